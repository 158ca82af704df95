"""The engine core: the one loop that drives a model's `Generator` for a server, in a thread of the
server's process (`EngineCore`, for a `Model` object you hold) or in a process of its own
(`run_core_process`, spawned from a picklable `ModelSpec` that loads the model there).

It speaks in batches: front ends send `Add` / `Cancel` / `Forget` commands, and the core answers with one
`Round` per generator step holding every job's new tokens and the batch's queue and row counts.
Between rounds it takes every command that arrived (a burst of requests joins the batch at the
same round and is prefilled together), so a process needs one message per request in and one per
round out; nothing per token crosses to the HTTP process.

Every accepted job gets exactly one final update (`finish_reason` set), unless it was cancelled.
A generator exception fails the sequences it was running and keeps the ones still queued.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing.connection
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from blockrt.errors import UserError
from blockrt.generation import GenerationConfig, RequestLimits
from blockrt.runtime.tracing import Trace

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ messages

@dataclass(slots=True)
class Add:
    job: int
    prompt: list[int]
    config: GenerationConfig


@dataclass(slots=True)
class Cancel:
    job: int


@dataclass(slots=True)
class Forget:
    """Cancel every job of front end `front_end` of `front_ends` (job % front_ends == front_end)."""

    front_end: int
    front_ends: int


@dataclass(slots=True)
class Update:
    """New tokens of one job; the last update has `finish_reason` ("stop", "length", "error")
    and, for "error", a message in `error` (`shutdown` when the server is stopping)."""

    job: int
    tokens: list[int]
    finish_reason: str | None = None
    error: str | None = None
    shutdown: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Round:
    """What one step of the core produced, and the batch after it, in columns (plain lists pickle
    about 30 times faster than as many small objects: 0.7 ms instead of 20 ms for 1024 jobs on a
    slow CPU)."""

    jobs: list[int]  # jobs with news
    tokens: list[list[int]]  # their new tokens
    finished: dict[int, tuple[str, str | None, bool]]  # job -> (finish_reason, error, shutdown) of those that ended
    waiting: int  # jobs without a batch row
    running: int  # rows generating

    @classmethod
    def of(cls, updates: list[Update], waiting: int = 0, running: int = 0) -> "Round":
        round_ = cls([], [], {}, waiting, running)
        for update in updates:
            round_.add(update.job, update.tokens, update.finish_reason, update.error, update.shutdown)
        return round_

    def add(self, job: int, tokens: list[int], finish_reason: str | None = None, error: str | None = None,
            shutdown: bool = False) -> None:
        self.jobs.append(job)
        self.tokens.append(tokens)
        if finish_reason is not None:
            self.finished[job] = (finish_reason, error, shutdown)

    def split(self, n: int) -> list["Round"]:
        """One round per front end k of n, with the jobs j where j % n == k (and the batch counts)."""
        jobs: list[list[int]] = [[] for _ in range(n)]
        tokens: list[list[list[int]]] = [[] for _ in range(n)]
        for job, new in zip(self.jobs, self.tokens):
            jobs[job % n].append(job)
            tokens[job % n].append(new)
        finished: list[dict] = [{} for _ in range(n)]
        for job, end in self.finished.items():
            finished[job % n][job] = end
        return [Round(jobs[k], tokens[k], finished[k], self.waiting, self.running) for k in range(n)]

    def updates(self) -> Iterator[Update]:
        finished = self.finished
        for job, tokens in zip(self.jobs, self.tokens):
            end = finished.get(job)
            yield Update(job, tokens) if end is None else Update(job, tokens, *end)


@dataclass
class ModelInfo:
    """What a front end needs to know of the model served by a core (sent once by a core process)."""

    name: str
    limits: RequestLimits  # what a request may ask (check_request)
    max_batch: int
    backend: str
    device: str
    tokenizer_json: str | None = None

    @classmethod
    def of(cls, model, name: str | None = None) -> "ModelInfo":
        tokenizer = model.tokenizer.to_str() if model.tokenizer is not None else None
        return cls(name or (model.directory.resolve().name if model.directory is not None else "blockrt"),
                   model.generator().limits, model.max_batch, getattr(model, "backend", "torch"), str(model.device),
                   tokenizer)


@dataclass
class ModelSpec:
    """How a core process gets its model: an artifact directory, a preset with random weights
    (PyTorch engine), or any picklable `factory()` returning a Model. `device` "cuda:N" makes
    the process see only GPU N. `compile`: the PyTorch engine's compiled steps (`Model.load`'s
    `compile=`: None compiles where that runs, CUDA with Triton). `trace`: a file for the core
    process's `StepTrace`s and garbage collections (`blockrt.runtime.tracing.Trace`; `blockrt bench --serve`)."""

    artifact: str | None = None
    preset: str | None = None
    backend: str = "auto"
    device: str | None = None
    max_batch: int | None = None
    dtype: str = "bf16"
    max_context: int = 2304
    seed: int = 0
    factory: Callable | None = None
    name: str | None = None
    compile: bool | None = None
    trace: str | None = None  # a core process writes its steps' host timings here (JSON) when it stops

    def describe(self) -> str:
        return self.artifact or self.preset or getattr(self.factory, "__name__", "model")

    def load(self):
        from blockrt.runtime import Model

        device = self.device
        if device is not None and device.startswith("cuda:"):  # this process sees only that GPU
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            index = int(device.split(":")[1])
            ids = visible.split(",") if visible else None
            if ids is not None and index >= len(ids):
                raise UserError(f"device {device}: only {len(ids)} GPUs are visible (CUDA_VISIBLE_DEVICES={visible})")
            os.environ["CUDA_VISIBLE_DEVICES"] = ids[index] if ids else str(index)
            device = "cuda"
        if self.factory is not None:
            return self.factory()
        if self.preset is not None:
            import torch

            from blockrt.exporter import build_model, get_preset, init_random
            from blockrt.exporter.config import TORCH_DTYPES

            dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            with torch.device(dev):
                weights = build_model(get_preset(self.preset))
            weights = init_random(weights, seed=self.seed).to(TORCH_DTYPES[self.dtype]).eval()
            return Model.from_torch(weights, dtype=self.dtype, max_batch=self.max_batch or 256,
                                    max_context=self.max_context, device=str(dev), compile=self.compile)
        return Model.load(self.artifact, backend=self.backend, device=device, max_batch=self.max_batch,
                          compile=self.compile)


