"""Row-wise selections for the sampler: argmax / argmin of each row, and the ``width`` largest entries.

On a GPU these are torch's kernels. On the CPU torch's are slow for these shapes, and numpy's SIMD ones give the
same results (1-thread timings on this machine, best of 7 under load, float32 rows of 4,096):
- argmax: torch 577 us for 256 rows, numpy 50 (torch's CPU arg-reductions are not vectorised); both take the
  first of equal values;
- the 46 largest: torch.topk partially sorts each row with ~10 us of fixed cost a row, 5.3 ms for 256 rows;
  numpy's argpartition (introselect) and a sort of the 46 kept, 2.4 ms; a values-only partition for the 46th
  value and the columns at or above it, 1.2 ms (argpartition where values tie with it); for one row topk wins
  (7.6 vs 16 us).
  Which of several tied columns comes back is unspecified in both, as it is for torch.topk itself. But
  introselect degrades on rows that are mostly one value: a grammar-masked row of 152,064 (300 finite, the
  rest -inf) takes 3.3 ms against topk's 0.14, so such batches stay on topk.
"""
from __future__ import annotations

import numpy as np
import torch

LARGEST_NUMPY_MIN = 1 << 16  # batch x vocabulary from which numpy's partition wins (16 rows of 4,096)
ARG_NUMPY_MIN = 1 << 10  # below, the tensor <-> array round trip costs more than torch's reduction


def _numpy(x: torch.Tensor, min_numel: int = ARG_NUMPY_MIN) -> bool:
    return x.device.type == "cpu" and x.numel() >= min_numel


def argmax(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """(B,) int64 (or (B, 1)): the first column holding each row's largest value."""
    if not _numpy(x):
        return x.argmax(-1, keepdim=keepdim)
    out = torch.from_numpy(np.argmax(x.numpy(), axis=-1))
    return out[:, None] if keepdim else out


def argmin(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """(B,) int64 (or (B, 1)): the first column holding each row's smallest value."""
    if not _numpy(x):
        return x.argmin(-1, keepdim=keepdim)
    out = torch.from_numpy(np.argmin(x.numpy(), axis=-1))
    return out[:, None] if keepdim else out


def largest(x: torch.Tensor, width: int, mostly_equal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, width), int64 column ids (B, width)) of the ``width`` largest entries of each row, descending.
    ``mostly_equal``: rows may be mostly one value (grammar masks)."""
    if mostly_equal or not _numpy(x, LARGEST_NUMPY_MIN):
        return x.topk(width, dim=-1)
    a = x.numpy()
    B, V = a.shape
    # The width-th largest value of each row from a values-only partition (half of argpartition's cost), then
    # the columns at or above it: exactly ``width`` a row unless values tie with it (or a row holds NaN), where
    # argpartition picks among the tied ones instead.
    kth = np.partition(a, V - width, axis=-1)[:, V - width]
    flat = np.flatnonzero(a >= kth[:, None])
    if flat.size == B * width:  # every row has at least width such columns, so each has exactly width
        part = flat.reshape(B, width) - (np.arange(B, dtype=np.int64) * V)[:, None]
    else:
        part = np.argpartition(a, -width, axis=-1)[:, -width:]
    vals = np.take_along_axis(a, part, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return torch.from_numpy(np.take_along_axis(vals, order, -1)), torch.from_numpy(np.take_along_axis(part, order, -1))
