"""Triton prefill attention over the paged KV cache against attention_ref (fp32 math from the same inputs)."""
import pytest
import torch

from qwen2_triton.kernels.attention import AttentionMetadata, attention, attention_ref
from qwen2_triton.kernels.testing import make_paged_batch, poisoned_allocations

# bf16: P is rounded to bf16 for the tensor-core P @ V (as FlashAttention does, ~2^-9 relative per weight) and
# the output once more: 2 ulp relative (2^-6) plus 2^-8 absolute for outputs that cancel towards 0.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2 ** -8, rtol=2 ** -6)}
DTYPES = [torch.float32, torch.bfloat16]


def _check(q_lens, seq_lens, hq, hk, head_dim, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    q, k_cache, v_cache, meta = make_paged_batch(q_lens, seq_lens, hq, hk, head_dim, dtype, device=device,
                                                 generator=g)
    assert not meta.is_decode
    scale = head_dim ** -0.5
    with poisoned_allocations():
        got = attention(q, k_cache, v_cache, meta, scale)
    want = attention_ref(q, k_cache, v_cache, meta, scale)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk", [(1, 1), (2, 1), (5, 1), (6, 1), (7, 1), (8, 1), (4, 4)])
def test_prefill_gqa_groups_packed(hq, hk, dtype, device):
    """A packed batch: plain prefill (17), an unscheduled sequence (0 queries), a 1-token chunk, and a chunk after
    a cached prefix of 125 keys (5 queries at positions 125..129)."""
    _check([17, 0, 1, 5], [17, 9, 40, 130], hq, hk, 64, dtype, device, seed=hq * 10 + hk)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hk", [(6, 1), (7, 1), (4, 2)])
def test_prefill_head_dim_128(hq, hk, dtype, device):
    """Qwen2-1.5B/7B head_dim; a 127-token prompt beside a 13-token chunk at an unaligned offset (287)."""
    _check([127, 13], [127, 300], hq, hk, 128, dtype, device, seed=hq)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_chunks_crossing_tiles(dtype, device):
    """Chunks whose first query sits mid-tile (offsets 33 and 500) and spans several query tiles (70 > 64)."""
    _check([64, 70], [97, 570], 2, 1, 64, dtype, device, seed=5)


def test_prefill_long_sequence(device):
    """One 1000+ token prompt (once: the interpreter is slow)."""
    _check([1037], [1037], 2, 1, 64, torch.bfloat16, device, seed=11)


def _meta(**overrides):
    fields = dict(cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32), seq_lens=torch.tensor([3], dtype=torch.int32),
                  block_tables=torch.zeros(1, 1, dtype=torch.int32), slot_mapping=torch.arange(3),
                  max_seqlen_q=3, max_seqlen_k=3)
    fields.update(overrides)
    return AttentionMetadata(**fields)


def test_attention_bad_inputs():
    q = torch.randn(3, 4, 64)
    cache = torch.zeros(2, 16, 2, 64)
    with pytest.raises(ValueError, match="cache dtype"):
        attention(q, cache.bfloat16(), cache.bfloat16(), _meta(), 0.125)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attention(torch.randn(3, 3, 64), cache, cache, _meta(), 0.125)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        attention(torch.randn(3, 4, 80), torch.zeros(2, 16, 2, 80), torch.zeros(2, 16, 2, 80), _meta(), 0.125)
    with pytest.raises(ValueError, match="cache head_dim"):
        attention(q, torch.zeros(2, 16, 2, 128), torch.zeros(2, 16, 2, 128), _meta(), 0.125)
    with pytest.raises(ValueError, match="cu_seqlens_q must be"):
        attention(q, cache, cache, _meta(cu_seqlens_q=torch.tensor([0, 1, 3], dtype=torch.int32)), 0.125)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        attention(q, cache, cache, _meta(max_seqlen_q=2), 0.125)
    with pytest.raises(ValueError, match="block_tables dtype"):
        attention(q, cache, cache, _meta(block_tables=torch.zeros(1, 1)), 0.125)
    with pytest.raises(ValueError, match="must match"):
        attention(q, cache, cache[:1], _meta(), 0.125)
