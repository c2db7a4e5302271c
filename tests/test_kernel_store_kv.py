"""Triton cache write (kernels/attention.py store_kv) against store_kv_ref."""
import pytest
import torch

from qwen2_triton.kernels.attention import store_kv, store_kv_ref


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("n_tokens,hk,head_dim", [(13, 2, 64), (5, 4, 128), (1, 1, 64), (17, 5, 128)])
def test_store_kv_matches_reference(n_tokens, hk, head_dim, dtype, cache_dtype, device):
    """k, v are views of a fused qkv buffer; slots are a shuffled subset of a NaN cache, some rows padding (-1)."""
    g = torch.Generator().manual_seed(n_tokens * 31 + hk)
    n_blocks, block_size, hq = 7, 16, 2 * hk
    qkv = torch.randn(n_tokens, (hq + 2 * hk) * head_dim, generator=g).to(dtype).to(device)
    k = qkv[:, hq * head_dim: (hq + hk) * head_dim].view(n_tokens, hk, head_dim)
    v = qkv[:, (hq + hk) * head_dim:].view(n_tokens, hk, head_dim)
    slots = torch.randperm(n_blocks * block_size, generator=g)[:n_tokens]
    slots[::3] = -1  # padding rows are skipped
    slots = slots.to(device)
    shape = (n_blocks, block_size, hk, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=device)
    v_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, want_k, want_v, slots)
    store_kv(k, v, k_cache, v_cache, slots)
    # a copy (with at most one rounding when the cache dtype is narrower): bitwise equal, NaN where untouched
    assert torch.equal(k_cache.nan_to_num(123.0), want_k.nan_to_num(123.0))
    assert torch.equal(v_cache.nan_to_num(123.0), want_v.nan_to_num(123.0))


def test_store_kv_bad_inputs(device):
    k = torch.randn(4, 2, 64, device=device)
    cache = torch.zeros(3, 16, 2, 64, device=device)
    slots = torch.arange(4, device=device)
    with pytest.raises(ValueError, match="Hk, D"):
        store_kv(k, k, torch.zeros(3, 16, 1, 64, device=device), torch.zeros(3, 16, 1, 64, device=device), slots)
    with pytest.raises(ValueError, match="slot_mapping dtype"):
        store_kv(k, k, cache, cache.clone(), slots.float())
    with pytest.raises(ValueError, match="slot_mapping must be"):
        store_kv(k, k, cache, cache.clone(), slots[:2])
    with pytest.raises(ValueError, match="v shape"):
        store_kv(k, k[:, :1], cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="must match"):
        store_kv(k, k, cache, cache[:2].clone(), slots)
    with pytest.raises(ValueError, match="4-D"):
        store_kv(k, k, cache[0], cache[0].clone(), slots)
