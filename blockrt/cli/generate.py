"""`blockrt generate`: generate with the PyTorch reference model, from a preset or a checkpoint.

This is the semantics every export and engine is checked against; it needs no export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import click

from blockrt.errors import UserError
from blockrt.graphs.contract import DTYPES
from blockrt.tokenizer import load_tokenizer

from .options import generation_config, parse_ids, positions_option, sampling_options

log = logging.getLogger("blockrt.generate")


@click.command("generate")
@click.option("--preset", help="Model preset with random weights (see `blockrt presets`); with --checkpoint, "
              "the config that overrides the checkpoint's own.")
@click.option("--checkpoint", type=click.Path(path_type=Path),
              help="Block model.safetensors (file or directory) or a Pythia/Hugging Face directory.")
@click.option("--prompt-ids", "prompt_ids", multiple=True, metavar="IDS",
              help="Comma-separated token ids of one prompt; repeat for a batch.")
@click.option("--prompt", "prompt_texts", multiple=True, metavar="TEXT",
              help="Prompt text, encoded with --tokenizer; repeat for a batch (after any --prompt-ids).")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="tokenizer.json (Hugging Face tokenizers format) for --prompt and to decode the output.")
@sampling_options
@click.option("--pad-token-id", type=int, default=None,
              help="Id that left-pads prompts to a block boundary (default: the model config's, 0).")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True)
@positions_option
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list with prompt and generated ids per prompt.")
def command(preset, checkpoint, prompt_ids, prompt_texts, tokenizer, pad_token_id, dtype, positions, device, as_json,
            **sampling) -> None:
    """Generate tokens with the PyTorch reference model (no export needed).

    \b
    Examples:
      blockrt generate --preset tiny_block --prompt-ids 1,2,3 --prompt-ids 4,5 --max-new-tokens 8
      blockrt generate --checkpoint ckpt/ --tokenizer tokenizer.json --prompt "Hello" --json
    """
    from blockrt.exporter.checkpoint import load_model
    from blockrt.exporter.generate import generate

    if preset is None and checkpoint is None:
        raise UserError("no model: pass --preset NAME (random weights) or --checkpoint PATH")
    if not prompt_ids and not prompt_texts:
        raise UserError("no prompt: pass --prompt-ids 1,2,3 or --prompt TEXT with --tokenizer")
    if prompt_texts and tokenizer is None:
        raise UserError("--prompt needs --tokenizer tokenizer.json to turn the text into token ids")
    tok = load_tokenizer(tokenizer, "--tokenizer") if tokenizer is not None else None
    prompts = [parse_ids(p, "--prompt-ids") for p in prompt_ids] + [tok.encode(t).ids for t in prompt_texts]
    config = dataclasses.replace(generation_config(**sampling), positions=positions)
    seed = config.seed

    model = load_model(checkpoint, preset, dtype=dtype, device=device, seed=seed, pad_token_id=pad_token_id)
    source = f"checkpoint {checkpoint}" if checkpoint is not None else f"preset {preset} (random weights, seed {seed})"
    log.info("model: %s, %s, %s on %s", source, model.config.kind, dtype, device)
    start = time.perf_counter()
    out = generate(model, prompts, config)
    seconds = time.perf_counter() - start
    log.info("generated %d tokens for %d prompt(s) in %.2f s", sum(map(len, out.tokens)), len(prompts), seconds)

    results = []
    for prompt, tokens, reason in zip(prompts, out.tokens, out.finish_reasons):
        row = {"prompt_ids": prompt, "token_ids": tokens, "finish_reason": reason}
        if tok is not None:
            row["text"] = tok.decode(tokens)
        results.append(row)
    if as_json:
        click.echo(json.dumps(results))
        return
    for i, row in enumerate(results):
        click.echo(f"[{i}] prompt:    {' '.join(map(str, row['prompt_ids']))}")
        click.echo(f"[{i}] generated: {' '.join(map(str, row['token_ids']))} ({row['finish_reason']})")
        if "text" in row:
            click.echo(f"[{i}] text:      {row['text']!r}")
