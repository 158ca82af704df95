"""A front end's handle on engine cores (core.py): `Scheduler(model)` runs a core on a thread of
this process, `Scheduler.spawn(spec)` in a process of its own (the GPU loop then never shares a
GIL with HTTP work); `EngineGroup` puts several behind one front end (one per GPU) and sends each
job to the least-loaded one.

`submit` checks for room (a job may wait for a row only while fewer than `max_queue` do), gives
the job an id and sends it to the core; `cancel` forgets it at once (later tokens are dropped)
and frees its row at the core's next round. Each `Round` from the core is handed over in one
piece: `dispatch([(job, update), ...])`, by default calling each job's `deliver(update)` on the
receiving thread (the engine thread, or the handle's reader thread for a process). An event-loop
front end passes a `dispatch` that hops to its loop once per round instead of once per token.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from blockrt.errors import UserError
from blockrt.generation import ContextTooLong, GenerationConfig, RequestError, check_request

from .core import Add, Cancel, EngineCore, ModelInfo, ModelSpec, Round, Update, run_core_process

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

__all__ = ["Scheduler", "EngineGroup", "Job", "Update", "QueueFull", "InvalidRequest", "ShuttingDown"]

_DRIVERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # generator -> the Scheduler driving it


class QueueFull(Exception):
    """Too many jobs are waiting for a row; the caller should retry later."""

    def __init__(self, waiting: int, limit: int):
        super().__init__(f"server busy: {waiting} requests are waiting for a free batch row "
                         f"(limit --max-queue {limit}); retry later")
        self.waiting, self.limit = waiting, limit


class InvalidRequest(UserError):
    """A request the server cannot run; `param` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class ShuttingDown(Exception):
    """The engine is stopping (or stopped) and takes no new jobs."""


@dataclass(eq=False, slots=True)
class Job:
    id: int
    deliver: Callable[[Update], None]
    owner: "Scheduler"
    submitted_at: float
    first_token_at: float | None = None
    done: bool = False


def check_for_api(info: ModelInfo, prompt: list[int], config: GenerationConfig) -> None:
    """Raise InvalidRequest, in the words of a completion request (max_tokens for max_new_tokens),
    for what the model's generator would reject (`check_request`, the generator's own check)."""
    try:
        check_request(prompt, config, info.limits)
    except RequestError as e:
        param = "max_tokens" if e.field == "max_new_tokens" else e.field
        code = "context_length_exceeded" if isinstance(e, ContextTooLong) else None
        raise InvalidRequest(str(e).replace("max_new_tokens", "max_tokens"), param, code) from None


def _deliver_each(pairs: list[tuple[Job, Update]]) -> None:
    for job, update in pairs:
        try:
            job.deliver(update)
        except Exception:  # a front end that went away must not stop the engine
            log.exception("delivering tokens failed")


