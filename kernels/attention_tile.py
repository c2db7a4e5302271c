"""The flash-attention inner loop over a paged KV cache, shared by the prefill and the split-KV decode kernels.

For a tile of BLOCK_M query rows (prefill: consecutive query tokens of one head; decode: the query heads of one
GQA group, padded) it walks keys ``start .. end`` in BLOCK_N tiles and keeps the online-softmax state:
    m_i  running max of the scaled scores (log2 domain: log2(e) is folded into qk_scale, so exp2 is exact exp)
    l_i  running sum of exp2(s - m_i)
    acc  running sum of exp2(s - m_i) * v        (all float32)
Key n of the sequence lives at cache row ``block_table[n // PAGE] * stride_b + (n % PAGE) * stride_s``; the
block id is widened to int64 before the multiply because num_blocks x block stride passes 2^31 for large caches.

Page ids are read with one vector load per tile (BLOCK_N entries, repeating within a page), one tile ahead of
the K/V loads that use them, so Triton's pipeliner copies ids and tiles asynchronously and double-buffers K/V
(2x64x128 in shared memory at num_stages 3 for decode). Before, the ids came from scalar loads per key in the
same iteration (67 ld.global.b32 in the decode kernel's sm_90 PTX) and K/V stayed single-buffered at every
num_stages. One id per page through tl.reshape compiled the same on triton 3.9 but stopped the pipeliner on
3.6, the GPU image's version (no cp.async at all, 212-255 registers, spills), so it is not used.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def kv_offsets(bt_ptr, n0, kv_limit, stride_b, stride_s, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Cache-row offsets (BLOCK_N,) int64 of keys n0 .. n0 + BLOCK_N. Block-table entries of keys past kv_limit
    are not read (they may lie past the sequence's row of the table)."""
    n = n0 + tl.arange(0, BLOCK_N)
    page = tl.load(bt_ptr + n // PAGE, mask=n < kv_limit, other=0).to(tl.int64)
    return page * stride_b + (n % PAGE) * stride_s


@triton.jit
def attn_tiles(acc, l_i, m_i, q, k_base, v_base, bt_ptr, stride_b, stride_s, start, end, kv_limit, q_pos, qk_scale,
               MASKED: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               DOT_PRECISION: tl.constexpr, STAGES: tl.constexpr):
    """MASKED=False: every key in [start, end) is visible to every row (no bounds, no causal test: the
    bulk of a long prefill). MASKED=True: keys must be < kv_limit and <= the row's position q_pos.
    ``start`` is a multiple of BLOCK_N. K and V caches share one layout (the launcher checks their strides), so
    one set of row offsets serves both."""
    d = tl.arange(0, HEAD_DIM)
    # Page ids one tile ahead: this tile's K/V addresses come from the previous iteration, so the pipeliner can
    # issue the next tile's copies while this one is computed (a same-iteration page load kept K/V
    # single-buffered at every num_stages).
    off = kv_offsets(bt_ptr, start, kv_limit, stride_b, stride_s, PAGE, BLOCK_N)
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        off_next = kv_offsets(bt_ptr, n0 + BLOCK_N, kv_limit, stride_b, stride_s, PAGE, BLOCK_N)
        n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_ok = n < kv_limit
        if DOT_PRECISION == "ieee":  # CUDA-core dot (fp32 tests): K^T loaded as is, 56 registers
            if MASKED:
                kt = tl.load(k_base + off[None, :] + d[:, None], mask=kv_ok[None, :], other=0.0)  # (D, N)
            else:
                kt = tl.load(k_base + off[None, :] + d[:, None])
        else:  # tensor cores: K loaded (N, D) like V, one layout of the offsets for both (a (D, N) load held
            # them twice: 128 registers and a spill at 3 stages); the dot reads it transposed from shared memory
            if MASKED:
                kt = tl.trans(tl.load(k_base + off[:, None] + d[None, :], mask=kv_ok[:, None], other=0.0))
            else:
                kt = tl.trans(tl.load(k_base + off[:, None] + d[None, :]))
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # (M, N) fp32, log2 domain
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
            v = tl.load(v_base + off[:, None] + d[None, :], mask=kv_ok[:, None], other=0.0)  # (N, D)
        else:
            v = tl.load(v_base + off[:, None] + d[None, :])
        # P is rounded to the K/V dtype for the tensor-core dot (as in FlashAttention); accumulation stays fp32.
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        off = off_next
    return acc, l_i, m_i
