"""The PyTorch engine's quantized layers: the artifact's quantized tensors loaded into the model,
and on CUDA fused kernels in place of the QDQ reference ops.

- fp8: `torch._scaled_mm` (FP8 E4M3 tensor cores, Hopper and later) on the activation quantized
  with its calibrated per-tensor scale (one Triton pass when run eagerly; fused by Inductor into
  the producing kernel when compiled), per-channel weight scales, bf16/fp16 output; in one of four
  forms (`_Fp8`), the fastest that agrees measured once per weight shape;
- int8-wo: `torch._weight_int8pack_mm` where this torch has it for the device, else dequantize + matmul;
- int4-wo: `torch._weight_int4pack_mm` (tinygemm: packed INT4, bf16 activations), else dequantize + matmul.

Each kernel is checked once against the QDQ reference on a random input when it is installed; one
that fails or is missing leaves the layer on the reference path (with a log line); one that passes
replaces the layer's `qweight` by its own layout (so the weights are held once). On CPU every
layer runs the reference ops (dequantize on the fly), the arithmetic of the exported graphs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from blockrt.exporter.qlinear import FP8_MAX, QuantLinear
from blockrt.graphs.manifest import Manifest

log = logging.getLogger(__name__)

CHECK_TOLERANCE = 2e-2  # relative error of a fused kernel against the QDQ reference (bf16 output)


def prepare_quantized(model: torch.nn.Module, manifest: Manifest, directory, device: torch.device,
                      compiled: bool = False) -> None:
    """Load the artifact's quantized layers into `model` (if it is quantized and not yet), then install
    the fused kernels on CUDA. `compiled`: the steps will run under TorchInductor, which fuses the
    element-wise work around each GEMM, so the fp8 forms are timed by their GEMMs alone."""
    if manifest.quantization is not None and directory is not None and not _layers(model):
        from blockrt.exporter.quantize import QUANTIZED_NAME, QuantConfig, load_quantized

        load_quantized(model, Path(directory) / QUANTIZED_NAME, QuantConfig.from_dict(manifest.quantization))
    if device.type != "cuda":
        return
    kinds: dict[str, int] = {}
    for layer in _layers(model):
        if layer.kernel is not None:  # prepared by an earlier load of the same model
            kinds[layer.kernel.name] = kinds.get(layer.kernel.name, 0) + 1
            continue
        kernel = _install(layer, compiled)
        if kernel is not None:
            layer.kernel = kernel
            layer.qweight = kernel.weight  # the kernel's layout replaces the reference one (no second copy)
            kinds[kernel.name] = kinds.get(kernel.name, 0) + 1
        else:
            kinds["reference"] = kinds.get("reference", 0) + 1
    if kinds:
        log.info("quantized layers: %s", ", ".join(f"{name} x{count}" for name, count in kinds.items()))


def _layers(model: torch.nn.Module) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


def quantize_fp8(x: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> FP8 E4M3 with a per-tensor scale (saturating; inv_scale is fp32 [1]). Under
    torch.compile these are plain element-wise ops on purpose: Inductor fuses them into the kernel
    that produces x (LayerNorm, GELU, attention). Run eagerly on CUDA, one Triton pass replaces the
    three PyTorch kernels (scale, clamp, cast) and their fp32 intermediates."""
    if x.is_cuda and not torch.compiler.is_compiling() and _quant_kernel() is not None:
        x = x.contiguous()
        out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        n = x.numel()
        _quant_kernel()[(-(-n // QUANT_BLOCK),)](x, out, inv_scale, n, FP8_MAX, BLOCK=QUANT_BLOCK, num_warps=4)
        return out
    return (x * inv_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # x promoted to fp32 by inv_scale


QUANT_BLOCK = 2048
_QUANT_KERNEL: list = []  # [the Triton kernel, or None without Triton], built on first use


def _quant_kernel():
    if not _QUANT_KERNEL:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _QUANT_KERNEL.append(None)
            return None

        @triton.jit
        def _quantize(X, Y, inv_scale, n, fp8_max, BLOCK: tl.constexpr):
            offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            inside = offsets < n
            x = tl.load(X + offsets, mask=inside).to(tl.float32) * tl.load(inv_scale)
            y = tl.minimum(tl.maximum(x, -fp8_max), fp8_max)
            tl.store(Y + offsets, y.to(tl.float8e4nv), mask=inside)

        _QUANT_KERNEL.append(_quantize)
    return _QUANT_KERNEL[0]


ONES_ROWS = 65536  # rows of the shared ones column (a prefill of the default budget fits)
_ONES: dict[torch.device, torch.Tensor] = {}


def ones_column(rows: int, device: torch.device) -> torch.Tensor:
    """A [rows, 1] fp32 column of ones: a view of one buffer per device, grown when a call needs more."""
    ones = _ONES.get(device)
    if ones is None or ones.shape[0] < rows:
        ones = _ONES[device] = torch.ones(max(rows, ONES_ROWS), 1, dtype=torch.float32, device=device)
    return ones[:rows]


class _Fp8:
    """y = (x_q @ w_q) * x_scale * w_scale + bias on FP8 tensor cores (`torch._scaled_mm`), the
    activation quantized with its calibrated per-tensor scale. Four forms compute it: `rowwise`
    (scale_a per row, scale_b per channel, bias in the GEMM) or `tensorwise` (scalar scales in the
    GEMM; the per-channel weight scale and the bias applied to its output, which Inductor fuses into
    the next element-wise kernel), each with fast accumulation (`-fast`) or without (cuBLAS has no
    fast-accumulation algorithm for some shapes: on an H100, K = 8192 at 37 rows). `prepare_quantized`
    keeps the fastest form that agrees with the QDQ reference, per weight shape."""

    name = "fp8 _scaled_mm"
    FORMS = ("rowwise-fast", "tensorwise-fast", "rowwise", "tensorwise")

    def __init__(self, layer: QuantLinear, form: str = "rowwise-fast"):
        self.layer = layer
        self.weight = layer.qweight.t().contiguous().t()  # column-major [K, N], as _scaled_mm wants
        # rowwise: the activation's per-tensor scale folded into the per-channel one, so that the
        # per-row scale is a slice of a ones column (no kernel to build it: a [rows, 1] tensor made per
        # GEMM was 4 kernels per layer and step, which Inductor also fused into the producers of the
        # activations, slowing them)
        self.channel_scale = (layer.input_scale.float() * layer.weight_scale.float()).reshape(1, -1).contiguous()
        self.ones = ones_column(ONES_ROWS, layer.qweight.device)
        self.w_scale_out = layer.weight_scale.reshape(-1)  # in the model dtype, for the tensorwise output
        self.inv_scale = (1.0 / layer.input_scale.float()).reshape(1)
        self.x_scale = layer.input_scale.float().reshape(())
        self.one = torch.ones((), dtype=torch.float32, device=layer.qweight.device)
        self._set_form(form)

    def _set_form(self, form: str) -> None:
        self.form, self.rowwise, self.fast = form, form.startswith("rowwise"), form.endswith("-fast")

    def with_form(self, form: str) -> "_Fp8":
        kernel = _Fp8.__new__(_Fp8)
        kernel.__dict__.update(self.__dict__)
        kernel._set_form(form)
        return kernel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.gemm(quantize_fp8(x.reshape(-1, shape[-1]), self.inv_scale), x.dtype)
        if not self.rowwise:
            bias = self.layer.bias
            y = y * self.w_scale_out if bias is None else torch.addcmul(bias, y, self.w_scale_out)
        return y.reshape(*shape[:-1], y.shape[-1])

    def gemm(self, xq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The `_scaled_mm` call alone: the whole layer (rowwise), or all but the per-channel scale and
        the bias (tensorwise)."""
        if self.rowwise:
            if xq.shape[0] > self.ones.shape[0]:  # a prefill past ONES_ROWS (eager)
                self.ones = ones_column(xq.shape[0], xq.device)
            return torch._scaled_mm(xq, self.weight, scale_a=self.ones[:xq.shape[0]], scale_b=self.channel_scale,
                                    bias=self.layer.bias, out_dtype=dtype, use_fast_accum=self.fast)
        return torch._scaled_mm(xq, self.weight, scale_a=self.x_scale, scale_b=self.one, out_dtype=dtype,
                                use_fast_accum=self.fast)


class _Int8:
    name = "int8 _weight_int8pack_mm"

    def __init__(self, layer: QuantLinear):
        self.layer = layer
        self.weight = layer.qweight.t().contiguous()  # [N, K]
        self.scale = layer.weight_scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(), self.weight, self.scale)
        if self.layer.bias is not None:
            y = y + self.layer.bias
        return y.reshape(*shape[:-1], y.shape[-1])


class _Int4:
    name = "int4 _weight_int4pack_mm"
    INNER_K_TILES = 8

    def __init__(self, layer: QuantLinear):
        self.layer = layer
        q = (layer.qweight.t().to(torch.int32) + 8)  # [N, K] in 0..15
        packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        self.weight = torch._convert_weight_to_int4pack(packed.contiguous(), self.INNER_K_TILES)
        scale = layer.weight_scale.to(torch.bfloat16)  # [K / g, N]
        self.scales_and_zeros = torch.stack([scale, torch.zeros_like(scale)], dim=-1).contiguous()
        self.group = layer.block_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int4pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(), self.weight,
                                      self.group, self.scales_and_zeros).to(x.dtype)
        if self.layer.bias is not None:
            y = y + self.layer.bias
        return y.reshape(*shape[:-1], y.shape[-1])


KERNELS = {"fp8": _Fp8, "int8-wo": _Int8, "int4-wo": _Int4}


def _kernel(layer: QuantLinear):
    if layer.mode == "fp8" and torch.cuda.get_device_capability(layer.qweight.device) < (8, 9):
        return None
    try:
        return KERNELS[layer.mode](layer)
    except (RuntimeError, AttributeError, NotImplementedError) as e:  # missing op or unsupported shape
        log.debug("no %s kernel for %s: %s", layer.mode, layer, e)
        return None


TIMING_ROWS = 2048  # the forms are timed at this many rows (decode batches are thousands of rows)
_FASTEST: dict[tuple, str] = {}  # (K, N, dtype, compiled) -> the fastest form of the fp8 kernel, timed once per process


def _install(layer: QuantLinear, compiled: bool):
    """The fused kernel for `layer` that agrees with its QDQ reference (for fp8, the fastest form that
    does), or None (logged: the layer keeps the reference ops)."""
    kernel = _kernel(layer)
    if kernel is None:
        return None
    candidates = [kernel.with_form(f) for f in _Fp8.FORMS] if isinstance(kernel, _Fp8) else [kernel]
    failures = {k: _disagreement(layer, k) for k in candidates}
    forms = [k for k, why in failures.items() if why is None]
    if not forms:
        log.warning("%s kernel unusable for %s (%s): using the reference ops", kernel.name, layer,
                    "; ".join(f"{getattr(k, 'form', k.name)}: {why}" for k, why in failures.items()))
        return None
    if len(forms) == 1:
        return forms[0]
    key = (layer.in_features, layer.out_features, layer.weight_scale.dtype, compiled)
    if key not in _FASTEST:
        x = _check_input(layer, rows=TIMING_ROWS)
        if compiled:  # the GEMM alone: Inductor fuses the quantization and the tensorwise epilogue
            xq = quantize_fp8(x, forms[0].inv_scale)
            times = {k.form: _median_ms(lambda x, k=k: k.gemm(xq, x.dtype), x) for k in forms}
        else:
            times = {k.form: _median_ms(k, x) for k in forms}
        _FASTEST[key] = min(times, key=times.get)
        failed = [k.form for k, why in failures.items() if why is not None]
        log.info("fp8 GEMM %d x %d at %d rows%s: %s; using %s%s", layer.in_features, layer.out_features, TIMING_ROWS,
                 " (GEMM alone, compiled steps)" if compiled else "",
                 ", ".join(f"{f} {t * 1e3:.1f} us" for f, t in times.items()), _FASTEST[key],
                 f" ({', '.join(failed)} unusable at 37 rows)" if failed else "")
    return next((k for k in forms if k.form == _FASTEST[key]), forms[0])


@torch.no_grad()
def _median_ms(kernel, x: torch.Tensor, reps: int = 15) -> float:
    """GPU time of one call, replayed from a CUDA graph as the engine runs it (timed directly, a
    call's kernel launches would cost more than small GEMMs)."""
    stream = torch.cuda.Stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            kernel(x)
    torch.cuda.current_stream(x.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel(x)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(x.device)
    return sorted(start.elapsed_time(end) for start, end in events)[reps // 2]


def _check_input(layer: QuantLinear, rows: int = 37) -> torch.Tensor:
    gen = torch.Generator(device=layer.qweight.device).manual_seed(0)
    dtype = layer.weight_scale.dtype
    x = torch.randn(rows, 2 * layer.in_features, generator=gen, device=layer.qweight.device).to(dtype)[:, ::2]
    # strided rows, as the LM head gets them (the last position of each sequence)
    if layer.input_scale is not None:  # fp8: span the activation range the scale was calibrated for
        x = x * (layer.input_scale.float() * 100).to(dtype)
    return x


@torch.no_grad()
def _disagreement(layer: QuantLinear, kernel) -> str | None:
    """Why `kernel` cannot replace the layer's QDQ reference ops (an error, or its relative error on
    a random input), or None if it agrees."""
    x = _check_input(layer)
    want = layer(x).float()
    try:
        got = kernel(x).float()
    except (RuntimeError, NotImplementedError) as e:
        return str(e).splitlines()[0][:200]
    rel = float((got - want).norm() / want.norm().clamp(min=1e-12))
    return None if rel < CHECK_TOLERANCE else f"relative error {rel:.1e} against the reference"
