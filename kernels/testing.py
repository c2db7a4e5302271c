"""Input builders shared by the kernel tests (tests/test_kernel_*.py) and the benchmarks (bench/).

``poisoned_allocations``: inside the block torch.empty / torch.empty_like return NaN-filled float tensors (and
-1-filled integer ones), so an output element a kernel forgets to write shows up as NaN instead of passing by
luck with stale memory.
``make_paged_batch``: a packed batch over a paged KV cache with shuffled (non-contiguous) block tables; every
cache row that no sequence owns, including the tail of each sequence's last block, is NaN, so a kernel that
reads past a sequence's end or through a wrong block id produces NaN.
``random_quant_weight``: a weight-only quantized Linear (kernels/quant_linear.py QuantWeight) with random codes,
built straight in the kernel's layout, so a benchmark gets Qwen2-7B-sized ones in milliseconds.
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
        max_seqlen_q=max(q_lens), max_seqlen_k=max(seq_lens), decode_seqs=sum(n == 1 for n in q_lens))
    return q, k_cache, v_cache, meta


def random_quant_weight(in_features: int, out_features: int, *, bits: int, group_size: int = 128, sym: bool = True,
                        device: torch.device | str = "cpu", generator: torch.Generator | None = None):
    """A QuantWeight (K=in_features, N=out_features) with uniformly random codes: every int32 word is a valid
    packing of 32 // bits codes, so the words are drawn directly (no (K, N) code tensor to pack). Zeros: the
    symmetric constant 2^(bits-1) (GPTQ sym, ``zeros`` None) or random integers per group and column (fp16, as
    pack_quant_weight stores them). fp16 scales around sqrt(12) / (2^bits sqrt(K)), so a randn input gives
    outputs of about unit size at any width. No act-order permutation."""
    from qwen2_triton.kernels.quant_linear import QuantWeight

    k, n, pack = in_features, out_features, 32 // bits
    assert k % pack == 0 and k % group_size == 0, (k, pack, group_size)
    groups = k // group_size
    kw = dict(device=device, generator=generator)
    qweight = torch.randint(-2 ** 31, 2 ** 31, (k // pack, n), dtype=torch.int32, **kw)
    scale = 12 ** 0.5 / (2 ** bits * k ** 0.5)
    scales = ((torch.rand(groups, n, **kw) + 0.5) * scale).half()
    zeros = None if sym else torch.randint(0, 2 ** bits, (groups, n), **kw).half()
    return QuantWeight(qweight, scales, zeros, 2 ** (bits - 1) if sym else -1, None, bits, group_size, k, n)
