"""The OpenAI-compatible HTTP server: `create_app(model)` builds the FastAPI app, `Server` runs it
on a background thread (tests, notebooks) and `serve` in the foreground (`blockrt serve`).

Handlers validate a request (400 with an OpenAI error object, in the words of the request's
fields), submit it to the engine thread (scheduler.py; 429 when too many wait for a row) and read
its tokens from an asyncio.Queue that the engine thread fills with `call_soon_threadsafe`.
Detokenization and stop strings run here, on the event loop, so the engine thread only generates.
A client that disconnects, streaming or not, cancels its request and frees its row.

Endpoints: POST /v1/completions (plain or SSE streaming), GET /v1/models, GET /health,
GET /metrics (Prometheus).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException

from blockrt.errors import UserError
from blockrt.generation import GenerationConfig

from .metrics import Metrics
from .scheduler import InvalidRequest, QueueFull, Scheduler, ShuttingDown, Update

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 16
RETRY_AFTER_S = 1


# ---------------------------------------------------------------------------------- request schema

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI /v1/completions fields, plus the extensions top_k, repetition_penalty, ignore_eos and
    stop_token_ids. Fields OpenAI has but this server does not implement are accepted only at their
    neutral value, so a client that sends the defaults works; anything unknown is a 400."""

    model_config = ConfigDict(extra="forbid")

    prompt: Union[str, list[StrictInt]]
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(16, ge=1)
    temperature: Optional[float] = Field(1.0, ge=0)
    top_p: Optional[float] = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, description="0 or -1 = off")
    repetition_penalty: float = Field(1.0, gt=0)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[StrictInt] = Field(default_factory=list)
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
        self.text = ""
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

    def pending(self, final: bool) -> str:
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

class _Mailbox:
    """Hands updates from the engine thread to the event loop. A round ends a block for every
    running request at once; waking the loop once per round instead of once per request gave
    about 5% more throughput with 64 streams (tiny_block, 2 CPU cores), where the event loop and
    the engine thread compete for the GIL."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Update]] = []

    def put(self, queue: asyncio.Queue, update: Update) -> None:  # engine thread
        with self._lock:
            self._items.append((queue, update))
            if len(self._items) > 1:  # a drain is already scheduled
                return
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the event loop is closed: the server stopped
            pass

    def _drain(self) -> None:  # event loop
        with self._lock:
            items, self._items = self._items, []
        for queue, update in items:
            queue.put_nowait(update)


class _State:
    def __init__(self, model, scheduler: Scheduler, metrics: Metrics, model_name: str):
        self.model, self.scheduler, self.metrics, self.model_name = model, scheduler, metrics, model_name
        self.tokenizer = model.tokenizer
        self.created = int(time.time())
        self.mailbox: _Mailbox | None = None  # made with the event loop, at startup


def create_app(model, max_queue: int = 256, model_name: str | None = None) -> FastAPI:
    """An OpenAI-compatible app serving `model` (a blockrt.runtime.Model). It starts the engine
    thread when the app starts (lifespan) and stops it at shutdown."""
    metrics = Metrics()
    scheduler = Scheduler(model, max_queue=max_queue, metrics=metrics)
    name = model_name or (model.directory.name if model.directory is not None else "blockrt")
    state = _State(model, scheduler, metrics, name)

    @asynccontextmanager
    async def lifespan(app):
        state.mailbox = _Mailbox(asyncio.get_running_loop())
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="blockrt", lifespan=lifespan)
    app.state.blockrt = state

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        metrics.requests.labels(str(exc.status), "error" if exc.status >= 500 else "none").inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _describe_validation(exc.errors())
        metrics.requests.labels("400", "none").inc()
        return APIError(400, message, param=param).response()

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
        if not scheduler.alive:
            return JSONResponse({"status": "engine thread not running"}, status_code=503)
        return {"status": "ok", "waiting": scheduler.waiting, "running": scheduler.running}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": state.created,
                                            "owned_by": "blockrt", "max_model_len": scheduler.max_context}]}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt, config, stops = _parse(body, state)
        updates: asyncio.Queue[Update] = asyncio.Queue()
        try:
            job = scheduler.submit(prompt, config, functools.partial(state.mailbox.put, updates))
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error") from None
        metrics.prompt_tokens.inc(len(prompt))
        text = _Text(state.tokenizer, stops)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _stream(state, job, updates, text, head, len(prompt), include_usage)
        return await _complete(state, request, job, updates, text, head, len(prompt))

    return app


def _parse(body: CompletionRequest, state: _State) -> tuple[list[int], GenerationConfig, list[str]]:
    """The request's prompt ids, generation config and stop strings, or an APIError(400)."""
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
        state.scheduler.check(prompt, config)
    except InvalidRequest as e:
        raise APIError(400, e.message, param=e.param, code=e.code) from None
    return prompt, config, stops


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


