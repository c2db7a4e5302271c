"""Input builders shared by the kernel tests (tests/test_kernel_*.py) and the benchmarks (bench/).

``poisoned_allocations``: inside the block torch.empty / torch.empty_like return NaN-filled float tensors (and
-1-filled integer ones), so an output element a kernel forgets to write shows up as NaN instead of passing by
luck with stale memory.
``make_paged_batch``: a packed batch over a paged KV cache with shuffled (non-contiguous) block tables; every
cache row that no sequence owns, including the tail of each sequence's last block, is NaN, so a kernel that
reads past a sequence's end or through a wrong block id produces NaN.
"""
from __future__ import annotations

import contextlib

import torch

from qwen2_triton.kernels.attention import AttentionMetadata


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan") if t.dtype.is_floating_point else -1)


@contextlib.contextmanager
def poisoned_allocations():
    real_empty, real_empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *a, **k: _poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: _poison(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def make_paged_batch(q_lens: list[int], seq_lens: list[int], n_q_heads: int, n_kv_heads: int, head_dim: int,
                     dtype: torch.dtype, *, block_size: int = 16, spare_blocks: int = 3,
                     device: torch.device | str = "cpu", generator: torch.Generator | None = None):
    """Returns (q (T, Hq, D), k_cache, v_cache (N, block_size, Hk, D), meta). Sequence b has q_lens[b] queries at
    the last q_lens[b] of its seq_lens[b] positions (q_len < seq_len: a cached prefix / chunked prefill).
    Random values come from ``generator`` (on its device) or, without one, from the target device."""
    assert len(q_lens) == len(seq_lens) and all(0 <= q <= s for q, s in zip(q_lens, seq_lens))
    device = torch.device(device)
    gen_device = generator.device if generator is not None else device

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=gen_device).to(device=device, dtype=dtype)

    n_blocks = [(s + block_size - 1) // block_size for s in seq_lens]
    total = sum(n_blocks) + spare_blocks
    perm = torch.randperm(total, generator=generator, device=gen_device).cpu()
    spare = perm[sum(n_blocks)].item() if spare_blocks else 0  # a NaN block: unused table entries point here
    block_tables = torch.full((len(seq_lens), max(max(n_blocks), 1)), spare, dtype=torch.int32)
    slots = []  # flat cache slot of every key, sequence by sequence
    offset = 0
    for b, (nb, s) in enumerate(zip(n_blocks, seq_lens)):
        blocks = perm[offset:offset + nb]
        offset += nb
        block_tables[b, :nb] = blocks.to(torch.int32)
        t = torch.arange(s)
        slots.append(blocks[t // block_size] * block_size + t % block_size)
    slots = torch.cat(slots).to(device)
    shape = (total, block_size, n_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    k_cache.view(-1, n_kv_heads, head_dim)[slots] = randn(slots.numel(), n_kv_heads, head_dim)
    v_cache.view(-1, n_kv_heads, head_dim)[slots] = randn(slots.numel(), n_kv_heads, head_dim)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    q = randn(int(cu[-1]), n_q_heads, head_dim)
    meta = AttentionMetadata(
        cu_seqlens_q=cu.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.full((q.shape[0],), -1, dtype=torch.int64, device=device),
        max_seqlen_q=max(q_lens), max_seqlen_k=max(seq_lens))
    return q, k_cache, v_cache, meta
