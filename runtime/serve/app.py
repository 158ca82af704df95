"""The OpenAI-compatible HTTP server: `create_app(source)` builds the FastAPI app, `Server` runs it
on a background thread (tests, notebooks) and `serve` in the foreground (`blockrt serve`).

The model runs in engine cores (core.py): in processes of their own when the app is given
`ModelSpec`s (one per GPU; what `blockrt serve` does), or on a thread of this process when given a
`Model`. This process only speaks HTTP: it reads and checks a request (the body with a size limit
and a timeout, JSON parsed off the event loop when large; 400 with an OpenAI error object in the
words of the request's fields), submits it to the least-loaded engine (429 when too many wait for
a row), and turns the engine's rounds into responses. A round reaches the event loop in one call;
each request keeps the tokens it has not sent yet, so a stream sends at most one event per round
(several rounds' tokens at once when its client lags). Detokenization and stop strings run here.
A client that disconnects, streaming or not, cancels its request and frees its row.

Shutdown (SIGTERM/SIGINT): stop accepting, let open requests finish for `shutdown_timeout`
seconds, then end the rest with an OpenAI-shaped error (JSON 503; a stream gets an `error` event,
`data: [DONE]` and a proper end).

Endpoints: POST /v1/completions (plain or SSE streaming), GET /v1/models, GET /health,
GET /metrics (Prometheus).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from blockrt.errors import UserError
from blockrt.generation import GenerationConfig

from .core import ModelSpec, Update
from .metrics import SHARED_DIR_ENV, Metrics
from .scheduler import EngineGroup, InvalidRequest, Job, QueueFull, Scheduler, SharedLoad, ShuttingDown

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16
RETRY_AFTER_S = 1
PARSE_OFF_LOOP_BYTES = 64 * 1024  # larger bodies are parsed on a worker thread
# pending TCP connections the kernel may hold for accept() (capped at net.core.somaxconn): uvicorn's
# default of 2048 is exactly the size of a 2-GPU benchmark's burst of new connections
BACKLOG = 16384


@dataclass
class HTTPLimits:
    """Limits that protect the server from slow or oversized clients."""

    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413 before they are parsed
    header_timeout_s: float = 10.0  # a connection must send a request's headers within this
    body_timeout_s: float = 30.0  # and its body within this (408)
    shutdown_timeout_s: float = 30.0  # open requests may finish within this after SIGTERM/SIGINT

    def __post_init__(self):
        if self.max_body_bytes < 1024:
            raise UserError(f"--max-body-bytes {self.max_body_bytes}: expected at least 1024")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name.replace('_s', '').replace('_', '-')} must be > 0 seconds")
        if not self.shutdown_timeout_s >= 0:
            raise UserError(f"--shutdown-timeout {self.shutdown_timeout_s}: expected >= 0 seconds")


# ---------------------------------------------------------------------------------- request schema

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI /v1/completions fields, plus the extensions top_k, repetition_penalty, ignore_eos and
    stop_token_ids. Types are strict (no "16" for 16, no Infinity). Fields OpenAI has but this
    server does not implement are accepted only at their neutral value, so a client that sends the
    defaults works; anything unknown is a 400."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: Union[str, list[int]]
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(16, ge=1)
    temperature: Optional[float] = Field(1.0, ge=0)
    top_p: Optional[float] = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1 = off")
    repetition_penalty: float = Field(1.0, gt=0)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # OpenAI fields served only at their neutral value
    n: int = 1
    best_of: Optional[int] = None
    echo: bool = False
    logprobs: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    suffix: Optional[str] = None
    user: Optional[str] = None


_UNSUPPORTED = [  # (field, is neutral, message)
    ("n", lambda r: r.n == 1, "only n=1 is supported: send n requests (with different seeds) instead"),
    ("best_of", lambda r: r.best_of in (None, 1), "best_of is not supported"),
    ("echo", lambda r: not r.echo, "echo is not supported: the prompt is not returned"),
    ("logprobs", lambda r: r.logprobs is None, "logprobs are not supported"),
    ("presence_penalty", lambda r: r.presence_penalty == 0, "presence_penalty is not supported (use repetition_penalty)"),
    ("frequency_penalty", lambda r: r.frequency_penalty == 0, "frequency_penalty is not supported (use repetition_penalty)"),
    ("logit_bias", lambda r: not r.logit_bias, "logit_bias is not supported"),
    ("suffix", lambda r: r.suffix is None, "suffix is not supported"),
]


class APIError(Exception):
    """An error answered with the OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------------- text state

