"""Embedding lookup from a GGUF table kept in its blocks: out[t] = row ids[t] of the table, dequantized.

The table is a ``GGUFWeight`` (kernels/gguf_linear.py) of (N = vocabulary rows, K = hidden): its columns are the
vocabulary in that layout, so a token's row is one column of every field, rebuilt by gguf_linear's
``dequant_tile`` with the token ids as the columns. Every value is computed as gguf.quants computes it and rounded
once to the output dtype, so the lookup equals F.embedding on the table dequantized at load, bit for bit (no sum is
involved). A step reads ids x K values of the table (for a decode step, a few KB), where a dense table would also
have to be resident at 16 bits: for Qwen2-7B's Q4_K token_embd, 0.32 GB instead of 1.09 GB.

Grid (cdiv(T, BLOCK_T), cdiv(K, BLOCK_K)); an id outside [0, N) reads nothing and writes zeros (the engine never
passes one: prompt ids are checked against the vocabulary on the host, and a device-side check would need a sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2_triton.kernels._checks import INDEX_DTYPES, check, check_tensor
from qwen2_triton.kernels.gguf_linear import GGUFWeight, dequant_tile, dequantize

BLOCK_T = 16  # tokens per program: their ids are the tile's columns
BLOCK_K = 128  # values per token per program: whole 32-value blocks, half a K-quant super-block


def gguf_embedding_ref(ids: torch.Tensor, w: GGUFWeight, dtype: torch.dtype) -> torch.Tensor:
    """Plain torch: the table dequantized (float32, rounded once to ``dtype``), then looked up."""
    return torch.nn.functional.embedding(ids, dequantize(w).to(dtype))


@triton.jit
def gguf_embedding_kernel(ids_ptr, lo_ptr, hi_ptr, sub_ptr, min_ptr, sup_ptr, supmin_ptr, out_ptr, T, N, K,
                          k_off, stride_ot, LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, SUB: tl.constexpr,
                          OFFSET: tl.constexpr, SUPER: tl.constexpr, HAS_MIN: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k0 = tl.program_id(1) * BLOCK_K
    ids = tl.load(ids_ptr + ts, mask=ts < T, other=0)
    valid = (ts < T) & (ids >= 0) & (ids < N)
    w = dequant_tile(lo_ptr, hi_ptr, sub_ptr, min_ptr, sup_ptr, supmin_ptr, k0, N, K, k_off, ids.to(tl.int32),
                     valid, LO_BITS, HI_BITS, SUB, OFFSET, SUPER, HAS_MIN, BLOCK_K, BLOCK_T)  # (BLOCK_K, BLOCK_T)
    ks = k0 + tl.arange(0, BLOCK_K)
    out = out_ptr + ts.to(tl.int64)[None, :] * stride_ot + ks[:, None]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=(ts < T)[None, :] & (ks < K)[:, None])


def gguf_embedding(ids: torch.Tensor, w: GGUFWeight, dtype: torch.dtype) -> torch.Tensor:
    """ids (T,) int32/int64 -> (T, K) in ``dtype``: the rows of the GGUF table ``w`` (N rows of K values)."""
    op = "gguf_embedding (kernels/gguf_embedding.py)"
    check_tensor(op, "ids", ids, ndim=1, dtypes=INDEX_DTYPES)
    check(w.lo.device == ids.device, op, f"table is on {w.lo.device}, ids on {ids.device}")
    f = w.fmt
    t, k = ids.shape[0], w.in_features
    out = torch.empty((t, k), dtype=dtype, device=ids.device)
    if t == 0:
        return out
    dummy = w.lo  # never read: its flag is off
    gguf_embedding_kernel[(triton.cdiv(t, BLOCK_T), triton.cdiv(k, BLOCK_K))](
        ids, w.lo, dummy if w.hi is None else w.hi, w.sub, dummy if w.sub_min is None else w.sub_min,
        dummy if w.sup is None else w.sup, dummy if w.sup_min is None else w.sup_min, out, t, w.out_features, k,
        w.k_offset, out.stride(0), LO_BITS=f.lo_bits, HI_BITS=f.hi_bits, SUB=f.sub_rows, OFFSET=f.offset,
        SUPER=f.super_rows, HAS_MIN=f.has_min, BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, num_warps=4,
        enable_fp_fusion=False)  # Q4_K: d*sc*q - dmin*m rounded twice, as gguf.quants (kernels/gguf_linear.py)
    return out
