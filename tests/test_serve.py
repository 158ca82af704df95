"""`blockrt serve`: the real HTTP server on 127.0.0.1 (tiny_block, torch backend, CPU) against offline
generation: same tokens, continuous batching, streaming, errors, back-pressure and cancellation."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi", reason="serving needs the 'serve' extra (pip install -e '.[dev]')")
httpx = pytest.importorskip("httpx", reason="the serving tests talk HTTP with httpx (pip install -e '.[dev]')")

from blockrt.errors import UserError  # noqa: E402
from blockrt.exporter import build_model, get_preset, init_random  # noqa: E402
from blockrt.generation import GenerationConfig  # noqa: E402
from blockrt.runtime import Model  # noqa: E402
from blockrt.runtime.serve import HTTPLimits, ModelSpec, Scheduler, Server, create_app  # noqa: E402

MAX_CONTEXT = 512


def tiny_model(max_batch: int = 8, max_context: int = MAX_CONTEXT, tokenizer=None) -> Model:
    """tiny_block with random weights (seed 0) on the PyTorch engine, CPU; every call builds an
    independent model with the same weights."""
    torch_model = init_random(build_model(get_preset("tiny_block")), seed=0).eval()
    return Model.from_torch(torch_model, dtype="fp32", max_batch=max_batch, max_context=max_context, device="cpu",
                            tokenizer=tokenizer)


@pytest.fixture(scope="module")
def reference() -> Model:
    """Offline generation with the served weights, on a model of its own."""
    return tiny_model()


def tiny_spec(max_batch: int = 8, max_context: int = MAX_CONTEXT) -> ModelSpec:
    """The weights of `tiny_model`, loaded by an engine process of their own."""
    return ModelSpec(preset="tiny_block", dtype="fp32", max_batch=max_batch, max_context=max_context, device="cpu")


@pytest.fixture(scope="module")
def server():
    """The server as `blockrt serve` runs it: the engine in a process of its own."""
    with Server(create_app(tiny_spec(), max_queue=64, model_name="tiny")) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def complete(client, **body) -> dict:
    r = client.post("/v1/completions", json={"temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream(client, **body) -> list[dict]:
    """The SSE events of a streaming completion, as parsed JSON, up to and checking `[DONE]`."""
    events = []
    with client.stream("POST", "/v1/completions", json={"temperature": 0, **body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        events.append(json.loads(line[len("data: "):]))
    return events


def expected(reference: Model, prompts: list[list[int]], max_tokens: list[int]) -> list[tuple[list[int], str]]:
    """Greedy offline tokens and finish reason per prompt, each with its own max_tokens: one batched
    generate up to the longest, cut to each limit (a greedy sequence's prefix does not depend on
    how long it runs)."""
    results = reference.generate(prompts, GenerationConfig(max_new_tokens=max(max_tokens)))
    out = []
    for r, n in zip(results, max_tokens):
        tokens = r.token_ids[:n]
        out.append((tokens, "stop" if r.finish_reason == "stop" and len(r.token_ids) <= n else "length"))
    return out


def metric(client, name: str, **labels) -> float:
    """The sum of the metric's series that carry the given labels (e.g. over engines)."""
    total = 0.0
    for found in re.finditer(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", client.get("/metrics").text, re.MULTILINE):
        series = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1) or ""))
        if all(series.get(k) == str(v) for k, v in labels.items()):
            total += float(found.group(2))
    return total


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


# ------------------------------------------------------------------------------------- tokens

def test_greedy_completions_equal_offline_generate(client, reference):
    prompts = [[1, 2, 3], [5] * 9, list(range(40, 80)), [7]]
    limits = [16, 33, 5, 64]
    for prompt, n, (tokens, reason) in zip(prompts, limits, expected(reference, prompts, limits)):
        out = complete(client, prompt=prompt, max_tokens=n)
        choice = out["choices"][0]
        assert choice["token_ids"] == tokens
        assert choice["finish_reason"] == reason
        assert out["object"] == "text_completion" and out["model"] == "tiny" and out["id"].startswith("cmpl-")
        assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(tokens),
                                "total_tokens": len(prompt) + len(tokens)}


def test_32_concurrent_clients_with_different_lengths_get_offline_tokens(server, reference):
    prompts = [[(13 * i + j) % 500 + 1 for j in range(1 + (37 * i) % 61)] for i in range(32)]
    limits = [1 + (53 * i) % 200 for i in range(32)]
    want = expected(reference, prompts, limits)

    def one(i):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            body = {"prompt": prompts[i], "max_tokens": limits[i]}
            if i % 2:
                events = stream(c, **body)
                return [t for e in events for t in e["choices"][0]["token_ids"]], events[-1]["choices"][0]["finish_reason"]
            choice = complete(c, **body)["choices"][0]
            return choice["token_ids"], choice["finish_reason"]

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"request {i}: prompt of {len(prompts[i])}, max_tokens {limits[i]}"


