"""Attention over the token decoder's few cached rows (L + 1 = 5) as one Triton kernel (CUDA).

At batch ~1000 the token decoder's attention is tiny per sequence (1 or 2 queries against at most
L + 1 keys per head) but runs for every (sequence, head): as batched matmuls it costs several
launches of poorly shaped GEMMs, and Inductor's fused reductions of the same arithmetic took about
45 us per layer on an H100 at batch 1216 (a fifth of the memory bandwidth; a first version of this
kernel, one program per sequence and head with 3-D broadcasts, took 60 us). Here one program per
sequence and group of heads
loads each query, key and value row once (keys a query may not see are skipped), and does scores,
softmax (online, fp32) and the weighted sum in registers. It is a `torch.library` custom op, so Inductor calls it from compiled steps and CUDA
graphs capture it like any kernel; the PyTorch engine installs it on the token decoder's
attentions (`Attention.small_cache_kernel`) on CUDA when Triton is present.
"""

from __future__ import annotations

import functools

import torch

MAX_ROWS = 16  # cached rows (keys) this kernel handles; the token decoder has L + 1


@torch.library.custom_op("blockrt::small_cache_attention", mutates_args=())
def small_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """q [B, H, T, D], k / v [B, H, S, D] (S <= MAX_ROWS), mask bool [B, 1, T, S] (True = attend)
    -> [B, H, T, D] in v's dtype (laid out as [B, T, H, D], so merging the heads is a view)."""
    import triton

    B, H, T, D = q.shape
    S = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(B, T, H, D, dtype=v.dtype, device=q.device).transpose(1, 2)
    mask = mask.expand(B, 1, T, S).view(torch.uint8)
    block_d = triton.next_power_of_2(D)
    block_h = min(triton.next_power_of_2(H), max(1, 1024 // block_d))  # 8 heads of 128 per program
    _kernel()[(B, triton.cdiv(H, block_h))](
        q, k, v, mask, out, scale, H, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask.stride(0), mask.stride(2), mask.stride(3),
        out.stride(0), out.stride(1), out.stride(2), T=T, S=S, BLOCK_H=block_h, BLOCK_D=block_d, D=D, num_warps=4)
    return out


@small_cache_attention.register_fake
def _small_cache_attention_fake(q, k, v, mask, scale):
    B, H, T, D = q.shape
    return q.new_empty(B, T, H, D, dtype=v.dtype).transpose(1, 2)


@functools.cache
def _kernel():
    """The Triton kernel, built on first use (Triton is imported on CUDA only)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _small_cache_kernel(Q, K, V, M, O, scale, H, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, smb, smt, sms,
                            sob, soh, sot, T: tl.constexpr, S: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_D: tl.constexpr, D: tl.constexpr):
        # one sequence, BLOCK_H heads; queries and cached rows unrolled (T <= 2, S <= MAX_ROWS), online
        # softmax in fp32; rows a query may not see are neither loaded nor counted
        b = tl.program_id(0)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        inside = (h < H)[:, None] & (d < D)[None, :]
        for t in tl.static_range(T):
            q = tl.load(Q + b * sqb + h[:, None] * sqh + t * sqt + d[None, :], mask=inside, other=0.0).to(tl.float32)
            top = tl.full([BLOCK_H], -1e30, tl.float32)
            total = tl.zeros([BLOCK_H], tl.float32)
            acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
            for s in tl.static_range(S):
                keep = tl.load(M + b * smb + t * smt + s * sms + 0 * h) != 0  # [BLOCK_H], all alike
                load = inside & keep[:, None]
                k = tl.load(K + b * skb + h[:, None] * skh + s * sks + d[None, :], mask=load, other=0.0)
                v = tl.load(V + b * svb + h[:, None] * svh + s * svs + d[None, :], mask=load, other=0.0)
                score = tl.where(keep, tl.sum(q * k.to(tl.float32), axis=1) * scale, float("-inf"))
                new_top = tl.maximum(top, score)
                alpha = tl.exp(top - new_top)
                p = tl.exp(score - new_top)
                acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
                total = total * alpha + p
                top = new_top
            out = acc / total[:, None]
            tl.store(O + b * sob + h[:, None] * soh + t * sot + d[None, :], out.to(O.dtype.element_ty), mask=inside)

    return _small_cache_kernel