class _Text:
    """The completion of one request as its tokens arrive: ids, detokenized text, stop strings.

    The text is the decoding of all ids so far (so multi-token characters come out whole). With
    stop strings, the first one found ends the completion: the text is cut before it and the ids
    end with the token that completed it. `pending` gives the text not yet streamed, holding back
    what could still turn into a stop string or an incomplete character."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.text: str | None = "" if tokenizer is not None else None
        self.sent = 0
        self.stopped = False

    def add(self, tokens: list[int]) -> None:
        if self.stopped or not tokens:
            return
        base = len(self.tokens)
        self.tokens += tokens
        if self.tokenizer is None:
            return
        search_from = max(0, len(self.text) - self.hold - 1)
        text = self.tokenizer.decode(self.tokens)
        if self._find(text, search_from) is None:
            self.text = text
            return
        for k in range(base + 1, len(self.tokens) + 1):  # the token that completed the stop string
            text = self.tokenizer.decode(self.tokens[:k])
            at = self._find(text, search_from)
            if at is not None:
                self.tokens, self.text, self.stopped = self.tokens[:k], text[:at], True
                return

    def _find(self, text: str, start: int) -> int | None:
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def pending(self, final: bool) -> str | None:
        """None without a tokenizer."""
        if self.text is None:
            return None
        end = len(self.text)
        if not (final or self.stopped):
            end -= self.hold
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent:
            return ""
        chunk, self.sent = self.text[self.sent:end], end
        return chunk


# ---------------------------------------------------------------------------------- the app

class _Stream:
    """One job's updates on the event loop: tokens not taken yet and how it ended. A reader that
    lags takes several rounds' tokens at once."""

    __slots__ = ("tokens", "finish", "error", "shutdown", "waiter")

    def __init__(self):
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.error: str | None = None
        self.shutdown = False
        self.waiter: asyncio.Future | None = None

    def deliver(self, update: Update) -> None:  # event loop
        self.tokens += update.tokens
        if update.finish_reason is not None:
            self.finish, self.error, self.shutdown = update.finish_reason, update.error, update.shutdown
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[int]:
        while not self.tokens and self.finish is None:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        tokens, self.tokens = self.tokens, []
        return tokens


class _State:
    def __init__(self, engines: EngineGroup, metrics: Metrics, model_name: str | None, limits: HTTPLimits,
                 tokenizer=None):
        self.engines, self.metrics, self.model_name, self.limits = engines, metrics, model_name, limits
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        info = self.engines.info
        self.model_name = self.model_name or info.name
        if self.tokenizer is None and info.tokenizer_json is not None:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_str(info.tokenizer_json)

        def apply(pairs: list[tuple[Job, Update]]) -> None:
            for job, update in pairs:
                job.deliver(update)

        def dispatch(pairs) -> None:  # the engine's receiving thread: one hop to the loop per round
            try:
                loop.call_soon_threadsafe(apply, pairs)
            except RuntimeError:  # the event loop is closed: the server stopped
                pass

        self.engines.set_dispatch(dispatch)

    def begin_shutdown(self) -> None:
        """Event loop: refuse new requests; end the open ones with 503 after the shutdown timeout."""
        if self.draining:
            return
        self.draining = True
        timeout = self.limits.shutdown_timeout_s
        log.info("shutting down: open requests may finish within %.0f s", timeout)

        def fail_the_rest() -> None:
            n = self.engines.fail_open(f"the server is shutting down (open requests got {timeout:g} s to finish)")
            if n:
                log.warning("ended %d open requests with an error at shutdown", n)

        self.loop.call_later(timeout, fail_the_rest)


