"""The generation loop: block steps and token steps over a batch of sequences, on the device.

A `Generator` owns every buffer of a fixed number of rows (`capacity`): the KV caches, positions,
sampling parameters and the per-row prefix (block models) or logits (vanilla models). Work goes
in *rounds*; a round is one block: L token steps (sampling on the device after each), then one
block step that folds the finished block into the block decoder's cache. A vanilla model's round
is up to `VANILLA_ROUND` decode steps.

- Sequences join between rounds (prefill of their prompt blocks on rows of their own) and leave
  between rounds (finished rows are compacted away), so finished sequences stop costing work and a
  server can batch continuously.
- Within a round nothing waits for the host. Each round's tokens are copied to pinned host memory
  asynchronously; the host reads round r while the device runs round r + 1 (stop checks, streaming)
  so a finished row does at most one extra round of work.
- Every row is independent: its own positions, cache rows, masks and random stream, so its tokens
  equal what it would get alone.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from blockrt.exporter.config import TORCH_DTYPES
from blockrt.generation import (GenerationConfig, RequestLimits, SamplingState, check_request, mark_seen, sample,
                                to_device)
from blockrt.graphs.manifest import Manifest

from .engine import SPEC_DTYPES, Engine, local_position, prefill_inputs

VANILLA_ROUND = 8  # decode steps per round of a vanilla model
PIPELINE_DEPTH = 1  # rounds launched ahead of the one the host reads


@dataclass(eq=False)  # a request is itself: compared and hashed by identity (its prompt is an array)
class Request:
    """One sequence: its prompt, parameters, output so far and timing (host clock, seconds)."""

    id: int
    prompt: np.ndarray  # int64 ids as given (before block padding), checked
    config: GenerationConfig
    stops: frozenset[int] = frozenset()  # ids that end it (stop ids and EOS unless ignored)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)  # one per row per round: a slotted instance is created ~4x faster
class TokenEvent:
    """New tokens of one request after a round (`finished` once it ends)."""

    request: Request
    tokens: list[int]
    finished: bool


@dataclass(slots=True)
class StepTrace:
    """Host timing of one `Generator.step` (perf_counter seconds; see `Generator.trace`)."""

    start: float
    launched: float  # compaction, admission (prefills) and the round's launch done
    end: float  # the oldest round's tokens read
    waited: float  # seconds of [launched, end] spent waiting for the device
    rows: int  # live rows after admission
    joined: int  # requests admitted (prefilled) in this step
    prefills: int  # prefill calls they took
    moved: int  # rows moved by compaction
    graphs: int  # CUDA graphs captured so far (all engines)
    stand_ins: int  # calls run on a larger captured graph so far (all engines)


@dataclass
class _Round:
    event: object  # torch.cuda.Event or None on CPU
    tokens: torch.Tensor  # host copy [n, K]
    rows: list[Request]


# Objects the interpreter keeps frozen by itself: 375 on CPython 3.12 from startup, 0 on 3.11 and 3.13.
# Counted as "nobody froze the heap": on 3.12 a test against 0 left generation's heap unfrozen
# (the H100 runs of the 2026-11-27 sessions, Python 3.12.3, still spent 160-320 ms in collections).
INTERPRETER_FROZEN = gc.get_freeze_count()


@contextlib.contextmanager
def collector_off_the_heap() -> Iterator[None]:
    """Within the block, no automatic garbage collection (`gc.disable()`), and every object that
    existed when it began (the model, compiled code, the caller's data) frozen (`gc.freeze()`), so
    that a collection someone asks for walks only what generation allocated; both undone at the end.
    A full collection of the whole heap stalls the host loop while the GPU finishes its round and
    then idles: the offline engine spent 1.1 s of a 15 s run in 4 full collections (H200,
    block_main_b4_1.2b bf16, 1024 x 2 requests of 1024 tokens). Freezing alone was not enough: an
    H100 run of fp8 + FP8 KV cache at 2368 rows still spent 1.9 s of 23.8 s in 3 full collections
    (the bf16 run of the same process: 0.1 s, none full). The loop makes no reference cycles of its
    own, so nothing piles up while the collector is off; what the caller's code makes in between
    (`stream`) is collected after. Where the heap is frozen already (an engine process of `blockrt
    serve` freezes it for good once its model is loaded), it stays frozen."""
    enabled = gc.isenabled()
    gc.disable()
    froze = gc.get_freeze_count() <= INTERPRETER_FROZEN  # else a caller froze the heap (for good: serve)
    if froze:
        gc.freeze()
    try:
        yield
    finally:
        if froze:
            # what generation made and keeps (the results) joins the old heap on its way back, so the
            # collector, once on again, does not walk it at the caller's next allocation: that walk was
            # 0.45 s of an H100 run's 22.1 s (fp8 + FP8 KV cache, 2368 rows x 2048 tokens), every row's
            # tokens, with the GPU idle
            gc.freeze()
            gc.unfreeze()
        if enabled:
            gc.enable()


def _batch_bucket(n: int, capacity: int) -> int:
    """Rows to run for n live rows: a few fixed sizes, so CUDA graphs are captured few times."""
    step = 8 if n <= 64 else 64
    return min(capacity, step * math.ceil(n / step))


class Generator:
    # what `record_timings` and `annotate_steps` name: prompt prefills, the main decoder's decode
    # steps (a block model's block decoder, a vanilla model's decoder), token steps, sampling
    STEP_NAMES = ("prefill", "block_decoder", "decoder", "token_decoder", "sampling")

    def __init__(self, manifest: Manifest, engines: dict[str, Engine], capacity: int, device: torch.device,
                 pad_rows: bool = False, prefill_budget: int = 65536):
        self.manifest, self.engines, self.capacity, self.device = manifest, engines, capacity, device
        self.config = manifest.model_config
        self.block = manifest.kind == "block"
        self.L = manifest.block_len if self.block else 1
        self.pad_rows = pad_rows
        self.prefill_budget = prefill_budget  # prompt positions (blocks or tokens) per prefill call
        self._timings: dict[str, list] | None = None  # see record_timings
        self._annotate = False  # see annotate_steps
        self.round_tokens = self.L if self.block else VANILLA_ROUND
        self.cache_len = manifest.limits.cache_len
        self.max_context = manifest.limits.max_context
        dtype = TORCH_DTYPES[manifest.dtype]
        main = self.config.block_decoder if self.block else self.config.decoder
        main_graph = manifest.graphs["block_decoder" if self.block else "decoder"]
        spare = engines["block_decoder" if self.block else "decoder"].spare_cache_rows
        self.caches = self._alloc(main, self.cache_len + spare, SPEC_DTYPES[main_graph.input("past_key_values.0.key").dtype])
        C = capacity
        if self.block:
            tok = self.config.token_decoder
            self.token_caches = self._alloc(tok, self.L + 1, dtype)
            self.prefix = torch.zeros(C, 2, tok.hidden_size, dtype=dtype, device=device)
            self.local_pos = [torch.full((C,), local_position(k), dtype=torch.long, device=device) for k in range(self.L)]
            self.first_ids = torch.zeros(C, 2, dtype=torch.long, device=device)
        else:
            self.logits = torch.zeros(C, self.config.vocab_size, dtype=torch.float32, device=device)
        self.past = torch.zeros(C, dtype=torch.long, device=device)  # cached blocks (tokens) per row
        self.generated = torch.zeros(C, dtype=torch.long, device=device)  # sampling stream position
        self.ones = torch.ones(C, dtype=torch.long, device=device)
        self.sampling = SamplingState(C, self.config.vocab_size, device, stop_width=8)
        self.limits = RequestLimits(self.config.vocab_size, self.L, self.max_context, self.config.eos_token_id,
                                    stop_slots=self.sampling.stop_ids.shape[1], positions=manifest.positions)
        self.rows: list[Request] = []  # live rows 0..n-1
        self.row_past: list[int] = []  # host mirror of self.past for live rows
        self.row_launched: list[int] = []  # tokens launched per live row
        self.queue: collections.deque[Request] = collections.deque()
        self.inflight: collections.deque[_Round] = collections.deque()
        self._ids = itertools.count()
        self._waited = 0.0  # seconds the current step waited for the device
        self.trace: collections.deque[StepTrace] | None = None  # set a deque to record every step's StepTrace

    def _alloc(self, stack, length: int, dtype) -> list[torch.Tensor]:
        shape = (self.capacity, stack.num_heads, length, stack.head_dim)
        return [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(2 * stack.num_layers)]

    # ---------------------------------------------------------------- requests
    def add(self, prompt: list[int], config: GenerationConfig) -> Request:
        """Queue a sequence; it joins at the next round. A request that `check_request` refuses
        raises RequestError (a UserError naming the field) and changes nothing."""
        ids = check_request(prompt, config, self.limits)
        request = Request(next(self._ids), ids, config, frozenset(config.stop_ids(self.config.eos_token_id)),
                          submitted_at=time.perf_counter())
        self.queue.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request; its row is freed at the next round."""
        if not request.finished:
            request.finish_reason, request.finished_at = "cancelled", time.perf_counter()
        if request in self.queue:
            self.queue.remove(request)

    @property
    def has_work(self) -> bool:
        return bool(self.queue or self.inflight or any(not r.finished for r in self.rows))

    @property
    def waiting(self) -> list[Request]:
        """Queued requests that have no row yet (cancelled ones excluded)."""
        return [r for r in self.queue if not r.finished]

    @property
    def running(self) -> int:
        """Rows generating now."""
        return sum(1 for r in self.rows if not r.finished)

    @contextlib.contextmanager
    def record_timings(self) -> Iterator[dict[str, list]]:
        """Within the block, bracket the device work of every engine step and of sampling with CUDA
        events: yields name -> [(start, end) events], filled as rounds run (read the times after a
        synchronize). On CPU nothing is recorded and the dict stays empty."""
        timings: dict[str, list] = {}
        self._timings = timings if self.device.type == "cuda" else None
        try:
            yield timings
        finally:
            self._timings = None

    @contextlib.contextmanager
    def annotate_steps(self) -> Iterator[None]:
        """Within the block, every engine step and sampling runs inside a `torch.profiler`
        `record_function` range named as in `STEP_NAMES` (for `blockrt.runtime.kernel_profile`)."""
        self._annotate = True
        try:
            yield
        finally:
            self._annotate = False

    def capture_graphs(self) -> int:
        """Capture the CUDA graphs of full-batch decode steps (the token steps, and the main step for
        every attend bucket up to the whole cache), so that every later decode step finds a graph:
        its own, or a larger one it runs on padded (`torch_engine.stand_in`). A server calls this
        at start, so its first burst does not stall on captures (each synchronizes the device and
        takes 100-400 ms at batch 1024) and compilation happens before it takes requests. Writes
        placeholder values into the caches: call it while no row is live. Returns the graphs
        captured (0 where the engines capture none: CPU, or CUDA graphs off)."""
        if self.rows or self.inflight:
            raise RuntimeError("capture_graphs needs a generator with no live rows")
        engines = list(self.engines.values())
        if not all(getattr(e, "cuda_graphs", False) for e in engines):  # only the PyTorch engine captures
            return 0
        before = sum(e.captures for e in engines)
        n = _batch_bucket(self.capacity, self.capacity) if self.pad_rows else self.capacity
        main = self.engines["block_decoder" if self.block else "decoder"]
        new_ids = torch.zeros(n, self.L, dtype=torch.long, device=self.device)
        caches = [c[:n] for c in self.caches]
        for attend in range(main.attend_bucket, self.cache_len + main.attend_bucket, main.attend_bucket):
            attend = min(attend, self.cache_len)  # smallest first: a larger bucket never stands in for it
            write = torch.full((n,), attend - 1, dtype=torch.long, device=self.device)
            self._main_step(new_ids, write, self.ones[:n], caches, attend_len=attend)
        if self.block:
            caches = [c[:n] for c in self.token_caches]
            for k in range(2):  # a block's first token step feeds 2 positions, the others 1
                ids = self.first_ids[:n] if k == 0 else self.first_ids[:n, :1]
                self.engines["token_decoder"]([ids, self.prefix[:n], self.local_pos[k][:n]], caches)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return sum(e.captures for e in engines) - before

    def reset(self) -> None:
        """Forget every request (after an error); the buffers stay allocated."""
        for r in itertools.chain(self.rows, self.queue):
            if not r.finished:
                r.finish_reason = "error"
        self.rows, self.row_past, self.row_launched = [], [], []
        self.queue.clear()
        self.inflight.clear()

    # ---------------------------------------------------------------- the loop
    def step(self) -> list[TokenEvent]:
        """Admit waiting sequences, launch one round, and return the tokens of the oldest round
        whose results are ready (rounds run `PIPELINE_DEPTH` ahead of the host)."""
        start = time.perf_counter()
        moved = self._compact()
        joined, prefills = self._admit()
        launched = self._launch_round()
        events: list[TokenEvent] = []
        self._waited = 0.0
        after_launch = time.perf_counter()
        while len(self.inflight) > PIPELINE_DEPTH or (self.inflight and not launched):
            events += self._collect(self.inflight.popleft())
        if self.trace is not None:
            engines = self.engines.values()
            self.trace.append(StepTrace(start, after_launch, time.perf_counter(), self._waited, len(self.rows), joined,
                                        prefills, moved, sum(e.captures for e in engines),
                                        sum(e.stand_ins for e in engines)))
        return events

    def _compact(self) -> int:
        """Move live rows from the tail into the holes of finished ones; how many moved."""
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        if len(keep) == len(self.rows):
            return 0
        n = len(keep)
        holes = [i for i in range(n) if self.rows[i].finished]
        tail = [i for i in keep if i >= n]
        if holes:
            dst = to_device(holes, torch.long, self.device)
            src = to_device(tail, torch.long, self.device)
            buffers = [*self.caches, self.past, self.generated, self.prefix if self.block else self.logits]
            for t in buffers:
                t[dst] = t[src]
            self.sampling.move(holes, tail)
            for h, t in zip(holes, tail):
                self.rows[h], self.row_past[h], self.row_launched[h] = self.rows[t], self.row_past[t], self.row_launched[t]
        del self.rows[n:], self.row_past[n:], self.row_launched[n:]
        return len(tail)

    def admit(self) -> tuple[int, int]:
        """Free the rows of finished sequences, give queued ones rows and launch their prefills
        (in groups of at most `prefill_budget` prompt positions, so activations stay bounded);
        (requests admitted, prefill calls). `step` does this first; a caller still checking more
        requests calls it to overlap that host work with the GPU's prefills (`Model.generate`
        does, once a group's worth is queued; those admissions happen outside any step, so `trace`
        does not show them)."""
        self._compact()
        return self._admit()

    def _admit(self) -> tuple[int, int]:
        """Give waiting requests rows and prefill them; (requests admitted, prefill calls)."""
        joining: list[Request] = []
        while self.queue and len(self.rows) + len(joining) < self.capacity:
            request = self.queue.popleft()
            if not request.finished:
                joining.append(request)
        group: list[Request] = []
        longest = prefills = 0
        for request in joining:
            units = math.ceil(len(request.prompt) / self.L)
            if group and (len(group) + 1) * max(longest, units) > self.prefill_budget:
                self._prefill(group)
                group, longest, prefills = [], 0, prefills + 1
            group.append(request)
            longest = max(longest, units)
        if group:
            self._prefill(group)
            prefills += 1
        return len(joining), prefills

    def _prefill(self, joining: list[Request]) -> None:
        start, k = len(self.rows), len(joining)
        rows = list(range(start, start + k))
        padded, units = prefill_inputs([r.prompt for r in joining], self.L, self.config.pad_token_id)
        ids = to_device(padded, torch.long, self.device)  # [k, width] int64, built by copying memory
        new_len = to_device(units, torch.long, self.device)
        zero = torch.zeros(k, dtype=torch.long, device=self.device)
        self.sampling.assign(rows, [r.config for r in joining], [r.prompt for r in joining], self.config.eos_token_id)
        self.past[start:start + k] = new_len
        self.generated[start:start + k] = 0
        caches = [c[start:start + k] for c in self.caches]
        first = self._main_step(ids, zero, new_len, caches, attend_len=max(units), label="prefill")  # causal
        (self.prefix if self.block else self.logits)[start:start + k] = first
        self.rows += joining
        self.row_past += units
        self.row_launched += [0] * k

    def _main_step(self, ids, past, new_len, caches, attend_len, label: str | None = None):
        name = "block_decoder" if self.block else "decoder"
        return self._timed(label or name, self.engines[name], [ids, past, new_len], caches, attend_len=attend_len)

    def _timed(self, name: str, fn, *args, **kwargs):
        """Call fn; when timing (`record_timings`), bracket its device work with CUDA events under
        `name`; when annotating (`annotate_steps`), name its host range for the profiler."""
        if self._annotate:
            with torch.profiler.record_function(name):
                return self._events(name, fn, *args, **kwargs)
        return self._events(name, fn, *args, **kwargs)

    def _events(self, name: str, fn, *args, **kwargs):
        if self._timings is None:
            return fn(*args, **kwargs)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args, **kwargs)
        end.record()
        self._timings.setdefault(name, []).append((start, end))
        return out

    def _launch_round(self) -> bool:
        remaining = max((r.config.max_new_tokens - launched for r, launched in zip(self.rows, self.row_launched)
                         if not r.finished), default=0)
        if remaining <= 0:
            return False
        n_live = len(self.rows)
        n = _batch_bucket(n_live, self.capacity) if self.pad_rows else n_live
        count = min(self.round_tokens, remaining)
        last_round = remaining <= self.round_tokens  # every row ends within this round
        state = self.sampling.head(n)
        generated = self.generated[:n]
        tokens = []
        if self.block:
            caches = [c[:n] for c in self.token_caches]
            prefix = self.prefix[:n]
            ids = self.first_ids[:n]  # positions 0 and 1 read the prefix
            for k in range(count):
                position = self.local_pos[k][:n]
                logits = self._timed("token_decoder", self.engines["token_decoder"], [ids, prefix, position], caches)
                token = self._timed("sampling", sample, logits, state, generated)
                mark_seen(state, token)
                generated += 1
                tokens.append(token)
                ids = token[:, None]
            if not last_round:
                self._advance(torch.stack(tokens, dim=1), n)
        else:
            for k in range(count):
                token = self._timed("sampling", sample, self.logits[:n], state, generated)
                mark_seen(state, token)
                generated += 1
                tokens.append(token)
                if not (last_round and k == count - 1):
                    self._advance(token[:, None], n)
        self._record(torch.stack(tokens, dim=1), n_live, count)
        return True

    def _advance(self, new_ids: torch.Tensor, n: int) -> None:
        """Fold one new block (token) per row into the main cache; keep the step's output (the next
        round's prefix, or a vanilla model's next logits)."""
        write = self.past[:n].clamp(max=self.cache_len - 1)  # finished rows may run one round over
        caches = [c[:n] for c in self.caches]
        attend = min(self.cache_len, max(self.row_past) + 1)
        out = self._main_step(new_ids, write, self.ones[:n], caches, attend_len=attend)
        self.past[:n] += 1
        self.row_past = [p + 1 for p in self.row_past]
        (self.prefix if self.block else self.logits)[:n] = out

    def _record(self, tokens: torch.Tensor, n_live: int, count: int) -> None:
        self.row_launched = [x + count for x in self.row_launched]
        tokens = tokens[:n_live]
        if self.device.type == "cuda":
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = tokens.clone(), None
        self.inflight.append(_Round(event, host, list(self.rows)))

    def _collect(self, round_: _Round) -> list[TokenEvent]:
        if round_.event is not None:
            waiting = time.perf_counter()
            round_.event.synchronize()
            self._waited += time.perf_counter() - waiting
        now = time.perf_counter()
        events = []
        # numpy's tolist is ~7x faster than torch's ([2368, 4]: 0.35 vs 2.5 ms on our CPU)
        for request, new in zip(round_.rows, round_.tokens.numpy().tolist()):
            if request.finish_reason is not None:
                continue
            room = request.config.max_new_tokens - len(request.tokens)
            if room < len(new):
                new = new[:room]
            if request.stops and not request.stops.isdisjoint(new):
                new = new[: next(i for i, t in enumerate(new) if t in request.stops) + 1]
                request.finish_reason = "stop"
            elif room <= len(new):
                request.finish_reason = "length"
            request.tokens += new
            if request.first_token_at is None and new:
                request.first_token_at = now
            if request.finish_reason is not None:
                request.finished_at = now
            events.append(TokenEvent(request, new, request.finish_reason is not None))
        return events
