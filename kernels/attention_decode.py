"""Split-KV decode attention (flash-decoding) over the paged KV cache, for every sequence with one query token.

It serves pure decode steps and the decode rows of mixed steps alike: a program whose sequence has q_len != 1
(a prefill chunk, or no query this step) exits at once, and kernels/attention_prefill.py skips the q_len == 1
sequences, so the two launches cover disjoint rows (a decode row never runs as a padded 64-row prefill tile).

Pass 1, grid (B, Hk, max_splits): a program takes one sequence, one KV head and one contiguous slice of the
sequence's keys, and runs the GQA group's query heads together as the rows of one tile, so each K/V tile is
loaded once per group instead of once per query head (group 7 for Qwen2-0.5B/7B). The rows are padded to
BLOCK_G >= 16 (the smallest mma tile; decode is memory bound, so the padded rows cost idle tensor-core cycles,
not bandwidth, whereas a broadcast-multiply would hold a (G, BLOCK_N, D) product in registers).
The split count is decided per sequence on the device (``split_plan``): about one split per ``min_split_keys``
keys, at most the host's ``max_splits`` (the grid), so a graph captured at the longest context still runs a
1k-token sequence in 4 splits, and programs of splits past that exit before reading anything. A sequence with
one split writes its output directly; otherwise each split writes its normalised partial and log2-sum-exp.
Pass 2, grid (B, Hq), launched only when max_splits > 1: merges a sequence's splits with weights
exp2(lse_s - max lse). Every split that split_plan counts holds at least one key, so no lse is -inf there;
sequences with one split (or q_len != 1) exit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2_triton.kernels.attention_prefill import LOG2E
from qwen2_triton.kernels.attention_tile import attn_tiles
from qwen2_triton.kernels.launch import MIN_KEYS_PER_SPLIT, AttnConfig, decode_config, merge_config


@triton.jit
def split_plan(seq_len, max_splits, min_split_keys, BLOCK_N: tl.constexpr):
    """(splits, keys per split) of one sequence: about seq_len / min_split_keys splits (1 .. max_splits) of whole
    BLOCK_N tiles, then as many as the rounded size needs, so that no split is empty."""
    n = tl.maximum(seq_len, 1)
    want = tl.minimum(tl.maximum(tl.cdiv(n, min_split_keys), 1), max_splits)
    chunk = tl.cdiv(tl.cdiv(n, want), BLOCK_N) * BLOCK_N
    return tl.cdiv(n, chunk), chunk


@triton.jit
def decode_split_kernel(q_ptr, k_ptr, v_ptr, o_ptr, po_ptr, plse_ptr, cu_q_ptr, seq_lens_ptr, bt_ptr,
                        stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
                        n_q_heads, group, max_splits, min_split_keys, qk_scale,
                        PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, STAGES: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    if tl.load(cu_q_ptr + seq + 1) - q_start != 1:  # a prefill chunk (prefill kernel) or no query this step
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    n_splits, chunk = split_plan(seq_len, max_splits, min_split_keys, BLOCK_N)
    if split >= n_splits:  # this sequence is too short for so many splits: nothing to read or write
        return
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    full_end = start + (end - start) // BLOCK_N * BLOCK_N

    g = tl.arange(0, BLOCK_G)
    g_ok = g < group
    head = kv_head * group + g  # (BLOCK_G,) query heads of this KV head
    d = tl.arange(0, HEAD_DIM)
    tok = q_start.to(tl.int64)
    q = tl.load(q_ptr + tok * stride_qt + head[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    k_base = k_ptr + kv_head.to(tl.int64) * stride_ch
    v_base = v_ptr + kv_head.to(tl.int64) * stride_ch
    bt = bt_ptr + seq.to(tl.int64) * stride_bt
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + seq_len - 1  # the single query is the last key

    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = attn_tiles(acc, l_i, m_i, q, k_base, v_base, bt, stride_cb, stride_cs, start, full_end, end,
                               q_pos, qk_scale, False, PAGE, BLOCK_N, HEAD_DIM, DOT_PRECISION, STAGES)
    acc, l_i, m_i = attn_tiles(acc, l_i, m_i, q, k_base, v_base, bt, stride_cb, stride_cs, full_end, end, end,
                               q_pos, qk_scale, True, PAGE, BLOCK_N, HEAD_DIM, DOT_PRECISION, 1)
    out = acc / l_i[:, None]  # l_i >= 1: the split's largest score contributes exp2(0)
    if n_splits == 1:  # the whole sequence in this program: the final output, no merge
        tl.store(o_ptr + tok * stride_ot + head[:, None] * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=g_ok[:, None])
    else:  # partials: (B, Hq, max_splits, D) and (B, Hq, max_splits), contiguous, float32
        row = (seq.to(tl.int64) * n_q_heads + head) * max_splits + split
        tl.store(plse_ptr + row, m_i + tl.log2(l_i), mask=g_ok)
        tl.store(po_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=g_ok[:, None])


@triton.jit
def decode_merge_kernel(po_ptr, plse_ptr, o_ptr, cu_q_ptr, seq_lens_ptr, stride_ot, stride_oh, n_q_heads,
                        max_splits, min_split_keys,
                        BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BLOCK_N: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(cu_q_ptr + seq)
    if tl.load(cu_q_ptr + seq + 1) - q_start != 1:
        return
    n_splits, _ = split_plan(tl.load(seq_lens_ptr + seq), max_splits, min_split_keys, KV_BLOCK_N)
    if n_splits == 1:  # pass 1 wrote the output
        return
    s = tl.arange(0, BLOCK_S)
    s_ok = s < n_splits  # only splits pass 1 wrote: the rest of the buffer is stale
    d = tl.arange(0, HEAD_DIM)
    row = (seq.to(tl.int64) * n_q_heads + head) * max_splits + s
    lse = tl.load(plse_ptr + row, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # every counted split is non-empty: max is finite; unused rows weigh 0
    part = tl.load(po_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
    tl.store(o_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def attention_decode(q, k_cache, v_cache, meta, scale: float, out: torch.Tensor, max_splits: int,
                     cfg: AttnConfig | None = None, min_split_keys: int = MIN_KEYS_PER_SPLIT) -> torch.Tensor:
    """Launch the decode passes for the q_len == 1 sequences of ``meta`` (rows of other sequences are left
    untouched); ``cfg`` as in attention_prefill (default: ``decode_config``). ``max_splits`` sizes the grid;
    each sequence uses at most that many (kernels/launch.py ``num_kv_splits``). Arguments are validated by
    kernels/attention.py ``attention``."""
    n_seqs = meta.seq_lens.shape[0]
    n_q_heads, head_dim = q.shape[1], q.shape[2]
    n_kv_heads = k_cache.shape[2]
    group = n_q_heads // n_kv_heads
    cfg = cfg or decode_config(head_dim, q.dtype, group)
    if max_splits > 1:
        part_out = torch.empty((n_seqs, n_q_heads, max_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((n_seqs, n_q_heads, max_splits), dtype=torch.float32, device=q.device)
    else:  # never written: every sequence has one split
        part_out = part_lse = out
    decode_split_kernel[(n_seqs, n_kv_heads, max_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), meta.block_tables.stride(0), n_q_heads, group, max_splits, min_split_keys,
        float(scale) * LOG2E,
        PAGE=k_cache.shape[1], BLOCK_G=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, HEAD_DIM=head_dim,
        DOT_PRECISION=cfg.dot_precision, STAGES=cfg.num_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if max_splits > 1:
        merge = merge_config(max_splits, head_dim)
        decode_merge_kernel[(n_seqs, n_q_heads)](
            part_out, part_lse, out, meta.cu_seqlens_q, meta.seq_lens, out.stride(0), out.stride(1), n_q_heads,
            max_splits, min_split_keys, BLOCK_S=merge.BLOCK, HEAD_DIM=head_dim, KV_BLOCK_N=cfg.BLOCK_N,
            num_warps=merge.num_warps)
    return out
