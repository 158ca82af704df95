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
(`_execute`); the PyTorch engine calls the step modules itself.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import torch

from blockrt.exporter.cache import _write_rows
from blockrt.graphs.manifest import GraphEntry, Manifest

log = logging.getLogger(__name__)

SPEC_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}
BACKENDS = ("torch", "onnxruntime", "tensorrt")


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
            self._execute(feeds, outputs)
            return output
        past_len = feeds["past_len"]
        num_new = inputs[0].shape[1] // (self.manifest.block_len if self.name == "block_decoder" else 1)
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
        self._execute(feeds, outputs)
        for cache, present in zip(caches, presents):  # keep the runtime's static layout
            _write_rows(cache, present[:, :, past:], past_len)
        return output

    @abstractmethod
    def _execute(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Run the graph reading `feeds` and writing into the preallocated `outputs` (by name)."""


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


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

