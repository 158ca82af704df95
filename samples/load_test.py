"""Load-test a `blockrt serve` server on this machine: N concurrent clients, each sending M streaming
completions one after another on its own keep-alive connection; prints request latency, time to
first token (TTFT), time per output token (TPOT) and throughput as a table, and as JSON with --json
(or into a file with --out).

Loopback only (127.0.0.1, localhost, ::1) and bounded (at most 1024 clients x 1000 requests):
it is a measuring tool, not a traffic generator; run it on the server's machine.

The client is a minimal HTTP/1.1 reader on asyncio streams (standard library only): with 64
concurrent streams, httpx's async connection pool added up to 5 s of queueing on the client side
(measured against the same server), which a load test would wrongly charge to the server.

    blockrt serve artifacts/tiny --backend torch --max-batch 64 &
    python samples/load_test.py --clients 64 --requests 10 --prompt-len 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_CLIENTS, MAX_REQUESTS = 1024, 1000


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads the response body as it comes."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: dict):
        """Yield (status, body bytes as they arrive); reconnects when the server closed the connection."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
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
    """Send one streaming completion; its timings and token count."""
    start = time.perf_counter()
    first = None
    tokens = 0
    text = ""
    async for status, chunk in connection.post("/v1/completions", body):
        if status != 200:
            return {"status": status, "error": chunk.decode()[:200]}
        text += chunk.decode()
        *events, text = text.split("\n\n")
        for event in events:
            if not event.startswith("data: {"):
                continue
            payload = json.loads(event[len("data: "):])
            if "error" in payload:
                return {"status": 500, "error": payload["error"]["message"]}
            new = len(payload["choices"][0].get("token_ids", []))
            if new and first is None:
                first = time.perf_counter()
            tokens += new
    end = time.perf_counter()
    return {"status": 200, "latency": end - start, "ttft": (first or end) - start, "tokens": tokens,
            "tpot": (end - first) / (tokens - 1) if first and tokens > 1 else None}


async def run(args) -> dict:
    rng = random.Random(args.seed)
    url = urlparse(args.url)
    results: list[dict] = []

    async def user():
        connection = Connection(url.hostname, url.port or 80)
        try:
            for _ in range(args.requests):
                prompt = [rng.randrange(1, args.max_token_id) for _ in range(args.prompt_len)]
                body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
                        "ignore_eos": args.ignore_eos, "stream": True}
                try:
                    results.append(await asyncio.wait_for(one_request(connection, body), args.timeout))
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
                    connection.close()
                    results.append({"status": 0, "error": f"{type(e).__name__}: {e}"})
        finally:
            connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(args.clients)))
    return summarize(results, time.perf_counter() - start, args)


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    values = sorted(values)

    def at(q):
        return values[min(len(values) - 1, int(q * len(values)))]

    return {"mean": statistics.fmean(values), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99)}


def summarize(results: list[dict], wall: float, args) -> dict:
    ok = [r for r in results if r["status"] == 200]
    errors: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    tokens = sum(r["tokens"] for r in ok)
    return {
        "url": args.url, "clients": args.clients, "requests_per_client": args.requests,
        "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "completed": len(ok), "failed": errors, "wall_s": wall,
        "requests_per_s": len(ok) / wall, "output_tokens_per_s": tokens / wall, "output_tokens": tokens,
        "latency_s": percentiles([r["latency"] for r in ok]),
        "ttft_s": percentiles([r["ttft"] for r in ok]),
        "tpot_s": percentiles([r["tpot"] for r in ok if r["tpot"] is not None]),
    }


def table(summary: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{1000 * x:.1f}"

    lines = [f"{summary['clients']} clients x {summary['requests_per_client']} requests, prompt {summary['prompt_len']}, "
             f"max_tokens {summary['max_tokens']}: {summary['completed']} completed, failed {summary['failed'] or 0}, "
             f"{summary['wall_s']:.1f} s",
             f"throughput: {summary['output_tokens_per_s']:.0f} output tokens/s, {summary['requests_per_s']:.2f} requests/s",
             "", f"{'metric (ms)':<16}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}"]
    for name, key in (("latency", "latency_s"), ("TTFT", "ttft_s"), ("TPOT", "tpot_s")):
        p = summary[key]
        lines.append(f"{name:<16}{ms(p['mean']):>10}{ms(p['p50']):>10}{ms(p['p90']):>10}{ms(p['p99']):>10}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=64, help="Concurrent clients.")
    parser.add_argument("--requests", type=int, default=10, help="Requests per client, one after another.")
    parser.add_argument("--prompt-len", type=int, default=32, help="Random prompt token ids per request.")
    parser.add_argument("--max-token-id", type=int, default=500, help="Prompt ids are drawn from [1, this).")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="Generate max_tokens every time (random weights hit EOS early).")
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds per request.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="Print JSON instead of the table.")
    parser.add_argument("--out", help="Also save the JSON here.")
    args = parser.parse_args()
    host = urlparse(args.url).hostname
    if host not in LOOPBACK:
        sys.exit(f"--url {args.url}: this load test only targets a server on this machine ({', '.join(sorted(LOOPBACK))})")
    if not (1 <= args.clients <= MAX_CLIENTS and 1 <= args.requests <= MAX_REQUESTS):
        sys.exit(f"--clients must be in [1, {MAX_CLIENTS}] and --requests in [1, {MAX_REQUESTS}]")
    summary = asyncio.run(run(args))
    print(json.dumps(summary, indent=2) if args.json else table(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
