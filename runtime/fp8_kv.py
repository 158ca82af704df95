"""FP8 (E4M3) KV caches for the PyTorch engine: half the bytes of a bf16 cache, so about twice the
sequences fit, and the block decoder's decode steps (bound by reading the cache) read half as much.

`enable_fp8_kv_cache` calibrates one scale per layer for keys and one for values (absmax over
calibration sequences / 448) and installs an `Fp8KV` on every attention of the block decoder
(vanilla: the decoder); the token decoder's L + 1 rows stay in the model dtype. A decode step (one
new row per sequence, in-place cache) is one custom op, `blockrt::fp8_kv_decode`: it applies rotary
to the new query and key, quantizes the new key and value, writes them into the cache in place and
attends to the sequence's rows (the attention hands `Fp8KV` its q and k before rotary for this). On
CUDA with Triton that is one kernel (`fp8_kv_kernel.decode_kernel`: one program per sequence and
head, online softmax over tiles of rows, FP8 loads converted in registers, the new row taken from
registers, the tile configuration autotuned per problem size); elsewhere it is PyTorch ops. Being one op that mutates the cache
it is given, compiled steps call it on the cache tensors themselves: Inductor copies nothing
around it (a non-mutating op reading the freshly written cache made Inductor copy the whole cache
into a contiguous buffer first, every layer and step). Other steps (prefills, calibration) write
the quantized rows and attend through the model's own attention on dequantized rows. The caches
are allocated in FP8 by the generator from the manifest (`graph_io(kv_cache_dtype="fp8")`).
"""

from __future__ import annotations

import logging

import torch

from blockrt.exporter.cache import ScatterCache, write_rows
from blockrt.exporter.model import Attention, apply_rotary
from blockrt.exporter.qlinear import FP8_MAX

from .inductor import triton_kernels_run

log = logging.getLogger(__name__)