def create_app(source, max_queue: int = 256, model_name: str | None = None, limits: HTTPLimits | None = None,
               shared_load: SharedLoad | None = None) -> FastAPI:
    """An OpenAI-compatible app serving `source`: a blockrt.runtime.Model (an engine thread in this
    process), one or more `ModelSpec`s (one engine process each, e.g. one per GPU), or `Scheduler`s
    attached to engine processes started elsewhere (an HTTP worker of `Workers`; the app gives them
    its metrics, and routes by the load all workers share in `shared_load`). Engines start when the
    app starts (lifespan) and stop at shutdown."""
    metrics = Metrics()
    limits = limits or HTTPLimits()
    if isinstance(source, Sequence) and source and all(isinstance(s, Scheduler) for s in source):
        for scheduler in source:
            scheduler.metrics = metrics
        engines = EngineGroup(list(source), shared_load)
        tokenizer = None
    elif isinstance(source, (ModelSpec, Sequence)):
        specs = [source] if isinstance(source, ModelSpec) else list(source)
        engines = EngineGroup([Scheduler.spawn(spec, max_queue, metrics, name=str(i)) for i, spec in enumerate(specs)])
        tokenizer = None
    else:
        engines = EngineGroup([Scheduler(source, max_queue=max_queue, metrics=metrics)])
        tokenizer = source.tokenizer
    state = _State(engines, metrics, model_name, limits, tokenizer)

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(engines.start)
        state.start(asyncio.get_running_loop())
        monitor = asyncio.ensure_future(_watch_loop(metrics))
        try:
            yield
        finally:
            monitor.cancel()
            await asyncio.to_thread(engines.stop)

    app = FastAPI(title="blockrt", lifespan=lifespan)
    app.state.blockrt = state

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        metrics.requests.labels(str(exc.status), "error" if exc.status >= 500 else "none").inc()
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        return APIError(exc.status_code, str(exc.detail), type="not_found_error" if exc.status_code == 404
                        else "invalid_request_error", headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("request failed")
        metrics.requests.labels("500", "error").inc()
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    @app.get("/health")
    async def health():
        if not engines.alive:
            return JSONResponse({"status": "no engine running"}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "waiting": engines.waiting, "running": engines.running,
                "engines": [{"name": s.name, "alive": s.alive, "open": s.load, "running": s.running,
                             "waiting": s.waiting} for s in engines.schedulers]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "blockrt", "max_model_len": engines.info.limits.max_context}]}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/completions")
    async def completions(request: Request):
        if state.draining:
            raise APIError(503, "the server is shutting down; retry on another replica", type="server_error")
        raw = await _read_body(request, limits)
        if len(raw) > PARSE_OFF_LOOP_BYTES:  # parsing megabytes would stall every other request
            body, prompt, config, stops = await asyncio.to_thread(_parse, raw, state)
        else:
            body, prompt, config, stops = _parse(raw, state)
        stream = _Stream()
        try:
            job = engines.submit(prompt, config, stream.deliver)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error") from None
        metrics.prompt_tokens.inc(len(prompt))
        text = _Text(state.tokenizer, stops)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": state.model_name}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _stream(state, job, stream, text, head, len(prompt), include_usage)
        return await _complete(state, request, job, stream, text, head, len(prompt))

    return app


