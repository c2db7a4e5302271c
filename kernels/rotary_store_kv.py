"""Rotary fused with the KV-cache write: one launch where the graph had two (kernels/rotary.py, then
kernels/attention.py ``store_kv``).

Per token, one program loads its cos/sin row once, rotates its q heads in place (attention reads q from the
activation buffer) and writes its rotated k heads and its v heads straight into their cache slot. k is only
read: nothing after this op reads k except through the cache (model/qwen2.py), so the rotated keys never make
the round trip through the qkv buffer that the unfused pair paid (rotary wrote k back, store_kv read it again).
Per layer and token that saves one launch and 2 x Hk x D x 2 bytes of traffic (0.5B: 24 launches a step).

Same results as ``rotary_store_kv_ref`` (rotary_ref then store_kv_ref): float32 math, one rounding to q's dtype
for q and to the cache dtype for k (the unfused pair rounded k twice when the cache was narrower than q).
Padding tokens (slot < 0) still rotate their q (their rows are discarded later) and write nothing.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen2_triton.kernels._checks import INDEX_DTYPES, check, check_tensor
from qwen2_triton.kernels.attention import _check_cache, store_kv_ref
from qwen2_triton.kernels.launch import rotary_config, store_kv_config
from qwen2_triton.kernels.rotary import rotary_ref


def rotary_store_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                        cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference: returns the rotated q (a new tensor); rotated k and v go to their cache slots."""
    q_rot, k_rot = rotary_ref(q, k.to(torch.float32), rows, cos_sin)  # k kept in fp32 until the cache cast
    store_kv_ref(k_rot, v, k_cache, v_cache, slot_mapping)
    return q_rot


@triton.jit
def _rotate(src_ptr, src_stride_h, dst_ptr, dst_stride_h, n_heads, cos, sin, HALF: tl.constexpr,
            BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = heads < n_heads
    src = src_ptr + heads * src_stride_h + d  # (BLOCK_H, HALF) first halves; the second halves are HALF further
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = dst_ptr + heads * dst_stride_h + d
    tl.store(dst, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotary_store_kv_kernel(q_ptr, k_ptr, v_ptr, row_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
                           stride_cb, stride_cs_row, stride_ch, n_q_heads, n_k_heads,
                           HALF: tl.constexpr, PAGE: tl.constexpr, BLOCK_HQ: tl.constexpr,
                           BLOCK_HK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # int64: token * stride and slot * row stride stay exact
    row = tl.load(row_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    cos = tl.load(cs_ptr + row * stride_cs + d)
    sin = tl.load(cs_ptr + row * stride_cs + HALF + d)
    q = q_ptr + t * stride_qt
    _rotate(q, stride_qh, q, stride_qh, n_q_heads, cos, sin, HALF, BLOCK_HQ)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        # k_cache and v_cache share strides (checked on the host), so one slot offset serves both
        base = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs_row
        _rotate(k_ptr + t * stride_kt, stride_kh, kc_ptr + base, stride_ch, n_k_heads, cos, sin, HALF, BLOCK_HK)
        h = tl.arange(0, BLOCK_HK)[:, None]
        dv = tl.arange(0, 2 * HALF)[None, :]
        mask = h < n_k_heads
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + dv, mask=mask)
        tl.store(vc_ptr + base + h * stride_ch + dv, v.to(vc_ptr.dtype.element_ty), mask=mask)


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, cos_sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Triton; same contract as ``rotary_store_kv_ref`` except that q is rotated in place and returned.
    q: (T, Hq, D), k, v: (T, Hk, D), unit last stride (views of the fused qkv output are fine); rows: (T,)
    each token's cos_sin row (< P, not checked: a device sync); cos_sin: (P, D) float32; caches
    (num_blocks, block_size, Hk, D) with equal strides; slot_mapping: (T,) int64, < 0 = write nothing."""
    op = "rotary_store_kv (kernels/rotary_store_kv.py)"
    check_tensor(op, "q", q, ndim=3)
    check_tensor(op, "k", k, ndim=3, device=q.device)
    check_tensor(op, "v", v, ndim=3, device=q.device)
    check_tensor(op, "rows", rows, ndim=1, dtypes=INDEX_DTYPES, device=q.device)
    check_tensor(op, "cos_sin", cos_sin, ndim=2, dtypes=(torch.float32,), device=q.device)
    check_tensor(op, "slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=q.device)
    _check_cache(op, k_cache, v_cache, q.device)
    n_tokens, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[1]
    check(k.dtype == q.dtype and v.dtype == q.dtype, op,
          f"k and v dtypes ({k.dtype}, {v.dtype}) must equal q dtype {q.dtype}")
    check(k.shape[0] == n_tokens and k.shape[2] == head_dim, op,
          f"k must be (T={n_tokens}, Hk, D={head_dim}), got {tuple(k.shape)}")
    check(tuple(v.shape) == tuple(k.shape), op, f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    check(tuple(k_cache.shape[2:]) == (n_k_heads, head_dim), op,
          f"cache (num_blocks, block_size, Hk, D) must have Hk, D = {(n_k_heads, head_dim)}, "
          f"got {tuple(k_cache.shape)}")
    check(rows.shape[0] == n_tokens and slot_mapping.shape[0] == n_tokens, op,
          f"rows and slot_mapping must be ({n_tokens},), got {tuple(rows.shape)} and {tuple(slot_mapping.shape)}")
    check(cos_sin.shape[1] == head_dim, op, f"cos_sin must be (P, {head_dim}), got {tuple(cos_sin.shape)}")
    half = head_dim // 2
    check(head_dim % 2 == 0 and half >= 1 and half & (half - 1) == 0, op,
          f"head_dim must be 2 x a power of two (64, 128, ...), got {head_dim}")
    if n_tokens == 0:
        return q
    cfg_q, cfg_k = rotary_config(n_q_heads, head_dim), rotary_config(n_k_heads, head_dim)
    warps = max(cfg_q.num_warps, cfg_k.num_warps, store_kv_config(n_k_heads, head_dim).num_warps)
    rotary_store_kv_kernel[(n_tokens,)](
        q, k, v, rows, cos_sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), n_q_heads, n_k_heads,
        HALF=half, PAGE=k_cache.shape[1], BLOCK_HQ=cfg_q.BLOCK, BLOCK_HK=cfg_k.BLOCK, num_warps=warps)
    return q
