"""Triton split-KV decode attention over the paged KV cache against attention_ref, with the split count decided
per sequence on the device (kernels/attention_decode.py ``split_plan``)."""
import pytest
import torch

from qwen2_triton.kernels import attention_decode as decode_mod
from qwen2_triton.kernels.attention import attention, attention_ref
from qwen2_triton.kernels.launch import MAX_SPLITS, num_kv_splits
from qwen2_triton.kernels.testing import make_paged_batch, poisoned_allocations

# Same budget as prefill (tests/test_kernel_attention_prefill.py): bf16 P for the P @ V dot + output rounding.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2 ** -8, rtol=2 ** -6)}
DTYPES = [torch.float32, torch.bfloat16]


def _check(seq_lens, hq, hk, head_dim, dtype, device, seed, num_splits, min_split_keys=16, block_size=16):
    g = torch.Generator().manual_seed(seed)
    q, k_cache, v_cache, meta = make_paged_batch([1] * len(seq_lens), seq_lens, hq, hk, head_dim, dtype,
                                                 device=device, generator=g, block_size=block_size)
    assert meta.is_decode
    scale = head_dim ** -0.5
    with poisoned_allocations():  # the split partials are poisoned too: a merge reading an unwritten one is NaN
        got = attention(q, k_cache, v_cache, meta, scale, num_splits=num_splits, min_split_keys=min_split_keys)
    want = attention_ref(q, k_cache, v_cache, meta, scale)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, **TOL[dtype])


def splits_of(seq_len: int, max_splits: int, min_split_keys: int, block_n: int) -> int:
    """Python mirror of kernels/attention_decode.py ``split_plan``."""
    n = max(seq_len, 1)
    want = min(max(-(-n // min_split_keys), 1), max_splits)
    chunk = -(-(-(-n // want)) // block_n) * block_n
    return -(-n // chunk)


def test_split_plan_gives_every_split_keys():
    """Per sequence: 1 split for short ones, about one per min_split_keys keys, never an empty one."""
    assert splits_of(1, 64, 256, 64) == 1 and splits_of(256, 64, 256, 64) == 1
    assert splits_of(1024, 64, 256, 64) == 4  # a 1k context in a graph captured for 32k: 4 splits, not 64
    assert splits_of(32768, 64, 256, 64) == 64
    for n in range(1, 3000, 7):
        for cap in (1, 2, 3, 8, 64, 128):
            s = splits_of(n, cap, 256, 64)
            chunk = -(-(-(-n // min(max(-(-n // 256), 1), cap))) // 64) * 64
            assert 1 <= s <= cap and (s - 1) * chunk < n  # the last split starts before the end: none empty


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk", [(1, 1), (2, 1), (5, 1), (6, 1), (7, 1), (8, 1), (2, 2)])
def test_decode_gqa_groups(hq, hk, dtype, device):
    """Lengths 1, 17, 127, 300 in one batch, up to 3 splits of whole tiles: 1, 1, 2 and 3 splits, so the grid's
    later splits have nothing to do for the short ones."""
    _check([1, 17, 127, 300], hq, hk, 64, dtype, device, seed=hq * 10 + hk, num_splits=3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk", [(6, 1), (7, 1), (8, 2)])
def test_decode_head_dim_128_default_splits(hq, hk, dtype, device):
    """Qwen2-1.5B/7B head_dim, split cap and keys per split from the launch policy (kernels/launch.py)."""
    _check([17, 250], hq, hk, 128, dtype, device, seed=hq, num_splits=None, min_split_keys=256)


@pytest.mark.parametrize("num_splits", [1, 16, MAX_SPLITS])
def test_decode_splits_per_sequence(num_splits, device):
    """A grid of up to 128 splits (a graph captured at the longest context) over 1-, 2-, 100- and 400-key
    sequences: each uses its own count (1, 1, 2, 7 splits of one 64-key tile, at most num_splits), the other
    programs exit; a sequence with one split writes its output directly (its poisoned partials are never read)."""
    for n, want in ((1, 1), (2, 1), (100, 2), (400, 7)):
        assert splits_of(n, MAX_SPLITS, 16, 64) == want
    _check([1, 2, 100, 400], 7, 1, 64, torch.bfloat16, device, seed=3, num_splits=num_splits)


@pytest.mark.parametrize("block_size", [8, 32, 12])
def test_decode_page_sizes(block_size, device):
    """Tiles spanning several pages (8), inside one page (32) and the per-key fallback (12, not a power of 2)."""
    _check([5, 70, 131], 7, 1, 64, torch.bfloat16, device, seed=block_size, num_splits=3, block_size=block_size)


def test_decode_long_context(device):
    """One 1000+ key context (once: the interpreter is slow), 4 splits of several tiles each."""
    _check([1100], 7, 1, 64, torch.bfloat16, device, seed=4, num_splits=4, min_split_keys=256)


class _Spy:
    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_one_split_needs_no_merge_launch(monkeypatch, device):
    """max_splits 1 (large batches): pass 1 writes the output and no merge is launched; a larger cap launches
    the merge, whose programs for 1-split sequences exit (the result stays right with poisoned partials)."""
    merge = _Spy(decode_mod.decode_merge_kernel)
    monkeypatch.setattr(decode_mod, "decode_merge_kernel", merge)
    _check([3, 40], 7, 1, 64, torch.bfloat16, device, seed=5, num_splits=1)
    assert merge.grids == []
    _check([3, 40], 7, 1, 64, torch.bfloat16, device, seed=5, num_splits=4, min_split_keys=256)
    assert merge.grids == [(2, 7)]


def test_split_policy():
    assert num_kv_splits(1, 2, 1, sm_count=132) == 1  # 1 key: nothing to split
    assert num_kv_splits(1, 2, 32768, sm_count=132) == 128  # batch 1, 2 KV heads: 256 programs for 132 SMs
    assert num_kv_splits(1, 4, 32768, sm_count=132) == 66
    assert num_kv_splits(64, 4, 32768, sm_count=132) == 2  # 256 (seq, head) programs already fill 132 SMs
    assert num_kv_splits(1, 2, 600, sm_count=132) == 3  # >= 256 keys per split
    assert 1 <= num_kv_splits(1, 2, 32768, sm_count=None) <= 4  # interpreter: a few