async def _watch_loop(metrics: Metrics, period_s: float = 0.01) -> None:
    """Record how late the event loop wakes from a `period_s` sleep: near 0 while it keeps up."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(period_s)
        metrics.loop_lag.observe(max(0.0, loop.time() - start - period_s))


async def _read_body(request: Request, limits: HTTPLimits) -> bytes:
    """The request body, after checking its content type, size (413 before reading past the
    limit) and arrival time (408)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"the request's Content-Type is {content_type or 'missing'!r}; send the JSON body with "
                       "'Content-Type: application/json'", code="unsupported_media_type")
    limit = limits.max_body_bytes
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                         "(--max-body-bytes)", code="request_too_large", headers={"Connection": "close"})
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    # a timer that cancels this task, rather than asyncio.wait_for: that runs the read as a task of
    # its own, which cost about as much as parsing the request (profiled in a burst of requests)
    task, expired = asyncio.current_task(), []
    timer = asyncio.get_running_loop().call_later(limits.body_timeout_s, lambda: expired.append(task.cancel()))
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except asyncio.CancelledError:
        if not expired:
            raise
        if hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled here
            task.uncancel()
        raise APIError(408, f"the request body did not arrive within {limits.body_timeout_s:g} s "
                       f"({size} bytes came)", code="request_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise APIError(499, "the client disconnected while sending the request") from None
    finally:
        timer.cancel()
    return b"".join(chunks)


def _parse(raw: bytes, state: _State) -> tuple[CompletionRequest, list[int], GenerationConfig, list[str]]:
    """The request, its prompt ids, generation config and stop strings, or an APIError(400)."""
    try:
        body = CompletionRequest.model_validate_json(raw)
    except ValidationError as e:
        message, param = _describe_validation(e.errors())
        raise APIError(400, message, param=param) from None
    if body.model is not None and body.model != state.model_name:
        raise APIError(404, f"model {body.model!r} is not served here; this server serves {state.model_name!r} "
                       "(see GET /v1/models)", param="model", code="model_not_found")
    for field, neutral, message in _UNSUPPORTED:
        if not neutral(body):
            raise APIError(400, f"{field}={getattr(body, field)!r}: {message}", param=field)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(s == "" for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(stops)}", param="stop")
    if state.tokenizer is None:
        if isinstance(body.prompt, str):
            raise APIError(400, "this model has no tokenizer, so 'prompt' must be a list of token ids; "
                           "re-export the artifact with --tokenizer tokenizer.json to send text", param="prompt")
        if stops:
            raise APIError(400, "this model has no tokenizer, so 'stop' strings cannot be matched; "
                           "use stop_token_ids", param="stop")
    prompt = state.tokenizer.encode(body.prompt).ids if isinstance(body.prompt, str) else list(body.prompt)
    config = GenerationConfig(max_new_tokens=16 if body.max_tokens is None else body.max_tokens,
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_k=max(body.top_k, 0), top_p=1.0 if body.top_p is None else body.top_p,
                              repetition_penalty=body.repetition_penalty,
                              seed=body.seed if body.seed is not None else secrets.randbelow(2**31 - 1),
                              stop_token_ids=list(body.stop_token_ids), ignore_eos=body.ignore_eos)
    try:
        state.engines.check(prompt, config)
    except InvalidRequest as e:
        raise APIError(400, e.message, param=e.param, code=e.code) from None
    return body, prompt, config, stops


def _describe_validation(errors) -> tuple[str, str | None]:
    """One line for pydantic's errors, naming the request field."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    kind = first.get("type")
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if not loc:
        return "the request body must be a JSON object with at least a 'prompt'", None
    if kind == "extra_forbidden":
        return f"unknown field {'.'.join(loc)!r} (see the OpenAI completions API; extensions: top_k, " \
               "repetition_penalty, ignore_eos, stop_token_ids)", param
    if kind == "missing":
        return f"the field {'.'.join(loc)!r} is required", param
    if param == "prompt":
        return "prompt must be a string or a list of integer token ids (one prompt per request)", param
    if param == "stop":
        return "stop must be a string or a list of strings", param
    return f"{'.'.join(loc)}: {first.get('msg')} (got {first.get('input')!r})", param


# ---------------------------------------------------------------------------------- responses

def _record(state: _State, status: int, finish_reason: str) -> None:
    state.metrics.requests.labels(str(status), finish_reason).inc()


async def _next(stream: _Stream, job: Job, state: _State, text: _Text) -> tuple[list[int], str | None]:
    """The job's tokens since the last call: (new ids, finish reason or None); raises APIError
    (500, or 503 at shutdown) for a failed job. A stop string ends it with "stop" and cancels it."""
    tokens = await stream.take()
    if stream.error is not None:
        raise APIError(503 if stream.shutdown else 500, stream.error, type="server_error")
    before = len(text.tokens)
    text.add(tokens)
    if text.stopped:
        if stream.finish is None:
            state.engines.cancel(job)
        return text.tokens[before:], "stop"
    return text.tokens[before:], stream.finish


async def _complete(state: _State, request: Request, job: Job, stream: _Stream, text: _Text, head: dict,
                    prompt_len: int):
    async def run() -> str:
        while True:
            _, finish = await _next(stream, job, state, text)
            if finish is not None:
                return finish

    work = asyncio.ensure_future(run())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():  # the client went away
            work.cancel()
            state.engines.cancel(job)
            _record(state, 499, "cancelled")
    if not work.done():
        return Response(status_code=499)
    finish = work.result()  # an APIError for a failed job
    _record(state, 200, finish)
    choice = {"index": 0, "text": text.text, "token_ids": text.tokens, "logprobs": None, "finish_reason": finish}
    return {**head, "choices": [choice], "usage": _usage(prompt_len, len(text.tokens))}


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _usage(prompt_len: int, completion_len: int) -> dict:
    return {"prompt_tokens": prompt_len, "completion_tokens": completion_len, "total_tokens": prompt_len + completion_len}


class _JobStream(StreamingResponse):
    """A streaming response that runs `on_close` however it ends (done, client gone, error)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _stream(state: _State, job: Job, stream: _Stream, text: _Text, head: dict, prompt_len: int, include_usage: bool):
    ended = []
    # every event of this stream starts the same: format that part once
    prefix = "data: " + json.dumps({**head, "choices": [{"index": 0, "text": None}]})[:-len("null}]}")]

    def event(payload) -> bytes:
        return f"data: {json.dumps(payload)}\n\n".encode()

    async def chunks():
        while True:
            try:
                ids, finish = await _next(stream, job, state, text)
            except APIError as e:
                ended.append((e.status, "error"))
                yield event({"error": {"message": e.message, "type": e.type, "param": None, "code": None}})
                yield b"data: [DONE]\n\n"
                return
            piece = text.pending(final=finish is not None)
            if piece or ids or finish:
                yield (f'{prefix}{"null" if piece is None else json.dumps(piece)},"token_ids":[{",".join(map(str, ids))}],'
                       f'"logprobs":null,"finish_reason":{"null" if finish is None else json.dumps(finish)}}}]}}\n\n'
                       ).encode()
            if finish is not None:
                break
        if include_usage:
            yield event({**head, "choices": [], "usage": _usage(prompt_len, len(text.tokens))})
        ended.append((200, finish))
        yield b"data: [DONE]\n\n"

    def on_close():
        if ended:
            _record(state, *ended[0])
        else:  # the client went away before the end
            state.engines.cancel(job)
            _record(state, 499, "cancelled")

    return _JobStream(chunks(), on_close)


# ---------------------------------------------------------------------------------- running it

def _protocol(header_timeout_s: float):
    """uvicorn's HTTP/1.1 protocol, closing connections that do not send a request's headers within
    `header_timeout_s` of connecting or of their last response (half-open sockets would otherwise
    hold file descriptors until the server can accept no more)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Protocol(AutoHTTPProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timeout()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_timeout()

        def _arm_header_timeout(self):
            self.loop.call_later(header_timeout_s, self._header_deadline, self.cycle)

        def _header_deadline(self, cycle):
            if self.cycle is cycle and not self.transport.is_closing():  # no new request since
                self.transport.close()

    return Protocol


class _Uvicorn(uvicorn.Server):
    """uvicorn that starts the app's graceful shutdown when it is told to exit."""

    def __init__(self, config: uvicorn.Config, state: _State):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self.request_shutdown()

    def request_shutdown(self) -> None:
        self.should_exit = True
        if self.state.loop is not None:
            try:
                self.state.loop.call_soon_threadsafe(self.state.begin_shutdown)
            except RuntimeError:  # the loop already closed
                pass


def _uvicorn(app: FastAPI, host: str, port: int, log_level: str) -> _Uvicorn:
    state: _State = app.state.blockrt
    limits = state.limits
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            http=_protocol(limits.header_timeout_s), backlog=BACKLOG,
                            timeout_graceful_shutdown=limits.shutdown_timeout_s + 5)
    return _Uvicorn(config, state)


