"""GPTQ checkpoints (AutoGPTQ / optimum format "gptq" = v1, GPTQModel's "gptq_v2"), one Linear(in=K, out=N):

    qweight int32 (K * bits / 32, N)  packed along the input dim: field j of word r = row r * (32 / bits) + j,
                                      at bits [bits * j, bits * (j + 1)), low bits first
    qzeros  int32 (G, N * bits / 32)  packed the same way along the output dim; v1 stores zero - 1
                                      (symmetric int4: every field 7, the word 0x77777777), v2 the zero
    scales  fp16  (G, N)
    g_idx   int32 (K,)                the group of each input row: i // group_size, or any order under desc_act
    W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])

v1 zeros are read field by field as stored + 1, the format's definition (a stored field of all ones, zero 0 in an
asymmetric v1 checkpoint, reads as 2^bits: what AutoGPTQ's dequantization computes).
"""
from __future__ import annotations

import torch

from qwen2_triton.model.quant_common import IntLinear, expect, groups_of


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (R, C) -> uint8 (R * 32 / bits, C): field j of word r is row r * (32 / bits) + j. (The same layout as
    the kernel's, kernels/quant_linear.py; read here on its own so the file format never depends on it.)"""
    pack = 32 // bits
    shifts = torch.arange(pack, device=packed.device, dtype=torch.int32).view(1, pack, 1) * bits
    return ((packed.unsqueeze(1) >> shifts) & (2 ** bits - 1)).reshape(-1, packed.shape[1]).to(torch.uint8)


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (R, C) -> int16 (R, C * 32 / bits): field j of word c is column c * (32 / bits) + j."""
    pack = 32 // bits
    shifts = torch.arange(pack, device=packed.device, dtype=torch.int32) * bits
    fields = (packed.unsqueeze(-1) >> shifts) & (2 ** bits - 1)
    return fields.reshape(packed.shape[0], -1).to(torch.int16)


def read_gptq(t: dict[str, torch.Tensor], name: str, k: int, n: int, qc, source: str) -> IntLinear:
    """The tensors of module ``name`` (leaf -> tensor) -> integer codes, real zeros, scales and g_idx."""
    bits, pack = qc.bits, 32 // qc.bits
    what = f"{qc.describe()}, {name} in_features {k}, out_features {n}"
    if k % pack or n % pack:
        raise ValueError(f"{source}: {name}: in_features {k} and out_features {n} must be multiples of {pack} "
                         f"to pack int{bits} codes {pack} per int32 word ({what})")
    g = groups_of(k, qc.group_size, name, source)
    qweight = expect(t, name, "qweight", (k // pack, n), (torch.int32,), source, what)
    qzeros = expect(t, name, "qzeros", (g, n // pack), (torch.int32,), source, what)
    scales = expect(t, name, "scales", (g, n), (torch.float16, torch.bfloat16, torch.float32), source, what)
    if "g_idx" in t:
        g_idx = expect(t, name, "g_idx", (k,), (torch.int32, torch.int64), source, what).to(torch.int64)
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= g):
            raise ValueError(f"{source}: tensor {name}.g_idx has values in [{int(g_idx.min())}, "
                             f"{int(g_idx.max())}], expected groups in [0, {g}) ({what})")
    elif qc.desc_act:
        raise ValueError(f"{source}: missing tensor {name}.g_idx: desc_act=true needs each row's group ({what})")
    else:
        g_idx = torch.arange(k, device=qweight.device) // (k // g)
    zeros = unpack_cols(qzeros, bits)
    if qc.checkpoint_format == "gptq":
        zeros += 1
    return IntLinear(unpack_rows(qweight, bits), zeros, scales, g_idx, bits, k // g)
