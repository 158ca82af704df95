"""Where the GPU time of a generation goes, kernel by kernel and engine step by engine step
(torch.profiler), for `blockrt bench --profile`.

`profile_kernels` runs a short generation under the profiler with every engine step (and sampling)
named by a `record_function` range (`Generator.annotate_steps`), exports its timeline as a Chrome
trace, and reads it back with `step_kernels`: each GPU kernel belongs to the step whose range
launched it (matched through the launch's correlation id: a CUDA graph replay's kernels all carry
its `cudaGraphLaunch`'s), so the kernels inside captured graphs are attributed too. The result says,
per step, how long one call spends in each kernel: what a step's distance from its hardware floor
is made of.
"""

from __future__ import annotations

import bisect
import gzip
import json
import logging
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")  # cudaLaunchKernel, cudaGraphLaunch, cuLaunchKernelEx (Triton)
NAME_WIDTH = 90


@dataclass
class KernelShare:
    name: str
    per_call: float  # launches of this kernel per call of the step
    us_per_call: float  # GPU microseconds per call of the step
    share: float  # of the step's kernel time


@dataclass
class StepKernels:
    step: str
    calls: int
    us_per_call: float  # GPU kernel time of one call (sum of its kernels' durations)
    kernels: list[KernelShare]


def step_kernels(trace: dict, steps: tuple[str, ...]) -> list[StepKernels]:
    """Per step named in `steps` (a `record_function` range name), the kernels its calls ran, from a
    Chrome trace of torch.profiler (`export_chrome_trace`), heaviest first."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    ranges = defaultdict(list)  # thread -> [(start, end, step)] of the step ranges, sorted by start
    calls = defaultdict(int)
    for e in events:
        if e.get("cat") == "user_annotation" and e["name"] in steps:
            ranges[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"], e["name"]))
            calls[e["name"]] += 1
    starts = {}
    for thread, spans in ranges.items():
        spans.sort()
        starts[thread] = [s for s, _, _ in spans]
    step_of_launch = {}  # correlation id -> step
    for e in events:
        correlation = e.get("args", {}).get("correlation")
        thread = (e.get("pid"), e.get("tid"))
        if e.get("cat") not in LAUNCH_CATEGORIES or correlation is None or thread not in ranges:
            continue
        spans = ranges[thread]
        i = bisect.bisect_right(starts[thread], e["ts"]) - 1
        # ranges do not nest here (one step at a time): the latest one started is the only candidate
        if i >= 0 and spans[i][0] <= e["ts"] <= spans[i][1]:
            step_of_launch[correlation] = spans[i][2]
    time_us = defaultdict(lambda: defaultdict(float))
    launches = defaultdict(lambda: defaultdict(int))
    for e in events:
        if e.get("cat") != "kernel":
            continue
        step = step_of_launch.get(e.get("args", {}).get("correlation"))
        if step is not None:
            time_us[step][e["name"]] += e["dur"]
            launches[step][e["name"]] += 1
    result = []
    for step in steps:
        if not calls[step]:
            continue
        n, total = calls[step], sum(time_us[step].values())
        kernels = [KernelShare(name, launches[step][name] / n, us / n, us / total if total else 0.0)
                   for name, us in sorted(time_us[step].items(), key=lambda kv: -kv[1])]
        result.append(StepKernels(step, n, total / n, kernels))
    return result


def format_step_kernels(breakdown: list[StepKernels], rows: int = 12) -> str:
    """A table per step: its heaviest kernels, per call of the step."""
    lines = []
    for s in breakdown:
        lines.append(f"{s.step}: {s.calls} calls, {s.us_per_call / 1e3:.3f} ms of kernels per call, "
                     f"{sum(k.per_call for k in s.kernels):.0f} launches per call")
        lines.append(f"  {'us/call':>9} {'share':>6} {'n/call':>6}  kernel")
        for k in s.kernels[:rows]:
            lines.append(f"  {k.us_per_call:9.1f} {100 * k.share:5.1f}% {k.per_call:6.1f}  {k.name[:NAME_WIDTH]}")
        rest = s.kernels[rows:]
        if rest:
            lines.append(f"  {sum(k.us_per_call for k in rest):9.1f} {100 * sum(k.share for k in rest):5.1f}% "
                         f"{sum(k.per_call for k in rest):6.1f}  ({len(rest)} other kernels)")
    return "\n".join(lines)


def profile_kernels(model, prompts: list[list[int]], gen_len: int, rows: int = 30,
                    trace: Path | None = None) -> tuple[str, list[StepKernels]]:
    """The heaviest GPU kernels of a short generation from `prompts` (after a warm-up), overall and per
    engine step; `trace`: also keep its timeline there (Chrome trace JSON, gzipped if the name ends
    in .gz: host calls and GPU kernels, for Perfetto or chrome://tracing). The profiler stays
    attached to CUDA after it stops (Kineto leaves CUPTI initialized: pytorch/pytorch#144455), which
    slowed every later run of the process on an H100 (prefill-heavy host overhead 7.9% -> 23.7%), so
    `blockrt bench` profiles after each measured run, and marks runs measured after a profile."""
    from torch.profiler import ProfilerActivity, profile

    from blockrt.generation import GenerationConfig

    config = GenerationConfig(max_new_tokens=gen_len, ignore_eos=True)
    model.generate(prompts, config)
    gen = model.generator()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=trace is not None) as prof, \
            gen.annotate_steps():
        model.generate(prompts, config)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(trace) if trace is not None else Path(scratch) / "trace.json"
        prof.export_chrome_trace(str(path))
        if trace is not None:
            log.info("timeline saved to %s", trace)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            breakdown = step_kernels(json.load(f), gen.STEP_NAMES)
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70)
    return table, breakdown
