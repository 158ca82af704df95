"""Host-side traces of a generation loop, and where its time went.

`Trace(generator)` records every `Generator.step` (`StepTrace`) and every garbage collection of the
process from then until `stop()`; `result()` gives both as JSON-ready lists (an engine process of
`blockrt serve` writes them to a file). `step_summary` says where an engine's time went between two
instants: steps, waits for the device, host time, prefills, CUDA graph captures and stand-ins,
garbage collections. `blockrt bench` uses both for its offline runs, `blockrt bench --serve` for
every engine process.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import statistics
import time
import traceback

from .generator import Generator, StepTrace

TRACE_LIMIT = 1_000_000  # steps (and garbage collections) a trace keeps, the latest


SLOW_COLLECTION_S = 0.02  # a collection this long also records where it ran (its Python stack)


class _CollectorSpans:
    """gc callback: (start, end, generation) of each garbage collection, perf_counter seconds, and
    for slow ones (start, the stack that triggered it)."""

    def __init__(self):
        self.spans: collections.deque[tuple[float, float, int]] = collections.deque(maxlen=TRACE_LIMIT)
        self.slow: collections.deque[tuple[float, str]] = collections.deque(maxlen=100)
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            end = time.perf_counter()
            self.spans.append((self._start, end, info["generation"]))
            if end - self._start > SLOW_COLLECTION_S:
                self.slow.append((self._start, "".join(traceback.format_stack()[-16:-1])))  # innermost frames


class Trace:
    """Records `generator`'s steps and this process's garbage collections from now until `stop()`."""

    def __init__(self, generator: Generator):
        self.generator = generator
        generator.trace = collections.deque(maxlen=TRACE_LIMIT)
        self._collections = _CollectorSpans()
        gc.callbacks.append(self._collections)

    def result(self) -> dict:
        """{"steps": [StepTrace as a tuple, ...], "gc": [(start, end, generation), ...]} so far."""
        return {"steps": [dataclasses.astuple(t) for t in self.generator.trace or ()],
                "gc": list(self._collections.spans), "gc_slow": list(self._collections.slow)}

    def stop(self) -> dict:
        """Stop recording; what was recorded (`result`)."""
        result = self.result()
        if self._collections in gc.callbacks:
            gc.callbacks.remove(self._collections)
        self.generator.trace = None
        return result


def step_summary(trace: dict, start: float, end: float, batch: int) -> dict:
    """Where one engine's time went between `start` and `end` (perf_counter), from a `Trace.result()`:
    generator steps (each admits, launches a round and reads the previous one), the wait for the
    device within them, the host time between them (a server's engine loop: commands and output),
    prefills, CUDA graph captures (and calls run on a larger graph instead) and garbage collections.
    `full_batch_*`: steps with at least 95% of `batch` rows and no prefill, the steady state of a
    decode-bound run. `gc_slow_stacks`: where each collection longer than SLOW_COLLECTION_S ran."""
    steps = [StepTrace(*row) for row in trace["steps"] if start <= row[0] <= end]
    gcs = [(b - a, generation) for a, b, generation in trace["gc"] if start <= a <= end]
    collections_ = {"gc_ms": 1e3 * sum(d for d, _ in gcs), "gc_full": sum(1 for _, g in gcs if g == 2),
                    "gc_max_ms": 1e3 * max((d for d, _ in gcs), default=0.0),
                    "gc_slow_stacks": [stack for t, stack in trace.get("gc_slow", ()) if start <= t <= end]}
    if len(steps) < 2:
        return {"steps": len(steps), **collections_}
    pairs = list(zip(steps, steps[1:]))
    full = [b.start - a.start for a, b in pairs if a.rows >= 0.95 * batch and a.joined == 0]

    def ms(values) -> float | None:
        return 1e3 * statistics.fmean(values) if values else None

    return {"steps": len(steps), "step_ms": ms([b.start - a.start for a, b in pairs]),
            "full_batch_steps": len(full), "full_batch_step_ms": ms(full),
            "full_batch_step_p50_ms": 1e3 * statistics.median(full) if full else None,
            "host_ms": ms([t.end - t.start - t.waited for t in steps]), "device_wait_ms": ms([t.waited for t in steps]),
            "between_steps_ms": ms([b.start - a.end for a, b in pairs]),
            "prefills": sum(t.prefills for t in steps), "joined": sum(t.joined for t in steps),
            "moved_rows": sum(t.moved for t in steps), "graphs_captured": steps[-1].graphs - steps[0].graphs,
            "graph_stand_ins": steps[-1].stand_ins - steps[0].stand_ins, **collections_}