# ------------------------------------------------------------------------------------ the loop

class EngineCore:
    """Drives one model's generator. `put` (any thread) hands it commands; `run` (its own
    thread) loops until `stop`, calling `emit(round)` after every step."""

    def __init__(self, model, emit: Callable[[Round], None]):
        """Also captures the model's full-batch CUDA graphs (compiling its steps first where they
        compile), so the first burst of requests does not stall on that (`Generator.capture_graphs`)."""
        self.generator = model.generator()
        if not self.generator.has_work:
            start = time.perf_counter()
            if captured := self.generator.capture_graphs():
                log.info("captured %d CUDA graphs of full-batch decode steps in %.1f s", captured,
                         time.perf_counter() - start)
        self.emit = emit
        self._cond = threading.Condition()
        self._inbox: list[Add | Cancel | Forget] = []
        self._stopping = False
        self._jobs: dict[int, int] = {}  # generator request id -> job id
        self._requests: dict[int, object] = {}  # job id -> generator request
        self.seconds = {"idle": 0.0, "commands": 0.0, "step": 0.0, "emit": 0.0}  # where the loop's time went
        self.rounds = 0

    def put(self, commands: list[Add | Cancel | Forget]) -> None:
        with self._cond:
            self._inbox += commands
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def run(self) -> None:
        try:
            self._loop()
            reason = "the server is shutting down"
        except BaseException as e:  # a bug here must not leave requests waiting forever
            log.exception("the engine core stopped")
            reason = f"the engine stopped: {type(e).__name__}: {e}"
        if self.rounds:
            log.info("engine core: %d rounds; per round %s", self.rounds,
                     ", ".join(f"{k} {1e3 * v / self.rounds:.2f} ms" for k, v in self.seconds.items()))
        self.generator.reset()
        updates = [Update(job, [], "error", reason, shutdown=True) for job in self._requests]
        with self._cond:
            updates += [Update(c.job, [], "error", reason, shutdown=True) for c in self._inbox if isinstance(c, Add)]
            self._inbox = []
        self._jobs, self._requests = {}, {}
        self.emit(Round.of(updates, 0, 0))

    def _loop(self) -> None:
        gen, seconds = self.generator, self.seconds
        clock = time.perf_counter
        while True:
            t0 = clock()
            with self._cond:
                while not (self._inbox or self._stopping or gen.has_work):
                    self._cond.wait()
                if self._stopping:
                    return
                inbox, self._inbox = self._inbox, []
            t1 = clock()
            out = Round([], [], {}, 0, 0)
            for command in inbox:
                if isinstance(command, Add):
                    self._add(command, out)
                elif isinstance(command, Cancel):
                    self._cancel(command.job)
                else:
                    for job in [j for j in self._requests if j % command.front_ends == command.front_end]:
                        self._cancel(job)
            t2 = clock()
            if gen.has_work:
                self._step(out)
                self.rounds += 1
            t3 = clock()
            out.waiting, out.running = len(gen.waiting), gen.running
            self.emit(out)
            t4 = clock()
            seconds["idle"] += t1 - t0
            seconds["commands"] += t2 - t1
            seconds["step"] += t3 - t2
            seconds["emit"] += t4 - t3

    def _add(self, command: Add, out: Round) -> None:
        try:
            request = self.generator.add(command.prompt, command.config)
        except Exception as e:  # the front end checked it, so this is the server's fault: fail this job only
            out.add(command.job, [], "error", f"{type(e).__name__}: {e}")
            return
        self._jobs[request.id] = command.job
        self._requests[command.job] = request

    def _cancel(self, job: int) -> None:
        request = self._requests.pop(job, None)
        if request is not None:
            self.generator.cancel(request)
            self._jobs.pop(request.id, None)

    def _step(self, out: Round) -> None:
        """One generator step; its tokens go into `out` as columns (no object per job)."""
        try:
            events = self.generator.step()
        except Exception as e:  # a device or engine failure: fail what ran, keep serving
            log.exception("generator step failed")
            self._recover(f"generation failed: {type(e).__name__}: {e}", out)
            return
        jobs, jobs_out, tokens_out, finished = self._jobs, out.jobs, out.tokens, out.finished
        for event in events:
            request = event.request
            job = jobs.get(request.id)
            if job is None:
                continue
            if event.finished:
                del jobs[request.id]
                del self._requests[job]
                finished[job] = (request.finish_reason, None, False)
            elif not event.tokens:
                continue
            jobs_out.append(job)
            tokens_out.append(event.tokens)

    def _recover(self, message: str, out: Round) -> None:
        """After a failed step: requests still in the generator's queue were not touched, so they
        are queued again on the reset generator; every other open job fails."""
        gen = self.generator
        untouched = [(self._jobs[r.id], r) for r in gen.queue if r.id in self._jobs]
        gen.reset()
        failed = set(self._requests) - {job for job, _ in untouched}
        self._jobs, self._requests = {}, {}
        for job in failed:
            out.add(job, [], "error", message)
        for job, r in untouched:
            self._add(Add(job, r.prompt, r.config), out)


