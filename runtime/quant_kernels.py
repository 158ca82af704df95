"""The PyTorch engine's quantized layers: the artifact's quantized tensors loaded into the model,
and on CUDA fused kernels in place of the QDQ reference ops.

- fp8: `torch._scaled_mm` (FP8 E4M3 tensor cores, Hopper and later) on the activation quantized
  with its calibrated per-tensor scale, per-channel weight scales, bf16/fp16 output;
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


def prepare_quantized(model: torch.nn.Module, manifest: Manifest, directory, device: torch.device) -> None:
    """Load the artifact's quantized layers into `model` (if it is quantized and not yet), then install
    the fused kernels on CUDA."""
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
        kernel = _kernel(layer)
        if kernel is not None and _agrees(layer, kernel):
            layer.kernel = kernel
            layer.qweight = kernel.weight  # the kernel's layout replaces the reference one (no second copy)
            kinds[kernel.name] = kinds.get(kernel.name, 0) + 1
        else:
            kinds["reference"] = kinds.get("reference", 0) + 1
    if kinds:
        log.info("quantized layers: %s", ", ".join(f"{name} x{count}" for name, count in kinds.items()))


def _layers(model: torch.nn.Module) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


class _Fp8:
    name = "fp8 _scaled_mm"

    def __init__(self, layer: QuantLinear):
        self.layer = layer
        self.weight = layer.qweight.t().contiguous().t()  # column-major [K, N], as _scaled_mm wants
        self.w_scale = layer.weight_scale.float().reshape(1, -1).contiguous()
        self.inv_scale = (1.0 / layer.input_scale.float()).reshape(1)
        self.x_scale = layer.input_scale.float().reshape(1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq = (x2 * self.inv_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.weight, scale_a=self.x_scale.expand(x2.shape[0], 1).contiguous(),
                             scale_b=self.w_scale, out_dtype=x.dtype)
        if self.layer.bias is not None:
            y = y + self.layer.bias
        return y.reshape(*shape[:-1], y.shape[-1])


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


@torch.no_grad()
def _agrees(layer: QuantLinear, kernel) -> bool:
    gen = torch.Generator(device=layer.qweight.device).manual_seed(0)
    dtype = layer.weight_scale.dtype
    x = torch.randn(37, 2 * layer.in_features, generator=gen, device=layer.qweight.device).to(dtype)[:, ::2]
    # strided rows, as the LM head gets them (the last position of each sequence)
    if layer.input_scale is not None:  # fp8: span the activation range the scale was calibrated for
        x = x * (layer.input_scale.float() * 100).to(dtype)
    want = layer(x).float()
    try:
        got = kernel(x).float()
    except (RuntimeError, NotImplementedError) as e:
        log.warning("%s kernel unusable for %s (%s): using the reference ops", kernel.name, layer, e)
        return False
    rel = float((got - want).norm() / want.norm().clamp(min=1e-12))
    if not rel < CHECK_TOLERANCE:
        log.warning("%s kernel disagrees with the reference for %s (rel %.1e): using the reference ops",
                    kernel.name, layer, rel)
    return rel < CHECK_TOLERANCE
