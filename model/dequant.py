"""GGUF tensor data -> float32 numpy: gguf.quants, with faster paths for the demo model's big Q8_0 and Q5_0 tensors.

gguf.quants decodes 16 rows per numpy call, so a 151,936-row embedding costs ~9,500 rounds of small-array calls and
their temporaries (~1.4 s for the demo's Q8_0 output.weight, ~1.8 s for its Q5_0 token_embd.weight on a 2-core CPU,
when both are in the page cache). The paths here decode 16,384 blocks (524,288 values, 2 MiB of output) per call
straight into one preallocated array: ~0.1 s and ~0.25 s for the same tensors, bit for bit the same values
(tests/test_dequant.py compares them with gguf.quants on random blocks and on the demo model).

Block layouts (ggml-common.h), all little-endian:
    Q8_0  34 bytes / 32 values:  fp16 d, int8 q[32];                     x = d * q
    Q5_0  22 bytes / 32 values:  fp16 d, u32 qh, u8 qs[16];  q = (qs[j] & 15 | bit j of qh << 4) for j < 16,
                                 (qs[j-16] >> 4 | bit j of qh << 4) for j >= 16;  x = d * (q - 16)
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize

_CHUNK_BLOCKS = 16384  # 4,096: 0.8-1.3 s for the Q8_0 embedding (call overhead); 65,536: 0.1-0.5 s (cache misses)
_SHIFTS = np.arange(32, dtype=np.uint32)


def dequantize(data: np.ndarray, qtype: QT) -> np.ndarray:
    """float32 values of a tensor's raw data (as gguf.GGUFReader and model.gguf_file expose it: (rows..., row
    bytes) uint8 for block types), shaped (rows..., values per row). Same values as gguf.quants.dequantize."""
    fast = _FAST.get(qtype)
    if fast is None:
        return gguf_dequantize(data, qtype)
    block_bytes, decode = fast
    if data.dtype != np.uint8 or data.shape[-1] % block_bytes:
        raise ValueError(f"{qtype.name} data must be uint8 rows of whole {block_bytes}-byte blocks, "
                         f"got {data.dtype} {data.shape}")
    blocks = data.reshape(-1, block_bytes)
    out = np.empty((blocks.shape[0], 32), dtype=np.float32)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        stop = start + _CHUNK_BLOCKS
        decode(blocks[start:stop], out[start:stop])
    return out.reshape(*data.shape[:-1], data.shape[-1] // block_bytes * 32)


def _scales(blocks: np.ndarray) -> np.ndarray:
    return blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)


def _q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    np.multiply(blocks[:, 2:].view(np.int8), _scales(blocks), out=out, dtype=np.float32)


def _q5_0(blocks: np.ndarray, out: np.ndarray) -> None:
    qh = blocks[:, 2:6].copy().view("<u4")  # (n, 1)
    qs = blocks[:, 6:]
    q = np.empty((blocks.shape[0], 32), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=q[:, :16])
    np.right_shift(qs, 4, out=q[:, 16:])
    q |= (((qh >> _SHIFTS) & 1) << 4).astype(np.uint8)
    signed = q.view(np.int8)
    np.subtract(signed, np.int8(16), out=signed)  # 0..31 -> -16..15, no overflow
    np.multiply(signed, _scales(blocks), out=out, dtype=np.float32)


_FAST = {QT.Q8_0: (34, _q8_0), QT.Q5_0: (22, _q5_0)}
