"""Embed the blockrt runtime in a program: load an exported artifact and generate.

    blockrt export --preset tiny_block --out artifacts/tiny     # or --checkpoint ... --tokenizer ...
    python samples/embed_runtime.py artifacts/tiny
"""

import sys

from blockrt.runtime import GenerationConfig, Model

model = Model.load(sys.argv[1] if len(sys.argv) > 1 else "artifacts/tiny", backend="onnxruntime")  # or "torch", "tensorrt"
config = GenerationConfig(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=1)

for result in model.generate([[1, 2, 3], [7, 8, 9, 10, 11]], config):  # ragged prompts, one batch
    print(result.token_ids, result.finish_reason, f"{result.latency_s * 1e3:.1f} ms")

for chunk in model.stream([[1, 2, 3]], config):  # tokens as each block completes
    print(chunk.token_ids, end=" ", flush=True)
print()
