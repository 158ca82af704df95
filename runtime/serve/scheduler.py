"""The engine thread: the one place that drives a model's `Generator` for a server.

Front ends (the HTTP app, the Triton model) run on other threads. They `submit` a job with a
`deliver` callback and may `cancel` it; both only touch a locked inbox and wake the engine thread.
The engine thread takes the inbox between rounds, queues new jobs on the generator (they join the
batch at the next block boundary), calls `generator.step()` while any work exists, and hands each
job its new tokens through `deliver` (called on the engine thread: it must only hand the update
over, e.g. with `loop.call_soon_threadsafe`). With no work it sleeps on a condition variable.

Every accepted job gets exactly one final update (`finish_reason` set, or `error`). A generator
exception fails the sequences it was running and keeps the ones still waiting in its queue.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from blockrt.errors import UserError
from blockrt.generation import ContextTooLong, GenerationConfig, RequestError, check_request

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

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
    """The scheduler is stopping and takes no new jobs."""


@dataclass
class Update:
    """New tokens of one job; the last update has `finish_reason` ("stop", "length", "cancelled",
    "error") and, for "error", a message in `error`."""

    tokens: list[int]
    finish_reason: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Job:
    prompt: list[int]
    config: GenerationConfig
    deliver: Callable[[Update], None]
    submitted_at: float = field(default_factory=time.perf_counter)
    # engine thread only:
    request: object | None = None  # the generator's Request once queued there
    first_token_at: float | None = None
    done: bool = False


class Scheduler:
    def __init__(self, model, max_queue: int = 256, metrics: Metrics | None = None):
        if max_queue < 1:
            raise UserError(f"max_queue must be >= 1, got {max_queue}")
        self.model, self.max_queue, self.metrics = model, max_queue, metrics
        self.generator = model.generator()
        self._cond = threading.Condition()
        self._inbox: list[Job] = []
        self._cancels: list[Job] = []
        self._waiting = 0  # accepted jobs without a batch row yet (inbox + generator queue)
        self._running = 0  # rows generating
        self._stopping = False
        self._jobs: dict[int, Job] = {}  # generator request id -> job (engine thread only)
        self._thread: threading.Thread | None = None
        manifest = model.manifest
        self.max_context = manifest.limits.max_context

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        """Start the engine thread; a model's generator takes one engine thread at a time."""
        other = _DRIVERS.get(self.generator)
        if other is not None and other is not self and other.alive:
            raise UserError("this model is already served by another engine thread (its generator is not "
                            "thread-safe): serve each Model from one app or Triton server")
        _DRIVERS[self.generator] = self
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="blockrt-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the engine thread; jobs still open get an error update."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def check(self, prompt: list[int], config: GenerationConfig) -> None:
        """Raise InvalidRequest, in the words of a completion request (max_tokens for
        max_new_tokens), for what the generator would reject (`check_request`, the generator's own
        check). Reads only fixed attributes: any thread may call it."""
        try:
            check_request(prompt, config, self.generator.limits)
        except RequestError as e:
            param = "max_tokens" if e.field == "max_new_tokens" else e.field
            code = "context_length_exceeded" if isinstance(e, ContextTooLong) else None
            raise InvalidRequest(str(e).replace("max_new_tokens", "max_tokens"), param, code) from None

    def submit(self, prompt: list[int], config: GenerationConfig, deliver: Callable[[Update], None]) -> Job:
        """Accept a job or raise QueueFull (nothing accepted). Call `check` first: what the
        generator still rejects comes back as an error update."""
        job = Job(list(prompt), config, deliver)
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._waiting >= self.max_queue:
                raise QueueFull(self._waiting, self.max_queue)
            self._waiting += 1
            self._inbox.append(job)
            self._cond.notify()
        if self.metrics:
            self.metrics.queue_depth.set(self._waiting)
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job (client gone, stop string seen); its row frees at the next round. Idempotent."""
        with self._cond:
            self._cancels.append(job)
            self._cond.notify()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            self._loop()
            reason = "the server is shutting down"
        except BaseException as e:  # a bug here must not leave requests waiting forever
            log.exception("the engine thread stopped")
            reason = f"the engine thread stopped: {type(e).__name__}: {e}"
            with self._cond:
                self._stopping = True
        self._shutdown(reason)

    def _loop(self) -> None:
        gen = self.generator
        while True:
            with self._cond:
                while not (self._inbox or self._cancels or self._stopping or gen.has_work):
                    self._cond.wait()
                if self._stopping:
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
            for job in cancels:
                self._cancel(job)
            for job in inbox:
                self._queue(job)
            if gen.has_work:
                self._step()
            self._publish()

    def _queue(self, job: Job) -> None:
        if job.done:  # cancelled before it reached the generator
            return
        try:
            job.request = self.generator.add(job.prompt, job.config)
        except Exception as e:  # `check` passed, so this is the server's fault: fail this job only
            self._finish(job, Update([], "error", f"{type(e).__name__}: {e}"))
            return
        self._jobs[job.request.id] = job

    def _cancel(self, job: Job) -> None:
        if job.done:
            return
        if job.request is not None:
            self.generator.cancel(job.request)
            self._jobs.pop(job.request.id, None)
        self._finish(job, Update([], "cancelled"))

    def _step(self) -> None:
        try:
            events = self.generator.step()
        except Exception as e:  # a device or engine failure: fail what ran, keep serving
            log.exception("generator step failed")
            self._recover(f"generation failed: {type(e).__name__}: {e}")
            return
        now = time.perf_counter()
        for event in events:
            job = self._jobs.get(event.request.id)
            if job is None or job.done:
                continue
            if event.tokens and job.first_token_at is None:
                job.first_token_at = now
                if self.metrics:
                    self.metrics.ttft.observe(now - job.submitted_at)
            if self.metrics and event.tokens:
                self.metrics.generated_tokens.inc(len(event.tokens))
            if event.finished:
                del self._jobs[event.request.id]
                self._finish(job, Update(list(event.tokens), event.request.finish_reason))
            else:
                self._deliver(job, Update(list(event.tokens)))

    def _recover(self, message: str) -> None:
        """After a failed step: requests still in the generator's queue were not touched, so they
        are queued again on the reset generator; every other open job fails."""
        gen = self.generator
        untouched = [self._jobs.pop(r.id) for r in gen.queue if r.id in self._jobs]
        gen.reset()
        failed, self._jobs = list(self._jobs.values()), {}
        for job in failed:
            self._finish(job, Update([], "error", message))
        for job in untouched:
            job.request = None
            self._queue(job)

    def _finish(self, job: Job, update: Update) -> None:
        job.done = True
        if self.metrics:
            self.metrics.latency.observe(time.perf_counter() - job.submitted_at)
        self._deliver(job, update)

    def _deliver(self, job: Job, update: Update) -> None:
        try:
            job.deliver(update)
        except Exception:  # a front end that went away must not stop the engine
            log.exception("delivering tokens failed")

    def _publish(self) -> None:
        gen = self.generator
        running = sum(1 for r in gen.rows if not r.finished)
        with self._cond:
            self._waiting = len(self._inbox) + sum(1 for r in gen.queue if not r.finished)
            self._running = running
        if self.metrics:
            self.metrics.queue_depth.set(self._waiting)
            self.metrics.running.set(running)

    def _shutdown(self, reason: str) -> None:
        with self._cond:
            inbox, self._inbox = self._inbox, []
        self.generator.reset()
        for job in [*self._jobs.values(), *inbox]:
            if not job.done:
                self._finish(job, Update([], "error", reason))
        self._jobs = {}
        self._publish()
