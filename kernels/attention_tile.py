"""The flash-attention inner loop over a paged KV cache, shared by the prefill and the split-KV decode kernels.

For a tile of BLOCK_M query rows (prefill: consecutive query tokens of one head; decode: the query heads of one
GQA group, padded) it walks keys ``start .. end`` in BLOCK_N tiles and keeps the online-softmax state:
    m_i  running max of the scaled scores (log2 domain: log2(e) is folded into qk_scale, so exp2 is exact exp)
    l_i  running sum of exp2(s - m_i)
    acc  running sum of exp2(s - m_i) * v        (all float32)
Key n of the sequence lives at cache row ``block_table[n // PAGE] * stride_b + (n % PAGE) * stride_s``; the
block id is widened to int64 before the multiply because num_blocks x block stride passes 2^31 for large caches.

Page ids are read once per tile, not once per key: a tile of BLOCK_N keys starting at a multiple of BLOCK_N
covers BLOCK_N / PAGE whole pages (BLOCK_N >= PAGE) or lies inside one page (PAGE > BLOCK_N); the per-key
gather remains only for block sizes that are neither (not a power of two). Per key, 64 keys of a 16-token page
were 67 scalar ld.global.b32 per program in the sm_90 PTX of the decode kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def kv_offsets(bt_ptr, n0, kv_limit, stride_b, stride_s, MASKED: tl.constexpr, PAGE: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Cache-row offsets (BLOCK_N,) int64 of keys n0 .. n0 + BLOCK_N (n0 a multiple of BLOCK_N). MASKED: block
    table entries of pages past kv_limit are not read (they may lie past the sequence's row of the table)."""
    if BLOCK_N % PAGE == 0:  # whole pages: one id per page, broadcast over its rows
        NP: tl.constexpr = BLOCK_N // PAGE
        p = n0 // PAGE + tl.arange(0, NP)
        if MASKED:
            page = tl.load(bt_ptr + p, mask=p * PAGE < kv_limit, other=0).to(tl.int64)
        else:
            page = tl.load(bt_ptr + p).to(tl.int64)
        r = tl.arange(0, PAGE)
        off = tl.reshape(page[:, None] * stride_b + r[None, :] * stride_s, (BLOCK_N,))
    elif PAGE % BLOCK_N == 0:  # the tile lies inside one page: one scalar id
        if MASKED:
            page = tl.load(bt_ptr + n0 // PAGE, mask=n0 < kv_limit, other=0).to(tl.int64)
        else:
            page = tl.load(bt_ptr + n0 // PAGE).to(tl.int64)
        off = page * stride_b + (n0 % PAGE + tl.arange(0, BLOCK_N)) * stride_s
    else:  # a block size that is not a power of two: gather per key
        n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            page = tl.load(bt_ptr + n // PAGE, mask=n < kv_limit, other=0).to(tl.int64)
        else:
            page = tl.load(bt_ptr + n // PAGE).to(tl.int64)
        off = page * stride_b + (n % PAGE) * stride_s
    return off


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
    off = kv_offsets(bt_ptr, start, kv_limit, stride_b, stride_s, True, PAGE, BLOCK_N)
    for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
        off_next = kv_offsets(bt_ptr, n0 + BLOCK_N, kv_limit, stride_b, stride_s, True, PAGE, BLOCK_N)
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