def test_seeded_sampling_equals_offline_generate_with_the_same_seed(client, reference):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    config = dict(temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    offline = reference.generate([prompt], GenerationConfig(max_new_tokens=24, **config))[0]
    out = complete(client, prompt=prompt, max_tokens=24, **config)
    assert out["choices"][0]["token_ids"] == offline.token_ids
    assert complete(client, prompt=prompt, max_tokens=24, **config)["choices"][0]["token_ids"] == offline.token_ids


def test_streaming_returns_the_same_tokens_as_non_streaming(client):
    body = dict(prompt=[11, 12, 13, 14, 15], max_tokens=41, ignore_eos=True)
    plain = complete(client, **body)["choices"][0]
    events = stream(client, **body, stream_options={"include_usage": True})
    chunks = [e for e in events if e["choices"]]
    assert [t for e in chunks for t in e["choices"][0]["token_ids"]] == plain["token_ids"]
    assert all(e["choices"][0]["finish_reason"] is None for e in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) > 1  # tokens arrive block by block
    assert {e["id"] for e in events} == {events[0]["id"]} and events[0]["object"] == "text_completion"
    assert events[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 41, "total_tokens": 46}


def test_a_short_request_sent_while_a_long_one_runs_finishes_first(server, client):
    """Continuous batching: the short request joins the running batch at a block boundary."""
    finished = {}
    started = threading.Event()

    def long_request():
        with httpx.Client(base_url=server.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={"prompt": [1, 2, 3, 4], "max_tokens": 480,
                                                             "temperature": 0, "ignore_eos": True, "stream": True}) as r:
                tokens = 0
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        tokens += len(json.loads(line[6:])["choices"][0]["token_ids"])
                        started.set()
        finished["long"] = (time.monotonic(), tokens)

    thread = threading.Thread(target=long_request)
    thread.start()
    assert started.wait(30)
    out = complete(client, prompt=[9, 8, 7], max_tokens=4, ignore_eos=True)
    finished["short"] = time.monotonic()
    assert "long" not in finished, "the short request waited for the long one to finish"
    thread.join(60)
    assert out["choices"][0]["finish_reason"] == "length" and len(out["choices"][0]["token_ids"]) == 4
    assert finished["long"][1] == 480 and finished["long"][0] > finished["short"]


# ------------------------------------------------------------------------------------- errors

BAD_REQUESTS = {
    "bad JSON": ('{"prompt": [1, 2', "not valid JSON", None),
    "unknown field": ({"prompt": [1], "max_token": 5}, "unknown field 'max_token'", "max_token"),
    "prompt too long": ({"prompt": [1] * 500, "max_tokens": 100}, "prompt too long", "prompt"),
    "negative temperature": ({"prompt": [1], "temperature": -1}, "temperature", "temperature"),
    "n=2": ({"prompt": [1], "n": 2}, "only n=1", "n"),
    "top_p 0": ({"prompt": [1], "top_p": 0}, "top_p", "top_p"),
    "max_tokens 0": ({"prompt": [1], "max_tokens": 0}, "max_tokens", "max_tokens"),
    "id outside vocab": ({"prompt": [1, 512]}, "outside the vocabulary", "prompt"),
    "empty prompt": ({"prompt": []}, "empty", "prompt"),
    "batch of prompts": ({"prompt": [[1, 2], [3]]}, "one prompt per request", "prompt"),
    "text without tokenizer": ({"prompt": "hello"}, "no tokenizer", "prompt"),
    "logprobs": ({"prompt": [1], "logprobs": 2}, "logprobs are not supported", "logprobs"),
    "echo": ({"prompt": [1], "echo": True}, "echo is not supported", "echo"),
    "missing prompt": ({"max_tokens": 3}, "'prompt' is required", "prompt"),
    "stop id outside vocab": ({"prompt": [1], "stop_token_ids": [600]}, "outside the vocabulary", "stop_token_ids"),
    "temperature Infinity": ('{"prompt": [1], "temperature": Infinity}', "finite number", "temperature"),
    "temperature 1e999": ('{"prompt": [1], "temperature": 1e999}', "finite number", "temperature"),
    "max_tokens as a string": ({"prompt": [1], "max_tokens": "16"}, "valid integer", "max_tokens"),
    "ignore_eos as a number": ({"prompt": [1], "ignore_eos": 1}, "valid boolean", "ignore_eos"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_get_400_with_a_message_and_the_server_keeps_serving(client, name):
    body, message, param = BAD_REQUESTS[name]
    if isinstance(body, str):
        r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}
    assert complete(client, prompt=[1, 2], max_tokens=2)["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_body_that_is_not_declared_json_gets_415_saying_so(client):
    r = client.post("/v1/completions", content=json.dumps({"prompt": [1]}), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415, r.text
    assert "Content-Type is 'text/plain'" in r.json()["error"]["message"] and "application/json" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": [1], "max_tokens": 1}).status_code == 200


def test_text_is_null_without_a_tokenizer(client):
    assert complete(client, prompt=[1, 2], max_tokens=3)["choices"][0]["text"] is None
    assert all(e["choices"][0]["text"] is None for e in stream(client, prompt=[1, 2], max_tokens=9))


def test_unknown_model_is_404_and_the_served_one_is_listed(client):
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": [1]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert complete(client, model="tiny", prompt=[1], max_tokens=1)["model"] == "tiny"
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["data"][0]["max_model_len"] == MAX_CONTEXT
    assert client.get("/health").json()["status"] == "ok"


def test_metrics_count_tokens_requests_and_latency(client):
    before = metric(client, "blockrt_generated_tokens_total")
    requests = metric(client, "blockrt_requests_total", finish_reason="length", status="200")
    complete(client, prompt=[4, 4, 4], max_tokens=12, ignore_eos=True)
    assert metric(client, "blockrt_generated_tokens_total") == before + 12
    assert metric(client, "blockrt_requests_total", finish_reason="length", status="200") == requests + 1
    assert metric(client, "blockrt_request_latency_seconds_count") >= 1
    assert metric(client, "blockrt_time_to_first_token_seconds_count") >= 1
    assert metric(client, "blockrt_queue_depth") == 0 and metric(client, "blockrt_running_requests") == 0


# ------------------------------------------------------------------------------------- text

@pytest.fixture(scope="module")
def text_server():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(get_preset("tiny_block").vocab_size)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with Server(create_app(tiny_model(max_batch=4, tokenizer=tokenizer))) as s:
        yield s


def test_text_prompts_are_encoded_and_stop_strings_cut_the_text(text_server, reference):
    with httpx.Client(base_url=text_server.url, timeout=60) as c:
        full = complete(c, prompt="w1 w2 w3", max_tokens=30, ignore_eos=True)["choices"][0]
        offline = reference.generate([[1, 2, 3]], GenerationConfig(max_new_tokens=30, ignore_eos=True))[0]
        assert full["token_ids"] == offline.token_ids
        assert full["text"] == " ".join(f"w{t}" for t in offline.token_ids)
        cut = next(k for k in range(3, 30) if full["token_ids"][k] not in full["token_ids"][:k])
        stop = f" w{full['token_ids'][cut]}"
        plain = complete(c, prompt="w1 w2 w3", max_tokens=30, ignore_eos=True, stop=["never", stop])["choices"][0]
        assert plain["text"] == full["text"][:full["text"].index(stop)]
        assert plain["token_ids"] == full["token_ids"][:cut + 1] and plain["finish_reason"] == "stop"
        events = stream(c, prompt="w1 w2 w3", max_tokens=30, ignore_eos=True, stop=stop)
        assert "".join(e["choices"][0]["text"] for e in events) == plain["text"]
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
        wait_for(lambda: c.get("/health").json()["running"] == 0, what="the stopped request to leave the batch")


# ------------------------------------------------------------------------------------- capacity

def test_queue_limit_answers_429_and_every_accepted_request_completes_once():
    with Server(create_app(tiny_model(max_batch=2), max_queue=3)) as s, \
            httpx.Client(base_url=s.url, timeout=60) as c:

        def one(i):
            with httpx.Client(base_url=s.url, timeout=60) as ci:
                return ci.post("/v1/completions", json={"prompt": [i + 1, 2, 3], "max_tokens": 40, "temperature": 0,
                                                        "ignore_eos": True})

        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(one, range(24)))
        ok = [r for r in responses if r.status_code == 200]
        busy = [r for r in responses if r.status_code == 429]
        assert len(ok) + len(busy) == 24 and busy and len(ok) >= 3  # at least the queue's worth
        assert all(r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "rate_limit_error" for r in busy)
        assert all(r.json()["usage"]["completion_tokens"] == 40 for r in ok)
        assert len({r.json()["id"] for r in ok}) == len(ok)
        assert metric(c, "blockrt_generated_tokens_total") == 40 * len(ok)  # no token lost or produced twice
        assert metric(c, "blockrt_requests_total", finish_reason="length", status="200") == len(ok)
        assert metric(c, "blockrt_requests_total", finish_reason="none", status="429") == len(busy)
        assert metric(c, "blockrt_queue_depth") == 0 and metric(c, "blockrt_running_requests") == 0
        assert complete(c, prompt=[1], max_tokens=3, ignore_eos=True)["usage"]["completion_tokens"] == 3


@pytest.fixture(scope="module")
def one_row_server():
    """A single batch row and a long context: one long request holds the whole server."""
    with Server(create_app(tiny_model(max_batch=1, max_context=4096))) as s:
        yield s


LONG = {"prompt": [1, 2, 3], "max_tokens": 4000, "temperature": 0, "ignore_eos": True}


def test_a_client_that_disconnects_frees_its_row(one_row_server):
    with httpx.Client(base_url=one_row_server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            assert next(line for line in r.iter_lines() if line).startswith("data: {")
        # the stream is closed after its first chunk
        wait_for(lambda: metric(c, "blockrt_requests_total", finish_reason="cancelled", status="499") == 1,
                 what="the server to see the disconnect")
        wait_for(lambda: metric(c, "blockrt_running_requests") == 0, what="the row to free")
        assert metric(c, "blockrt_request_latency_seconds_count") == 0  # a cancelled request has no latency
        start = time.monotonic()
        assert complete(c, prompt=[5, 6], max_tokens=8, ignore_eos=True)["usage"]["completion_tokens"] == 8
        assert time.monotonic() - start < 5

        with pytest.raises(httpx.ReadTimeout):  # not streaming: the client gives up waiting
            httpx.post(f"{one_row_server.url}/v1/completions", json=LONG, timeout=0.5)
        wait_for(lambda: metric(c, "blockrt_requests_total", finish_reason="cancelled", status="499") == 2,
                 what="the server to see the second disconnect")
        wait_for(lambda: metric(c, "blockrt_running_requests") == 0, what="the row to free")
        assert complete(c, prompt=[5, 6], max_tokens=8, ignore_eos=True)["usage"]["completion_tokens"] == 8
        assert metric(c, "blockrt_generated_tokens_total") < 2 * 4000
        assert metric(c, "blockrt_request_latency_seconds_count") == 2  # the two completed ones only


def test_a_generator_failure_fails_the_running_request_only(reference):
    """The running request gets an error; the one waiting in the queue still completes, with the
    right tokens, and the server keeps serving."""
    model = tiny_model(max_batch=1, max_context=4096)
    token_decoder = model.engines["token_decoder"]
    fail = threading.Event()

    def flaky(*args, **kwargs):
        if fail.is_set():
            fail.clear()
            raise RuntimeError("injected device failure")
        return token_decoder(*args, **kwargs)

    model.engines["token_decoder"] = flaky
    with Server(create_app(model)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        waiting = ThreadPoolExecutor(1)
        with c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")
            queued = waiting.submit(complete, c, prompt=[7, 7, 7, 7, 7], max_tokens=9)
            wait_for(lambda: metric(c, "blockrt_queue_depth") == 1, what="the second request to queue")
            fail.set()
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert "injected device failure" in events[-1]["error"]["message"]
        tokens, reason = expected(reference, [[7, 7, 7, 7, 7]], [9])[0]
        assert queued.result(30)["choices"][0]["token_ids"] == tokens
        assert complete(c, prompt=[7, 7, 7, 7, 7], max_tokens=9)["choices"][0]["token_ids"] == tokens
        assert metric(c, "blockrt_requests_total", finish_reason="error", status="500") == 1
        waiting.shutdown()


def test_a_failed_non_streaming_request_gets_500():
    model = tiny_model(max_batch=2)
    model.engines["token_decoder"] = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken engine"))
    with Server(create_app(model)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 4})
        assert r.status_code == 500 and "broken engine" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"
        assert c.get("/health").status_code == 200


def test_a_request_the_generator_refuses_gets_500_and_others_complete():
    model = tiny_model(max_batch=2)
    gen = model.generator()
    add = gen.add

    def picky(prompt, config):
        if prompt == [13, 13]:
            raise RuntimeError("refused")
        return add(prompt, config)

    gen.add = picky
    with Server(create_app(model)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/v1/completions", json={"prompt": [13, 13], "max_tokens": 4})
        assert r.status_code == 500 and "RuntimeError: refused" in r.json()["error"]["message"]
        assert complete(c, prompt=[13, 14], max_tokens=4, ignore_eos=True)["usage"]["completion_tokens"] == 4


def test_a_model_is_driven_by_one_engine_thread_at_a_time():
    model = tiny_model()
    first = Scheduler(model)
    first.start()
    try:
        with pytest.raises(UserError, match="already served by another engine thread"):
            Scheduler(model).start()
    finally:
        first.stop()
    second = Scheduler(model)
    second.start()  # the first one stopped: the model is free again
    second.stop()


# ------------------------------------------------------------------------------------- hardening

LIMITS = HTTPLimits(max_body_bytes=256 * 1024, header_timeout_s=1.0, body_timeout_s=1.0)


@pytest.fixture(scope="module")
def guarded_server():
    with Server(create_app(tiny_model(max_batch=2), limits=LIMITS)) as s:
        yield s


def test_a_body_above_the_limit_gets_413_before_it_is_read(guarded_server):
    big = json.dumps({"prompt": [1] * 100_000}).encode()  # 300 kB
    with httpx.Client(base_url=guarded_server.url, timeout=30) as c:
        r = c.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert "limit of 262144 bytes" in r.json()["error"]["message"]

        def chunked():  # no Content-Length: counted while it arrives
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]

        r = c.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert complete(c, prompt=[1, 2], max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_a_large_body_is_parsed_off_the_event_loop(guarded_server):
    """A body near the limit is parsed on a worker thread: /health keeps answering meanwhile."""
    body = json.dumps({"prompt": [7] * 60_000, "max_tokens": 1}).encode()  # 240 kB, prompt too long
    with httpx.Client(base_url=guarded_server.url, timeout=30) as c, ThreadPoolExecutor(4) as pool:
        big = [pool.submit(c.post, "/v1/completions", content=body, headers={"Content-Type": "application/json"})
               for _ in range(3)]
        slowest = 0.0
        while not all(f.done() for f in big):
            start = time.monotonic()
            assert c.get("/health").status_code == 200
            slowest = max(slowest, time.monotonic() - start)
        assert all(f.result().status_code == 400 for f in big)
        assert "prompt too long" in big[0].result().json()["error"]["message"]
        assert slowest < 2.0


def test_connections_that_send_nothing_or_half_a_request_are_closed(guarded_server):
    host, port = guarded_server.host, guarded_server.port
    idle = [socket.create_connection((host, port)) for _ in range(20)]
    partial = [socket.create_connection((host, port)) for _ in range(20)]
    for sock in partial:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
    slow_body = socket.create_connection((host, port))
    slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    for sock in [*idle, *partial, slow_body]:
        sock.settimeout(10)
    for sock in [*idle, *partial]:
        assert sock.recv(1024) == b"", "the server kept a connection that never sent its headers"
    answer = b""
    while chunk := slow_body.recv(65536):  # the server answers, then closes
        answer += chunk
    answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer
    for sock in [*idle, *partial, slow_body]:
        sock.close()
    with httpx.Client(base_url=guarded_server.url, timeout=30) as c:
        assert complete(c, prompt=[1, 2], max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_two_engines_share_the_load_and_report_per_engine_metrics(reference):
    with Server(create_app([tiny_spec(max_batch=4), tiny_spec(max_batch=4)])) as s:
        prompts = [[(11 * i + j) % 500 + 1 for j in range(3 + i % 5)] for i in range(12)]
        want = expected(reference, prompts, [20] * 12)

        def one(i):
            with httpx.Client(base_url=s.url, timeout=60) as c:
                choice = complete(c, prompt=prompts[i], max_tokens=20)["choices"][0]
                return choice["token_ids"], choice["finish_reason"]

        with ThreadPoolExecutor(12) as pool:
            assert list(pool.map(one, range(12))) == want
        with httpx.Client(base_url=s.url, timeout=60) as c:
            per_engine = [metric(c, "blockrt_request_latency_seconds_count", engine=e) for e in ("0", "1")]
            assert sum(per_engine) == 12 and min(per_engine) >= 3  # both engines served
            assert [e["name"] for e in c.get("/health").json()["engines"]] == ["0", "1"]


def test_two_front_ends_on_one_engine_process_get_their_own_tokens_and_one_can_leave(reference):
    """Two front ends on one engine process, as two HTTP workers are: each gets exactly its own
    jobs' offline tokens; when one goes away, the engine frees its rows and keeps serving the other."""
    import multiprocessing

    from blockrt.runtime.serve.core import run_core_process

    context = multiprocessing.get_context("spawn")
    ends = [context.Pipe() for _ in range(2)]
    engine = context.Process(target=run_core_process, args=(tiny_spec(max_batch=4), [child for _, child in ends]),
                             daemon=True)
    engine.start()
    for _, child in ends:
        child.close()
    fronts = [Scheduler.attach(mine, mine.recv(), k, 2, name=str(k)) for k, (mine, _) in enumerate(ends)]
    try:
        for front in fronts:
            front.start()
        prompts = [[(7 * i + j) % 500 + 1 for j in range(2 + i)] for i in range(6)]
        want = expected(reference, prompts, [16] * 6)
        got: dict[int, tuple[list[int], str]] = {}

        def collect(i):
            tokens = []

            def deliver(update):
                tokens.extend(update.tokens)
                if update.finished:
                    got[i] = (tokens, update.finish_reason)
            return deliver

        for i, prompt in enumerate(prompts):  # alternating front ends, all in one batch
            fronts[i % 2].submit(prompt, GenerationConfig(max_new_tokens=16), collect(i))
        wait_for(lambda: len(got) == 6, timeout=60, what="six jobs on two front ends")
        assert [got[i] for i in range(6)] == want
        endless = GenerationConfig(max_new_tokens=400, ignore_eos=True)
        stays = fronts[1].submit([5, 6, 7], endless, lambda update: None)
        fronts[0].submit([1, 2, 3], endless, lambda update: None)
        wait_for(lambda: fronts[1].running == 2, timeout=30, what="both long jobs running")
        fronts[0].stop()  # a worker that goes away: its job's row is freed, the other job runs on
        wait_for(lambda: fronts[1].running == 1, timeout=30, what="the engine to drop the departed front end's job")
        assert fronts[1].alive and stays.id in fronts[1]._jobs
    finally:
        for front in fronts:
            front.stop()
        engine.join(30)
    assert engine.exitcode == 0  # it stops once every front end is gone


def test_http_workers_return_offline_tokens_and_report_at_shutdown(reference):
    from blockrt.runtime.serve import Workers

    prompts = [[(13 * i + j) % 500 + 1 for j in range(3 + i % 4)] for i in range(12)]
    want = expected(reference, prompts, [20] * 12)
    with Workers([tiny_spec(max_batch=4)], 2, max_queue=64) as workers:
        def one(i):
            with httpx.Client(base_url=workers.url, timeout=60) as c:
                if i % 2:
                    events = stream(c, prompt=prompts[i], max_tokens=20)
                    tokens = [t for e in events for t in e["choices"][0]["token_ids"]]
                    return tokens, events[-1]["choices"][0]["finish_reason"]
                choice = complete(c, prompt=prompts[i], max_tokens=20)["choices"][0]
                return choice["token_ids"], choice["finish_reason"]

        with ThreadPoolExecutor(12) as pool:
            assert list(pool.map(one, range(12))) == want
        for _ in range(6):  # new connections, taken by either worker: each answers for both
            with httpx.Client(base_url=workers.url, timeout=60) as c:
                assert metric(c, "blockrt_requests_total", status=200, finish_reason="length") == 12
                assert metric(c, "blockrt_generated_tokens_total", engine=0) == 12 * 20
                assert metric(c, "blockrt_running_requests", engine=0) == 0
    assert len(workers.loop_lag) == 2  # both workers shut down cleanly and reported


# ------------------------------------------------------------------------------------- command line

def start_blockrt_serve(*args: str) -> tuple[subprocess.Popen, str]:
    """`blockrt serve ARGS` in a process of its own on a free port, once /health answers; (process, url)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-c", "from blockrt.cli import main; main()", "serve", *args,
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(f"{url}/health").status_code == 200
        except httpx.TransportError:
            assert process.poll() is None, process.stdout.read()
            return False

    try:
        wait_for(up, timeout=120, what="blockrt serve to start")
    except BaseException:
        process.kill()
        raise
    return process, url


def test_blockrt_serve_serves_an_exported_artifact(exported):
    artifact = exported("tiny_block")
    process, url = start_blockrt_serve(str(artifact), "--backend", "auto", "--device", "cpu", "--max-batch", "2")
    try:
        prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4]]
        outs = [httpx.post(f"{url}/v1/completions", json={"prompt": p, "max_tokens": 7, "temperature": 0,
                                                          "ignore_eos": True}).json() for p in prompts]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    log = process.stdout.read()
    offline = Model.load(artifact, backend="onnxruntime").generate(prompts, GenerationConfig(max_new_tokens=7,
                                                                                              ignore_eos=True))
    for out, p, want in zip(outs, prompts, offline):
        assert out["model"] == artifact.name and out["object"] == "text_completion"
        [choice] = out["choices"]
        assert choice["token_ids"] == want.token_ids and choice["finish_reason"] == "length"
        assert out["usage"] == {"prompt_tokens": len(p), "completion_tokens": 7, "total_tokens": len(p) + 7}
    if not torch.cuda.is_available():
        assert "onnxruntime on cpu" in log  # --backend auto without a GPU
    assert f"serving on {url}" in log and "Traceback" not in log


def test_sigterm_lets_open_requests_finish_then_ends_the_rest_with_openai_errors():
    process, url = start_blockrt_serve("--preset", "tiny_block", "--dtype", "fp32", "--device", "cpu", "--max-batch", "4",
                                       "--max-context", "8192", "--shutdown-timeout", "3")
    try:
        endless = {"prompt": [1, 2, 3], "max_tokens": 8000, "temperature": 0, "ignore_eos": True}
        streamed = threading.Event()

        def long_stream():
            with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/v1/completions",
                                                          json={**endless, "stream": True}) as r:
                lines = []
                for line in r.iter_lines():  # raises if the chunked body does not end properly
                    lines.append(line)
                    streamed.set()
                return r.status_code, [line for line in lines if line]

        def short():  # sent after the signal below, until the server stops accepting (it may answer 503 first)
            streamed.wait(60)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(0.2)
                response = httpx.post(f"{url}/v1/completions", json={"prompt": [4, 5], "max_tokens": 8,
                                                                      "ignore_eos": True}, timeout=60)
                assert response.status_code == 503, response.text  # draining: never a new generation
            return response

        with ThreadPoolExecutor(4) as pool:
            stream_future = pool.submit(long_stream)
            plain_future = pool.submit(httpx.post, f"{url}/v1/completions", json=endless, timeout=60)
            finishing = pool.submit(httpx.post, f"{url}/v1/completions",
                                    json={"prompt": [9], "max_tokens": 40, "ignore_eos": True}, timeout=60)
            assert streamed.wait(60)
            deadline = time.monotonic() + 60  # all three admitted (or the short one done) before the signal
            while not finishing.done() and httpx.get(f"{url}/health", timeout=60).json()["running"] < 3:
                assert time.monotonic() < deadline, "the three requests were not admitted within 60 s"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            late = pool.submit(short)
            status, lines = stream_future.result(60)
            plain = plain_future.result(60)
            assert finishing.result(60).status_code == 200  # finished within the shutdown timeout
            with pytest.raises(httpx.TransportError):  # no longer accepting connections
                late.result(60)
        assert status == 200 and lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][len("data: "):])["error"]
        assert "shutting down" in error["message"] and error["type"] == "server_error"
        assert plain.status_code == 503 and plain.headers["content-type"] == "application/json"
        assert "shutting down" in plain.json()["error"]["message"]
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_blockrt_serve_with_http_workers_passes_compile_to_the_engine_and_stops_on_sigterm():
    process, url = start_blockrt_serve("--preset", "tiny_block", "--dtype", "fp32", "--device", "cpu",
                                       "--max-batch", "2", "--compile", "--http-workers", "2")
    try:
        out = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 5, "ignore_eos": True},
                         timeout=60).json()
        assert out["usage"]["completion_tokens"] == 5
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    log = process.stdout.read()
    assert code == 0, log
    # the engine process got compile=True; on a CPU the compiled path says why it runs eagerly
    assert "not compiling the steps: compilation targets CUDA GPUs" in log
    assert "2 HTTP workers" in log and "Traceback" not in log


def test_blockrt_serve_rejects_a_batch_above_the_artifact_limit(exported, blockrt_cli):
    code, _, err = blockrt_cli("serve", str(exported("tiny_block")), "--backend", "torch", "--max-batch", "64")
    assert code == 2 and "max_batch 64 is above the artifact's limit" in err


def test_bench_serve_measures_the_server_and_the_offline_engine_on_the_same_workload(blockrt_cli, tmp_path):
    code, out, err = blockrt_cli("bench", "tiny_block", "--serve", "--dtype", "fp32", "--device", "cpu", "--clients", "2",
                                 "--requests", "2", "--prompt-len", "5", "--gen-len", "12", "--client-processes", "1",
                                 "--trace-dir", str(tmp_path / "traces"), "--out", str(tmp_path / "serve.json"))
    assert code == 0, err
    result = json.loads((tmp_path / "serve.json").read_text())["results"][0]
    served, offline = result["served"], result["offline"]
    assert served["completed"] == 4 and not served["failed"]
    assert served["output_tokens"] == offline["output_tokens"] == 4 * 12
    assert result["ratio"]["output_tokens_per_s"] == pytest.approx(served["output_tokens_per_s"] / offline["output_tokens_per_s"])
    assert all(0 < run["ttft_s"]["p50"] <= run["ttft_s"]["p99"] for run in (served, offline))
    assert "served" in out and "offline" in out and "2x2" in out
    # each engine's steps during the measured load: the 4 measured requests (not the warm-up's 2) were
    # admitted; offline, 2 rows take them in 2 prefills of 2, each over 3 rounds of 4 tokens (+1 to read the last)
    (engine,), (off,) = served["engine_steps"], offline["engine_steps"]
    assert engine["joined"] == off["joined"] == 4 and off["prefills"] == 2 and engine["prefills"] >= 2
    assert off["steps"] == 2 * (12 // 4 + 1) and engine["steps"] >= off["steps"]
    assert engine["device_wait_ms"] == off["device_wait_ms"] == 0 and engine["graphs_captured"] == 0
    assert "engine steps during the run" in out
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["engine-0-2.json", "offline-0-2.json"]
    steps = json.loads((tmp_path / "traces" / "offline-0-2.json").read_text())["steps"]
    assert len(steps) == off["steps"] and sum(step[5] for step in steps) == 4  # StepTrace.joined



class _FakeHandle:
    """A stand-in for one front end's Scheduler of one engine, for EngineGroup's routing tests
    (our plumbing only): it counts that front end's jobs (`load`, as a Scheduler does), refuses
    one when its engine is full, and reports finished jobs through `on_release`."""

    def __init__(self, engine: list):
        self.engine, self.jobs, self.alive, self.on_release = engine, [], True, None  # engine: [rows, open jobs]

    @property
    def load(self) -> int:
        return len(self.jobs)

    def submit(self, prompt, config, deliver):
        from blockrt.runtime.serve.scheduler import Job, QueueFull
        if self.engine[1] >= self.engine[0]:
            raise QueueFull(0, 0)
        self.engine[1] += 1
        self.jobs.append(Job(len(self.jobs), deliver, self, 0.0))
        return self.jobs[-1]

    def finish(self, count: int) -> None:
        del self.jobs[:count]
        self.engine[1] -= count
        self.on_release(count)


def _front_ends(rows: list[int], shared=None):
    """Two front ends on engines of `rows` rows: their EngineGroups and the engines' [rows, open]."""
    from blockrt.runtime.serve.scheduler import EngineGroup, SharedLoad
    engines = [[r, 0] for r in rows]
    groups = [EngineGroup([_FakeHandle(e) for e in engines], shared and SharedLoad(shared, w, len(rows)))
              for w in range(2)]
    return groups, engines


def test_http_workers_route_by_the_open_jobs_of_all_workers():
    """Each front end (HTTP worker) counting only its own jobs sends its odd job to the same
    engine, so at exactly full batch one engine gets a job more than it has rows and that job
    waits a whole wave; with the shared table the engines' totals stay even, releases are counted
    back, and a job that finds its engine full goes to the next one."""
    import multiprocessing

    from blockrt.runtime.serve.scheduler import SharedLoad

    groups, engines = _front_ends([10, 10])
    for group in groups:  # three jobs each: each front end alone puts two on engine 0
        for _ in range(3):
            group.submit([1], None, None)
    assert [e[1] for e in engines] == [4, 2]  # what routing by one's own jobs does

    table = SharedLoad.create(multiprocessing.get_context("spawn"), 2, 2)
    groups, engines = _front_ends([10, 10], table)
    for group in groups:
        for _ in range(3):
            group.submit([1], None, None)
    assert [e[1] for e in engines] == [3, 3]
    assert list(table) == [2, 1, 1, 2]  # open jobs per (front end, engine)
    groups[0].schedulers[0].finish(2)  # front end 0's two jobs on engine 0 end
    assert groups[1].shared.totals() == [1, 3]
    groups[1].submit([1], None, None)  # front end 1 has more on engine 0 itself, but engine 0 has the fewest
    assert list(table) == [0, 1, 2, 2]
    engines[0][0] = 0  # engine 0 refuses (its queue is full): the job goes to engine 1 and is counted there
    groups[1].submit([1], None, None)
    assert list(table) == [0, 1, 2, 3] and [e[1] for e in engines] == [2, 4]


def test_a_killed_http_worker_leaves_the_routing_table():
    """The server's main process sees an HTTP worker exit and clears its row of the shared load
    table, so the other workers stop routing around its (cancelled) jobs."""
    from blockrt.runtime.serve import Workers
    from blockrt.runtime.serve.scheduler import SharedLoad

    with Workers([tiny_spec(max_batch=4)], 2, max_queue=64) as workers:
        SharedLoad(workers._load_table, 1, 1).add(0, 5)  # worker 1 holds 5 open jobs on engine 0
        watcher = threading.Thread(target=workers.watch)
        watcher.start()
        workers.workers[1].kill()
        deadline = time.monotonic() + 30
        while workers._load_table[1] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(workers._load_table) == [0, 0]
        with httpx.Client(base_url=workers.url, timeout=60) as c:  # worker 0 still serves
            assert complete(c, prompt=[1, 2, 3], max_tokens=4)["choices"][0]["finish_reason"] == "length"
    watcher.join(30)
    assert not watcher.is_alive()
