"""RMSNorm, optionally fused with the residual add that precedes it in every Qwen2 block.

    r   = x + residual                      (when a residual is given; r is the new residual stream)
    out = weight * (r / sqrt(mean(r^2) + eps)).to(x.dtype)

The cast order is transformers' Qwen2RMSNorm: normalise in float32, cast to the input dtype, then multiply
by the weight. The residual sum is rounded to the activation dtype before normalising, as HF's
``hidden_states = residual + hidden_states`` does.
"""
from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
    """Plain-torch reference. x, residual: (T, H); weight: (H,).

    Returns ``out`` when residual is None, else ``(out, new_residual)``.
    """
    if residual is not None:
        x = x + residual
        new_residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, new_residual)
