"""Post-training quantization of a model for export: which layers, their scales, calibration data,
and the quantized tensors an artifact stores.

`quantize_model` replaces every `nn.Linear` of the decoder stacks and the LM head (`embed_out`)
with a `QuantLinear` and, in the weight-only modes, every embedding table (`nn.Embedding`) with a
`QuantEmbedding` (see `qlinear.py` for the modes and their ONNX QDQ form). LayerNorms, the block
model's small `expansion_layer` (a Conv1d) and, in mode fp8, the embedding tables stay in the model
dtype (FP8 is for the tensor cores; a table lookup does no arithmetic).

Weight scales come from the weights (absmax per output channel, or per block of `group_size` input
rows for INT4; an embedding table: per row, or per row and block of `group_size` columns). FP8
activation scales are calibrated: the fp32 model runs teacher-forced over calibration sequences
and each layer's input absmax / 448 becomes its per-tensor scale. The
sequences are the user's (`calibration_sequences`: token ids or text; `blockrt export
--calibration-prompts FILE` reads them from JSONL) or, by default, deterministic random token ids.

An artifact keeps the quantized tensors in `quantized.safetensors` (`<layer>.qweight`,
`.weight_scale`, `.input_scale`, `.bias`; embeddings `.qweight`, `.weight_scale`), the very
tensors its graphs hold, so the PyTorch engine and `blockrt verify` rebuild the same quantized
model (`load_quantized`); `weights.safetensors`
keeps the unquantized weights as the reference.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from blockrt.errors import UserError
from blockrt.graphs.qdq import KV_CACHE_DTYPES

from .qlinear import FP8_MAX, MODES, QuantEmbedding, QuantLinear, quantize_weight

log = logging.getLogger(__name__)

QUANTIZED_NAME = "quantized.safetensors"
DEFAULT_GROUP_SIZE = 128
DEFAULT_CALIBRATION = {"sequences": 16, "length": 64, "seed": 0}


@dataclass(frozen=True)
class QuantConfig:
    """The manifest's `quantization` section."""

    mode: str  # fp8 | int8-wo | int4-wo
    group_size: int = DEFAULT_GROUP_SIZE  # int4-wo: input rows per scale (smaller where a layer is narrower)
    kv_cache_dtype: str | None = None  # fp8, or None: caches in the artifact dtype
    calibration: str = ""  # where the fp8 activation scales came from
    layers: int = 0  # quantized layers: Linear, and Embedding tables in the weight-only modes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        return cls(**d)


def check_options(mode: str | None, kv_cache_dtype: str | None, group_size: int, calibration: bool = False) -> None:
    if calibration and mode != "fp8":
        raise UserError("calibration prompts set the activation scales of --quantize fp8; the other modes "
                        "quantize weights only and take none")
    if mode is not None and mode not in MODES:
        raise UserError(f"unknown --quantize mode {mode!r}: expected one of {', '.join(MODES)}")
    if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
        raise UserError(f"unknown --kv-cache-dtype {kv_cache_dtype!r}: expected one of {', '.join(KV_CACHE_DTYPES)}")
    if kv_cache_dtype is not None:
        raise UserError("--kv-cache-dtype fp8 is not supported by this export yet (the ONNX cache I/O stays in the "
                        "artifact dtype); the PyTorch engine's FP8 KV cache is set with `blockrt bench --kv-cache-dtype`")
    if not isinstance(group_size, int) or group_size < 16 or group_size & (group_size - 1):
        raise UserError(f"--group-size {group_size!r}: expected a power of two >= 16 (e.g. 128)")


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear (decoder stacks and LM head): quantized in every mode."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def quantized_layers(model: nn.Module, mode: str) -> dict[str, nn.Linear | nn.Embedding]:
    """The layers that `mode` quantizes: the Linear layers, and the embedding tables in the
    weight-only modes."""
    kinds = (nn.Linear,) if mode == "fp8" else (nn.Linear, nn.Embedding)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def _block_size(name: str, width: int, mode: str, group_size: int) -> int:
    """int4-wo: values per scale along `width` (the group size, or the whole width if smaller)."""
    if mode != "int4-wo":
        return 0
    block = min(group_size, width)
    if width % block:
        raise UserError(f"--quantize int4-wo: layer {name} has {width} inputs, not a multiple of the group size "
                        f"{block}; choose another --group-size")
    return block


def calibration_sequences(config, prompts: list | None = None, tokenizer=None,
                          source: str = "calibration prompts") -> tuple[list[list[int]], str]:
    """(token-id sequences, description) for calibration: `prompts` (token-id lists, or text that
    `tokenizer`, a tokenizers.Tokenizer, encodes), else deterministic random ids."""
    if prompts is None:
        d = DEFAULT_CALIBRATION
        gen = torch.Generator().manual_seed(d["seed"])
        seqs = torch.randint(0, config.vocab_size, (d["sequences"], d["length"]), generator=gen).tolist()
        return seqs, f"{d['sequences']} random sequences of {d['length']} tokens (seed {d['seed']})"
    seqs = []
    for n, item in enumerate(prompts, 1):
        if isinstance(item, str):
            if tokenizer is None:
                raise UserError(f"{source}, prompt {n}: text needs a tokenizer; export with --tokenizer "
                                f"tokenizer.json, or give token ids")
            item = tokenizer.encode(item).ids
        if not (isinstance(item, list) and item and all(isinstance(t, int) and 0 <= t < config.vocab_size
                                                        for t in item)):
            raise UserError(f"{source}, prompt {n}: expected a non-empty list of token ids in "
                            f"0..{config.vocab_size - 1}, or a string")
        seqs.append(item)
    if not seqs:
        raise UserError(f"{source}: no prompts")
    return seqs, f"{source} ({len(seqs)} prompts)"


