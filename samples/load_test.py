"""Load-test a `blockrt serve` server on this machine: N concurrent clients, each sending M streaming
completions one after another on its own keep-alive connection (spread over client processes);
prints request latency, time to first token (TTFT), time per output token (TPOT) and throughput
as a table, and as JSON with --json (or into a file with --out).

Loopback only (127.0.0.1, localhost, ::1) and bounded (at most 4096 clients x 1000 requests): it
is a measuring tool, not a traffic generator; run it on the server's machine. The client is
`blockrt.runtime.serve.loadgen` (what `blockrt bench --serve` uses).

    blockrt serve artifacts/tiny --backend torch --max-batch 64 &
    python samples/load_test.py --clients 64 --requests 10 --prompt-len 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import sys

from blockrt.runtime.serve.loadgen import Load, run_load, table

MAX_CLIENTS, MAX_REQUESTS = 4096, 1000


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
    parser.add_argument("--processes", type=int, default=4, help="Client processes the clients are spread over.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="Print JSON instead of the table.")
    parser.add_argument("--out", help="Also save the JSON here.")
    args = parser.parse_args()
    if not (1 <= args.clients <= MAX_CLIENTS and 1 <= args.requests <= MAX_REQUESTS):
        sys.exit(f"--clients must be in [1, {MAX_CLIENTS}] and --requests in [1, {MAX_REQUESTS}]")
    load = Load(args.clients, args.requests, args.prompt_len, args.max_tokens, args.max_token_id, args.temperature,
                args.ignore_eos, args.timeout, args.seed)
    try:
        summary = run_load(args.url, load, args.processes)
    except ValueError as e:
        sys.exit(str(e))
    print(json.dumps(summary, indent=2) if args.json else table(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
