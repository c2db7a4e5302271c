"""The flash-attention inner loop over a paged KV cache, shared by the prefill and the split-KV decode kernels.

For a tile of BLOCK_M query rows (prefill: consecutive query tokens of one head; decode: the query heads of one
GQA group, padded) it walks keys ``start .. end`` in BLOCK_N tiles and keeps the online-softmax state:
    m_i  running max of the scaled scores (log2 domain: log2(e) is folded into qk_scale, so exp2 is exact exp)
    l_i  running sum of exp2(s - m_i)
    acc  running sum of exp2(s - m_i) * v        (all float32)
Key n of the sequence lives at cache row ``block_table[n // PAGE] * stride_b + (n % PAGE) * stride_s``; the
block id is widened to int64 before the multiply because num_blocks x block stride passes 2^31 for large caches.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attn_tiles(acc, l_i, m_i, q, k_base, v_base, bt_ptr, stride_kb, stride_ks, stride_vb, stride_vs,
               start, end, kv_limit, q_pos, qk_scale,
               MASKED: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """MASKED=False: every key in [start, end) is visible to every row (no bounds, no causal test: the
    bulk of a long prefill). MASKED=True: keys must be < kv_limit and <= the row's position q_pos."""
    d = tl.arange(0, HEAD_DIM)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_ok = n < kv_limit
            page = tl.load(bt_ptr + n // PAGE, mask=kv_ok, other=0).to(tl.int64)
        else:
            page = tl.load(bt_ptr + n // PAGE).to(tl.int64)
        row = n % PAGE
        k_off = page * stride_kb + row * stride_ks  # (BLOCK_N,) int64
        v_off = page * stride_vb + row * stride_vs
        if MASKED:
            k = tl.load(k_base + k_off[None, :] + d[:, None], mask=kv_ok[None, :], other=0.0)  # (D, N) = K^T
        else:
            k = tl.load(k_base + k_off[None, :] + d[:, None])
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (M, N) fp32, log2 domain
        if MASKED:
            visible = (n[None, :] <= q_pos[:, None]) & kv_ok[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row with no visible key yet has m_new = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(qk - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_base + v_off[:, None] + d[None, :], mask=kv_ok[:, None], other=0.0)  # (N, D)
        else:
            v = tl.load(v_base + v_off[:, None] + d[None, :])
        # P is rounded to the K/V dtype for the tensor-core dot (as in FlashAttention); accumulation stays fp32.
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i
