"""SwiGLU on the fused gate_up projection: out = silu(gate) * up, with gate_up = [gate | up] on the last dim.

The math runs in float32 and is rounded once to the activation dtype.
"""
from __future__ import annotations

import torch


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference. gate_up: (T, 2*I) -> (T, I)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)
