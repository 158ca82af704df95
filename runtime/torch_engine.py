"""PyTorch engine: runs the exported step modules directly, in place on the runtime's caches.

On CUDA, decode-shaped calls (every call that is not a from-scratch prefill) are captured once per
shape into CUDA graphs and replayed, which removes the per-kernel launch cost of small steps.
Attention reads only the cache rows any sequence can see (`attend_len`, rounded up to a bucket so
the number of captured graphs stays small).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from blockrt.exporter.config import TORCH_DTYPES
from blockrt.exporter.model import Attention, build_model
from blockrt.exporter.steps import step_modules
from blockrt.graphs.manifest import WEIGHTS_NAME, ArtifactError, Manifest

from .engine import Engine

log = logging.getLogger(__name__)



class TorchEngine(Engine):
    def __init__(self, manifest: Manifest, graph: str, step: torch.nn.Module, device: torch.device,
                 cuda_graphs: bool, attend_bucket: int, pool=None):
        super().__init__(manifest, graph, device)
        self.step = step
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.attend_bucket = attend_bucket
        self.pool = pool
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, inputs, caches, attend_len=None):
        cache_len = caches[0].shape[2]
        num_new = self.new_rows(inputs[0])
        if attend_len is not None and attend_len != num_new:  # not a prefill: round up to a bucket
            attend_len = min(cache_len, math.ceil(attend_len / self.attend_bucket) * self.attend_bucket)
        if attend_len == cache_len:
            attend_len = None
        if not self.cuda_graphs or attend_len == num_new:
            self.step.attend_len = attend_len
            return self.step(*inputs, *caches)
        key = (tuple(t.shape for t in inputs), attend_len, caches[0].data_ptr())
        if key not in self._graphs:
            self._graphs[key] = self._capture(inputs, caches, attend_len)
        graph, static_inputs, output = self._graphs[key]
        for dst, src in zip(static_inputs, inputs):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return output

    def _capture(self, inputs, caches, attend_len):
        log.debug("capturing CUDA graph for %s: inputs %s, attend_len %s", self.name,
                  [tuple(t.shape) for t in inputs], attend_len)
        static_inputs = [t.clone() for t in inputs]
        self.step.attend_len = attend_len
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up: writes the same rows a real call writes
            for _ in range(2):
                self.step(*static_inputs, *caches)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.step(*static_inputs, *caches)
        return graph, static_inputs, output


def load_torch_engines(manifest: Manifest, directory, device: torch.device, model: torch.nn.Module | None = None,
                       cuda_graphs: bool = True, attend_bucket: int = 64) -> dict[str, TorchEngine]:
    """Engines for every graph of the artifact, from its saved weights, or from the tensors of a
    given model (which is not changed; see `_own_model`)."""
    if model is None:
        from blockrt.exporter.checkpoint import load_checkpoint

        path = Path(directory) / WEIGHTS_NAME
        if not path.is_file():
            raise ArtifactError(f"{path} not found: the PyTorch backend needs the weights that "
                                f"`blockrt export` saves beside the graphs; re-export the model")
        model = load_checkpoint(path, config=manifest.model_config, dtype=manifest.dtype)
    model = _own_model(model, device, TORCH_DTYPES[manifest.dtype])
    for module in model.modules():
        if isinstance(module, Attention):
            module.decode_math = True
    pool = torch.cuda.graph_pool_handle() if device.type == "cuda" and cuda_graphs else None
    steps = step_modules(model, "inplace", inplace=True, positions=manifest.positions)
    return {name: TorchEngine(manifest, name, step, device, cuda_graphs, attend_bucket, pool)
            for name, step in steps.items()}


def _own_model(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A module of the engine's own (the engine sets attention flags on it) holding `model`'s
    tensors on `device` in `dtype`: the very same tensors where they already match, so no memory
    is copied, and cast copies where not. `model` itself is never changed."""
    with torch.device("meta"):
        own = build_model(model.config)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
             for k, v in model.state_dict().items()}
    own.load_state_dict(state, assign=True, strict=True)
    return own.eval()