class Scheduler:
    """One engine core seen from a front end. `Scheduler(model)`: the core runs on a thread of
    this process; `Scheduler.spawn(spec)`: in a process that loads the model itself;
    `Scheduler.attach(connection, info, k, n)`: front end k of n on a core process started elsewhere
    (HTTP worker processes sharing one engine per GPU)."""

    def __init__(self, model=None, max_queue: int = 256, metrics: Metrics | None = None, name: str = "0",
                 *, spec: ModelSpec | None = None, connection=None, info: ModelInfo | None = None,
                 front_end: int = 0, front_ends: int = 1):
        if max_queue < 1:
            raise UserError(f"max_queue must be >= 1, got {max_queue}")
        if sum(x is not None for x in (model, spec, connection)) != 1:
            raise ValueError("give a model (engine thread), a spec (engine process) or a connection to a running one")
        self.model, self.spec = model, spec
        self.max_queue, self.metrics, self.name = max_queue, metrics, name
        self.dispatch: Callable[[list[tuple[Job, Update]]], None] = _deliver_each
        self.on_release: Callable[[int], None] | None = None  # told how many jobs ended (EngineGroup's SharedLoad)
        self.info: ModelInfo | None = ModelInfo.of(model) if model is not None else info
        self.waiting = 0  # as of the core's last round (all front ends' jobs)
        self.running = 0
        self._lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(front_end, front_ends)  # the core tells front ends apart by job % front_ends
        self._front_ends = front_ends
        self._sent_since_round = 0
        self._stopping = False
        self._alive = False
        self._core: EngineCore | None = None
        self._thread: threading.Thread | None = None  # engine thread, or reader thread of a process
        self._process = None
        self._connection = connection
        self._outbox: list[Add | Cancel] = []  # commands for a core process, sent by the writer thread
        self._closing = False  # the writer sends the outbox, then None, then stops
        self._outbox_ready = threading.Condition()
        self._writer: threading.Thread | None = None

    @classmethod
    def spawn(cls, spec: ModelSpec, max_queue: int = 256, metrics: Metrics | None = None, name: str = "0") -> "Scheduler":
        return cls(None, max_queue, metrics, name, spec=spec)

    @classmethod
    def attach(cls, connection, info: ModelInfo, front_end: int, front_ends: int, max_queue: int = 256,
               metrics: Metrics | None = None, name: str = "0") -> "Scheduler":
        """Front end `front_end` of `front_ends` on a core process whose `info` was already read."""
        return cls(None, max_queue, metrics, name, connection=connection, info=info, front_end=front_end,
                   front_ends=front_ends)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the core and wait until it serves (a process loads its model first)."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the core without waiting for a process to load its model (see `wait_ready`)."""
        if self.model is not None:
            generator = self.model.generator()
            other = _DRIVERS.get(generator)
            if other is not None and other is not self and other.alive:
                raise UserError("this model is already served by another engine thread (its generator is not "
                                "thread-safe): serve each Model from one app or Triton server")
            _DRIVERS[generator] = self
            if self._thread is None:
                self._core = EngineCore(self.model, self._on_round)
                self._alive = True
                self._thread = threading.Thread(target=self._core.run, name=f"blockrt-engine-{self.name}", daemon=True)
                self._thread.start()
            return
        if self._process is None and self.spec is not None:
            context = multiprocessing.get_context("spawn")
            self._connection, child = context.Pipe()
            self._process = context.Process(target=run_core_process, args=(self.spec, [child]),
                                            name=f"blockrt-engine-{self.name}", daemon=True)
            self._process.start()
            child.close()

    def wait_ready(self) -> None:
        if self.model is not None or self._alive:
            return
        if self._process is not None:
            try:
                hello = self._connection.recv()
            except (EOFError, OSError):
                self._process.join(5)
                raise UserError(f"the engine process for {self.spec.describe()} exited while loading the model "
                                f"(exit code {self._process.exitcode}); see its log above") from None
            if isinstance(hello, tuple):
                self._process.join(5)
                raise UserError(f"engine {self.name} ({self.spec.describe()}): {hello[1]}")
            self.info = hello
        self._alive = True
        self._thread = threading.Thread(target=self._read, name=f"blockrt-engine-{self.name}-reader", daemon=True)
        self._thread.start()
        self._writer = threading.Thread(target=self._write, name=f"blockrt-engine-{self.name}-writer", daemon=True)
        self._writer.start()
        log.info("engine %s ready: %s (%s on %s), batch %d", self.name, self.info.name, self.info.backend,
                 self.info.device, self.info.max_batch)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the core; jobs still open get an error update."""
        self._stopping = True
        if self._core is not None:
            self._core.stop()
        elif self._connection is not None:
            with self._outbox_ready:
                self._closing = True
                self._outbox_ready.notify()
            if self._writer is None:  # never got ready: nothing was queued
                try:
                    self._connection.send(None)
                except OSError:  # already gone
                    pass
        if self._writer is not None:
            self._writer.join(timeout)
            self._writer = None
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                log.warning("engine %s did not stop in %s s: killing it", self.name, timeout)
                self._process.kill()
                self._process.join()
            self._process = None
        self._alive = False

    @property
    def alive(self) -> bool:
        return self._alive and self._thread is not None and self._thread.is_alive()

    @property
    def load(self) -> int:
        """Open jobs (running or waiting)."""
        return len(self._jobs)

    # ------------------------------------------------------------------ jobs (any thread)
    def check(self, prompt: list[int], config: GenerationConfig) -> None:
        check_for_api(self.info, prompt, config)

    def submit(self, prompt: list[int], config: GenerationConfig, deliver: Callable[[Update], None]) -> Job:
        """Accept a job or raise QueueFull / ShuttingDown (nothing accepted). Call `check` first:
        what the generator still rejects comes back as an error update."""
        with self._lock:
            if self._stopping or not self.alive:
                raise ShuttingDown("the server is shutting down" if self._stopping else "the engine is not running")
            open_jobs = len(self._jobs)
            if self._front_ends > 1:  # the other front ends' jobs share the core: count them as of its last round
                open_jobs = max(open_jobs, self.waiting + self.running + self._sent_since_round)
            waiting = open_jobs - self.info.max_batch
            if waiting >= self.max_queue:
                raise QueueFull(waiting, self.max_queue)
            job = Job(next(self._ids), deliver, self, time.perf_counter())
            self._jobs[job.id] = job
            self._sent_since_round += 1
        self._send([Add(job.id, list(prompt), config)])
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job (client gone, stop string seen); no update reaches it after this. Idempotent."""
        with self._lock:
            if self._jobs.pop(job.id, None) is None:
                return
            job.done = True
        self._released(1)
        self._send([Cancel(job.id)])

    def fail_open(self, message: str) -> int:
        """End every open job with an error update (shutdown=True), freeing their rows; how many."""
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
            for job in jobs:
                job.done = True
        self._released(len(jobs))
        if jobs:
            if self.alive:
                self._send([Cancel(job.id) for job in jobs])
            self.dispatch([(job, Update(job.id, [], "error", message, shutdown=True)) for job in jobs])
        return len(jobs)

    def _released(self, count: int) -> None:
        if count and self.on_release is not None:
            self.on_release(count)

    def _send(self, commands: list[Add | Cancel]) -> None:
        if self._core is not None:
            self._core.put(commands)
            return
        with self._outbox_ready:
            self._outbox += commands
            self._outbox_ready.notify()

    def _write(self) -> None:
        """Writer thread of a core process: everything queued since its last write goes in one message,
        so a burst of requests costs a few pipe writes, not one each (and the core reads it at once)."""
        while True:
            with self._outbox_ready:
                while not (self._outbox or self._closing):
                    self._outbox_ready.wait()
                commands, self._outbox, closing = self._outbox, [], self._closing
            try:
                if commands:
                    self._connection.send(commands)
                if closing:
                    self._connection.send(None)
                    return
            except OSError:  # the core process is gone (the reader thread reports it)
                return

    # ------------------------------------------------------------------ rounds (receiving thread)
    def _read(self) -> None:
        try:
            while True:
                self._on_round(self._connection.recv())
        except (EOFError, OSError):
            pass
        self._alive = False
        if self._stopping:
            self.fail_open("the server is shutting down")
            return
        code = "unknown"
        if self._process is not None:
            self._process.join(5)
            code = self._process.exitcode
        log.error("engine %s stopped (exit code %s)", self.name, code)
        self.fail_open(f"the engine process stopped (exit code {code})")

    def _on_round(self, round_: Round) -> None:
        now = time.perf_counter()
        pairs, tokens, ttfts, latencies, finished = [], 0, [], [], 0
        with self._lock:
            for update in round_.updates():
                job = self._jobs.get(update.job)
                if job is None:  # cancelled
                    continue
                tokens += len(update.tokens)
                if update.tokens and job.first_token_at is None:
                    job.first_token_at = now
                    ttfts.append(now - job.submitted_at)
                if update.finished:
                    del self._jobs[update.job]
                    job.done = True
                    finished += 1
                    if update.error is None:
                        latencies.append(now - job.submitted_at)
                pairs.append((job, update))
            self.waiting, self.running, self._sent_since_round = round_.waiting, round_.running, 0
        self._released(finished)
        if self.metrics is not None:
            self.metrics.record_round(self.name, tokens, ttfts, latencies, round_.waiting, round_.running)
        if pairs:
            self.dispatch(pairs)


