"""The Triton kernel of `blockrt.runtime.fp8_kv`'s decode step (imported only where it runs: on CUDA
with Triton, or under TRITON_INTERPRET=1); `fp8_kv` wraps it in its autotuner."""

import triton
import triton.language as tl


@triton.jit
def _cuda_core_tile(k, v, keep, q, m_rows, l_rows, acc_rows):
    s = tl.where(keep, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))
    m_new = tl.maximum(m_rows, s)  # per slot: no reduction across the tile
    alpha = tl.exp2(m_rows - m_new)
    p = tl.exp2(s - m_new)
    return m_new, l_rows * alpha + p, acc_rows * alpha[:, None] + p[:, None] * v.to(tl.float32)

@triton.jit
def _tensor_core_tile(k, v, keep, qb, s_scale, m_r, l_r, acc_r):
    s = tl.where(keep[None, :], tl.dot(qb, tl.trans(k.to(qb.dtype))) * s_scale, float("-inf"))  # [16, BLOCK]
    m_new = tl.maximum(m_r, tl.max(s, axis=1))
    alpha = tl.exp2(m_r - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, l_r * alpha + tl.sum(p, axis=1), acc_r * alpha[:, None] + tl.dot(p.to(qb.dtype), v.to(qb.dtype))

@triton.jit
def _rotated(X, d, c, s, partner, rotary):
    # rotate-half on the first R channels in fp32, rounded to the model dtype as the model's own
    # rotary output is (x * cos + rotate_half(x) * sin)
    x = tl.load(X + d).to(tl.float32)
    turn = tl.load(X + partner, mask=rotary, other=0.0).to(tl.float32)
    return (x * c + turn * s).to(X.dtype.element_ty).to(tl.float32)

@triton.jit(do_not_specialize=["rows", "attend", "size_class"])
def decode_kernel(Q, KN, VN, K, V, W, O, qk_scale, k_inv, v_inv, v_scale, fp8_max, sqb, sqh, sknb, sknh, svnb,
                   svnh, skb, skh, sks, svb, svh, svs, sob, soh, COS, SIN, scb, ssb, H, rows, attend, size_class,
                   D: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr, DOT: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)  # 64-bit offsets: one layer's cache can pass 2^31 bytes (2496 x 16 x 545 x 128)
    h = pid % H
    d = tl.arange(0, D)
    first = tl.arange(0, BLOCK)
    k_rows = K + b * skb + h * skh + d[None, :]
    v_rows = V + b * svb + h * svh + d[None, :]
    if not DOT:  # the first tile, before the write index: rows below `attend` exist in every sequence's cache
        k0 = tl.load(k_rows + first[:, None] * sks, mask=(first < attend)[:, None], other=0.0)
        v0 = tl.load(v_rows + first[:, None] * svs, mask=(first < attend)[:, None], other=0.0)
    w = tl.load(W + b).to(tl.int32)
    # rotary (the first R channels of q and k): cos / sin of this sequence's position
    rotary = d < R
    partner = tl.where(d < R // 2, d + R // 2, d - R // 2)
    c = tl.load(COS + b * scb + d, mask=rotary, other=1.0).to(tl.float32)
    s = tl.load(SIN + b * ssb + d, mask=rotary, other=0.0).to(tl.float32) * tl.where(d < R // 2, -1.0, 1.0)
    # the new row: rotated, quantized, written at row w (unless past the cache), and used from registers
    kn = _rotated(KN + b * sknb + h * sknh, d, c, s, partner, rotary) * k_inv
    vn = tl.load(VN + b * svnb + h * svnh + d).to(tl.float32) * v_inv
    kn = tl.minimum(tl.maximum(kn, -fp8_max), fp8_max).to(tl.float8e4nv)
    vn = tl.minimum(tl.maximum(vn, -fp8_max), fp8_max).to(tl.float8e4nv)
    in_cache = (w + 0 * d) < rows  # [D]
    tl.store(K + b * skb + h * skh + w * sks + d, kn, mask=in_cache)
    tl.store(V + b * svb + h * svh + w * svs + d, vn, mask=in_cache)
    q_in = _rotated(Q + b * sqb + h * sqh, d, c, s, partner, rotary)
    q = q_in * qk_scale  # log2 units: exp2 below
    # older rows: 0 .. min(w, attend) - 1, read from the cache (never the row written above)
    n_old = tl.minimum(w, attend)
    if DOT:  # fp16 tensor cores (DOT = 2; the bf16 form, 1, is gone): the query unscaled (an fp16 of
        # the scaled one could underflow), scaled in fp32 after
        qb = (tl.zeros((16, D), tl.float32) + q_in[None, :]).to(tl.float16)
        s_scale = qk_scale
        m_r = tl.full((16,), -1e30, tl.float32)
        l_r = tl.zeros((16,), tl.float32)
        acc_r = tl.zeros((16, D), tl.float32)
        for start in range(0, n_old, BLOCK):
            n = start + first
            keep = n < n_old
            k = tl.load(k_rows + n[:, None] * sks, mask=keep[:, None], other=0.0)
            v = tl.load(v_rows + n[:, None] * svs, mask=keep[:, None], other=0.0)
            m_r, l_r, acc_r = _tensor_core_tile(k, v, keep, qb, s_scale, m_r, l_r, acc_r)
        m_i = tl.max(m_r, axis=0)
        acc = tl.sum(acc_r, axis=0) * (1.0 / 16)  # the 16 rows are copies of one
        l_i = tl.sum(l_r, axis=0) * (1.0 / 16)
    else:  # CUDA cores, the next tile loaded before computing on this one
        keep0 = first < n_old
        v0 = tl.where(keep0[:, None], v0.to(tl.float16), 0.0)  # rows past the sequence's may hold any bytes (NaN)
        m_rows, l_rows, acc_rows = _cuda_core_tile(k0, v0, keep0, q, tl.full((BLOCK,), -1e30, tl.float32),
                                                   tl.zeros((BLOCK,), tl.float32), tl.zeros((BLOCK, D), tl.float32))
        k_next = tl.load(k_rows + (BLOCK + first)[:, None] * sks, mask=(BLOCK + first < n_old)[:, None], other=0.0)
        v_next = tl.load(v_rows + (BLOCK + first)[:, None] * svs, mask=(BLOCK + first < n_old)[:, None], other=0.0)
        for start in range(BLOCK, n_old, BLOCK):
            n = start + first
            keep = n < n_old
            k, v = k_next, v_next
            after = n + BLOCK
            k_next = tl.load(k_rows + after[:, None] * sks, mask=(after < n_old)[:, None], other=0.0)
            v_next = tl.load(v_rows + after[:, None] * svs, mask=(after < n_old)[:, None], other=0.0)
            m_rows, l_rows, acc_rows = _cuda_core_tile(k, v, keep, q, m_rows, l_rows, acc_rows)
        m_i = tl.max(m_rows, axis=0)
        merge = tl.exp2(m_rows - m_i)
        acc = tl.sum(acc_rows * merge[:, None], axis=0)
        l_i = tl.sum(l_rows * merge, axis=0)
    # the new row itself, when it is among the attended rows
    s_new = tl.where(w < attend, tl.sum(kn.to(tl.float32) * q, axis=0), float("-inf"))
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp2(m_i - m_new)
    p_new = tl.exp2(s_new - m_new)
    acc = acc * alpha + p_new * vn.to(tl.float32)
    l_i = l_i * alpha + p_new
    out = acc * (v_scale / l_i)
    tl.store(O + b * sob + h * soh + d, out.to(O.dtype.element_ty))
