"""The sampler's randomness: Exp(1) draws that are a pure function of (request seed, output index, token id).

The draw is ``argmax(p / E)`` (the exponential race, as gpt-fast samples), so a request's tokens depend on its seed
alone, never on its batch, and nothing needs a host sync or a torch.Generator. E comes from a counter-based hash:
a per-row key from (seed, output index), mixed with the token id. The key is computed for a block of
``KEY_BLOCK`` output indices at once and cached with the batch, so a decode step only mixes in token ids.
"""
from __future__ import annotations

import numpy as np
import torch

from qwen2_triton.runtime.row_select import argmin

MASK32 = 0xFFFFFFFF
KEY_BLOCK = 64  # output indices per computed block of row keys: one block per 64 decode steps of a batch


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply); products stay below 2^59 in int64, so no overflow."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & MASK32
    return x ^ (x >> 16)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """``_mix32`` in place (x: a fresh int64 tensor holding values < 2^32): the same values, fewer allocations."""
    x ^= x >> 16
    x.mul_(0x45D9F3B).bitwise_and_(MASK32)
    x ^= x >> 16
    x.mul_(0x45D9F3B).bitwise_and_(MASK32)
    x ^= x >> 16
    return x


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The per-row hash key of (seed, output index); broadcasts (e.g. seeds (B, 1) x steps (B, N))."""
    return _mix32((seeds & MASK32) ^ _mix32((steps * 0x9E3779B1) & MASK32))


def key_block(seeds: torch.Tensor, steps: torch.Tensor, block: int) -> torch.Tensor:
    """(B, KEY_BLOCK) keys of output indices steps + block * KEY_BLOCK + [0, KEY_BLOCK)."""
    offsets = torch.arange(block * KEY_BLOCK, (block + 1) * KEY_BLOCK, device=steps.device)
    return row_keys(seeds[:, None], steps[:, None] + offsets)


def noise_from_keys(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) float32 Exp(1) draws: keys (B,) int64, token_ids (B, N) int64 (or (N,), the same ids every row)."""
    return bits_to_exponential(_mix32_(torch.add(keys[:, None], token_ids, alpha=0x85EBCA6B).bitwise_and_(MASK32)))


def race(probs: torch.Tensor, keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1) column of ``argmax(probs / E)`` for E the Exp(1) draws of these rows' keys at ``token_ids``; probs is
    overwritten. The same arithmetic as ``bits_to_exponential`` in fewer ops (a decode step of a small batch is
    bound by op count): argmin(p / log u) is argmax(p / E) for E = -log u, since p / (-E) is exactly -(p / E) and
    both take the first of equal values."""
    return argmin(probs.div_(uniform24(keys, token_ids).log_()), keepdim=True)


def uniform24(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """float32 (B, N): the uniform ``bits_to_exponential`` takes the log of, (k + 0.5) * 2^-24 clamped below 1, for
    k the top 24 bits of each (key, token id) hash as ``noise_from_keys`` mixes them. k * 2^-24 + 2^-25 rounds the
    same exact value once, so every path gives the same floats. On the CPU in numpy: its in-place ufuncs on the
    small arrays of a decode step cost about a third of torch's per op (the 46-token window of one row: 9 us
    against 20; 256 rows: 33 against 47), and in uint32 the multiplications wrap without masking."""
    if keys.device.type != "cpu":
        x = _mix32_(torch.add(keys[:, None], token_ids, alpha=0x85EBCA6B).bitwise_and_(MASK32))
        return torch.add(_half_ulp(keys.device), x >> 8, alpha=2.0 ** -24).clamp_(max=_U_MAX)
    x = token_ids.numpy().astype(np.uint32)
    x *= np.uint32(0x85EBCA6B)
    x = x + keys.numpy().astype(np.uint32)[:, None]  # (B, N) also when the ids are one row (N,) shared by all
    for _ in range(2):  # _mix32's two xor-shift-multiply rounds, then its last xor-shift
        x ^= x >> 16
        x *= np.uint32(0x45D9F3B)
    x ^= x >> 16
    x >>= 8
    u = x.astype(np.float32)  # < 2^24: exact
    u *= np.float32(2.0 ** -24)  # exact: a power of two
    u += np.float32(2.0 ** -25)  # the one rounding
    return torch.from_numpy(np.minimum(u, np.float32(_U_MAX), out=u))


def _half_ulp(device) -> torch.Tensor:
    """A 0-dim float32 2^-25 on ``device`` (a tensor operand: a Python scalar costs a wrap per op)."""
    t = _HALF_ULP.get(device)
    if t is None:
        t = _HALF_ULP[device] = torch.tensor(2.0 ** -25, device=device)
    return t


def noise_at(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) Exp(1) draws for token ids (B, N): the values ``exponential_noise`` gives at those columns."""
    return noise_from_keys(row_keys(seeds, steps), token_ids)


def exponential_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) float32 Exp(1) draws, a pure function of (seed, step, token id)."""
    return noise_from_keys(row_keys(seeds, steps), torch.arange(vocab, device=seeds.device, dtype=torch.int64))


# Largest float32 below 1. (k + 0.5) / 2^24 for the top 24-bit k rounds to exactly 1.0 in float32 (k + 0.5 needs
# 25 bits), and -log(1) = -0.0 made a filtered token's 0 / -0.0 = NaN win the argmax (issue 8: ~1% of draws
# over a 152k vocabulary came from outside top-k/top-p). Clamping keeps every other draw bit-identical.
_U_MAX = 1.0 - 2.0 ** -24
_HALF_ULP: dict = {}  # device -> 0-dim tensor 2^-25


def bits_to_exponential(x: torch.Tensor) -> torch.Tensor:
    """32-bit hash values (int64 holding [0, 2^32)) -> float32 Exp(1) draws in [6e-8, 17.4]: never 0, never inf,
    so p / E is finite for every p in [0, 1] and exactly 0 for a filtered token."""
    u = (x >> 8).float().add_(0.5).mul_(1.0 / (1 << 24))  # uniform in [2^-25, 1]
    return u.clamp_(max=_U_MAX).log_().neg_()
