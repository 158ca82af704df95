"""`blockrt bench`: throughput and latency of a model, side by side with baselines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from blockrt.backends import BACKENDS
from blockrt.graphs.contract import DTYPES
from blockrt.graphs.qdq import KV_CACHE_DTYPES, QUANT_MODES

log = logging.getLogger("blockrt.bench")


@click.command("bench")
@click.argument("model")
@click.option("--backend", type=click.Choice(BACKENDS), default="torch", show_default=True,
              help="Engine for artifact directories (presets always run on the PyTorch engine; the results "
              "name the engine that ran).")
@click.option("--dtype", type=click.Choice(DTYPES), default="bf16", show_default=True,
              help="Weights and cache dtype for presets (artifacts keep their own).")
@click.option("--workload", type=click.Choice(["decode-heavy", "prefill-heavy", "both", "custom"]), default=None,
              help="decode-heavy: prompt 128, generate 2048; prefill-heavy: prompt 2048, generate 128; both "
              "(the default); custom: --prompt-len/--gen-len (implied by either). A named workload longer than an "
              "artifact's max context is shortened, with a warning.")
@click.option("--prompt-len", type=click.IntRange(1), default=None, help="Custom workload prompt tokens (default 128).")
@click.option("--gen-len", type=click.IntRange(1), default=None, help="Custom workload generated tokens (default 128).")
@click.option("--batch", default="auto", show_default=True,
              help="'auto' (the largest batch that fits GPU memory, at most the artifact's max batch; on a CPU at "
              "most 8) or a comma-separated sweep, e.g. 64,256,1024.")
@click.option("--against", multiple=True, metavar="MODEL|hf",
              help="Baseline run in the same process on the same workload: a preset or artifact directory "
              "(e.g. vanilla_410), 'hf:PRESET' for Hugging Face transformers generate on a vanilla preset's "
              "random weights, or 'hf' for transformers on the weights of the vanilla model (preset or artifact) "
              "given as MODEL or another --against. Repeatable.")
@click.option("--against-batch", multiple=True, metavar="SPEC",
              help="Batch spec for each --against, in order (default: same as --batch).")
@click.option("--quantize", type=click.Choice(QUANT_MODES),
              help="Quantize MODEL (a preset) in memory as `blockrt export --quantize` does, default calibration.")
@click.option("--kv-cache-dtype", type=click.Choice(KV_CACHE_DTYPES),
              help="FP8 KV cache for MODEL's block decoder (a preset; calibrated scales, fused decode attention on CUDA).")
@click.option("--device", default=None, help="cuda (default when available) or cpu.")
@click.option("--compile/--no-compile", "compile_steps", default=False, show_default=True,
              help="PyTorch backend on a GPU: run decode steps compiled by TorchInductor (faster; experimental: "
              "see README, Compiled fast path; kernels cached on disk, the first run compiles for minutes).")
@click.option("--profile", is_flag=True, help="Also log the heaviest GPU kernels of a short run (torch.profiler).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also save the JSON results here.")
def command(model, backend, dtype, workload, prompt_len, gen_len, batch, against, against_batch, quantize, kv_cache_dtype,
            device, compile_steps, profile, as_json, out):
    """Benchmark MODEL (a preset name or an artifact directory) and compare it with baselines.

    EOS is ignored so every sequence generates exactly the requested tokens. Reports time to first
    token, time per output token, output and total tokens/s, peak GPU memory, the GPU time of
    each engine step with the fraction of its hardware floor, and the host overhead.

    \b
    The paper's comparison on one GPU:
      blockrt bench block_main_b4_1.2b --against vanilla_410 --against hf \\
          --against-batch auto --against-batch 256 --out results.json
    On a CPU, in seconds:
      blockrt bench artifacts/tiny --against tiny_vanilla --against hf --prompt-len 16 --gen-len 32
    Quantized against unquantized, same run:
      blockrt bench block_main_b4_1.2b --quantize fp8 --kv-cache-dtype fp8 --against block_main_b4_1.2b \\
          --workload decode-heavy --against-batch auto
    """
    from blockrt.runtime.bench import (WORKLOADS, Target, format_ratios, format_table, run_bench, to_json)

    custom = prompt_len is not None or gen_len is not None
    if custom and workload not in (None, "custom"):
        raise click.BadParameter(f"--prompt-len/--gen-len set the lengths of a custom workload, not of {workload}; "
                                 f"drop --workload {workload}", param_hint="--workload")
    workload = workload or ("custom" if custom else "both")
    if workload == "both":
        workloads = [(name, *WORKLOADS[name]) for name in ("decode-heavy", "prefill-heavy")]
    elif workload == "custom":
        workloads = [("custom", prompt_len or 128, gen_len or 128)]
    else:
        workloads = [(workload, *WORKLOADS[workload])]
    if len(against_batch) > len(against):
        raise click.BadParameter("more --against-batch values than --against models", param_hint="--against-batch")
    targets = [Target(model, backend)] + [Target(a, backend) for a in against]
    batch_specs = [batch] + [against_batch[i] if i < len(against_batch) else batch for i in range(len(against))]
    results, hw, ratios = run_bench(targets, workloads, batch_specs, dtype, device, profile, compile_steps, quantize,
                                    kv_cache_dtype)
    data = to_json(results, hw, ratios)
    if out:
        out.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        log.info("results saved to %s", out)
    if as_json:
        click.echo(json.dumps(data, indent=2, allow_nan=False))
        return
    click.echo(hw.describe())
    click.echo(format_table(results))
    if ratios:
        click.echo(format_ratios(ratios))
