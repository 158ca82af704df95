"""`blockrt bench --serve`: the served throughput of a model next to the offline engine's, on the
same workload in the same run, so the ratio is always measured side by side.

1. `blockrt serve`'s stack starts on loopback (HTTP in this process, or in --http-workers processes; one
   engine process per device).
2. A warm-up load (every client, one request) captures the CUDA graphs the run needs; then the
   measured load: `clients` streams x `requests` each (loadgen.py, several client processes).
3. The server stops and the offline engine (`Model.generate`, one process per device, batch = the
   streams per device) runs the same number of prompts of the same lengths, after its own warm-up.

Both report output tokens/s over the wall time and per-request TTFT / TPOT percentiles
(TPOT = (end - first token) / (tokens - 1)), and where each engine's time went during the run
(`step_summary`: generator steps, waiting for the device, host time, prefills, CUDA graph captures,
garbage collections).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import tempfile
import time
from pathlib import Path
from dataclasses import replace

from blockrt.runtime.bench import text_table
from blockrt.runtime.tracing import Trace, step_summary

from .core import ModelSpec
from .loadgen import Load, percentiles, run_load

log = logging.getLogger(__name__)


def _offline_process(spec: ModelSpec, prompts: int, prompt_len: int, gen_len: int, out) -> None:
    from blockrt.generation import GenerationConfig
    from blockrt.runtime.bench import random_prompts

    model = spec.load()
    ids = random_prompts(prompts, prompt_len, min(model.config.vocab_size, 500))
    config = GenerationConfig(max_new_tokens=gen_len, ignore_eos=True)
    model.generate(ids[:model.max_batch], config)  # warm-up: captures the CUDA graphs
    out.send("ready")
    out.recv()  # every device starts together
    trace = Trace(model.generator())
    start = time.perf_counter()
    results = model.generate(ids, config)
    end = time.perf_counter()
    out.send({"start": start, "end": end, "trace": trace.stop(), "tokens": sum(len(r.token_ids) for r in results),
              "ttft": [r.time_to_first_token_s for r in results],
              "tpot": [(r.latency_s - r.time_to_first_token_s) / (len(r.token_ids) - 1) for r in results
                       if len(r.token_ids) > 1]})


def bench_offline(specs: list[ModelSpec], prompts: int, prompt_len: int, gen_len: int,
                  trace_path: Path | None = None) -> dict:
    """`prompts` prompts split over one offline engine process per spec, run at the same time;
    `trace_path` (with `{}` for the engine's index) keeps each engine's raw step trace."""
    batch = specs[0].max_batch
    context = multiprocessing.get_context("spawn")
    workers, pipes = [], []
    share, extra = divmod(prompts, len(specs))
    for i, spec in enumerate(specs):
        mine, theirs = context.Pipe()
        worker = context.Process(target=_offline_process, args=(spec, share + (i < extra), prompt_len, gen_len, theirs), daemon=True)
        worker.start()
        theirs.close()
        workers.append(worker)
        pipes.append(mine)
    try:
        for pipe in pipes:
            if pipe.recv() != "ready":
                raise RuntimeError("an offline engine process failed to start")
        for pipe in pipes:
            pipe.send("go")
        parts = [pipe.recv() for pipe in pipes]
    except EOFError:
        raise RuntimeError("an offline engine process failed; see its log above") from None
    finally:
        for worker in workers:
            worker.join(60)
    if trace_path is not None:
        for i, p in enumerate(parts):
            Path(str(trace_path).format(i)).write_text(json.dumps(p["trace"]))
    wall = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    return {"wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            "ttft_s": percentiles([t for p in parts for t in p["ttft"]]),
            "tpot_s": percentiles([t for p in parts for t in p["tpot"]]),
            "engine_steps": [step_summary(p["trace"], p["start"], p["end"], batch) for p in parts]}


def bench_serve(specs: list[ModelSpec], clients: int, requests: int, prompt_len: int, gen_len: int,
                client_processes: int = 4, offline: bool = True, http_workers: int = 1,
                trace_dir: Path | None = None) -> dict:
    """Served vs offline on one workload; a dict with both summaries and their ratios.
    `http_workers` > 1: the server's HTTP side in that many processes (`Workers`). Each engine
    process traces its steps (`step_summary` of the measured load in "engine_steps"); `trace_dir`
    keeps the raw traces (engine-N-STREAMS.json)."""
    with tempfile.TemporaryDirectory() as scratch:
        where = Path(trace_dir or scratch)
        where.mkdir(parents=True, exist_ok=True)
        traces = [where / f"engine-{i}-{clients}.json" for i in range(len(specs))]
        per_device = math.ceil(clients / len(specs))
        specs = [replace(s, max_batch=per_device, trace=str(t)) for s, t in zip(specs, traces)]
        return _bench_serve(specs, traces, clients, requests, prompt_len, gen_len, client_processes, offline,
                            http_workers, Path(trace_dir) if trace_dir else None)


def _bench_serve(specs: list[ModelSpec], traces: list[Path], clients: int, requests: int, prompt_len: int,
                 gen_len: int, client_processes: int, offline: bool, http_workers: int, trace_dir: Path | None) -> dict:
    from .app import Server, Workers, create_app

    per_device = specs[0].max_batch
    load = Load(clients=clients, requests=requests, prompt_len=prompt_len, max_tokens=gen_len)
    log.info("serving %s on %d engine(s), batch %d each, %d HTTP process(es)", specs[0].describe(), len(specs),
             per_device, http_workers)
    if http_workers > 1:
        server = Workers(specs, http_workers, max_queue=clients)
    else:
        server = Server(create_app(specs, max_queue=clients))
    with server:
        log.info("warm-up: %d clients x 1 request", clients)
        run_load(server.url, replace(load, requests=1, seed=1), client_processes)
        log.info("measured: %d clients x %d requests, prompt %d, %d new tokens", clients, requests, prompt_len, gen_len)
        if http_workers == 1:
            before = server.app.state.blockrt.metrics.loop_lag_sum_count()
        served = run_load(server.url, load, client_processes)
        if http_workers == 1:
            after = server.app.state.blockrt.metrics.loop_lag_sum_count()
            served["event_loop_lag_mean_s"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
    if http_workers > 1:  # the workers report at their end: warm-up and measured load together
        lag_sum, samples = (sum(column) for column in zip(*server.loop_lag))
        served["event_loop_lag_mean_s"] = lag_sum / max(1.0, samples)
    if served["failed"]:
        raise RuntimeError(f"{sum(served['failed'].values())} served requests failed ({served['failed']}): "
                           f"{served['first_error']}")
    served["engine_steps"] = [step_summary(json.loads(t.read_text()), *served["window"], per_device) for t in traces]
    result = {"model": specs[0].describe(), "devices": [s.device for s in specs], "http_workers": http_workers,
              "clients": clients,
              "requests_per_client": requests, "prompt_len": prompt_len, "gen_len": gen_len, "batch_per_engine": per_device,
              "served": served}
    if offline:
        log.info("offline: %d prompts on %d engine(s), batch %d each", clients * requests, len(specs), per_device)
        off = bench_offline([replace(s, trace=None) for s in specs], clients * requests, prompt_len, gen_len,
                            trace_dir and trace_dir / f"offline-{{}}-{clients}.json")
        result["offline"] = off
        result["ratio"] = {"output_tokens_per_s": served["output_tokens_per_s"] / off["output_tokens_per_s"],
                           "tpot_p50": served["tpot_s"]["p50"] / off["tpot_s"]["p50"]}
    return result


def format_serve(results: list[dict]) -> str:
    """One table: served and offline rows per workload, with the ratio."""
    head = ["streams", "engines", "HTTP procs", "run", "out tok/s", "ratio", "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms",
            "TPOT p99 ms", "HTTP loop lag ms"]
    rows = []
    for r in results:
        for run in ("served", "offline"):
            if run not in r:
                continue
            x = r[run]
            ratio = f"{100 * r['ratio']['output_tokens_per_s']:.0f}%" if run == "served" and "ratio" in r else ""
            rows.append([f"{r['clients']}x{r['requests_per_client']}", str(len(r["devices"])), str(r["http_workers"]),
                         run,
                         f"{x['output_tokens_per_s']:,.0f}", ratio, f"{x['ttft_s']['p50']:.3f}", f"{x['ttft_s']['p99']:.3f}",
                         f"{1e3 * x['tpot_s']['p50']:.2f}", f"{1e3 * x['tpot_s']['p99']:.2f}",
                         f"{1e3 * x['event_loop_lag_mean_s']:.2f}" if "event_loop_lag_mean_s" in x else ""])
    steps_head = ["streams", "run", "engine", "steps", "step ms", "full-batch step ms (n)", "host ms", "device wait ms",
                  "between steps ms", "prefills (joined)", "graphs captured (stand-ins)", "gc ms (full)"]
    steps_rows = []
    for r in results:
        for run in ("served", "offline"):
            for i, e in enumerate(r.get(run, {}).get("engine_steps", [])):
                if e["steps"] < 2:
                    continue
                ms = {k: "-" if e[k] is None else f"{e[k]:.2f}" for k in ("step_ms", "full_batch_step_ms", "host_ms",
                                                                          "device_wait_ms", "between_steps_ms")}
                steps_rows.append([f"{r['clients']}x{r['requests_per_client']}", run, str(i), str(e["steps"]),
                                   ms["step_ms"], f"{ms['full_batch_step_ms']} ({e['full_batch_steps']})", ms["host_ms"],
                                   ms["device_wait_ms"], ms["between_steps_ms"], f"{e['prefills']} ({e['joined']})",
                                   f"{e['graphs_captured']} ({e['graph_stand_ins']})", f"{e['gc_ms']:.1f} ({e['gc_full']})"])
    return text_table(head, rows) + ("\n\nengine steps during the run:\n" + text_table(steps_head, steps_rows) if steps_rows else "")

