"""The Triton kernel of `blockrt.runtime.small_attention` (imported only where it runs: on CUDA with
Triton, or under TRITON_INTERPRET=1)."""

import triton
import triton.language as tl


@triton.jit
def _new_row(QKV, COS, SIN, KC, VC, w, b, t, h, d, inside, sxb, sxt, sxh, scb, sct, ssb, sst, skb, skh, sks,
             svb, svh, svs, S: tl.constexpr, R: tl.constexpr, D: tl.constexpr):
    # new position t: q and k rotated (rotate-half on the first R channels, in fp32, rounded to
    # the dtype as the model's tensors are), k and v written at cache row w + t when it exists
    row = QKV + b * sxb + t * sxt + h[:, None] * sxh
    rotary = d < R
    partner = tl.where(d < R // 2, d + R // 2, d - R // 2)
    sign = tl.where(d < R // 2, -1.0, 1.0)
    turn = inside & rotary[None, :]
    c = tl.load(COS + b * scb + t * sct + d, mask=rotary, other=1.0).to(tl.float32)[None, :]
    s = tl.load(SIN + b * ssb + t * sst + d, mask=rotary, other=0.0).to(tl.float32)[None, :] * sign[None, :]
    q = tl.load(row + d[None, :], mask=inside, other=0.0).to(tl.float32)
    q_turn = tl.load(row + partner[None, :], mask=turn, other=0.0).to(tl.float32)
    k = tl.load(row + D + d[None, :], mask=inside, other=0.0).to(tl.float32)
    k_turn = tl.load(row + D + partner[None, :], mask=turn, other=0.0).to(tl.float32)
    v = tl.load(row + 2 * D + d[None, :], mask=inside, other=0.0)
    q = (q * c + q_turn * s).to(QKV.dtype.element_ty).to(tl.float32)
    k = (k * c + k_turn * s).to(KC.dtype.element_ty)
    v = v.to(VC.dtype.element_ty)
    store = inside & ((w + t + 0 * h) < S)[:, None]
    tl.store(KC + b * skb + h[:, None] * skh + (w + t) * sks + d[None, :], k, mask=store)
    tl.store(VC + b * svb + h[:, None] * svh + (w + t) * svs + d[None, :], v, mask=store)
    return q, k.to(tl.float32), v.to(tl.float32)

@triton.jit
def _softmax_step(score, v, top, total, acc):
    new_top = tl.maximum(top, score)
    alpha = tl.exp(top - new_top)
    p = tl.exp(score - new_top)
    return new_top, total * alpha + p, acc * alpha[:, None] + p[:, None] * v

@triton.jit
def small_cache_kernel(QKV, COS, SIN, KC, VC, W, O, scale, H, sxb, sxt, sxh, scb, sct, ssb, sst, skb, skh,
                        sks, svb, svh, svs, sob, sot, soh, T: tl.constexpr, S: tl.constexpr,
                        R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr):
    # one sequence, BLOCK_H heads, T <= 2 new positions; older rows (0 .. w - 1) loaded once and
    # scored against every query, new rows from registers
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    inside = (h < H)[:, None] & (d < D)[None, :]
    w = tl.load(W + b).to(tl.int32)
    q0, k0, v0 = _new_row(QKV, COS, SIN, KC, VC, w, b, 0, h, d, inside, sxb, sxt, sxh, scb, sct, ssb, sst,
                          skb, skh, sks, svb, svh, svs, S, R, D)
    top0 = tl.full([BLOCK_H], -1e30, tl.float32)
    total0 = tl.zeros([BLOCK_H], tl.float32)
    acc0 = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    if T == 2:
        q1, k1, v1 = _new_row(QKV, COS, SIN, KC, VC, w, b, 1, h, d, inside, sxb, sxt, sxh, scb, sct, ssb,
                              sst, skb, skh, sks, svb, svh, svs, S, R, D)
        top1 = tl.full([BLOCK_H], -1e30, tl.float32)
        total1 = tl.zeros([BLOCK_H], tl.float32)
        acc1 = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for s in tl.static_range(S):
        if s < w:  # row s was written by an earlier step
            k = tl.load(KC + b * skb + h[:, None] * skh + s * sks + d[None, :], mask=inside, other=0.0)
            v = tl.load(VC + b * svb + h[:, None] * svh + s * svs + d[None, :], mask=inside, other=0.0)
            k, v = k.to(tl.float32), v.to(tl.float32)
            top0, total0, acc0 = _softmax_step(tl.sum(q0 * k, axis=1) * scale, v, top0, total0, acc0)
            if T == 2:
                top1, total1, acc1 = _softmax_step(tl.sum(q1 * k, axis=1) * scale, v, top1, total1, acc1)
    top0, total0, acc0 = _softmax_step(tl.sum(q0 * k0, axis=1) * scale, v0, top0, total0, acc0)
    out = O + b * sob + h[:, None] * soh + d[None, :]
    tl.store(out, (acc0 / total0[:, None]).to(O.dtype.element_ty), mask=inside)
    if T == 2:
        top1, total1, acc1 = _softmax_step(tl.sum(q1 * k0, axis=1) * scale, v0, top1, total1, acc1)
        top1, total1, acc1 = _softmax_step(tl.sum(q1 * k1, axis=1) * scale, v1, top1, total1, acc1)
        tl.store(out + sot, (acc1 / total1[:, None]).to(O.dtype.element_ty), mask=inside)
