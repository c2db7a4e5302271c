"""AWQ checkpoints (AutoAWQ "gemm" version, zero_point true), one Linear(in=K, out=N):

    qweight int32 (K, N / 8)  packed along the output dim: field i (bits [4i, 4i + 4)) of word j holds column
                              8j + [0, 2, 4, 6, 1, 3, 5, 7][i]
    qzeros  int32 (G, N / 8)  same packing and order; the real zero (unsigned, no -1 offset)
    scales  fp16  (G, N)
    W[n, k] = scales[k // group_size, n] * (q[k, n] - zero[k // group_size, n]); no g_idx.
Other versions (gemv, gemv_fast: a different packing) are refused by QuantConfig.
"""
from __future__ import annotations

import torch

from qwen2_triton.model.quant_common import IntLinear, expect, groups_of

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # field i of a word holds column AWQ_ORDER[i] of its 8


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 (R, C) -> int16 (R, 8C) in column order."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32) * 4
    fields = (packed.unsqueeze(-1) >> shifts) & 0xF  # (R, C, 8): field i
    out = torch.empty_like(fields)
    out[..., list(AWQ_ORDER)] = fields  # column AWQ_ORDER[i] <- field i
    return out.reshape(packed.shape[0], -1).to(torch.int16)


def read_awq(t: dict[str, torch.Tensor], name: str, k: int, n: int, qc, source: str) -> IntLinear:
    what = f"{qc.describe()}, {name} in_features {k}, out_features {n}"
    if n % 8:
        raise ValueError(f"{source}: {name}: out_features {n} must be a multiple of 8 to pack int4 codes 8 per "
                         f"int32 word ({what})")
    g = groups_of(k, qc.group_size, name, source)
    qweight = expect(t, name, "qweight", (k, n // 8), (torch.int32,), source, what)
    qzeros = expect(t, name, "qzeros", (g, n // 8), (torch.int32,), source, what)
    scales = expect(t, name, "scales", (g, n), (torch.float16, torch.bfloat16, torch.float32), source, what)
    if "g_idx" in t:
        raise ValueError(f"{source}: unexpected tensor {name}.g_idx: AWQ has no g_idx ({what})")
    codes = unpack_awq(qweight).to(torch.uint8)
    g_idx = torch.arange(k, device=qweight.device) // (k // g)
    return IntLinear(codes, unpack_awq(qzeros), scales, g_idx, 4, k // g)
