"""The sampler's primitives on their own: the CPU row selections (numpy's) against torch's, and the noise of the
exponential race (runtime/sampling_noise.py): its fused form, its numpy form and its per-column form agree with
the reference formulas bit for bit."""
from __future__ import annotations

import pytest
import torch

from qwen2_triton.runtime.sampler import exponential_noise, noise_at
from qwen2_triton.runtime.sampling_noise import noise_from_keys


@pytest.mark.parametrize("vocab,rows", [(4096, 64), (152064, 2), (1000, 3)])
def test_cpu_row_selections_are_torchs(vocab, rows):
    """The CPU selections (numpy's) against torch's: argmax/argmin (first of equal values), and the largest entries
    (numpy's argpartition from 2^16 elements, else torch.topk): topk's values, descending, and columns that hold
    them; bf16-rounded rows too (ties: any tied column may come back, as topk's own choice among them is
    unspecified)."""
    from qwen2_triton.runtime.row_select import argmax, argmin, largest

    g = torch.Generator().manual_seed(vocab)
    for x in (torch.randn(rows, vocab, generator=g) * 3, (torch.randn(rows, vocab, generator=g) * 3).bfloat16().float()):
        x[0, :5] = float("-inf")  # grammar-masked columns
        for width in (1, 23, 46, 116):
            vals, ids = largest(x, width)
            assert torch.equal(vals, x.topk(width).values) and torch.equal(x.gather(1, ids), vals)
            assert torch.equal(largest(x, width, mostly_equal=True)[0], vals)  # grammar-masked batches: topk
            assert ids.dtype == torch.int64 and all(len(set(r)) == width for r in ids.tolist())
        assert torch.equal(argmax(x), x.argmax(-1)) and torch.equal(argmin(x), x.argmin(-1))
        assert torch.equal(argmax(x, keepdim=True), x.argmax(-1, keepdim=True))


def test_race_is_the_argmax_of_p_over_e():
    """The draw's fused form (one-op uniform, argmin of p / log u) picks the column argmax(p / E) picks, E from
    bits_to_exponential: over every 24-bit uniform, and on rows with zeros and exact ties."""
    from qwen2_triton.runtime.sampling_noise import race

    k = torch.arange(1 << 24, dtype=torch.int64)
    f = k.float()
    assert torch.equal(f.clone().add_(0.5).mul_(1.0 / (1 << 24)), torch.add(torch.tensor(2.0 ** -25), f, alpha=2.0 ** -24))
    g = torch.Generator().manual_seed(0)
    B, N = 512, 64
    probs = torch.rand(B, N, generator=g).mul_(torch.rand(B, N, generator=g) > 0.5).round(decimals=2)  # ties, zeros
    probs[:, 0] = 0.5
    keys = torch.randint(0, 2**32, (B,), generator=g)
    ids = torch.randint(0, 152064, (B, N), generator=g)
    want = (probs / noise_from_keys(keys, ids)).argmax(-1, keepdim=True)
    assert torch.equal(race(probs.clone(), keys, ids), want)


def test_cpu_uniform_is_the_torch_uniform():
    """race's CPU path hashes and scales in numpy (uint32): the same uniforms as the torch mix and one-op scaling
    for extreme keys and token ids, per-row ids, one id row shared by every row, and the (key, id) pairs whose
    hash has all 24 top bits set (the clamp below 1: (2^24 - 0.5) / 2^24 rounds to 1.0)."""
    from qwen2_triton.runtime.sampling_noise import _U_MAX, MASK32, _mix32, uniform24

    g = torch.Generator().manual_seed(1)
    keys = torch.cat([torch.tensor([0, 1, 2**32 - 1, 2**31, 20, 28]), torch.randint(0, 2**32, (58,), generator=g)])
    top = torch.zeros(64, 2, dtype=torch.int64)
    top[4:6] = torch.tensor([817060, 1008918])[:, None]  # the hash of (20, 817060) and (28, 1008918) is 2^24 - 1
    for ids in (torch.randint(0, 152064, (64, 37), generator=g), torch.tensor([0, 1, 152063, 2**20 - 1]),
                torch.arange(152064).flip(0)[::1000], top):
        bits = (_mix32((keys[:, None] + ids * 0x85EBCA6B) & MASK32) >> 8).float()
        want = torch.add(torch.tensor(2.0 ** -25), bits, alpha=2.0 ** -24).clamp_(max=_U_MAX)
        got = uniform24(keys, ids)
        assert got.dtype == torch.float32 and torch.equal(got, want)
    assert (bits[4:6, 0] == 2**24 - 1).all() and (got[4:6, 0] == _U_MAX).all()


def test_noise_at_equals_the_full_row_noise():
    seeds, steps = torch.tensor([1, 2**32 - 1, 77]), torch.tensor([0, 3, 10**6])
    full = exponential_noise(seeds, steps, 5000)
    ids = torch.tensor([[0, 4999, 17], [5, 5, 6], [1234, 0, 4321]])
    assert torch.equal(noise_at(seeds, steps, ids), full.gather(1, ids))
