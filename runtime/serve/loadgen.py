"""A load generator for an OpenAI-style completions server on this machine: N concurrent clients,
each sending M streaming completions one after another on its own keep-alive connection, spread
over several client processes (uvloop when installed) so the client side is not what is measured.
Every client connects first, and all start together once every process has connected (a client
process that starts slowly would otherwise turn one burst into several: on an H100 host, 3 of 4
processes started 2.4 s late behind a fixed 3.8 s allowance).
Per request: latency, time to first token (TTFT) and time per output token (TPOT = (end - first
token) / (tokens - 1)); per run: output tokens/s over the wall time from the first request sent to
the last one done.

The client is a minimal HTTP/1.1 reader on asyncio streams (standard library only): with 64
concurrent streams, httpx's async connection pool added up to 5 s of queueing on the client side
(measured against the same server), which a load test would wrongly charge to the server.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import statistics
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Load:
    clients: int = 64
    requests: int = 1  # per client, one after another
    prompt_len: int = 32
    max_tokens: int = 64
    max_token_id: int = 500  # prompt ids are drawn from [1, max_token_id)
    temperature: float = 0.0
    ignore_eos: bool = True
    timeout_s: float = 600.0
    seed: int = 0


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads the response body as it comes."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def connect(self) -> None:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: dict):
        """Yield (status, body bytes as they arrive); reconnects when the server closed the connection."""
        await self.connect()
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                yield status, await self.reader.readexactly(size)
                await self.reader.readline()
            await self.reader.readline()
        else:
            yield status, await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection") == "close":
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def one_request(connection: Connection, body: dict) -> dict:
    """Send one streaming completion; its timings (perf_counter, comparable across processes) and tokens."""
    start = time.perf_counter()
    first = None
    tokens = 0
    pending = b""
    async for status, chunk in connection.post("/v1/completions", body):
        if status != 200:
            return {"status": status, "error": chunk.decode()[:200]}
        *events, pending = (pending + chunk).split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: {"):
                continue
            at = event.find(b'"token_ids":[')
            if at < 0:
                if b'"error"' in event:
                    return {"status": 500, "error": json.loads(event[6:])["error"]["message"]}
                continue
            ids = event[at + 13:event.index(b"]", at)]
            new = ids.count(b",") + 1 if ids else 0
            if new and first is None:
                first = time.perf_counter()
            tokens += new
    end = time.perf_counter()
    return {"status": 200, "start": start, "end": end, "first": first or end, "tokens": tokens}


async def _clients(url: str, load: Load, first_client: int, count: int, pipe) -> list[dict]:
    """Connect every client first, say "ready" on `pipe`, then start them all at the moment the
    parent sends (once every process is ready): TTFT then measures the server's handling of a burst
    of requests, not the kernel's queue of a burst of TCP handshakes, and the burst is one burst
    even when some client processes start slowly."""
    address = urlparse(url)
    results: list[dict] = []
    connections = [Connection(address.hostname, address.port or 80) for _ in range(count)]
    await asyncio.gather(*(c.connect() for c in connections))
    pipe.send("ready")
    start_at = pipe.recv()  # nothing else runs on this loop until then
    delay = start_at - time.perf_counter()  # every process starts its clients at the same moment
    if delay > 0:
        await asyncio.sleep(delay)

    async def user(index: int, connection: Connection):
        rng = random.Random(load.seed * 1_000_003 + first_client + index)
        try:
            for _ in range(load.requests):
                prompt = [rng.randrange(1, load.max_token_id) for _ in range(load.prompt_len)]
                body = {"prompt": prompt, "max_tokens": load.max_tokens, "temperature": load.temperature,
                        "ignore_eos": load.ignore_eos, "stream": True}
                try:
                    results.append(await asyncio.wait_for(one_request(connection, body), load.timeout_s))
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
                    connection.close()
                    results.append({"status": 0, "error": f"{type(e).__name__}: {e}"})
        finally:
            connection.close()

    await asyncio.gather(*(user(i, c) for i, c in enumerate(connections)))
    return results


def _client_process(url: str, load: Load, first_client: int, count: int, out) -> None:
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    out.send(run(_clients(url, load, first_client, count, out)))
    out.close()


def run_load(url: str, load: Load, processes: int = 4) -> dict:
    """Run `load` against the server at `url` (loopback only) from `processes` client processes;
    the summary (see `summarize`)."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"{url}: the load generator only targets a server on this machine ({', '.join(sorted(LOOPBACK))})")
    processes = max(1, min(processes, load.clients))
    context = multiprocessing.get_context("spawn")
    workers, pipes = [], []
    share, extra = divmod(load.clients, processes)
    first = 0
    for p in range(processes):
        count = share + (p < extra)
        mine, theirs = context.Pipe()
        worker = context.Process(target=_client_process, args=(url, load, first, count, theirs), daemon=True)
        worker.start()
        theirs.close()
        workers.append(worker)
        pipes.append(mine)
        first += count

    def receive(pipe, worker):
        try:
            return pipe.recv()
        except EOFError:
            raise RuntimeError(f"a load-generator process failed (exit code {worker.join(5) or worker.exitcode})") from None

    for pipe, worker in zip(pipes, workers):  # every client connected
        receive(pipe, worker)
    start_at = time.perf_counter() + 0.05
    for pipe in pipes:
        pipe.send(start_at)
    results = []
    for pipe, worker in zip(pipes, workers):
        results += receive(pipe, worker)
        worker.join()
    return summarize(results, load, url)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    values = sorted(values)

    def at(q):
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"mean": statistics.fmean(values), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99)}


def summarize(results: list[dict], load: Load, url: str) -> dict:
    ok = [r for r in results if r["status"] == 200]
    errors: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    wall = max(r["end"] for r in ok) - min(r["start"] for r in ok) if ok else float("nan")
    tokens = sum(r["tokens"] for r in ok)
    return {
        "url": url, **asdict(load), "completed": len(ok), "failed": errors,
        "first_error": next((r["error"] for r in results if r["status"] != 200), None),
        "wall_s": wall,  # window: perf_counter (system-wide) of the first request sent and the last one done
        "window": [min(r["start"] for r in ok), max(r["end"] for r in ok)] if ok else None,
        "requests_per_s": len(ok) / wall, "output_tokens_per_s": tokens / wall, "output_tokens": tokens,
        "latency_s": percentiles([r["end"] - r["start"] for r in ok]),
        "ttft_s": percentiles([r["first"] - r["start"] for r in ok]),
        "tpot_s": percentiles([(r["end"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]),
    }


def table(summary: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{1000 * x:.1f}"

    lines = [f"{summary['clients']} clients x {summary['requests']} requests, prompt {summary['prompt_len']}, "
             f"max_tokens {summary['max_tokens']}: {summary['completed']} completed, failed {summary['failed'] or 0}, "
             f"{summary['wall_s']:.1f} s",
             f"throughput: {summary['output_tokens_per_s']:.0f} output tokens/s, {summary['requests_per_s']:.2f} requests/s",
             "", f"{'metric (ms)':<16}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for name, key in (("latency", "latency_s"), ("TTFT", "ttft_s"), ("TPOT", "tpot_s")):
        p = summary[key]
        lines.append(f"{name:<16}{ms(p['mean']):>10}{ms(p['p50']):>10}{ms(p['p90']):>10}{ms(p['p99']):>10}")
    return "\n".join(lines)
