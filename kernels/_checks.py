"""Host-side argument checks shared by the launchers: every failure is a ValueError naming the op, the tensor,
and what was expected versus what arrived."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check(cond: bool, op: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{op}: {msg}")


def check_tensor(op: str, name: str, t, *, ndim: int, dtypes=FLOAT_DTYPES, unit_last_stride: bool = True,
                 device: torch.device | None = None) -> None:
    check(isinstance(t, torch.Tensor), op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check(t.dim() == ndim, op, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    check(t.dtype in dtypes, op, f"{name} dtype must be one of {[str(d) for d in dtypes]}, got {t.dtype}")
    if unit_last_stride and t.numel() > 0:
        check(t.stride(-1) == 1 or t.shape[-1] == 1, op,
              f"{name} must have unit stride on its last dim, got strides {t.stride()}")
    if device is not None:
        check(t.device == device, op, f"{name} is on {t.device}, expected {device}")


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple) -> None:
    check(tuple(t.shape) == tuple(expected), op, f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")