async def _next(updates: asyncio.Queue, job, scheduler: Scheduler, text: _Text) -> tuple[list[int], str | None]:
    """Await the job's next update: (new ids, finish reason or None); raises APIError(500) for a
    failed job. A stop string ends it with "stop" and cancels the job."""
    update = await updates.get()
    if update.error is not None:
        raise APIError(500, update.error, type="server_error")
    before = len(text.tokens)
    text.add(update.tokens)
    if text.stopped:
        if not update.finished:
            scheduler.cancel(job)
        return text.tokens[before:], "stop"
    return text.tokens[before:], update.finish_reason


async def _complete(state: _State, request: Request, job, updates, text: _Text, head: dict, prompt_len: int):
    async def run() -> str:
        while True:
            _, finish = await _next(updates, job, state.scheduler, text)
            if finish is not None:
                return finish

    work = asyncio.ensure_future(run())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():  # the client went away (or the server is stopping)
            work.cancel()
            state.scheduler.cancel(job)
            _record(state, 499, "cancelled")
    if not work.done():
        return Response(status_code=499)
    finish = work.result()  # an APIError(500) for a failed job
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


def _stream(state: _State, job, updates, text: _Text, head: dict, prompt_len: int, include_usage: bool):
    ended = []

    def event(payload) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    async def chunks():
        while True:
            try:
                ids, finish = await _next(updates, job, state.scheduler, text)
            except APIError as e:
                ended.append((500, "error"))
                yield event({"error": {"message": e.message, "type": e.type, "param": None, "code": None}})
                yield "data: [DONE]\n\n"
                return
            piece = text.pending(final=finish is not None)
            if piece or ids or finish:
                choice = {"index": 0, "text": piece, "token_ids": ids, "logprobs": None, "finish_reason": finish}
                yield event({**head, "choices": [choice]})
            if finish is not None:
                break
        if include_usage:
            yield event({**head, "choices": [], "usage": _usage(prompt_len, len(text.tokens))})
        ended.append((200, finish))
        yield "data: [DONE]\n\n"

    def on_close():
        if ended:
            _record(state, *ended[0])
        else:  # the client went away before the end
            state.scheduler.cancel(job)
            _record(state, 499, "cancelled")

    return _JobStream(chunks(), on_close)


# ---------------------------------------------------------------------------------- running it

class Server:
    """uvicorn on a background thread, for tests and notebooks:

        with Server(create_app(model)) as server:
            httpx.post(f"{server.url}/v1/completions", json={...})

    port 0 picks a free port (see `.port` once started)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                     lifespan="on", timeout_graceful_shutdown=5))
        self.host, self.port = host, port
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "Server":
        self._thread = threading.Thread(target=self._server.run, name="blockrt-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 256, model_name: str | None = None,
          log_level: str = "info") -> None:
    """Serve `model` until interrupted (Ctrl-C)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: expected 0..65535")
    uvicorn.run(create_app(model, max_queue=max_queue, model_name=model_name), host=host, port=port,
                log_level=log_level, timeout_graceful_shutdown=10)