class Server:
    """uvicorn on a background thread, for tests and notebooks:

        with Server(create_app(model)) as server:
            httpx.post(f"{server.url}/v1/completions", json={...})

    port 0 picks a free port (see `.port` once started)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self._server = _uvicorn(app, host, port, log_level)
        self.host, self.port = host, port
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 600.0) -> "Server":
        """Start serving; waits for the engines to load (up to `timeout` seconds)."""
        self._thread = threading.Thread(target=self._server.run, name="blockrt-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down gracefully (as on SIGTERM) and wait for it."""
        self._server.request_shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Workers:
    """`count` HTTP worker processes in front of one engine process per spec, with `Server`'s
    interface (start, stop, url, context manager). The workers accept connections from one shared
    listening socket (the kernel hands each new connection to one of them); every worker runs the
    whole app (parsing, routing to the least-loaded engine, streaming) and talks to every engine
    over a pipe of its own, so the per-request and per-token work of the HTTP side is spread over
    `count` processes instead of one event loop. /metrics answers for all workers (their values
    added up through a shared directory: metrics.py); /health for the worker that takes the request."""

    def __init__(self, specs: Sequence[ModelSpec], count: int, host: str = "127.0.0.1", port: int = 0,
                 max_queue: int = 256, model_name: str | None = None, limits: HTTPLimits | None = None,
                 log_level: str = "warning"):
        if count < 1:
            raise UserError(f"--http-workers {count}: expected at least 1")
        self.specs, self.count, self.host, self.port = list(specs), count, host, port
        self.max_queue, self.model_name, self.log_level = max_queue, model_name, log_level
        self.limits = limits or HTTPLimits()
        self.engines: list = []
        self.workers: list = []
        self._status: list = []
        self._ready: list[bool] = []
        self.loop_lag: list[tuple[float, float]] = []  # (sum, count) of each worker's event-loop lag samples
        self._metrics_dir: str | None = None  # the workers' shared metrics (metrics.SHARED_DIR_ENV)
        self._load_table = None  # SharedLoad's table: open jobs per (worker, engine)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 600.0) -> "Workers":
        """Start the engines, then the workers once the engines serve; returns when every worker accepts."""
        import multiprocessing
        import socket

        from .core import run_core_process

        context = multiprocessing.get_context("spawn")
        pipes = []  # per engine: this process's end of one pipe per worker
        try:
            for i, spec in enumerate(self.specs):
                ends = [context.Pipe() for _ in range(self.count)]
                engine = context.Process(target=run_core_process, args=(spec, [child for _, child in ends]),
                                         name=f"blockrt-engine-{i}", daemon=True)
                engine.start()
                for _, child in ends:
                    child.close()
                self.engines.append(engine)
                pipes.append([mine for mine, _ in ends])
            infos = []
            for spec, ends, engine in zip(self.specs, pipes, self.engines):
                hellos = [_receive(end, timeout) for end in ends]
                if any(h is None for h in hellos):
                    raise UserError(f"the engine process for {spec.describe()} exited while loading the model "
                                    f"(exit code {engine.exitcode}); see its log above")
                if isinstance(hellos[0], tuple):
                    raise UserError(f"engine {spec.describe()}: {hellos[0][1]}")
                infos.append(hellos[0])
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(BACKLOG)
            self.port = sock.getsockname()[1]
            self._metrics_dir = tempfile.mkdtemp(prefix="blockrt-metrics-")
            load_table = self._load_table = SharedLoad.create(context, self.count, len(self.specs))
            for w in range(self.count):
                status, child = context.Pipe()
                links = [(ends[w], info) for ends, info in zip(pipes, infos)]
                args = (links, w, self.count, sock, self.max_queue, self.model_name, self.limits, self.log_level, child,
                        load_table)
                worker = context.Process(target=_http_worker, args=args, name=f"blockrt-http-{w}")
                with _environment(SHARED_DIR_ENV, self._metrics_dir):  # the workers' metrics add up (metrics.py)
                    worker.start()
                child.close()
                self.workers.append(worker)
                self._status.append(status)
            for w, status in enumerate(self._status):
                if _receive(status, timeout) != "ready":
                    raise RuntimeError(f"HTTP worker {w} did not start (exit code {self.workers[w].exitcode})")
                self._ready.append(True)
            sock.close()  # the workers hold it now
        except BaseException:
            _close(pipes)
            self.stop(5)
            raise
        _close(pipes)  # the workers hold them now: an engine sees its workers go away
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down gracefully: each worker as on SIGTERM, then the engines (they stop once every
        worker is gone)."""
        for worker in self.workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)
        for worker, status in zip(self.workers, self._status):
            lag = _receive(status, timeout)
            if isinstance(lag, tuple):
                self.loop_lag.append(lag)
            worker.join(timeout)
            if worker.is_alive():
                worker.kill()
                worker.join()
        for engine in self.engines:
            engine.join(timeout)
            if engine.is_alive():
                log.warning("engine %s did not stop in %s s: killing it", engine.name, timeout)
                engine.kill()
                engine.join()
        self.workers, self._status, self._ready, self.engines = [], [], [], []
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._metrics_dir = None

    def run(self) -> None:
        """Start, serve in the foreground until SIGTERM or SIGINT (passed on to the workers, which
        shut down gracefully), then stop. A signal while the engines load stops the start; one while
        the workers start reaches them once they serve."""
        pending: list[int] = []

        def forward(signum, frame) -> None:
            if not self.workers:
                raise KeyboardInterrupt  # loading the engines: `start` cleans up
            if len(self._ready) < self.count:
                pending.append(signum)
                return
            for worker in self.workers:
                if worker.is_alive():
                    os.kill(worker.pid, signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            for signum in pending:
                forward(signum, None)
            log.info("serving on %s: %s (%d HTTP workers, queue limit %d per engine)", self.url,
                     self.specs[0].name or self.specs[0].describe(), self.count, self.max_queue)
            self.watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.stop(self.limits.shutdown_timeout_s + 10)

    def watch(self) -> None:
        """Wait until every worker has exited. One that exits on its own while the others serve
        (killed, or crashed) is logged, and its open jobs leave the routing table (`SharedLoad.clear`;
        its engines cancel them), so the others do not keep routing around jobs that are gone."""
        import multiprocessing.connection

        running = {worker.sentinel: (w, worker) for w, worker in enumerate(self.workers)}
        while running:
            for sentinel in multiprocessing.connection.wait(list(running)):
                w, worker = running.pop(sentinel)
                worker.join()
                if running and worker.exitcode != 0:
                    log.warning("HTTP worker %d exited (code %s); %d keep serving and its requests were cancelled",
                                w, worker.exitcode, len(running))
                if self._load_table is not None:
                    SharedLoad(self._load_table, w, len(self.specs)).clear()

    def __enter__(self) -> "Workers":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def _environment(name: str, value: str):
    """`name=value` in this process's environment within the block (what a process spawned there inherits)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _close(pipes: list[list]) -> None:
    for ends in pipes:
        for end in ends:
            end.close()


