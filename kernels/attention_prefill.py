"""Prefill attention kernel: causal flash attention of a variable-length packed batch over the paged KV cache.

Grid (cdiv(max_seqlen_q, BLOCK_M), Hq, B): a program owns BLOCK_M consecutive query tokens of one head of one
sequence (programs past the sequence's q_len exit at once, so sizing the grid from the host int max_seqlen_q
needs no device sync). Query i of sequence b sits at position ctx + i with ctx = seq_len - q_len, which covers
plain prefill (ctx = 0), chunked prefill and a cached prefix (ctx > 0) alike. Keys [0, ctx + m0) are visible
to every row of the tile and run without masks; only the diagonal tiles test causality and the sequence end.
Launch checks and dispatch live in kernels/attention.py (``attention``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2_triton.kernels.attention_tile import attn_tiles
from qwen2_triton.kernels.launch import AttnConfig, prefill_config

LOG2E = 1.4426950408889634


@triton.jit
def prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_q_ptr, seq_lens_ptr, bt_ptr,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                   group, qk_scale,
                   PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    m_block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    m0 = m_block * BLOCK_M
    if m0 >= q_len:
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
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    bt = bt_ptr + seq.to(tl.int64) * stride_bt

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full_end = (ctx + m0) // BLOCK_N * BLOCK_N  # whole tiles every row sees
    acc, l_i, m_i = attn_tiles(acc, l_i, m_i, q, k_base, v_base, bt, stride_kb, stride_ks, stride_vb, stride_vs,
                               0, full_end, seq_len, q_pos, qk_scale,
                               False, PAGE, BLOCK_N, HEAD_DIM, DOT_PRECISION)
    diag_end = tl.minimum(seq_len, ctx + m0 + BLOCK_M)  # last row's position + 1
    acc, l_i, m_i = attn_tiles(acc, l_i, m_i, q, k_base, v_base, bt, stride_kb, stride_ks, stride_vb, stride_vs,
                               full_end, diag_end, seq_len, q_pos, qk_scale,
                               True, PAGE, BLOCK_N, HEAD_DIM, DOT_PRECISION)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + tok[:, None] * stride_ot + head * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])


def attention_prefill(q, k_cache, v_cache, meta, scale: float, out: torch.Tensor,
                      cfg: AttnConfig | None = None) -> torch.Tensor:
    """Launch the prefill kernel with ``cfg`` (default: kernels/launch.py ``prefill_config``; the runtime passes
    its tuned choice). Arguments are validated by kernels/attention.py ``attention``."""
    n_seqs = meta.seq_lens.shape[0]
    n_q_heads, head_dim = q.shape[1], q.shape[2]
    group = n_q_heads // k_cache.shape[2]
    cfg = cfg or prefill_config(head_dim, q.dtype)
    grid = (triton.cdiv(meta.max_seqlen_q, cfg.BLOCK_M), n_q_heads, n_seqs)
    prefill_kernel[grid](
        q, k_cache, v_cache, out, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        group, float(scale) * LOG2E,
        PAGE=k_cache.shape[1], BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, HEAD_DIM=head_dim,
        DOT_PRECISION=cfg.dot_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
