"""`blockrt bench`: throughput and latency of a model, side by side with baselines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from blockrt.graphs.contract import DTYPES

log = logging.getLogger("blockrt.bench")


@click.command("bench")
@click.argument("model")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch", show_default=True,
              help="Engine for artifact directories (presets always run on the PyTorch engine).")
@click.option("--dtype", type=click.Choice(DTYPES), default="bf16", show_default=True,
              help="Weights and cache dtype for presets (artifacts keep their own).")
@click.option("--workload", type=click.Choice(["decode-heavy", "prefill-heavy", "both", "custom"]), default="both",
              show_default=True, help="decode-heavy: prompt 128, generate 2048; prefill-heavy: prompt 2048, "
              "generate 128; custom: --prompt-len/--gen-len.")
@click.option("--prompt-len", type=click.IntRange(1), default=128, show_default=True, help="Custom workload prompt tokens.")
@click.option("--gen-len", type=click.IntRange(1), default=128, show_default=True, help="Custom workload generated tokens.")
@click.option("--batch", default="auto", show_default=True,
              help="'auto' (largest batch that fits GPU memory) or a comma-separated sweep, e.g. 64,256,1024.")
@click.option("--against", multiple=True, metavar="MODEL|hf",
              help="Baseline run in the same process on the same workload: a preset or artifact directory "
              "(e.g. vanilla_410), 'hf:PRESET' for Hugging Face transformers generate on a vanilla preset's "
              "random weights, or 'hf' for the weights of the vanilla model given with it. Repeatable.")
@click.option("--against-batch", multiple=True, metavar="SPEC",
              help="Batch spec for each --against, in order (default: same as --batch).")
@click.option("--device", default=None, help="cuda (default when available) or cpu.")
@click.option("--profile", is_flag=True, help="Also log the heaviest GPU kernels of a short run (torch.profiler).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also save the JSON results here.")
def command(model, backend, dtype, workload, prompt_len, gen_len, batch, against, against_batch, device, profile, as_json, out):
    """Benchmark MODEL (a preset name or an artifact directory) and compare it with baselines.

    EOS is ignored so every sequence generates exactly the requested tokens. Reports time to first
    token, time per output token, output and total tokens/s, peak GPU memory, the GPU time of
    each engine step with the fraction of its hardware floor, and the host overhead.

    \b
    The paper's comparison on one GPU:
      blockrt bench block_main_b4_1.2b --against vanilla_410 --against hf \\
          --against-batch auto --against-batch 256 --out results.json
    """
    from blockrt.runtime.bench import (WORKLOADS, Target, format_ratios, format_table, run_bench, to_json)

    if workload == "both":
        workloads = [(name, *WORKLOADS[name]) for name in ("decode-heavy", "prefill-heavy")]
    elif workload == "custom":
        workloads = [("custom", prompt_len, gen_len)]
    else:
        workloads = [(workload, *WORKLOADS[workload])]
    if len(against_batch) > len(against):
        raise click.BadParameter("more --against-batch values than --against models", param_hint="--against-batch")
    targets = [Target(model, backend)] + [Target(a, backend) for a in against]
    batch_specs = [batch] + [against_batch[i] if i < len(against_batch) else batch for i in range(len(against))]
    results, hw, ratios = run_bench(targets, workloads, batch_specs, dtype, device, profile)
    data = to_json(results, hw, ratios)
    if out:
        out.write_text(json.dumps(data, indent=2) + "\n")
        log.info("results saved to %s", out)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"{hw.device}: copy {hw.copy_bandwidth_gbs:,.0f} GB/s, matmul {hw.matmul_tflops:,.0f} TFLOP/s")
    click.echo(format_table(results))
    if ratios:
        click.echo(format_ratios(ratios))
