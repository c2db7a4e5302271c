"""Split-KV decode attention (flash-decoding) over the paged KV cache: one query token per sequence.

Pass 1, grid (B, Hk, num_splits): a program takes one sequence, one KV head and one contiguous slice of the
sequence's keys, and runs the GQA group's query heads together as the rows of one tile, so each K/V tile is
loaded once per group instead of once per query head (group 7 for Qwen2-0.5B/7B). The rows are padded to
BLOCK_G >= 16 (the smallest mma tile; decode is memory bound, so the padded rows cost idle tensor-core cycles,
not bandwidth, whereas a broadcast-multiply would hold a (G, BLOCK_N, D) product in registers). It writes the
slice's normalised partial output and its log2-sum-exp.
Pass 2, grid (B, Hq): merges the splits with weights exp2(lse_s - max lse). An empty split (its slice starts past
the sequence end) writes lse = -inf and a zero partial, whose weight is exactly 0: no NaN reaches the output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2_triton.kernels.attention_prefill import LOG2E
from qwen2_triton.kernels.attention_tile import attn_tiles
from qwen2_triton.kernels.launch import AttnConfig, decode_config, merge_config


@triton.jit
def decode_split_kernel(q_ptr, k_ptr, v_ptr, po_ptr, plse_ptr, cu_q_ptr, seq_lens_ptr, bt_ptr,
                        stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                        stride_bt, n_q_heads, group, num_splits, qk_scale,
                        PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    if tl.load(cu_q_ptr + seq + 1) == q_start:  # no query for this sequence in the step
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    # Per-sequence slice of whole tiles, so short sequences in a mixed batch do not run empty splits only.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N

    g = tl.arange(0, BLOCK_G)
    g_ok = g < group
    head = kv_head * group + g  # (BLOCK_G,) query heads of this KV head
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + q_start.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None], other=0.0)
    k_base = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + kv_head.to(tl.int64) * stride_vh
    bt = bt_ptr + seq.to(tl.int64) * stride_bt
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + seq_len - 1  # the single query is the last key

    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = attn_tiles(acc, l_i, m_i, q, k_base, v_base, bt, stride_kb, stride_ks, stride_vb, stride_vs,
                               start, full_end, end, q_pos, qk_scale,
                               False, PAGE, BLOCK_N, HEAD_DIM, DOT_PRECISION)
    acc, l_i, m_i = attn_tiles(acc, l_i, m_i, q, k_base, v_base, bt, stride_kb, stride_ks, stride_vb, stride_vs,
                               full_end, end, end, q_pos, qk_scale,
                               True, PAGE, BLOCK_N, HEAD_DIM, DOT_PRECISION)
    nonempty = l_i > 0
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    # partials: (B, Hq, num_splits, D) and (B, Hq, num_splits), contiguous, float32
    row = (seq.to(tl.int64) * n_q_heads + head) * num_splits + split
    tl.store(plse_ptr + row, lse, mask=g_ok)
    tl.store(po_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=g_ok[:, None])


@triton.jit
def decode_merge_kernel(po_ptr, plse_ptr, o_ptr, cu_q_ptr, stride_ot, stride_oh, n_q_heads, num_splits,
                        BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + seq)
    if tl.load(cu_q_ptr + seq + 1) == q_start:
        return
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    d = tl.arange(0, HEAD_DIM)
    row = (seq.to(tl.int64) * n_q_heads + head) * num_splits + s
    lse = tl.load(plse_ptr + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (seq_len 0): weights 0, output 0
    w = tl.exp2(lse - m)  # empty split: exp2(-inf) = 0
    part = tl.load(po_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    part = tl.where(w[:, None] > 0, part, 0.0)  # 0 * (anything left in an unused partial) must not be NaN
    denom = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(o_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def attention_decode(q, k_cache, v_cache, meta, scale: float, out: torch.Tensor, num_splits: int,
                     cfg: AttnConfig | None = None) -> torch.Tensor:
    """Launch both decode passes; ``cfg`` as in attention_prefill (default: ``decode_config``). Arguments are
    validated by kernels/attention.py ``attention``."""
    n_seqs = meta.seq_lens.shape[0]
    n_q_heads, head_dim = q.shape[1], q.shape[2]
    n_kv_heads = k_cache.shape[2]
    group = n_q_heads // n_kv_heads
    cfg = cfg or decode_config(head_dim, q.dtype, group)
    part_out = torch.empty((n_seqs, n_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((n_seqs, n_q_heads, num_splits), dtype=torch.float32, device=q.device)
    decode_split_kernel[(n_seqs, n_kv_heads, num_splits)](
        q, k_cache, v_cache, part_out, part_lse, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        n_q_heads, group, num_splits, float(scale) * LOG2E,
        PAGE=k_cache.shape[1], BLOCK_G=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, HEAD_DIM=head_dim,
        DOT_PRECISION=cfg.dot_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    merge = merge_config(num_splits, head_dim)
    decode_merge_kernel[(n_seqs, n_q_heads)](
        part_out, part_lse, out, meta.cu_seqlens_q, out.stride(0), out.stride(1), n_q_heads, num_splits,
        BLOCK_S=merge.BLOCK, HEAD_DIM=head_dim, num_warps=merge.num_warps)
    return out
