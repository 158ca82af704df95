"""`blockrt export`: a preset (random weights) or a checkpoint -> ONNX graphs + manifest.json."""

from __future__ import annotations

import json
from pathlib import Path

import click

from blockrt.errors import UserError
from blockrt.graphs.contract import CACHE_IO_MODES, DTYPES
from blockrt.graphs.qdq import KV_CACHE_DTYPES, QUANT_MODES

from .options import positions_option


@click.command("export")
@click.option("--preset", help="Model preset (see `blockrt presets`): random weights from --seed, or, with "
              "--checkpoint, the config that overrides the checkpoint's own.")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Block model.safetensors (file or directory) or a Pythia/Hugging Face directory.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random weights (with --preset alone).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Artifact directory to write (created; an existing artifact there is replaced).")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
              help="Precision of the graphs' weights, activations and caches (logits stay fp32).")
@click.option("--max-batch", default=8, show_default=True, type=int,
              help="Most sequences one step may run; engine profiles and runtime buffers are sized by it.")
@click.option("--max-context", default=2048, show_default=True, type=int,
              help="Most tokens (prompt, padded to a block, + generated) a sequence may hold; sizes the caches.")
@click.option("--cache-io", type=click.Choice(CACHE_IO_MODES), default="inplace", show_default=True,
              help="inplace: static caches updated with TensorScatter (TensorRT >= 10.15 updates them in place); "
              "concat: present = concat(past, new), for older engines.")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="tokenizer.json (or a directory holding one) to copy into the artifact for text prompts.")
@positions_option
@click.option("--quantize", type=click.Choice(QUANT_MODES),
              help="Quantize the linear layers (ONNX QDQ): fp8 = FP8 E4M3 weights (per-channel scales) and activations "
              "(calibrated per-tensor scales); int8-wo / int4-wo = weight-only INT8 (per-channel) / INT4 (per group).")
@click.option("--kv-cache-dtype", type=click.Choice(KV_CACHE_DTYPES),
              help="Store the block decoder's KV cache in FP8 (not in exported graphs yet: a clear error says so).")
@click.option("--group-size", default=128, show_default=True, type=int,
              help="int4-wo: input rows per scale (smaller where a layer has fewer inputs).")
@click.option("--calibration-prompts", type=click.Path(path_type=Path),
              help="fp8: JSONL prompts (token-id lists, or text with --tokenizer) whose activations set the scales "
              "(default: 16 deterministic random sequences of 64 tokens).")
@click.option("--force", is_flag=True, help="Replace --out even if it is a non-empty directory that is not an artifact.")
@click.option("--json", "as_json", is_flag=True, help="Print the written manifest as JSON.")
def command(preset, checkpoint, seed, out_dir, dtype, max_batch, max_context, cache_io, tokenizer, positions, quantize,
            kv_cache_dtype, group_size, calibration_prompts, force, as_json) -> None:
    """Export a model to ONNX (opset 24) graphs with explicit KV-cache inputs and outputs.

    Writes into --out: block_decoder.onnx + token_decoder.onnx (Block Transformer) or decoder.onnx
    (vanilla), weights.safetensors (used by `blockrt verify` and the PyTorch backend), and
    manifest.json naming every graph input and output, the limits and each file's SHA-256. The
    directory appears only once everything is written and checked.

    \b
    Examples:
      blockrt export --preset tiny_block --out artifacts/tiny
      blockrt export --preset block_main_b4_85 --dtype fp16 --max-batch 64 --out artifacts/b85
      blockrt export --checkpoint ckpt/model.safetensors --tokenizer tokenizer.json --out artifacts/main
      blockrt export --preset tiny_vanilla --cache-io concat --max-context 512 --out artifacts/vanilla
      blockrt export --preset block_main_b4_85 --dtype fp16 --quantize fp8 --out artifacts/b85-fp8
    Next: `blockrt verify DIR`, then `blockrt build DIR` for TensorRT engines.
    """
    from blockrt.exporter.export import export

    if preset is None and checkpoint is None:
        raise UserError("no model: pass --preset NAME (random weights) or --checkpoint PATH")
    if checkpoint is not None:
        from blockrt.exporter.checkpoint import load_checkpoint

        model, source = load_checkpoint(checkpoint, config=preset, dtype=dtype), str(checkpoint)
    else:
        model, source = preset, None
    calibration = None
    if calibration_prompts is not None:
        from .options import read_prompts_file

        calibration = read_prompts_file(calibration_prompts, "--calibration-prompts")
    manifest = export(model, out_dir, dtype=dtype, max_batch=max_batch, max_context=max_context, cache_io=cache_io,
                      seed=seed, source=source, tokenizer=tokenizer, force=force, positions=positions, quantize=quantize,
                      kv_cache_dtype=kv_cache_dtype, group_size=group_size, calibration_prompts=calibration,
                      **({"calibration_source": calibration_prompts.name} if calibration_prompts else {}))
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2))
    else:
        graphs = ", ".join(g.file.path for g in manifest.graphs.values())
        quant = f", {quantize}" if quantize else ""
        click.echo(f"exported {out_dir}: {graphs} ({dtype}{quant}, {cache_io} caches, batch <= {max_batch}, "
                   f"context <= {max_context})")
