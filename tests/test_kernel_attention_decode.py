"""Triton split-KV decode attention over the paged KV cache against attention_ref."""
import pytest
import torch

from qwen2_triton.kernels.attention import attention, attention_ref
from qwen2_triton.kernels.launch import num_kv_splits
from qwen2_triton.kernels.testing import make_paged_batch, poisoned_allocations

# Same budget as prefill (tests/test_kernel_attention_prefill.py): bf16 P for the P @ V dot + output rounding.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2 ** -8, rtol=2 ** -6)}
DTYPES = [torch.float32, torch.bfloat16]


def _check(seq_lens, hq, hk, head_dim, dtype, device, seed, num_splits):
    g = torch.Generator().manual_seed(seed)
    q, k_cache, v_cache, meta = make_paged_batch([1] * len(seq_lens), seq_lens, hq, hk, head_dim, dtype,
                                                 device=device, generator=g)
    assert meta.is_decode
    scale = head_dim ** -0.5
    with poisoned_allocations():  # the split partials are poisoned too
        got = attention(q, k_cache, v_cache, meta, scale, num_splits=num_splits)
    want = attention_ref(q, k_cache, v_cache, meta, scale)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk", [(1, 1), (2, 1), (5, 1), (6, 1), (7, 1), (8, 1), (2, 2)])
def test_decode_gqa_groups(hq, hk, dtype, device):
    """Lengths 1, 17, 127, 300 in one batch with 3 splits: the 1-key sequence leaves splits 1 and 2 empty."""
    _check([1, 17, 127, 300], hq, hk, 64, dtype, device, seed=hq * 10 + hk, num_splits=3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk", [(6, 1), (7, 1), (8, 2)])
def test_decode_head_dim_128_default_splits(hq, hk, dtype, device):
    """Qwen2-1.5B/7B head_dim, split count from the launch policy (kernels/launch.py)."""
    _check([17, 250], hq, hk, 128, dtype, device, seed=hq, num_splits=None)


@pytest.mark.parametrize("num_splits", [1, 16])
def test_decode_empty_splits(num_splits, device):
    """16 splits over 1- and 2-key sequences: 15 empty splits each must weigh 0 in the merge, not NaN."""
    _check([1, 2, 33], 7, 1, 64, torch.bfloat16, device, seed=3, num_splits=num_splits)


def test_decode_long_context(device):
    """One 1000+ key context (once: the interpreter is slow), several splits of several tiles each."""
    _check([1100], 7, 1, 64, torch.bfloat16, device, seed=4, num_splits=4)


def test_split_policy():
    assert num_kv_splits(1, 2, 1, sm_count=132) == 1  # 1 key: nothing to split
    assert num_kv_splits(1, 2, 32768, sm_count=132) == 64  # batch 1: fill the GPU, capped at MAX_SPLITS
    assert num_kv_splits(64, 4, 32768, sm_count=132) == 2  # 256 (seq, head) programs already fill 132 SMs
    assert num_kv_splits(1, 2, 600, sm_count=132) == 3  # >= 256 keys per split
    assert 1 <= num_kv_splits(1, 2, 32768, sm_count=None) <= 4  # interpreter: a few