def _receive(connection, timeout: float):
    """The next message on `connection`, or None when it closes or nothing comes within `timeout` s."""
    try:
        return connection.recv() if connection.poll(timeout) else None
    except (EOFError, OSError):
        return None


def _http_worker(links, front_end: int, front_ends: int, sock, max_queue: int, model_name: str | None,
                 limits: HTTPLimits, log_level: str, status, load_table) -> None:
    """An HTTP worker process of `Workers`: the app on the engines of `links` ((pipe, ModelInfo) per
    engine), accepting on the shared socket and routing by the open jobs of all workers
    (`load_table`, see SharedLoad); says "ready" once it accepts, and at the end sends its
    event-loop lag (sum, count)."""
    os.setpgid(0, 0)  # signals come from the server process, which forwards its own
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    schedulers = [Scheduler.attach(connection, info, front_end, front_ends, max_queue, name=str(i))
                  for i, (connection, info) in enumerate(links)]
    shared = SharedLoad(load_table, front_end, len(links))
    app = create_app(schedulers, max_queue=max_queue, model_name=model_name, limits=limits, shared_load=shared)
    server = _uvicorn(app, "", 0, log_level)

    def ready() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.01)
        status.send("ready" if server.started else "failed")

    threading.Thread(target=ready, daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn raises the signal it stopped for again once done:
        signal.signal(sig, lambda signum, frame: None)  # then it finds this handler, and the report below is sent
    server.run(sockets=[sock])
    status.send(app.state.blockrt.metrics.loop_lag_sum_count())


def serve(source, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 256, model_name: str | None = None,
          limits: HTTPLimits | None = None, log_level: str = "info", http_workers: int = 1) -> None:
    """Serve `source` (a Model, or ModelSpecs for engine processes) until SIGTERM or SIGINT;
    `http_workers` > 1 (ModelSpecs only) spreads the HTTP side over that many processes (`Workers`)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: expected 0..65535")
    if http_workers > 1:
        if not (isinstance(source, Sequence) and all(isinstance(s, ModelSpec) for s in source)):
            raise UserError("HTTP workers serve engine processes: give ModelSpecs, not a Model")
        Workers(source, http_workers, host, port, max_queue, model_name, limits, log_level).run()
        return
    app = create_app(source, max_queue=max_queue, model_name=model_name, limits=limits)
    engines = app.state.blockrt.engines
    engines.start()  # load the model first: a bad artifact or device is a clear error, not a failed startup
    log.info("serving on http://%s:%d: %s (queue limit %d per engine)", host, port, engines.info.name, max_queue)
    _uvicorn(app, host, port, log_level).run()