class Fp8KV:
    """The attention of one layer over an FP8 cache; with `scales=None` it only records the absmax
    of the keys and values it sees (calibration) and attends in full precision."""

    def __init__(self, attention: Attention):
        self.attention = attention
        self.scales: tuple[float, float] | None = None
        self.amax = [0.0, 0.0]
        self.fused = False  # decode steps through `fp8_kv_decode` (set when the scales are)

    def __call__(self, q, k, v, cos, sin, mask, cache, layer: int, scale: float):
        """Attention of q, k, v (before rotary: cos / sin [B, 1, T, R]) over the layer's cache."""
        if self.fused and q.shape[2] == 1 and isinstance(cache, ScatterCache) and cache.inplace:  # fused: scales set
            keys, values = cache.keys[layer], cache.values[layer]
            attend = keys.shape[2] if cache.attend_len is None else cache.attend_len
            return fp8_kv_decode(q, k, v, cos, sin, keys, values, cache.write_index, attend, *self.scales, scale)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.scales is None:
            self.amax = [max(self.amax[0], float(k.abs().max())), max(self.amax[1], float(v.abs().max()))]
            if cache is not None:
                k, v = cache.update(layer, k, v)
            return self.attention.attend(q, k, v, mask, scale)
        ks, vs = self.scales
        k8, v8 = cache.update(layer, quantize(k, ks), quantize(v, vs))  # [B, H, S, D] FP8 rows to attend to
        return self.attention.attend(q, k8.to(q.dtype) * ks, v8.to(q.dtype) * vs, mask, scale)


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale in FP8 E4M3, saturating."""
    return (x.float() * (1.0 / scale)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _stack(model):
    return model.block_decoder.gpt_neox if model.config.kind == "block" else model.gpt_neox


@torch.no_grad()
def enable_fp8_kv_cache(model: torch.nn.Module, sequences: list[list[int]]) -> list[tuple[float, float]]:
    """Calibrate and install FP8 KV caches on `model` (in place); returns the (key, value) scales."""
    hooks = []
    for layer in _stack(model).layers:
        layer.attention.kv_quant = Fp8KV(layer.attention)
        hooks.append(layer.attention.kv_quant)
    device = next(model.parameters()).device
    L = model.config.block_len
    for seq in sequences:
        n = max(2 * L, len(seq) // L * L)
        model(torch.tensor([(seq * (n // len(seq) + 1))[:n]], device=device))
    fused = device.type != "cuda" or (triton_kernels_run(device) and _decode_kernel_agrees(device, _stack(model).config))
    for h in hooks:
        h.scales = tuple(max(a, 1e-6) / FP8_MAX for a in h.amax)
        h.fused = fused
    how = ("fused Triton" if device.type == "cuda" else "PyTorch ops") if fused else "dequantizing"
    log.info("FP8 KV cache on %d layers (%s decode steps)", len(hooks), how)
    return [h.scales for h in hooks]


def _decode_kernel_agrees(device: torch.device, stack_config) -> bool:
    """Run every tile configuration of the fused decode kernel once against the PyTorch ops (random
    data, ragged lengths, a row written past the attended ones, strided caches as the compiled steps
    get them); only those that agree are left to the autotuner. False if none does."""
    gen = torch.Generator(device=device).manual_seed(0)
    B, H, S, D = 4, stack_config.num_heads, 77, stack_config.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    q, k, v = (randn(B, H, 1, D).to(torch.bfloat16) for _ in range(3))
    cos, sin = (f(randn(B, 1, 1, stack_config.rotary_dim)).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    caches = [randn(B, H, S + 3, D).to(torch.float8_e4m3fn)[:, :, :S + 2] for _ in range(2)]
    write_index = torch.tensor([76, 4, 39, 78], device=device)  # the last one past the 77 attended rows
    want_caches = [c.clone() for c in caches]
    want = _reference(q, k, v, cos, sin, *want_caches, write_index, S, 0.5, 0.25, 0.1).float()
    tuner = _kernel()
    agree, failures = [], []
    for config in tuner.configs:
        mine = [c.clone() for c in caches]
        for c in mine:  # rows past sequence 1's own (0 .. 4) may hold any bytes: NaN must not leak in
            c[1, :, 5:].view(torch.uint8).fill_(0x7F)  # NaN in E4M3
        try:
            got = _fused(q, k, v, cos, sin, *mine, write_index, S, 0.5, 0.25, 0.1, config=config).float()
        except Exception as e:  # Triton compile or launch errors have no common base class
            failures.append(f"{config.kwargs}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        rel = float((got - want).norm() / want.norm())
        for a, b in zip(mine, want_caches):
            a[1, :, 5:] = b[1, :, 5:]  # the NaN rows (not written by the step) back, to compare the rest
        # the written rows: equal, give or take one E4M3 step (1/8) where a rounding tie broke another way
        written = all(torch.allclose(a.float(), b.float(), rtol=0.13, atol=2 ** -9) for a, b in zip(mine, want_caches))
        if rel < 2e-2 and written:
            agree.append(config)
        else:
            failures.append(f"{config.kwargs}: rel {rel:.1e}, cache rows {'as written' if written else 'differ'}")
    if failures:
        log.warning("fused FP8 decode step: %d of %d tile configurations left out (%s)%s", len(failures),
                    len(tuner.configs), "; ".join(failures), "" if agree else ": dequantizing instead")
    if agree:
        tuner.configs = agree
    return bool(agree)


@torch.library.custom_op("blockrt::fp8_kv_decode", mutates_args=("k_cache", "v_cache"))
def fp8_kv_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, write_index: torch.Tensor, attend: int,
                  k_scale: float, v_scale: float, scale: float) -> torch.Tensor:
    """One decode step of one layer over its FP8 cache. q, k, v [B, H, 1, D], q and k before rotary
    (cos / sin [B, 1, 1, R]: rotate-half on the first R channels of each head); k_cache, v_cache
    [B, H, S, D] FP8 (keys / k_scale, values / v_scale). Rotates q and k, writes the quantized k, v
    at row write_index[b] of each sequence (in place), then attends q to its rows 0 ..
    write_index[b] among the first `attend` rows -> [B, H, 1, D] in q's dtype."""
    if q.is_cuda:
        return _fused(q, k, v, cos, sin, k_cache, v_cache, write_index, attend, k_scale, v_scale, scale)
    return _reference(q, k, v, cos, sin, k_cache, v_cache, write_index, attend, k_scale, v_scale, scale)


@fp8_kv_decode.register_fake
def _fp8_kv_decode_fake(q, k, v, cos, sin, k_cache, v_cache, write_index, attend, k_scale, v_scale, scale):
    return q.new_empty(q.shape)  # contiguous, as the kernel writes it


