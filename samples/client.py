"""Call `blockrt serve` from Python with httpx: one completion, then the same one streamed.

The API is OpenAI's /v1/completions, so the `openai` package works too:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="tiny", prompt="Hello", max_tokens=16, temperature=0)

(token-id prompts, `token_ids` in the reply and the extensions top_k, repetition_penalty,
ignore_eos, stop_token_ids go through `extra_body` there).

    python samples/client.py --prompt-ids 1,2,3 --max-tokens 24
    python samples/client.py --prompt "The capital of France is" --stop "."   # artifact with a tokenizer
"""

from __future__ import annotations

import argparse
import json

import httpx


def complete(url: str, body: dict) -> dict:
    """One completion; raises with the server's error message on a 4xx/5xx."""
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.json()['error']['message']}")
    return response.json()


def stream(url: str, body: dict):
    """Yield each streamed choice (text, token_ids, finish_reason) as its block completes."""
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=600) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"{response.status_code}: {response.json()['error']['message']}")
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            yield event["choices"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", help="Comma-separated token ids.")
    prompt.add_argument("--prompt", help="Text (the artifact needs a tokenizer).")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", help="Stop string; repeatable.")
    args = parser.parse_args()

    body = {"prompt": args.prompt if args.prompt is not None else [int(t) for t in args.prompt_ids.split(",")],
            "max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        body["seed"] = args.seed
    if args.stop:
        body["stop"] = args.stop

    out = complete(args.url, body)
    choice = out["choices"][0]
    print(f"completion: {choice['token_ids']} {choice['text']!r} ({choice['finish_reason']}), usage {out['usage']}")
    print("streamed:")
    for piece in stream(args.url, body):
        print(f"  +{piece['token_ids']} {piece['text']!r}" + (f" ({piece['finish_reason']})" if piece["finish_reason"] else ""))


if __name__ == "__main__":
    main()
