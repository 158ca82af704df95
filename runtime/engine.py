"""One interface for every backend: an `Engine` runs one graph of an artifact on buffers the
runtime owns.

`engine(inputs, caches, attend_len)`:
- `inputs`: the graph's non-cache inputs in contract order (see blockrt.graphs.contract);
- `caches`: the runtime's static cache tensors `[n, heads, cache_len, head_dim]` (key, value per
  layer), updated in place: in-place graphs alias `present.*` to `past_key_values.*`; for concat
  graphs the engine passes the first `attend_len - new` rows as the past and writes the new rows
  back, so the runtime never sees the difference;
- `attend_len`: how many cache rows any sequence can see after this step (a hint: the PyTorch
  engine attends to just those rows);
returns the graph's first output (`prefix_embeds` or `logits`), valid until the next call.

`GraphEngine` backends (ONNX Runtime, TensorRT) only bind tensors by name and run
(`execute`); the PyTorch engine calls the step modules itself.

The order of steps (shared by the `Generator` and `blockrt verify`): a prefill of each prompt's
blocks (`prefill_inputs`), then per block L token steps at `local_position(k)`, then one block
step that folds the L new tokens into the block cache (a vanilla model: prefill, then one token
per decode step). The reference `generate` sequences its steps on its own, on purpose.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import torch

from blockrt.backends import BACKENDS
from blockrt.errors import UserError
from blockrt.exporter.cache import write_rows
from blockrt.graphs.manifest import GraphEntry, Manifest

log = logging.getLogger(__name__)

SPEC_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
                "float8e4m3fn": torch.float8_e4m3fn}


def prefill_inputs(prompts: Sequence[Sequence[int]], block_len: int, pad_token_id: int) -> tuple[np.ndarray, list[int]]:
    """The prefill step's `input_ids` rows [n, width] (int64) and `new_len` of ragged prompts: each
    prompt left-padded with the pad id to a multiple of `block_len` (1 for vanilla models;
    docs/model.md), then all right-padded to the longest; `new_len` counts each prompt's blocks
    (tokens). Prompts given as int64 arrays (`Generator` requests) are copied as memory."""
    units = [-(-len(p) // block_len) for p in prompts]
    ids = np.full((len(prompts), max(units) * block_len), pad_token_id, dtype=np.int64)
    for row, (p, n) in enumerate(zip(prompts, units)):
        start = n * block_len - len(p)
        ids[row, start:start + len(p)] = p
    return ids, units


def local_position(k: int) -> int:
    """The token decoder's `past_len` at token step k of a block: step 0 feeds the two prefix
    vectors at positions 0 and 1, step k > 0 feeds token k - 1 at position k + 1."""
    return 0 if k == 0 else k + 1


class Engine(ABC):
    def __init__(self, manifest: Manifest, graph: str, device: torch.device):
        self.manifest, self.name, self.device = manifest, graph, device
        entry: GraphEntry = manifest.graphs[graph]
        self.input_names = [t.name for t in entry.inputs if not t.name.startswith("past_key_values.") and t.name != "attention_mask"]
        self.cache_inputs = [t.name for t in entry.inputs if t.name.startswith("past_key_values.")]
        self.cache_outputs = [t.name for t in entry.outputs if t.name.startswith("present.")]
        first = entry.outputs[0]
        self.output_name, self.output_dtype = first.name, SPEC_DTYPES[first.dtype]
        self.output_tail = tuple(first.shape[1:])  # static dims after batch
        self.concat = manifest.cache_io == "concat"
        self.tokens_per_row = manifest.block_len if graph == "block_decoder" else 1
        self.spare_cache_rows = 0  # rows the runtime allocates beyond the cache length (never used)
        self.captures = 0  # CUDA graphs captured so far
        self.stand_ins = 0  # calls that ran on a larger captured graph

    def new_rows(self, input_ids: torch.Tensor) -> int:
        """Cache rows one call adds per sequence: blocks for block_decoder, tokens otherwise."""
        return input_ids.shape[1] // self.tokens_per_row

    @abstractmethod
    def __call__(self, inputs: list[torch.Tensor], caches: list[torch.Tensor], attend_len: int | None = None) -> torch.Tensor:
        """Run one step (see the module docstring); returns the first output."""


class GraphEngine(Engine):
    """An engine for a compiled graph: binds the runtime's tensors by name and runs it."""

    def __call__(self, inputs: list[torch.Tensor], caches: list[torch.Tensor], attend_len: int | None = None) -> torch.Tensor:
        n = inputs[0].shape[0]
        feeds = dict(zip(self.input_names, inputs))
        output = torch.empty((n, *self.output_tail), dtype=self.output_dtype, device=self.device)
        outputs = {self.output_name: output}
        if not self.concat:
            feeds.update(zip(self.cache_inputs, caches))
            outputs.update(zip(self.cache_outputs, caches))  # in place: present aliases past
            self.execute(feeds, outputs)
            return output
        past_len = feeds["past_len"]
        num_new = self.new_rows(inputs[0])
        past = attend_len - num_new if attend_len is not None else int(past_len.max())
        feeds.update((name, c[:, :, :past]) for name, c in zip(self.cache_inputs, caches))
        if self.name != "token_decoder":
            rows = torch.arange(past + num_new, device=self.device)
            valid_past = rows[None, :past] < past_len[:, None]
            valid_new = rows[None, :num_new] < feeds["new_len"][:, None]
            feeds["attention_mask"] = torch.cat([valid_past, valid_new], dim=1).to(torch.int64)
        presents = [torch.empty(c.shape[0], c.shape[1], past + num_new, c.shape[3], dtype=c.dtype, device=self.device)
                    for c in caches]
        outputs.update(zip(self.cache_outputs, presents))
        self.execute(feeds, outputs)
        for cache, present in zip(caches, presents):  # keep the runtime's static layout
            write_rows(cache, present[:, :, past:], past_len)
        return output

    @abstractmethod
    def execute(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Run the graph reading `feeds` and writing into the preallocated `outputs` (by name)."""


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)} (or auto)")
    return backend


def pick_backend(manifest: Manifest) -> str:
    """The "auto" backend: TensorRT when engines were built and a GPU is here, else PyTorch on a
    GPU, else ONNX Runtime."""
    if torch.cuda.is_available():
        return "tensorrt" if manifest.engines else "torch"
    return "onnxruntime"


def load_engines(manifest: Manifest, directory, backend: str, device: torch.device, **options) -> dict[str, Engine]:
    """Graph name -> Engine for every graph of the artifact, on the chosen backend."""
    check_backend(backend)
    if backend == "torch":
        from .torch_engine import load_torch_engines

        return load_torch_engines(manifest, directory, device, **options)
    if backend == "onnxruntime":
        from .ort_engine import OrtEngine

        return {g: OrtEngine(manifest, directory, g, device) for g in manifest.graphs}
    from .trt_engine import TensorRTEngine

    return {g: TensorRTEngine(manifest, directory, g, device) for g in manifest.graphs}

