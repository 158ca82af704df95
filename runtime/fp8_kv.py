"""FP8 (E4M3) KV caches for the PyTorch engine: half the bytes of a bf16 cache, so about twice the
sequences fit, and the block decoder's decode steps (bound by reading the cache) read half as much.

`enable_fp8_kv_cache` calibrates one scale per layer for keys and one for values (absmax over
calibration sequences / 448) and installs an `Fp8KV` on every attention of the block decoder
(vanilla: the decoder); the token decoder's L + 1 rows stay in the model dtype. `Fp8KV` quantizes
the new keys and values before they are written and, for a decode step (one new row per sequence)
on CUDA with Triton, attends straight from the FP8 cache in one kernel (`_decode_kernel`: online
softmax over tiles of rows, FP8 loads converted in registers, the tile size autotuned per problem
size; a custom op, so compiled steps run it too); otherwise it dequantizes the rows it
attends to and runs the model's own attention. The caches are allocated in FP8 by the generator
from the manifest (`graph_io(kv_cache_dtype="fp8")`).
"""

from __future__ import annotations

import logging

import torch

from blockrt.exporter.model import Attention
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
        self.fused = False

    def __call__(self, q, k, v, mask, cache, layer: int, scale: float):
        if self.scales is None:
            self.amax = [max(self.amax[0], float(k.abs().max())), max(self.amax[1], float(v.abs().max()))]
            if cache is not None:
                k, v = cache.update(layer, k, v)
            return self.attention.attend(q, k, v, mask, scale)
        ks, vs = self.scales
        k8 = (k.float() * (1.0 / ks)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        v8 = (v.float() * (1.0 / vs)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        k8, v8 = cache.update(layer, k8, v8)  # [B, H, S, D] FP8 rows to attend to
        if self.fused and q.shape[2] == 1 and mask is not None and q.is_cuda:
            return decode_attention(q, k8, v8, mask[:, 0, 0, :], ks, vs, scale)
        return self.attention.attend(q, k8.to(q.dtype) * ks, v8.to(q.dtype) * vs, mask, scale)


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
    fused = triton_kernels_run(device) and _decode_kernel_agrees(device, _stack(model).config)
    for h in hooks:
        h.scales = tuple(max(a, 1e-6) / FP8_MAX for a in h.amax)
        h.fused = fused
    log.info("FP8 KV cache on %d layers (%s decode attention)", len(hooks), "fused Triton" if fused else "dequantizing")
    return [h.scales for h in hooks]


def _decode_kernel_agrees(device: torch.device, stack_config) -> bool:
    """Run the fused decode kernel once against the dequantizing path (random data, ragged lengths)."""
    gen = torch.Generator(device=device).manual_seed(0)
    B, H, S, D = 3, stack_config.num_heads, 77, stack_config.head_dim
    q = torch.randn(B, H, 1, D, generator=gen, device=device).to(torch.bfloat16)
    k8, v8 = (torch.randn(B, H, S, D, generator=gen, device=device).to(torch.float8_e4m3fn) for _ in range(2))
    mask = torch.arange(S, device=device)[None, :] < torch.tensor([77, 5, 40], device=device)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k8.float() * 0.5, v8.float() * 0.25,
                                                            attn_mask=mask[:, None, None, :], scale=0.1)
    try:
        got = decode_attention(q, k8, v8, mask, 0.5, 0.25, 0.1).float()
    except Exception as e:  # Triton compile or launch errors have no common base class
        log.warning("fused FP8 decode attention unusable here (%s: %s): dequantizing instead", type(e).__name__, e)
        return False
    rel = float((got - want).norm() / want.norm())
    if not rel < 2e-2:
        log.warning("fused FP8 decode attention disagrees with the reference (rel %.1e): dequantizing instead", rel)
    return rel < 2e-2


@torch.library.custom_op("blockrt::fp8_decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, mask: torch.Tensor, k_scale: float,
                     v_scale: float, scale: float) -> torch.Tensor:
    """One query row per sequence and head: q [B, H, 1, D], k8 / v8 [B, H, S, D] FP8, mask [B, S]
    (True = attend) -> [B, H, 1, D] in q's dtype. A custom op, so that compiled steps call the
    kernel as it is (Inductor fuses the work around it)."""
    B, H, _, D = q.shape
    S = k8.shape[2]
    out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    mask = mask.to(torch.uint8)
    # the autotuner's key: the tuned tile size depends on how many (sequence, head) programs fill
    # the GPU and how many rows each reads, rounded to powers of two (a few tunings per process)
    size_class = (B * H).bit_length() * 64 + S.bit_length()
    _kernel()[(B * H,)](q, k8, v8, mask, out, k_scale * scale * LOG2E, v_scale,
                        q.stride(0), q.stride(1), k8.stride(0), k8.stride(1), k8.stride(2),
                        v8.stride(0), v8.stride(1), v8.stride(2), mask.stride(0), out.stride(0), out.stride(1),
                        H, S, size_class, D=D)
    return out


@decode_attention.register_fake
def _decode_attention_fake(q, k8, v8, mask, k_scale, v_scale, scale):
    return q.new_empty(q.shape)  # contiguous, as the kernel writes it


LOG2E = 1.4426950408889634
_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    return _KERNEL


def _build_kernel():
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((16, 2), (32, 2), (32, 4), (64, 4), (64, 8))]

    @triton.autotune(configs=configs, key=["D", "size_class"])
    @triton.jit
    def _decode_kernel(Q, K, V, M, O, qk_scale, v_scale, sqb, sqh, skb, skh, sks, svb, svh, svs, smb, sob, soh,
                       H, S, size_class, D: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + d).to(tl.float32) * qk_scale  # log2 units: exp2 below
        m_i = tl.full((), -1e30, tl.float32)
        l_i = tl.full((), 0.0, tl.float32)
        acc = tl.zeros((D,), tl.float32)
        for start in range(0, S, BLOCK):
            n = start + tl.arange(0, BLOCK)
            inside = n < S
            keep = (tl.load(M + b * smb + n, mask=inside, other=0) != 0) & inside
            k = tl.load(K + b * skb + h * skh + n[:, None] * sks + d[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(V + b * svb + h * svh + n[:, None] * svs + d[None, :], mask=inside[:, None], other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        out = acc * (v_scale / l_i)
        tl.store(O + b * sob + h * soh + d, out.to(O.dtype.element_ty))

    return _decode_kernel