class SharedLoad:
    """Open jobs per (front end, engine), in memory shared by the HTTP worker processes of one
    server (`Workers`), so that every worker routes to the engine with the fewest open jobs of all
    workers together. A worker that counts only its own jobs sends its odd job to the same engine
    as every other worker does: with exactly as many streams as the engines have rows, those jobs
    wait for a whole wave and then run nearly alone (2 x H200, 2048 streams on two engines of 1024
    rows: one engine ran 772 steps, the other 523, for 1.58x one GPU's served throughput).

    `table` is a `multiprocessing` Array("q", front_ends * engines) (zeros); its lock makes a
    routing decision and its count one step, so workers routing at once cannot both take the last
    free row of one engine. A worker that exits while the server runs (killed, or crashed) has its
    row cleared by the server's main process (`clear`), as its engines cancel its jobs."""

    def __init__(self, table, front_end: int, engines: int):
        if len(table) % engines:
            raise ValueError(f"a load table of {len(table)} entries does not hold {engines} engines per front end")
        self.table, self.front_end, self.engines = table, front_end, engines

    @staticmethod
    def create(context, front_ends: int, engines: int):
        """The shared table for `front_ends` workers on `engines` engines (pass it to every worker)."""
        return context.Array("q", front_ends * engines)

    def totals(self) -> list[int]:
        """Open jobs per engine, all front ends together (call with `self.table.get_lock()` held)."""
        E, t = self.engines, self.table
        return [sum(t[w * E + e] for w in range(len(t) // E)) for e in range(E)]

    def add(self, engine: int, count: int) -> None:
        with self.table.get_lock():
            self.table[self.front_end * self.engines + engine] += count

    def clear(self) -> None:
        """Forget this front end's open jobs (it is gone: its engines cancel them)."""
        with self.table.get_lock():
            for engine in range(self.engines):
                self.table[self.front_end * self.engines + engine] = 0


class EngineGroup:
    """Several engine cores behind one front end (e.g. one per GPU), with one Scheduler's
    interface: each job goes to the least-loaded live core that has room; counted over every front
    end of the server when they share a `SharedLoad`, else over this front end's own jobs."""

    def __init__(self, schedulers: list[Scheduler], shared: SharedLoad | None = None):
        if not schedulers:
            raise ValueError("an engine group needs at least one engine")
        if shared is not None and shared.engines != len(schedulers):
            raise ValueError(f"a load table for {shared.engines} engines cannot route to {len(schedulers)}")
        self.schedulers = schedulers
        self.shared = shared
        if shared is not None:
            for i, s in enumerate(schedulers):
                s.on_release = lambda count, i=i: shared.add(i, -count)

    def start(self) -> None:
        for s in self.schedulers:  # processes load their models in parallel
            s.launch()
        try:
            for s in self.schedulers:
                s.wait_ready()
        except BaseException:
            self.stop(5)
            raise
        first = self.info
        for s in self.schedulers[1:]:
            if s.info.limits != first.limits:
                raise UserError(f"engine {s.name} serves a different model than engine {self.schedulers[0].name}")

    def stop(self, timeout: float | None = 30.0) -> None:
        for s in self.schedulers:
            s.stop(timeout)

    @property
    def info(self) -> ModelInfo:
        return self.schedulers[0].info

    @property
    def alive(self) -> bool:
        return any(s.alive for s in self.schedulers)

    @property
    def waiting(self) -> int:
        return sum(s.waiting for s in self.schedulers)

    @property
    def running(self) -> int:
        return sum(s.running for s in self.schedulers)

    def set_dispatch(self, dispatch: Callable[[list[tuple[Job, Update]]], None]) -> None:
        for s in self.schedulers:
            s.dispatch = dispatch

    def check(self, prompt: list[int], config: GenerationConfig) -> None:
        check_for_api(self.info, prompt, config)

    def submit(self, prompt: list[int], config: GenerationConfig, deliver: Callable[[Update], None]) -> Job:
        shared = self.shared
        with shared.table.get_lock() if shared is not None else contextlib.nullcontext():  # choose and count at once
            load = shared.totals() if shared is not None else [s.load for s in self.schedulers]
            error: Exception = ShuttingDown("no engine is running")
            for i in sorted((i for i, s in enumerate(self.schedulers) if s.alive), key=load.__getitem__):
                try:
                    job = self.schedulers[i].submit(prompt, config, deliver)
                except (QueueFull, ShuttingDown) as e:
                    error = e
                    continue
                if shared is not None:
                    shared.add(i, 1)
                return job
            raise error

    def cancel(self, job: Job) -> None:
        job.owner.cancel(job)

    def fail_open(self, message: str) -> int:
        return sum(s.fail_open(message) for s in self.schedulers)
