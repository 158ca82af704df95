"""The token decoder's attention step over its few cached rows (L + 1 = 5) as one Triton kernel (CUDA).

At batch ~1000 the token decoder's attention is tiny per sequence (1 or 2 queries against at most
L + 1 keys per head) but runs for every (sequence, head). Compiled by Inductor, everything between
the QKV projection and the output projection was three kernels per layer: rotary on q and k, the
cache write of the new keys and values, and the attention (first Inductor's fused reductions, about
45 us per layer on an H100 at batch 1216; then a Triton kernel of ours, 21 us), about 41 us in all.
Here it is one (22.8 us per layer at batch 1216, bf16, block_main_b4_1.2b on an H100): one
program per sequence and group of heads reads the new q, k, v straight from the projection's output
(laid out per head), rotates q and k in registers, writes k and v into the cache rows at the
sequence's write index, and attends (online softmax in fp32) over the older cached rows, loaded
once each, and the new rows, kept in registers. It is a `torch.library` custom op that mutates the
caches it is given, so Inductor calls it on the cache tensors themselves (no copy around it) and
CUDA graphs capture it like any kernel; the PyTorch engine installs it on the token decoder's
attentions (`Attention.small_cache_kernel`) on CUDA when Triton is present.
"""

from __future__ import annotations

import torch

from blockrt.exporter.cache import scatter_mask, write_rows
from blockrt.exporter.model import apply_rotary, matmul_attention

MAX_ROWS = 16  # cached rows this kernel handles; the token decoder has L + 1
MAX_NEW = 2  # new positions per step: the token decoder feeds 2 (the prefix vectors), then 1


@torch.library.custom_op("blockrt::small_cache_decode", mutates_args=("k_cache", "v_cache"))
def small_cache_decode(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, write_index: torch.Tensor, scale: float) -> torch.Tensor:
    """One attention step of one layer over a small in-place cache. qkv [B, T, H, 3 * D] (the fused
    projection, per head: q, k, v), cos / sin [B, 1, T, R] (rotary on the first R channels of each
    head), k_cache / v_cache [B, H, S, D] (S <= MAX_ROWS, T <= MAX_NEW), write_index [B]: rotates q
    and k, writes k and v at rows write_index[b] .. + T - 1 (in place; rows past S are not written)
    and attends query t to rows 0 .. write_index[b] + t -> [B, T, H, D] in the cache's dtype."""
    if qkv.is_cuda:
        return fused(qkv, cos, sin, k_cache, v_cache, write_index, scale)
    return reference(qkv, cos, sin, k_cache, v_cache, write_index, scale)


@small_cache_decode.register_fake
def _small_cache_decode_fake(qkv, cos, sin, k_cache, v_cache, write_index, scale):
    B, T, H, D3 = qkv.shape
    return qkv.new_empty(B, T, H, D3 // 3, dtype=v_cache.dtype)


def reference(qkv, cos, sin, k_cache, v_cache, write_index, scale: float) -> torch.Tensor:
    """`small_cache_decode` in PyTorch ops: the model's own attention step on an in-place cache."""
    D = qkv.shape[-1] // 3
    q, k, v = qkv.transpose(1, 2).split(D, dim=-1)  # each [B, H, T, D]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    write_rows(k_cache, k, write_index)
    write_rows(v_cache, v, write_index)
    mask = scatter_mask(write_index, q.shape[2], k_cache.shape[2])
    return matmul_attention(q, k_cache, v_cache, mask, scale).transpose(1, 2).contiguous()


def fused(qkv, cos, sin, k_cache, v_cache, write_index, scale: float) -> torch.Tensor:
    """The Triton kernel (CUDA; on CPU tensors only under TRITON_INTERPRET=1)."""
    import triton

    B, T, H, D3 = qkv.shape
    D, S, R = D3 // 3, k_cache.shape[2], cos.shape[-1]
    if T > MAX_NEW or S > MAX_ROWS or qkv.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError(f"small_cache_decode: {T} new rows, {S} cached rows (at most {MAX_NEW} and {MAX_ROWS}), "
                         "channels contiguous")
    out = torch.empty(B, T, H, D, dtype=v_cache.dtype, device=qkv.device)
    cos, sin = cos.expand(B, 1, T, R), sin.expand(B, 1, T, R)
    block_d = triton.next_power_of_2(D)
    block_h = min(triton.next_power_of_2(H), max(1, 1024 // block_d))  # 8 heads of 128 per program
    from .small_attention_kernel import small_cache_kernel

    small_cache_kernel[(B, triton.cdiv(H, block_h))](
        qkv, cos, sin, k_cache, v_cache, write_index, out, scale, H,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), cos.stride(0), cos.stride(2), sin.stride(0), sin.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), out.stride(0), out.stride(1), out.stride(2),
        T=T, S=S, R=R, BLOCK_H=block_h, BLOCK_D=block_d, D=D, num_warps=4)
    return out
