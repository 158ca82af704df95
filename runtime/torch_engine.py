"""PyTorch engine: runs the exported step modules directly, in place on the runtime's caches.

On CUDA, decode-shaped calls (every call that is not a from-scratch prefill) are captured once per
shape into CUDA graphs and replayed, which removes the per-kernel launch cost of small steps. A
shape that has no graph yet first runs on a larger captured one, padded (`stand_in`), and gets its
own graph once it persists (`CAPTURE_AFTER_CALLS`).
Attention reads only the cache rows any sequence can see (`attend_len`, rounded up to a bucket of
`ATTEND_BLOCKS` blocks for the block decoder and `ATTEND_TOKENS` tokens for a vanilla decoder, so
the number of captured graphs stays small). Where TorchInductor can run (CUDA with Triton; unless
`compile=False`) what the graphs capture is the compiled step (`blockrt.runtime.inductor`);
prefills always run eagerly.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from blockrt.exporter.config import TORCH_DTYPES
from blockrt.exporter.model import MLP, Attention, BlockTransformer, build_model
from blockrt.exporter.steps import step_modules
from blockrt.graphs.manifest import WEIGHTS_NAME, ArtifactError, Manifest

from .engine import Engine
from .inductor import CompiledStep, skip_reason, triton_kernels_run
from .quant_kernels import prepare_quantized
from .small_attention import small_cache_decode

log = logging.getLogger(__name__)

# Attend buckets (cache rows). Each captured graph keeps its own output: [n, 2, h] prefix vectors for
# the block decoder (10 MB at batch 1216), so its buckets are finer (8 blocks = 32 tokens: a step
# reads 3.5 blocks of padding on average instead of 7.5 with 16); [n, vocab] fp32 logits for a
# vanilla decoder (~100 MB each at its batch), so it keeps 64 tokens.
ATTEND_BLOCKS = 8
ATTEND_TOKENS = 64


# A decode shape without a graph of its own first runs on a larger captured one (`stand_in`); it is
# captured at its call after this many. A capture synchronizes the device and empties its memory
# caches: served at batch 1024 on an H100, a step that captured graphs took 100-400 ms instead of
# 30 ms, and 35 captures during one run cost about 3.4 s of its 19 s. Shapes that pass (a burst
# joining over a few rounds, a wave of requests leaving) should not stall every row for that;
# shapes that persist get a graph of their own.
CAPTURE_AFTER_CALLS = 32


def stand_in(key: tuple, captured) -> tuple | None:
    """The key of a captured graph that can run a call of `key` (input shapes, attended cache
    rows or None for all, cache address) on more rows: the same cache tensor, the same input shapes
    but for a batch at least as large, attending to at least as many cache rows; the cheapest (rows x
    attended rows) or None. Its extra rows are beyond the live rows (as a batch bucket's padding rows
    are), so what it computes for them is discarded and the cache rows it writes there are not live."""
    shapes, attend, address = key
    n = shapes[0][0]
    if any(s[0] != n for s in shapes):
        return None
    best, best_cost = None, None
    for other in captured:
        other_shapes, other_attend, other_address = other
        rows = other_shapes[0][0]
        if (other_address != address or len(other_shapes) != len(shapes) or rows < n
                or any(a[0] != rows or a[1:] != b[1:] for a, b in zip(other_shapes, shapes))
                or (other_attend is not None and (attend is None or other_attend < attend))):
            continue
        cost = rows * (math.inf if other_attend is None else other_attend)
        if best_cost is None or cost < best_cost:
            best, best_cost = other, cost
    return best


class TorchEngine(Engine):
    def __init__(self, manifest: Manifest, graph: str, step: torch.nn.Module, device: torch.device,
                 cuda_graphs: bool, attend_bucket: int, pool=None, compiled: CompiledStep | None = None):
        super().__init__(manifest, graph, device)
        self.step = step
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.attend_bucket = attend_bucket  # cache rows
        self.pool = pool
        self.compiled = compiled
        # a compiled step over the whole cache must still get a strided slice, not the contiguous
        # tensor: Dynamo guards contiguity, and the whole tensor would be compiled once more
        self.spare_cache_rows = 1 if compiled is not None and compiled.symbolic_cache_len else 0
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self._uncaptured: dict[tuple, int] = {}  # calls of shapes that ran on a larger graph (see stand_in)

    @torch.no_grad()
    def __call__(self, inputs, caches, attend_len=None):
        cache_len = caches[0].shape[2] - self.spare_cache_rows  # rows the generator uses
        num_new = self.new_rows(inputs[0])
        if attend_len is None and self.spare_cache_rows:
            attend_len = cache_len
        elif attend_len is not None and attend_len != num_new:  # not a prefill: round up to a bucket
            attend_len = min(cache_len, math.ceil(attend_len / self.attend_bucket) * self.attend_bucket)
        if attend_len == caches[0].shape[2]:
            attend_len = None
        if not self.cuda_graphs or attend_len == num_new:  # eager: no graphs, or a prefill
            self.step.attend_len = attend_len
            return self.step(*inputs, *caches)
        key = (tuple(t.shape for t in inputs), attend_len, caches[0].data_ptr())
        entry = self._graphs.get(key)
        if entry is None:
            calls = self._uncaptured[key] = self._uncaptured.get(key, 0) + 1
            larger = stand_in(key, self._graphs) if calls <= CAPTURE_AFTER_CALLS else None
            if larger is None:
                entry = self._graphs[key] = self._capture(inputs, caches, attend_len)
                self.captures += 1
            else:
                entry = self._graphs[larger]
                self.stand_ins += 1
        graph, static_inputs, output = entry
        n = inputs[0].shape[0]
        for dst, src in zip(static_inputs, inputs):
            dst[:n].copy_(src, non_blocking=True)
        graph.replay()
        return output[:n]

    def _capture(self, inputs, caches, attend_len):
        log.debug("capturing CUDA graph for %s: inputs %s, attend_len %s", self.name,
                  [tuple(t.shape) for t in inputs], attend_len)
        static_inputs = [t.clone() for t in inputs]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):  # warm-up (and compilation): writes the rows a real call writes
                for _ in range(2):
                    self._decode(static_inputs, caches, attend_len)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                output = self._decode(static_inputs, caches, attend_len)
        except Exception:  # logged here: a failed capture can take the process down before it is reported
            log.exception("%s: running or capturing the %s step failed (inputs %s, attend_len %s)", self.name,
                          "compiled" if self.compiled else "eager", [tuple(t.shape) for t in inputs], attend_len)
            raise
        return graph, static_inputs, output

    def _decode(self, inputs, caches, attend_len):
        """The work a decode graph captures: the compiled step on the attended cache rows, or the
        eager step told to attend to them."""
        if self.compiled is None:
            self.step.attend_len = attend_len
            return self.step(*inputs, *caches)
        self.step.attend_len = None
        if attend_len is not None:
            caches = [c[:, :, :attend_len] for c in caches]
            # padding rows of a batch bucket may hold stale positions: keep their cache writes inside
            # the attended rows (their outputs are discarded; live rows always write below attend_len)
            inputs = [inputs[0], inputs[1].clamp(max=attend_len - 1), *inputs[2:]]
        return self.compiled(inputs, caches)


def load_torch_engines(manifest: Manifest, directory, device: torch.device, model: torch.nn.Module | None = None,
                       cuda_graphs: bool = True, compile: bool | None = None) -> dict[str, TorchEngine]:
    """Engines for every graph of the artifact, from its saved weights, or from the tensors of a
    given model (which is not changed; see `_own_model`). `compile`: run decode steps compiled by
    TorchInductor inside the CUDA graphs (CUDA with Triton only; elsewhere, or without CUDA graphs, the
    steps run eagerly, and the reason is logged where compile=True asked for it); None: where it runs;
    False: never."""
    if model is None:
        from blockrt.exporter.checkpoint import load_checkpoint

        path = Path(directory) / WEIGHTS_NAME
        if not path.is_file():
            raise ArtifactError(f"{path} not found: the PyTorch backend needs the weights that "
                                f"`blockrt export` saves beside the graphs; re-export the model")
        model = load_checkpoint(path, config=manifest.model_config, dtype=manifest.dtype)
    if _is_quantized(model):  # its quantized layers / FP8 KV cache hooks are modules of its own
        model = model.to(device=device, dtype=TORCH_DTYPES[manifest.dtype]).eval()
    else:
        model = _own_model(model, device, TORCH_DTYPES[manifest.dtype])
    if compile is not False:
        reason = skip_reason(device) or (None if cuda_graphs else "compiled steps run inside CUDA graphs, which are off")
        if reason:
            log.log(logging.INFO if compile else logging.DEBUG, "not compiling the steps: %s", reason)
        compile = reason is None
    prepare_quantized(model, manifest, directory, device, compiled=compile)
    if isinstance(model, BlockTransformer):  # the token decoder's rotary, cache write and attention over its
        kernel = small_cache_decode if triton_kernels_run(device) else None  # L + 1 rows: one Triton kernel on CUDA
        for module in model.token_decoder.modules():
            if isinstance(module, Attention):
                module.decode_math, module.small_cache_kernel = True, kernel
    if device.type == "cuda" and manifest.dtype in ("bf16", "fp16"):  # fp32 (exactness checks) keeps erf GELU
        for module in model.modules():
            if isinstance(module, MLP) and type(module.dense_h_to_4h) is torch.nn.Linear:  # not a QuantLinear
                module.gelu_epilogue = True
    pool = torch.cuda.graph_pool_handle() if device.type == "cuda" and cuda_graphs else None
    steps = step_modules(model, "inplace", inplace=True, positions=manifest.positions)
    engines = {}
    for name, step in steps.items():
        rows = ATTEND_BLOCKS if name == "block_decoder" else ATTEND_TOKENS
        compiled = None
        if compile:
            compiled = CompiledStep(step, name, symbolic_cache_len=name != "token_decoder")
        engines[name] = TorchEngine(manifest, name, step, device, cuda_graphs, rows, pool, compiled)
    return engines


def _is_quantized(model: torch.nn.Module) -> bool:
    from blockrt.exporter.qlinear import QuantEmbedding, QuantLinear

    return _has_fp8_kv_cache(model) or any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def _has_fp8_kv_cache(model: torch.nn.Module) -> bool:
    return any(getattr(m, "kv_quant", None) is not None for m in model.modules())


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
