"""Device and dtype resolution with errors a user can act on."""
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


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The dtype for ``device``: the rules live in runtime/kernel_plan.py ``choose_dtype``."""
    from qwen2_triton.runtime.kernel_plan import DeviceInfo, choose_dtype

    return choose_dtype(dtype, DeviceInfo.of(device))[0]
