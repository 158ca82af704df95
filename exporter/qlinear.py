"""Quantized linear layers and embedding tables, as the exported graphs and the PyTorch engine
compute them.

A `QuantLinear` keeps its weight quantized and transposed to `[in, out]` (the layout of the
graph's MatMul) with its scales, in one of three modes:

- `int8-wo`: INT8 weights, one scale per output channel; activations stay in the model dtype.
- `int4-wo`: INT4 weights (held in int8 here, packed two per byte in the ONNX file), one scale per
  block of `block_size` input rows and output channel.
- `fp8`: FP8 E4M3 weights with per-channel scales, and FP8 activations with one calibrated
  per-tensor scale (`input_scale`).

A `QuantEmbedding` (weight-only modes) keeps its table `[vocab, hidden]` in INT8 with one scale per
row, or in INT4 with one scale per row and group of `block_size` columns.

Their forwards are custom ops that export to standard ONNX QDQ (see `qdq_translations`):
`blockrt::dequantize` -> DequantizeLinear (per-axis, or blocked with `block_size`, opset 21+),
`blockrt::fake_quant_fp8` -> QuantizeLinear to FP8 + DequantizeLinear, and
`blockrt::dequantize_gather` -> DequantizeLinear of the table -> Gather. Run eagerly they compute
exactly what those ONNX ops compute (dequantize on the fly; the embedding gathers its rows first,
which gives the same values), so the eager model is the reference of the quantized graphs; the
PyTorch engine on CUDA replaces the linear ones with fused kernels (`blockrt.runtime.quant_kernels`)
by setting `kernel`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from blockrt.graphs.qdq import QUANT_MODES as MODES

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT_MAX = {"int8-wo": 127, "int4-wo": 7}
INT_MIN = {"int8-wo": -127, "int4-wo": -8}


@torch.library.custom_op("blockrt::dequantize", mutates_args=())
def dequantize(q: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """q [K, N] (int8 or float8) -> q * scale in the scale's dtype; scale is [N] (per output
    channel) or, with block_size > 0, [K / block_size, N] (per block of rows)."""
    if block_size:
        scale = scale.repeat_interleave(block_size, dim=0)
    return q.to(torch.float32).mul(scale.to(torch.float32)).to(scale.dtype)


@dequantize.register_fake
def _dequantize_fake(q, scale, block_size):
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


@torch.library.custom_op("blockrt::fake_quant_fp8", mutates_args=())
def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x -> dequantize(quantize(x)) through FP8 E4M3 with a per-tensor scale (saturating, as ONNX
    QuantizeLinear with saturate=1)."""
    q = (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.float().mul(scale.float()).to(x.dtype)


@fake_quant_fp8.register_fake
def _fake_quant_fp8_fake(x, scale):
    return torch.empty_like(x)


@torch.library.custom_op("blockrt::dequantize_gather", mutates_args=())
def dequantize_gather(q: torch.Tensor, scale: torch.Tensor, block_size: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the table q [V, H] * scale, in the scale's dtype; scale is [V] (per row) or, with
    block_size > 0, [V, H / block_size] (per row and block of columns)."""
    rows, scale = q[ids].to(torch.float32), scale[ids]
    scale = scale.repeat_interleave(block_size, dim=-1) if block_size else scale[..., None]
    return rows.mul(scale.to(torch.float32)).to(scale.dtype)


@dequantize_gather.register_fake
def _dequantize_gather_fake(q, scale, block_size, ids):
    return torch.empty((*ids.shape, q.shape[1]), dtype=scale.dtype, device=q.device)


def qdq_translations(op) -> dict:
    """ONNX translations of the custom ops for `torch.onnx.export(custom_translation_table=...)`;
    `op` is the onnxscript opset the graph is exported with."""
    import onnx_ir as ir

    def dq(q, scale, block_size):
        if block_size:
            return op.DequantizeLinear(q, scale, axis=0, block_size=block_size)
        return op.DequantizeLinear(q, scale, axis=1)

    def fq(x, scale):
        zero = op.Constant(value=ir.tensor(np.zeros((), dtype=ir.DataType.FLOAT8E4M3FN.numpy())))
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero, saturate=1), scale)

    def dq_gather(q, scale, block_size, ids):
        table = (op.DequantizeLinear(q, scale, axis=1, block_size=block_size) if block_size
                 else op.DequantizeLinear(q, scale, axis=0))
        return op.Gather(table, ids, axis=0)

    return {torch.ops.blockrt.dequantize.default: dq, torch.ops.blockrt.fake_quant_fp8.default: fq,
            torch.ops.blockrt.dequantize_gather.default: dq_gather}


class QuantLinear(nn.Module):
    """y = x @ dequantize(qweight) + bias, with fp8 activations in mode `fp8` (see the module
    docstring). Buffers: qweight [in, out], weight_scale, input_scale (fp8), bias."""

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, mode: str,
                 block_size: int = 0, input_scale: torch.Tensor | None = None):
        super().__init__()
        self.mode, self.block_size = mode, block_size
        self.in_features, self.out_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("input_scale", input_scale)
        self.register_buffer("bias", bias)
        self.kernel = None  # a fused implementation (PyTorch engine on CUDA), or None: the QDQ ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        if self.mode == "fp8":
            x = torch.ops.blockrt.fake_quant_fp8(x, self.input_scale)
        y = x @ torch.ops.blockrt.dequantize(self.qweight, self.weight_scale, self.block_size)
        return y if self.bias is None else y + self.bias

    def _apply(self, fn, recurse=True):
        """`Module.to(dtype)` casts every floating tensor, FP8 included: cast the weight back (exact,
        every E4M3 value is representable in fp16 / bf16 / fp32)."""
        dtype = self.qweight.dtype if self.qweight is not None else None
        super()._apply(fn, recurse)
        if dtype is not None and self.qweight.dtype != dtype:
            self.qweight = self.qweight.to(dtype)
        return self

    def extra_repr(self) -> str:
        block = f", block_size={self.block_size}" if self.block_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{block}"


class QuantEmbedding(nn.Module):
    """An embedding table in INT8 / INT4 (weight-only modes; see the module docstring). Buffers:
    qweight [vocab, hidden] (int8), weight_scale [vocab] or [vocab, hidden / block_size]."""

    def __init__(self, qweight: torch.Tensor, weight_scale: torch.Tensor, mode: str, block_size: int = 0):
        super().__init__()
        self.mode, self.block_size = mode, block_size
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", weight_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.blockrt.dequantize_gather(self.qweight, self.weight_scale, self.block_size, ids)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, mode: str, block_size: int) -> "QuantEmbedding":
        """Quantize a table row by row (as a Linear whose output channels are the rows)."""
        q, scale = quantize_weight(embedding.weight, mode, block_size, embedding.weight.dtype)
        return cls(q.t().contiguous(), scale.t().contiguous(), mode, block_size)

    def extra_repr(self) -> str:
        block = f", block_size={self.block_size}" if self.block_size else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode}{block}"


def quantize_weight(weight: torch.Tensor, mode: str, block_size: int, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear weight [out, in] -> (qweight [in, out], scale), symmetric round-to-nearest. Scales
    are absmax / qmax per output channel ([out]) or per block of `block_size` input rows
    ([in / block_size, out]), rounded to `dtype` first so that q * scale is what the graph computes."""
    w = weight.detach().float().t()  # [K, N]
    K, N = w.shape
    if mode == "int4-wo":
        amax = w.abs().view(K // block_size, block_size, N).amax(dim=1)  # [K / block, N]
        full = amax.repeat_interleave(block_size, dim=0)
    else:
        amax = w.abs().amax(dim=0)  # [N]
        full = amax
    qmax = FP8_MAX if mode == "fp8" else INT_MAX[mode]
    scale = (amax / qmax).clamp(min=1e-12).to(dtype)
    full = (full / qmax).clamp(min=1e-12).to(dtype).float()
    if mode == "fp8":
        q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        q = (w / full).round().clamp(INT_MIN[mode], INT_MAX[mode]).to(torch.int8)
    return q.contiguous(), scale
