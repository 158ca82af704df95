"""How many tokens/s can the HTTP front end of `blockrt serve` stream? A measurement of the
plumbing alone: the engine process runs a FAKE generator (no model, no GPU) that gives every
running request one block of 4 tokens per round and sleeps `--round-ms` per round (as a GPU round
would, without holding the GIL). The real front end (FastAPI/uvicorn, the pipe, SSE) and the real
load generator (`blockrt.runtime.serve.loadgen`) run unchanged, so the served tokens/s against the
fake's ideal rate (streams x 4 / round time) is the front end's ceiling on this machine.

    python samples/front_end_ceiling.py --clients 1024 --round-ms 33 --max-tokens 1024
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import json
import time
from types import SimpleNamespace

from blockrt.generation import RequestLimits
from blockrt.runtime.generator import Request, TokenEvent
from blockrt.runtime.serve import ModelSpec, Server, create_app
from blockrt.runtime.serve.loadgen import Load, run_load, table

BLOCK = 4


class FakeGenerator:
    """A stand-in for `Generator` (same methods the engine core calls): no model, fixed round time."""

    def __init__(self, capacity: int, round_s: float):
        self.capacity, self.round_s = capacity, round_s
        self.queue: collections.deque[Request] = collections.deque()
        self.rows: list[Request] = []
        self.limits = RequestLimits(50304, BLOCK, 1 << 20, 0, stop_slots=8)
        self._ids = itertools.count()

    def add(self, prompt, config) -> Request:
        request = Request(next(self._ids), list(prompt), config, submitted_at=time.perf_counter())
        self.queue.append(request)
        return request

    def cancel(self, request: Request) -> None:
        request.finish_reason = request.finish_reason or "cancelled"
        if request in self.queue:
            self.queue.remove(request)

    @property
    def waiting(self) -> list[Request]:
        return list(self.queue)

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def has_work(self) -> bool:
        return bool(self.queue or any(not r.finished for r in self.rows))

    def reset(self) -> None:
        self.queue.clear()
        self.rows = []

    def step(self) -> list[TokenEvent]:
        self.rows = [r for r in self.rows if not r.finished]
        while self.queue and len(self.rows) < self.capacity:
            self.rows.append(self.queue.popleft())
        time.sleep(self.round_s)
        events = []
        for r in self.rows:
            new = [7] * min(BLOCK, r.config.max_new_tokens - len(r.tokens))
            r.tokens += new
            if len(r.tokens) >= r.config.max_new_tokens:
                r.finish_reason = "length"
            events.append(TokenEvent(r, new, r.finished))
        return events


def fake_model(capacity: int, round_s: float):
    generator = FakeGenerator(capacity, round_s)
    return SimpleNamespace(max_batch=capacity, tokenizer=None, directory=None, backend="fake", device="cpu",
                           generator=lambda: generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--round-ms", type=float, default=33.0, help="Fake round time (an H100 round at 1024 rows: ~33 ms).")
    parser.add_argument("--client-processes", type=int, default=4)
    args = parser.parse_args()
    spec = ModelSpec(factory=functools.partial(fake_model, args.clients, args.round_ms / 1e3), name="fake")
    with Server(create_app(spec, max_queue=args.clients)) as server:
        load = Load(clients=args.clients, requests=args.requests, prompt_len=16, max_tokens=args.max_tokens)
        lag = server.app.state.blockrt.metrics.loop_lag
        summary = run_load(server.url, load, args.client_processes)
        samples = {s.name: s.value for m in lag.collect() for s in m.samples}
    ideal = args.clients * BLOCK / (args.round_ms / 1e3)
    print(table(summary))
    print(f"fake engine ideal: {ideal:,.0f} tok/s; served {summary['output_tokens_per_s']:,.0f} tok/s "
          f"({100 * summary['output_tokens_per_s'] / ideal:.0f}%); SSE events/s about "
          f"{summary['output_tokens_per_s'] / BLOCK:,.0f}; mean event-loop lag "
          f"{1e3 * samples['blockrt_event_loop_lag_seconds_sum'] / samples['blockrt_event_loop_lag_seconds_count']:.2f} ms")
    print(json.dumps({"ideal_tok_s": ideal, **summary}))


if __name__ == "__main__":
    main()
