"""Compiled step modules for the PyTorch engine on CUDA (TorchInductor through `torch.compile`).

Each step module is compiled once per number of new positions, with the batch dimension symbolic
(and, for the block and vanilla decoders, the attended cache length too), and the engine captures
the compiled code into its own CUDA graphs per batch bucket and attend bucket: one compilation
serves every batch and context. Inductor fuses the element-wise work between the matrix products
(LayerNorm, rotary, the per-head QKV split, cache writes, GELU, residual adds, the token decoder's
attention over its few cached rows); matrix products stay cuBLAS, and attention over the block
cache stays PyTorch's fused SDPA (over an FP8 cache: `blockrt.runtime.fp8_kv`'s decode op). Nothing
here depends on the module types inside the step.

Compilation is handled like an engine build: Inductor's FX-graph and autotuning caches and
Triton's kernels live on disk under `cache_dir()` (`$BLOCKRT_CACHE_DIR`, default
`~/.cache/blockrt/inductor`), so a later process with the same model shapes loads its kernels
instead of compiling them; the first compilation of a step is logged with its duration.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MODE = "default"  # our own CUDA graphs replace Inductor's; see README "Compiled fast path"


def cache_dir() -> Path:
    """Where compiled kernels are kept between processes."""
    return Path(os.environ.get("BLOCKRT_CACHE_DIR", Path.home() / ".cache" / "blockrt")) / "inductor"


def skip_reason(device: torch.device) -> str | None:
    """Why steps on `device` run eagerly instead of compiled (None: they can be compiled)."""
    if device.type != "cuda":
        return f"compilation targets CUDA GPUs; on {device.type} the steps run eagerly"
    if not _triton_installed():
        return "triton is not installed, which torch.compile needs on a GPU"
    return None


def triton_kernels_run(device: torch.device) -> bool:
    """Whether Triton kernels (Inductor's and our own) can run on `device`: a CUDA GPU, with triton."""
    return skip_reason(device) is None


def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401  (Inductor's GPU code generator)
    except ImportError:
        return False
    return True


def _configure() -> None:
    """Process-wide Inductor settings (idempotent): on-disk caches, room for a few recompiles."""
    if "BLOCKRT_CACHE_DIR" in os.environ:  # ours, when given, over an Inductor cache dir set elsewhere
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir())
    else:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
    import torch._dynamo
    import torch._inductor.config as inductor

    inductor.fx_graph_cache = True
    inductor.autotune_local_cache = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)


class CompiledStep:
    """A step module under torch.compile; called with the step's inputs and caches. Only called
    while the engine captures a CUDA graph (warm-up and capture), never per replayed step."""

    def __init__(self, step: torch.nn.Module, name: str, symbolic_cache_len: bool):
        _configure()
        self.name, self.symbolic_cache_len = name, symbolic_cache_len
        self.fn = torch.compile(step, fullgraph=True, dynamic=False, mode=MODE)
        self._seen: set[tuple] = set()
        self.compilations = 0  # graphs Dynamo traced for this step (one per new-position count, if all goes well)

    def __call__(self, inputs: list[torch.Tensor], caches: list[torch.Tensor]) -> torch.Tensor:
        for t in (*inputs, *caches):
            torch._dynamo.maybe_mark_dynamic(t, 0)  # batch
        if self.symbolic_cache_len:
            for c in caches:
                torch._dynamo.maybe_mark_dynamic(c, 2)  # attended cache rows
        key = tuple(tuple(t.shape[1:]) for t in inputs)
        first = key not in self._seen
        if first:
            log.info("compiling %s for %s new positions (any batch%s; kernels cached in %s)", self.name,
                     inputs[0].shape[1], ", any context" if self.symbolic_cache_len else "",
                     os.environ["TORCHINDUCTOR_CACHE_DIR"])
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        out = self.fn(*inputs, *caches)
        traced = counters["stats"]["unique_graphs"] - graphs
        self.compilations += traced
        if first:
            self._seen.add(key)
            log.info("compiled %s in %.1f s", self.name, time.perf_counter() - start)
        elif traced:
            log.warning("%s was compiled again for inputs %s (a shape the compiled code had specialized)",
                        self.name, [tuple(t.shape) for t in (*inputs, *caches[:1])])
        return out
