"""`blockrt bench`: throughput and latency of a model, side by side with baselines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from blockrt.backends import BACKENDS
from blockrt.graphs.contract import DTYPES
from blockrt.graphs.qdq import KV_CACHE_DTYPES, QUANT_MODES
from blockrt.parsing import parse_int_list

from .options import compile_option

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
@compile_option
@click.option("--profile", is_flag=True,
              help="Also log the heaviest GPU kernels of a short run (torch.profiler), and each engine step's "
                   "kernels per call (JSON 'kernels'). A mid-context profile: --prompt-len 1152 --gen-len 16.")
@click.option("--serve", "serve", is_flag=True, help="Benchmark `blockrt serve` on loopback against the offline engine "
              "on the same workload (--clients streams x --requests each, --prompt-len, --gen-len).")
@click.option("--clients", default="256", show_default=True, metavar="N[,N...]",
              help="--serve: concurrent streams (a comma-separated list runs each in turn).")
@click.option("--requests", type=click.IntRange(1), default=2, show_default=True,
              help="--serve: requests per stream, one after another.")
@click.option("--client-processes", type=click.IntRange(1), default=4, show_default=True,
              help="--serve: processes the load generator spreads its clients over.")
@click.option("--offline/--no-offline", default=True, show_default=True,
              help="--serve: also run the offline engine on the same workload (for the ratio).")
@click.option("--http-workers", type=click.IntRange(1), default=1, show_default=True,
              help="--serve: HTTP worker processes of the server (blockrt serve --http-workers).")
@click.option("--devices", default=None, metavar="LIST", help="--serve: one engine per device, e.g. cuda:0,cuda:1.")
@click.option("--data-parallel", type=click.IntRange(1), default=None, metavar="N",
              help="--serve: shorthand for --devices cuda:0,...,cuda:N-1.")
@click.option("--trace-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="--serve: keep each engine's raw step trace of each run there (engine-N-STREAMS.json; the "
              "results always hold their summary). Otherwise: save the timeline of --profile's short run (implied) "
              "there, one gzipped Chrome trace per model, workload and batch (host calls and GPU kernels; Perfetto).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also save the JSON results here.")
def command(model, backend, dtype, workload, prompt_len, gen_len, batch, against, against_batch, quantize, kv_cache_dtype,
            device, compile_steps, profile, serve, clients, requests, client_processes, offline, http_workers, devices,
            data_parallel, trace_dir, as_json, out):
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

    \b
    Served vs offline (HTTP server on loopback, then Model.generate on the same workload):
      blockrt bench block_main_b4_1.2b --serve --clients 64,256,1024 --prompt-len 128 --gen-len 1024
    """
    if serve:
        _bench_serve(model, backend, dtype, device, devices, data_parallel, clients, requests, prompt_len or 128,
                     gen_len or 128, client_processes, offline, http_workers, compile_steps, trace_dir, as_json, out)
        return
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
    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)

    def save_so_far(results, hw) -> None:  # a long bench stopped midway keeps what it measured
        _write(out, to_json(results, hw, []))

    results, hw, ratios = run_bench(targets, workloads, batch_specs, dtype, device, profile, compile_steps, quantize,
                                    kv_cache_dtype, trace_dir, on_result=save_so_far if out else None)
    if _saved(to_json(results, hw, ratios), out, as_json):
        return
    click.echo(hw.describe())
    click.echo(format_table(results))
    if ratios:
        click.echo(format_ratios(ratios))


def _bench_serve(model, backend, dtype, device, devices, data_parallel, clients, requests, prompt_len, gen_len,
                 client_processes, offline, http_workers, compile_steps, trace_dir, as_json, out) -> None:
    from blockrt.errors import UserError, require
    from blockrt.exporter import PRESETS, get_preset
    from blockrt.generation import padded_len

    from .serve import engine_specs

    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "serve", "blockrt bench --serve")
    from blockrt.runtime.serve.bench import bench_serve, format_serve

    counts = parse_int_list(clients, "--clients", minimum=1, item="stream count")
    preset = model if model in PRESETS else None
    artifact = None if preset else Path(model)
    if artifact is not None and not artifact.is_dir():
        raise UserError(f"{model} is neither a preset nor an artifact directory")
    # a preset is built in the engine processes for this workload; an artifact brings its own context
    context = padded_len(prompt_len, get_preset(preset).block_len) + gen_len if preset else 0
    specs = engine_specs(artifact, preset, backend, device, devices, data_parallel, None, dtype, context, compile_steps)
    from blockrt.runtime.bench import environment

    results = []
    data = {"environment": environment(), "results": results}
    for count in counts:
        results.append(bench_serve(specs, count, requests, prompt_len, gen_len, client_processes, offline,
                                   http_workers, trace_dir))
        log.info("%d streams: %s", count, format_serve(results[-1:]))  # also in the log, in case a later one fails
        if out:  # saved after every stream count: a run stopped midway keeps the ones it measured
            _write(out, data)
    if _saved(data, out, as_json):
        return
    click.echo(f"{specs[0].describe()}, prompt {prompt_len}, {gen_len} new tokens (EOS ignored), "
               f"{requests} requests per stream")
    click.echo(format_serve(results))


def _saved(data: dict, out: Path | None, as_json: bool) -> bool:
    """Save the results to --out; print them as JSON with --json (then True: no table)."""
    if out:
        _write(out, data)
        log.info("results saved to %s", out)
    if as_json:
        click.echo(json.dumps(data, indent=2, allow_nan=False))
    return as_json


def _write(out: Path, data: dict) -> None:
    out.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