def _reference(q, k, v, cos, sin, k_cache, v_cache, write_index, attend: int, k_scale: float, v_scale: float,
               scale: float):
    """`fp8_kv_decode` in PyTorch ops: what prefill steps compute over the cache, one row at a time."""
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    write_rows(k_cache, quantize(k, k_scale), write_index)
    write_rows(v_cache, quantize(v, v_scale), write_index)
    keys = k_cache[:, :, :attend].to(q.dtype) * k_scale
    values = v_cache[:, :, :attend].to(q.dtype) * v_scale
    mask = torch.arange(attend, device=q.device)[None, :] <= write_index[:, None]  # [B, attend]
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None, None, :],
                                                            scale=scale)


def _fused(q, k, v, cos, sin, k_cache, v_cache, write_index, attend: int, k_scale: float, v_scale: float,
           scale: float, config=None):
    """The Triton kernel: its autotuned tile, or the given `triton.Config`."""
    B, H, _, D = q.shape
    R = cos.shape[-1]
    cos, sin = cos.expand(B, 1, 1, R), sin.expand(B, 1, 1, R)
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    # the autotuner's key: the tuned tile size depends on how many (sequence, head) programs fill
    # the GPU and how many rows each reads, rounded to powers of two (a few tunings per process)
    size_class = (B * H).bit_length() * 64 + attend.bit_length()
    args = (q, k, v, k_cache, v_cache, write_index, out, k_scale * scale * LOG2E, 1.0 / k_scale, 1.0 / v_scale,
            v_scale, FP8_MAX, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *k_cache.stride()[:3],
            *v_cache.stride()[:3], *out.stride()[:2], cos, sin, cos.stride(0), sin.stride(0), H, k_cache.shape[2],
            attend, size_class)
    if config is None:
        _kernel()[(B * H,)](*args, D=D, R=R)
    else:
        _kernel().fn[(B * H,)](*args, D=D, R=R, **config.kwargs, num_warps=config.num_warps,
                               num_stages=config.num_stages)
    return out


LOG2E = 1.4426950408889634
_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    return _KERNEL


def _build_kernel():
    import triton

    # Two ways to attend, in the configurations that won at some context length on an H100
    # (block_main_b4_1.2b's 16 heads of 128 at batch 2368, 96 to 540 cached rows, each forced in turn;
    # README "FP8 KV cache"). Every configuration is checked once by `_decode_kernel_agrees` before
    # the autotuner may choose it.
    # - DOT = 0, CUDA cores: each of the BLOCK row slots of a tile keeps its own online softmax
    #   (running maximum, sum and weighted values over rows slot, slot + BLOCK, ...), merged once after
    #   the loop, so a tile needs no reduction across warps (the dot products reduce within a warp).
    #   The next tile is loaded before computing on this one (more bytes in flight), and the
    #   first tile is loaded before the write index is known (masked by `attend`, the rows every
    #   sequence may have; rows past the sequence's own are masked once the index is in), so that a
    #   program's first bytes are in flight at once: 1-8% faster than after the index.
    # - DOT = 2, tensor cores: both products as fp16 matrix products (16 copies of the query row; fp16
    #   holds every E4M3 value, and the probabilities with 3 more mantissa bits), which lets Triton
    #   pipeline the tile loads through shared memory (`num_stages`); taking the first tile out of
    #   that pipeline made it 4-16% slower, so it is not. (A bf16 form, DOT = 1, lost everywhere.)
    # The lengths are not specialized, so the kernels compiled for the check serve every context; the
    # strides are (multiples of 16 bytes, so the rows load 16 bytes at a time).
    # (A 16-row, 1-warp CUDA-core form, fastest in that sweep at 96 rows, disagreed with the PyTorch ops
    # on the GPU in two calls, relative error 0.23 and 2.1, though it agrees in Triton's interpreter.)
    configs = [triton.Config({"BLOCK": 32, "DOT": 0}, num_warps=2, num_stages=1),
               triton.Config({"BLOCK": 32, "DOT": 2}, num_warps=2, num_stages=3),
               triton.Config({"BLOCK": 64, "DOT": 2}, num_warps=4, num_stages=3)]

    from .fp8_kv_kernel import decode_kernel

    return triton.autotune(configs=configs, key=["D", "size_class"])(decode_kernel)