# ------------------------------------------------------------------------------------ as a process

def run_core_process(spec: ModelSpec, connections: list) -> None:
    """The entry point of a core process (multiprocessing, spawn): load the model, send its
    `ModelInfo` (or `("error", message)`) to every front end, then serve their commands until each
    has sent `None` (or closed its end of the pipe).

    With several front ends (HTTP worker processes), front end k of n numbers its jobs k, k + n,
    k + 2n, ...: each round goes out split by `job % n`, and the jobs of a front end that went away
    are cancelled."""
    os.setpgid(0, 0)  # Ctrl-C or a signal to the server's process group is the server's to handle
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    try:
        model = spec.load()
        info = ModelInfo.of(model, spec.name)
        core = EngineCore(model, outbox.put)
    except Exception as e:  # a bad artifact or device: one line for the server to report
        for connection in connections:
            connection.send(("error", str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"))
        return
    gc.collect()
    gc.freeze()  # the model's objects never die: keep the collector off them
    trace = Trace(core.generator) if spec.trace else None
    n = len(connections)
    gone: set[int] = set()  # front ends whose pipe broke

    def send() -> None:  # pickling and writing overlap the next round, as the GPU runs it
        while (round_ := outbox.get()) is not None:
            if isinstance(round_, int):  # front end `round_` is done: it reads to the end of its pipe
                gone.add(round_)
                connections[round_].close()
                continue
            parts = [round_] if n == 1 else round_.split(n)
            for k, (connection, part) in enumerate(zip(connections, parts)):
                if k in gone:
                    continue
                try:
                    connection.send(part)
                except OSError:  # that front end went away
                    gone.add(k)

    # the loop runs on a thread of its own, as in a server's process (on a busy CPU, torch's
    # intra-op threads slow a main-thread loop down many times); this thread reads commands
    loop = threading.Thread(target=core.run, name="blockrt-core")
    sender = threading.Thread(target=send, name="blockrt-core-output")
    for connection in connections:
        connection.send(info)
    sender.start()
    loop.start()
    open_ = {connection: k for k, connection in enumerate(connections)}
    while open_:
        for connection in multiprocessing.connection.wait(list(open_)):
            try:
                commands = connection.recv()
            except (EOFError, OSError):  # that front end went away
                commands = None
            if commands is not None:
                core.put(commands)
                continue
            k = open_.pop(connection)
            if open_:  # the others keep serving: free the rows of this one's jobs, close its pipe
                core.put([Forget(k, n)])
                outbox.put(k)
    core.stop()
    loop.join()
    outbox.put(None)
    sender.join()
    for k, connection in enumerate(connections):
        if k not in gone:
            connection.close()
    if trace is not None:
        with open(spec.trace, "w") as f:
            json.dump(trace.stop(), f)
