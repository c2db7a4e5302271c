"""GGUF quantized blocks -> integer codes and scales (torch, CPU): the fields kernels/gguf_linear.py repacks.

Block layouts (ggml-common.h, little-endian, QK_K = 256) and the value gguf.quants (and model/dequant.py) compute
from them, in float32, in this order of operations:
    Q8_0   34 B / 32:   fp16 d, int8 q[32]                                x = d * q
    Q5_0   22 B / 32:   fp16 d, u32 qh, u8 qs[16] (5-bit q)               x = d * (q - 16)
    Q4_0   18 B / 32:   fp16 d, u8 qs[16] (4-bit q)                       x = d * (q - 8)
    Q5_1   24 B / 32:   fp16 d, fp16 m, u32 qh, u8 qs[16] (5-bit q)       x = d * q + m
    Q4_1   20 B / 32:   fp16 d, fp16 m, u8 qs[16] (4-bit q)               x = d * q + m
    Q4_K  144 B / 256:  fp16 d, fp16 dmin, u8 scales[12] (6-bit sc, m    x = (d * sc[j]) * q - (dmin * m[j])
                        of 8 sub-blocks of 32), u8 qs[128] (4-bit q)
    Q5_K  176 B / 256:  Q4_K's d, dmin, scales, then u8 qh[32] (bit j   x = (d * sc[j]) * q - (dmin * m[j])
                        of qh[i]: bit 4 of value 32j + i), u8 qs[128]
    Q6_K  210 B / 256:  u8 ql[128], u8 qh[64] (6-bit q), int8 sc[16]     x = (d * sc[j]) * (q - 32)
                        (16 sub-blocks of 16), fp16 d
Each unpacker mirrors gguf.quants' own reshapes, so value v of a block comes from the same bytes as there
(tests/test_kernel_gguf_linear.py checks the round trip against model/dequant.py bit for bit).

The fields (``BlockFields``), all in the tensor's (N, K) orientation, one row per output:
    codes    uint8 (N, K): the unsigned code u; q = u - offset (offset 128 / 16 / 0 / 32 for the types above)
    sub      (N, K // sub_rows): fp16 d (Q8_0, Q5_0, Q4_0), uint8 sc (Q4_K, Q5_K), int8 sc (Q6_K)
    sub_min  (N, K // 32): uint8 m of Q4_K / Q5_K, fp16 m of Q5_1 / Q4_1, else None
    sup      fp16 (N, K // 256): the super-block d of Q4_K / Q5_K / Q6_K, else None
    sup_min  fp16 (N, K // 256): Q4_K's / Q5_K's dmin, else None
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK_BYTES = {"Q8_0": (34, 32), "Q5_0": (22, 32), "Q4_0": (18, 32), "Q5_1": (24, 32), "Q4_1": (20, 32),
               "Q4_K": (144, 256), "Q5_K": (176, 256), "Q6_K": (210, 256)}  # (bytes, values)


@dataclass
class BlockFields:
    qtype: str
    codes: torch.Tensor
    sub: torch.Tensor
    sub_min: torch.Tensor | None = None
    sup: torch.Tensor | None = None
    sup_min: torch.Tensor | None = None


def unpack_blocks(data, qtype: str) -> BlockFields:
    """Raw tensor data uint8 (N, row bytes) (numpy, e.g. a GGUF memory map, or torch) of type ``qtype`` ->
    BlockFields. Raises ValueError for another type or a row that is not whole blocks."""
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"GGUF type {qtype} has no block unpacker (supported: {sorted(BLOCK_BYTES)})")
    raw = torch.from_numpy(np.array(data)) if isinstance(data, np.ndarray) else data.contiguous()
    nbytes, _ = BLOCK_BYTES[qtype]
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] % nbytes:
        raise ValueError(f"{qtype} data must be uint8 (rows, whole {nbytes}-byte blocks), got {raw.dtype} "
                         f"{tuple(raw.shape)}")
    n = raw.shape[0]
    f = _UNPACK[qtype](raw.reshape(-1, nbytes))  # per block: codes (blocks, nvals), scales per block
    return BlockFields(qtype, *(None if t is None else t.reshape(n, -1) for t in f))


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16)


def _q8_0(b):
    q = b[:, 2:].contiguous().view(torch.int8)
    return (q.to(torch.int16) + 128).to(torch.uint8), _f16(b[:, :2]), None, None, None


def _five_bits(qh_qs: torch.Tensor) -> torch.Tensor:
    """u32 qh then u8 qs[16] -> 32 five-bit codes: bit j of qh is bit 4 of value j."""
    qh = qh_qs[:, :4].contiguous().view(torch.int32)
    hi = (qh >> torch.arange(32, dtype=torch.int32)) & 1
    return (_four_bits(qh_qs[:, 4:]) | (hi << 4)).to(torch.uint8)


def _four_bits(qs: torch.Tensor) -> torch.Tensor:
    """u8 qs[16] -> 32 four-bit codes (int32): values 0..15 from the low nibbles, 16..31 from the high ones."""
    qs = qs.to(torch.int32)
    return torch.cat([qs & 0x0F, qs >> 4], 1)


def _q5_0(b):
    return _five_bits(b[:, 2:]), _f16(b[:, :2]), None, None, None


def _q4_0(b):
    return _four_bits(b[:, 2:]).to(torch.uint8), _f16(b[:, :2]), None, None, None


def _q5_1(b):
    return _five_bits(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4]), None, None


def _q4_1(b):
    return _four_bits(b[:, 4:]).to(torch.uint8), _f16(b[:, :2]), _f16(b[:, 2:4]), None, None


def q4_k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 packed bytes per block -> 8 six-bit scales and 8 six-bit mins (gguf.quants.Q4_K.get_scale_min)."""
    s = scales.to(torch.int32).reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], 1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], 1)
    return sc.to(torch.uint8), mn.to(torch.uint8)


def _q4_k(b):
    sc, mn = q4_k_scale_min(b[:, 4:16])
    qs = b[:, 16:].to(torch.int32).reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.int32).view(1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(-1, 256).to(torch.uint8)  # value 64c + 32h + i: byte 32c + i, nibble h
    return codes, sc, mn, _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_k(b):
    sc, mn = q4_k_scale_min(b[:, 4:16])
    qh = (b[:, 16:48].to(torch.int32)[:, None, :] >> torch.arange(8, dtype=torch.int32).view(1, 8, 1)) & 1
    qs = b[:, 48:].to(torch.int32).reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.int32).view(1, 1, 2, 1)
    codes = (qs & 0x0F).reshape(-1, 256) | (qh.reshape(-1, 256) << 4)  # value 32j + i: bit j of qh[i] on top
    return codes.to(torch.uint8), sc, mn, _f16(b[:, :2]), _f16(b[:, 2:4])


def _q6_k(b):
    ql = b[:, :128].to(torch.int32).reshape(-1, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.int32).view(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(-1, 8, 32)
    qh = b[:, 128:192].to(torch.int32).reshape(-1, 2, 1, 32) >> \
        torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(-1, 8, 32)
    codes = (ql | (qh << 4)).reshape(-1, 256).to(torch.uint8)
    return codes, b[:, 192:208].contiguous().view(torch.int8), None, _f16(b[:, 208:210]), None


_UNPACK = {"Q8_0": _q8_0, "Q5_0": _q5_0, "Q4_0": _q4_0, "Q5_1": _q5_1, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_K": _q5_k,
           "Q6_K": _q6_k}
