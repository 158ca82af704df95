"""Stream completions from a blockrt model served by Triton (`blockrt triton DIR`), over gRPC.

The model is decoupled: each request gets one response per generated block (`token_ids`, the new
tokens) and its last response carries `finish_reason`. All prompts go out on one gRPC stream and
are generated together in the server's batch.

    pip install 'tritonclient[grpc]'
    python samples/triton_client.py --url localhost:8001 --prompt-ids 1,2,3 --prompt-ids 4,5 --max-tokens 32
"""

from __future__ import annotations

import argparse
import queue
import time

import numpy as np
import tritonclient.grpc as grpcclient


def _input(name: str, values, dtype: str) -> grpcclient.InferInput:
    array = np.asarray(values, dtype={"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_}[dtype])
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def stream(url: str, model: str, prompts: list[list[int]], max_tokens: int = 16, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, seed: int = 0, ignore_eos: bool = False, timeout: float = 120.0):
    """Yield (prompt index, new token ids, finish_reason or "") as responses arrive."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for i, ids in enumerate(prompts):
            inputs = [_input("input_ids", ids, "INT64"), _input("max_tokens", [max_tokens], "INT32"),
                      _input("temperature", [temperature], "FP32"), _input("top_p", [top_p], "FP32"),
                      _input("top_k", [top_k], "INT32"), _input("seed", [seed], "INT64"),
                      _input("ignore_eos", [ignore_eos], "BOOL")]
            client.async_stream_infer(model, inputs, request_id=str(i))
        open_requests = set(range(len(prompts)))
        while open_requests:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                raise RuntimeError(f"Triton: {error}")
            index = int(result.get_response().id)
            reason = result.as_numpy("finish_reason")[0].decode()
            yield index, result.as_numpy("token_ids").tolist(), reason
            if reason:
                open_requests.discard(index)
    finally:
        client.stop_stream()
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="Triton's gRPC address.")
    parser.add_argument("--model", default="blockrt", help="The model name given to `blockrt triton --model-name`.")
    parser.add_argument("--prompt-ids", action="append", required=True, help="Comma-separated ids; repeatable.")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    prompts = [[int(t) for t in p.split(",")] for p in args.prompt_ids]
    tokens = [[] for _ in prompts]
    start = time.perf_counter()
    for index, new, reason in stream(args.url, args.model, prompts, args.max_tokens, args.temperature, seed=args.seed):
        tokens[index] += new
        print(f"[{index}] +{new}" + (f" ({reason})" if reason else ""))
    print(f"{sum(map(len, tokens))} tokens for {len(prompts)} prompts in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
