"""Rotary position embedding (half-split / neox form) with default or YaRN frequencies.

For a head vector x = [x1, x2] (halves of head_dim) at position p:
    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin],   cos/sin = attention_factor * cos/sin(p * inv_freq)

The cos/sin tables are built once per model (``build_cos_sin_cache``) and indexed per token, so packed batches
of different sequences need no special handling. Several tables (plain RoPE for short requests, YaRN for long
ones) live in one concatenated buffer (``concat_cos_sin``), as vLLM's Phi-3 LongRoPE keeps its short and long
tables: a token reads row ``position + offset`` where offset is where its request's table starts, so one batch
(and one captured CUDA graph) mixes requests of both kinds with nothing but a different row index.
"""
from __future__ import annotations

import math

import torch


def yarn_inv_freq(head_dim: int, base: float, factor: float, original_max_position: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True) -> torch.Tensor:
    """YaRN inverse frequencies, as transformers' ``_compute_yarn_parameters`` computes them.

    Dims that rotate fewer than beta_slow times over the original context are interpolated (divided by
    factor); dims that rotate more than beta_fast times are kept (extrapolated); a linear ramp blends between.
    """
    dim = head_dim

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where the dim is extrapolated (high frequency)
    return interpolation * (1 - keep) + extrapolation * keep


def yarn_attention_factor(factor: float) -> float:
    """The paper's default attention (mscale) factor: 0.1 * ln(factor) + 1, and 1 for factor <= 1."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def build_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, attention_factor: float = 1.0,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """(max_positions, head_dim) float32 table: [:, :D/2] = cos, [:, D/2:] = sin, both times attention_factor.

    Built in float32 exactly as HF builds its cos/sin (positions as float32 times inv_freq).
    """
    pos = torch.arange(max_positions, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq.float()[None, :]  # (P, D/2)
    table = torch.cat([freqs.cos() * attention_factor, freqs.sin() * attention_factor], dim=-1)
    return table.to(device) if device is not None else table


def concat_cos_sin(tables: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, int]]:
    """One (sum of P_i, D) buffer holding ``tables`` one after the other, and each table's first row: a token
    whose request uses table ``name`` reads row ``position + offsets[name]``."""
    offsets, start = {}, 0
    for name, t in tables.items():
        offsets[name] = start
        start += t.shape[0]
    return torch.cat(list(tables.values())), offsets


def rotary_ref(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, cos_sin: torch.Tensor):
    """Plain-torch reference. q: (T, Hq, D), k: (T, Hk, D), rows: (T,) int, each token's row of cos_sin (its
    position plus its table's offset, see ``concat_cos_sin``), cos_sin: (P, D) float32.

    Returns new (q, k) in the input dtype; math in float32.
    """
    half = q.shape[-1] // 2
    cs = cos_sin[rows.long()]  # (T, D)
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x):
        x1, x2 = x.float()[..., :half], x.float()[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rot(q), rot(k)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel: one program per token rotates all of its q heads and k heads in place, loading the token's
# cos/sin row (position + table offset, computed by the caller) once. q and k may be strided views of the fused
# qkv projection output.
# ---------------------------------------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qwen2_triton.kernels._checks import INDEX_DTYPES, check, check_tensor  # noqa: E402
from qwen2_triton.kernels.launch import rotary_config  # noqa: E402


@triton.jit
def _rotate_heads(x_ptr, stride_h, n_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = heads < n_heads
    p1 = x_ptr + heads * stride_h + d  # (BLOCK_H, HALF): first halves; the second halves are HALF further
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotary_kernel(q_ptr, k_ptr, row_ptr, cs_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                  n_q_heads, n_k_heads, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # int64 offsets: token * stride stays exact for any batch size
    row = tl.load(row_ptr + t).to(tl.int64)  # rows reach 32k + 128k (plain table, then YaRN's of 32k x factor)
    d = tl.arange(0, HALF)[None, :]
    cos = tl.load(cs_ptr + row * stride_cs + d)
    sin = tl.load(cs_ptr + row * stride_cs + HALF + d)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, n_q_heads, cos, sin, HALF, BLOCK_HQ)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, n_k_heads, cos, sin, HALF, BLOCK_HK)


def rotary(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, cos_sin: torch.Tensor):
    """Triton rotary, in place. q: (T, Hq, D), k: (T, Hk, D) (unit last stride, any token/head stride, e.g.
    views of a fused qkv output); rows: (T,) int32/int64, each token's row of cos_sin (position + its table's
    offset); cos_sin: (P, D) float32 from ``build_cos_sin_cache`` or ``concat_cos_sin``. Returns (q, k). Rows
    must be < P (not checked: that would need a device sync).
    """
    op = "rotary (kernels/rotary.py)"
    check_tensor(op, "q", q, ndim=3)
    check_tensor(op, "k", k, ndim=3, device=q.device)
    check_tensor(op, "rows", rows, ndim=1, dtypes=INDEX_DTYPES, device=q.device)
    check_tensor(op, "cos_sin", cos_sin, ndim=2, dtypes=(torch.float32,), device=q.device)
    n_tokens, n_q_heads, head_dim = q.shape
    check(k.dtype == q.dtype, op, f"k dtype {k.dtype} must equal q dtype {q.dtype}")
    check(k.shape[0] == n_tokens and k.shape[2] == head_dim, op,
          f"k must be (T={n_tokens}, Hk, D={head_dim}), got {tuple(k.shape)}")
    check(rows.shape[0] == n_tokens, op, f"rows must be ({n_tokens},), got {tuple(rows.shape)}")
    check(cos_sin.shape[1] == head_dim, op, f"cos_sin must be (P, {head_dim}), got {tuple(cos_sin.shape)}")
    half = head_dim // 2
    check(head_dim % 2 == 0 and half >= 1 and half & (half - 1) == 0, op,
          f"head_dim must be 2 x a power of two (64, 128, ...), got {head_dim}")
    if n_tokens == 0:
        return q, k
    cfg_q, cfg_k = rotary_config(n_q_heads, head_dim), rotary_config(k.shape[1], head_dim)
    rotary_kernel[(n_tokens,)](q, k, rows, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                               cos_sin.stride(0), n_q_heads, k.shape[1], HALF=half, BLOCK_HQ=cfg_q.BLOCK,
                               BLOCK_HK=cfg_k.BLOCK, num_warps=max(cfg_q.num_warps, cfg_k.num_warps))
    return q, k
