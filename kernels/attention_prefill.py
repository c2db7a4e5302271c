"""Prefill attention kernel: causal flash attention of a variable-length packed batch over the paged KV cache.

Grid (Hq, T // BLOCK_M + B), compact over query blocks as vLLM's unified attention lays it out: sequence b's
query blocks are numbered from ``cu_seqlens_q[b] // BLOCK_M + b``, which gives every sequence
cdiv(q_len, BLOCK_M) blocks or one more, so the grid has at most B programs per head with nothing to do,
and is sized from host ints (no device sync). A program finds its sequence by binary search over
cu_seqlens_q. The old grid (cdiv(max_q, BLOCK_M), Hq, B) ran B x cdiv(max_q, BLOCK_M) x Hq programs, most of
them empty for a mixed step (63 decodes + one 2048-token chunk of Qwen2-7B: 64 x 32 x 28 = 57k, against
28 x 96 here).
Sequences with q_len == 1 (decode rows, 1-token chunks) are skipped: kernels/attention_decode.py runs them
split-KV with the GQA group in one tile. Block numbers run backwards, so the last (longest-context, causal)
query blocks are issued first and the short ones fill the tail; the head is the fastest grid axis, so the
GQA group's heads, which read the same K/V, run side by side.

Query i of sequence b sits at position ctx + i with ctx = seq_len - q_len, which covers plain prefill
(ctx = 0), chunked prefill and a cached prefix (ctx > 0) alike. Keys [0, ctx + m0) are visible to every row of
the tile and run without masks; only the diagonal tiles test causality and the sequence end.
Launch checks and dispatch live in kernels/attention.py (``attention``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2_triton.kernels.attention_tile import attn_tiles
from qwen2_triton.kernels.launch import AttnConfig, capability_of, prefill_config

LOG2E = 1.4426950408889634


@triton.jit
def find_seq(cu_q_ptr, block, n_seqs, BLOCK_M: tl.constexpr):
    """The sequence whose query blocks include ``block``: the last b with cu_q[b] // BLOCK_M + b <= block."""
    lo = 0
    hi = n_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_q_ptr + mid) // BLOCK_M + mid <= block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, seq_lens_ptr, bt_ptr,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
                   n_seqs, group, qk_scale,
                   PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, STAGES: tl.constexpr):
    head = tl.program_id(0)
    block = tl.num_programs(1) - 1 - tl.program_id(1)  # heavy (late) query blocks first
    seq = find_seq(cu_q_ptr, block, n_seqs, BLOCK_M)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    m0 = (block - (q_start // BLOCK_M + seq)) * BLOCK_M
    if (m0 >= q_len) | (q_len == 1):  # past this sequence's queries, or a decode row (decode kernel)
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len  # keys already in the cache before this step's queries

    m = m0 + tl.arange(0, BLOCK_M)
    row_ok = m < q_len
    q_pos = ctx + m
    d = tl.arange(0, HEAD_DIM)
    tok = (q_start + m).to(tl.int64)  # int64: token * stride stays exact for any packed batch
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)

    kv_head = (head // group).to(tl.int64)
    k_base = k_ptr + kv_head * stride_ch
    v_base = v_ptr + kv_head * stride_ch
    bt = bt_ptr + seq.to(tl.int64) * stride_bt

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full_end = (ctx + m0) // BLOCK_N * BLOCK_N  # whole tiles every row sees
    acc, l_i, m_i = attn_tiles(acc, l_i, m_i, q, k_base, v_base, bt, stride_cb, stride_cs, 0, full_end, seq_len,
                               q_pos, qk_scale, False, PAGE, BLOCK_N, HEAD_DIM, DOT_PRECISION, STAGES)
    diag_end = tl.minimum(seq_len, ctx + m0 + BLOCK_M)  # last row's position + 1
    acc, l_i, m_i = attn_tiles(acc, l_i, m_i, q, k_base, v_base, bt, stride_cb, stride_cs, full_end, diag_end,
                               seq_len, q_pos, qk_scale, True, PAGE, BLOCK_N, HEAD_DIM, DOT_PRECISION, STAGES)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + tok[:, None] * stride_ot + head * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])


def prefill_grid(n_tokens: int, n_seqs: int, n_q_heads: int, block_m: int) -> tuple[int, int]:
    """(Hq, query blocks): every sequence's cdiv(q_len, BLOCK_M) blocks, plus at most one spare each."""
    return n_q_heads, n_tokens // block_m + n_seqs


def attention_prefill(q, k_cache, v_cache, meta, scale: float, out: torch.Tensor,
                      cfg: AttnConfig | None = None) -> torch.Tensor:
    """Launch the prefill kernel with ``cfg`` (default: kernels/launch.py ``prefill_config``; the runtime passes
    its tuned choice) for the sequences with q_len > 1; rows of q_len == 1 sequences are left to
    kernels/attention_decode.py. Arguments are validated by kernels/attention.py ``attention``."""
    n_seqs = meta.seq_lens.shape[0]
    n_q_heads, head_dim = q.shape[1], q.shape[2]
    group = n_q_heads // k_cache.shape[2]
    cfg = cfg or prefill_config(head_dim, q.dtype, capability_of(q.device))
    prefill_kernel[prefill_grid(q.shape[0], n_seqs, n_q_heads, cfg.BLOCK_M)](
        q, k_cache, v_cache, out, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), meta.block_tables.stride(0), n_seqs, group, float(scale) * LOG2E,
        PAGE=k_cache.shape[1], BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, HEAD_DIM=head_dim,
        DOT_PRECISION=cfg.dot_precision, STAGES=cfg.num_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
