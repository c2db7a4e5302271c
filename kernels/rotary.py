"""Rotary position embedding (half-split / neox form) with default or YaRN frequencies.

For a head vector x = [x1, x2] (halves of head_dim) at position p:
    out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin],   cos/sin = attention_factor * cos/sin(p * inv_freq)

The cos/sin table is built once per model (``build_cos_sin_cache``) and indexed by per-token positions, so
packed batches of different sequences need no special handling.
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


def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
    """Plain-torch reference. q: (T, Hq, D), k: (T, Hk, D), positions: (T,) int, cos_sin: (P, D) float32.

    Returns new (q, k) in the input dtype; math in float32.
    """
    half = q.shape[-1] // 2
    cs = cos_sin[positions.long()]  # (T, D)
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x):
        x1, x2 = x.float()[..., :half], x.float()[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rot(q), rot(k)
