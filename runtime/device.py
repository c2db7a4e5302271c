"""Device resolution with errors a user can act on (the dtype rule is runtime/kernel_plan.py choose_dtype)."""
from __future__ import annotations

import torch


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cuda', 'cuda:N', 'cpu' or None") from None
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"unsupported device {device!r}; use 'cuda', 'cuda:N', 'cpu' or None")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA device is available; use device='cpu'")
    return dev