@torch.no_grad()
def calibrate(model: nn.Module, sequences: list[list[int]], batch: int = 8) -> dict[str, float]:
    """Layer name -> absmax of its input over the sequences, run teacher-forced in fp32."""
    model = copy.deepcopy(model).float().eval()
    L, device = model.config.block_len, next(model.parameters()).device
    amax: dict[str, float] = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: amax.__setitem__(
                 name, max(amax.get(name, 0.0), float(args[0].abs().max()))))
             for name, m in linear_layers(model).items()]
    try:
        for i in range(0, len(sequences), batch):
            for seq in sequences[i:i + batch]:  # one at a time: no padding enters the statistics
                n = max(2 * L, len(seq) // L * L)  # a block model needs two blocks to predict one
                ids = (seq * (n // len(seq) + 1))[:n]
                model(torch.tensor([ids], device=device))
    finally:
        for h in hooks:
            h.remove()
    return amax


def quantize_model(model: nn.Module, mode: str, *, group_size: int = DEFAULT_GROUP_SIZE,
                   sequences: list[list[int]] | None = None) -> nn.Module:
    """A copy of `model` (in its own dtype) with its `quantized_layers` replaced by QuantLinear /
    QuantEmbedding layers; fp8 calibrates activation scales on `sequences`."""
    dtype = next(model.parameters()).dtype
    amax = calibrate(model, sequences) if mode == "fp8" else {}
    qmodel = copy.deepcopy(model)
    for name, layer in quantized_layers(qmodel, mode).items():
        if isinstance(layer, nn.Embedding):
            block = _block_size(name, layer.embedding_dim, mode, group_size)
            _set_module(qmodel, name, QuantEmbedding.from_embedding(layer, mode, block))
            continue
        block = _block_size(name, layer.in_features, mode, group_size)
        qweight, scale = quantize_weight(layer.weight, mode, block, dtype)
        input_scale = None
        if mode == "fp8":
            input_scale = torch.tensor(max(amax.get(name, 0.0), 1e-6) / FP8_MAX).to(dtype)
        bias = None if layer.bias is None else layer.bias.detach().clone()
        _set_module(qmodel, name, QuantLinear(qweight, scale, bias, mode, block, input_scale))
    return qmodel.eval()


def weight_bytes(config, dtype: str, mode: str | None = None, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes of a model's weights, from its shapes alone (no weights are made): every tensor in
    `dtype`, or with `mode`'s quantized layers as an artifact holds them (INT8 / FP8: a byte a
    value, INT4: half a byte, plus their scales, and biases, in `dtype`)."""
    from .config import TORCH_DTYPES
    from .model import build_model

    with torch.device("meta"):
        model = build_model(config)
    size = TORCH_DTYPES[dtype].itemsize
    layers = quantized_layers(model, mode) if mode is not None else {}
    total = 0
    for name, p in model.named_parameters():
        layer_name, _, kind = name.rpartition(".")
        if layer_name not in layers or kind != "weight":
            total += p.numel() * size
            continue
        block = _block_size(layer_name, p.shape[1], mode, group_size)  # Linear [out, in], Embedding [rows, width]
        scales = p.numel() // block if block else p.shape[0]
        total += p.numel() * (4 if mode == "int4-wo" else 8) // 8 + scales * size + (size if mode == "fp8" else 0)
    return total


def quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every QuantLinear / QuantEmbedding buffer of a quantized model, by state_dict name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            for key, t in m.named_buffers(recurse=False):
                out[f"{name}.{key}"] = t.detach().contiguous()
    return out


def save_quantized(model: nn.Module, directory: str | os.PathLike, config: QuantConfig) -> Path:
    path = Path(directory) / QUANTIZED_NAME
    save_file(quantized_tensors(model), str(path), metadata={"format": "pt", "quantization": json.dumps(config.to_dict())})
    os.chmod(path, 0o644)
    return path


def load_quantized(model: nn.Module, path: str | os.PathLike, config: QuantConfig) -> nn.Module:
    """Replace the Linear / Embedding layers of `model` (in place) by the quantized ones stored at `path`."""
    tensors = load_file(str(path))
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    missing = [n for n in names if not isinstance(_get_module(model, n), (nn.Linear, nn.Embedding))]
    if missing or len(names) != config.layers:
        raise UserError(f"{path} does not match the model: {len(names)} quantized layers for {config.layers} in the "
                        f"manifest{', unknown ' + ', '.join(missing[:3]) if missing else ''}; re-export the model")
    device = next(model.parameters()).device
    for name in names:
        qweight, scale = tensors[f"{name}.qweight"], tensors[f"{name}.weight_scale"]
        if isinstance(_get_module(model, name), nn.Embedding):  # qweight [V, H], scale [V] or [V, H / block]
            block = qweight.shape[1] // scale.shape[1] if scale.ndim == 2 else 0
            layer = QuantEmbedding(qweight, scale, config.mode, block)
        else:  # qweight [K, N], scale [N] or [K / block, N]
            block = qweight.shape[0] // scale.shape[0] if scale.ndim == 2 else 0
            layer = QuantLinear(qweight, scale, tensors.get(f"{name}.bias"), config.mode, block,
                                tensors.get(f"{name}.input_scale"))
        _set_module(model, name, layer.to(device))
    return model


def _get_module(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
