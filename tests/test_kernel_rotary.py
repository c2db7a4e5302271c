"""Triton rotary (in place, on strided q/k views) against the plain-torch reference (kernels/rotary.py)."""
import pytest
import torch

from qwen2_triton.kernels.rotary import (build_cos_sin_cache, concat_cos_sin, default_inv_freq, rotary,
                                         rotary_ref, yarn_attention_factor, yarn_inv_freq)

# bf16: one rounding of an fp32 value that may differ from the reference's by an FMA: <= 1 ulp (2^-7 relative).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=2 ** -7)}
MAX_POS = 40_000  # YaRN factor 4 over 32k: positions past 32768 are in range


def _table(head_dim, yarn):
    if yarn:  # attention factor folded into the table, as the model builds it
        inv = yarn_inv_freq(head_dim, 1e6, 4.0, 32768)
        return build_cos_sin_cache(inv, MAX_POS, yarn_attention_factor(4.0))
    return build_cos_sin_cache(default_inv_freq(head_dim, 1e6), MAX_POS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tokens,hq,hk,head_dim", [(1, 14, 2, 64), (13, 12, 2, 128), (127, 5, 1, 64),
                                                     (17, 4, 4, 128)])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32])
def test_rotary_fused_qkv_views(n_tokens, hq, hk, head_dim, dtype, pos_dtype, device):
    """q and k are views of one (T, Hq*D + 2*Hk*D) qkv buffer: token stride != heads*D; v must stay untouched."""
    g = torch.Generator().manual_seed(n_tokens * 7 + hq)
    width = (hq + 2 * hk) * head_dim
    qkv = torch.randn(n_tokens, width, generator=g).to(dtype).to(device)
    q = qkv[:, : hq * head_dim].view(n_tokens, hq, head_dim)
    k = qkv[:, hq * head_dim: (hq + hk) * head_dim].view(n_tokens, hk, head_dim)
    v_before = qkv[:, (hq + hk) * head_dim:].clone()
    positions = torch.randint(0, MAX_POS, (n_tokens,), generator=g)
    positions[0] = MAX_POS - 1  # the table's last row, far past 32768
    positions = positions.to(pos_dtype).to(device)
    cos_sin = _table(head_dim, yarn=head_dim == 128).to(device)
    want_q, want_k = rotary_ref(q.clone(), k.clone(), positions, cos_sin)
    got_q, got_k = rotary(q, k, positions, cos_sin)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    torch.testing.assert_close(got_q, want_q, **TOL[dtype])
    torch.testing.assert_close(got_k, want_k, **TOL[dtype])
    assert torch.equal(qkv[:, (hq + hk) * head_dim:], v_before)


def test_rotary_position_zero_is_identity_and_large_positions_rotate(device):
    head_dim = 64
    cos_sin = _table(head_dim, yarn=False).to(device)
    q = torch.randn(2, 3, head_dim, device=device)
    k = torch.randn(2, 1, head_dim, device=device)
    q0 = q.clone()
    rotary(q, k, torch.tensor([0, 39_000], device=device), cos_sin)
    torch.testing.assert_close(q[0], q0[0], atol=0, rtol=0)
    assert not torch.allclose(q[1], q0[1])


def test_rotary_bad_inputs(device):
    cos_sin = _table(64, yarn=False).to(device)
    q = torch.randn(4, 2, 64, device=device)
    k = torch.randn(4, 1, 64, device=device)
    pos = torch.arange(4, device=device)
    with pytest.raises(ValueError, match="rows dtype"):
        rotary(q, k, pos.float(), cos_sin)
    with pytest.raises(ValueError, match="cos_sin dtype"):
        rotary(q, k, pos, cos_sin.to(torch.bfloat16))
    with pytest.raises(ValueError, match="k dtype"):
        rotary(q, k.to(torch.bfloat16), pos, cos_sin)
    with pytest.raises(ValueError, match="rows must be"):
        rotary(q, k, pos[:3], cos_sin)
    with pytest.raises(ValueError, match="cos_sin must be"):
        rotary(q, k, pos, _table(128, yarn=False).to(device))
    with pytest.raises(ValueError, match="k must be"):
        rotary(q, torch.randn(3, 1, 64, device=device), pos, cos_sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_mixed_tables_read_their_own_rows(dtype, device):
    """One buffer holds a plain table (as many rows as the original context) then the YaRN table; each token reads
    row position + its table's offset. Every token must come out as if rotated with its own table alone, and a
    row read from the other table (offset lost) must differ: YaRN's attention factor scales cos and sin."""
    head_dim, original = 64, 256
    plain = build_cos_sin_cache(default_inv_freq(head_dim, 1e6), original)
    yarn = build_cos_sin_cache(yarn_inv_freq(head_dim, 1e6, 4.0, original), 4 * original, yarn_attention_factor(4.0))
    table, offsets = concat_cos_sin({"plain": plain, "yarn": yarn})
    assert offsets == {"plain": 0, "yarn": original} and table.shape == (5 * original, head_dim)
    table = table.to(device)
    g = torch.Generator().manual_seed(3)
    n = 37
    q = torch.randn(n, 14, head_dim, generator=g).to(dtype).to(device)
    k = torch.randn(n, 2, head_dim, generator=g).to(dtype).to(device)
    pos = torch.randint(0, original, (n,), generator=g)
    long = torch.rand(n, generator=g) < 0.5  # tokens of YaRN requests, interleaved with plain ones
    pos[long] = torch.randint(0, 4 * original, (int(long.sum()),), generator=g)
    pos[0], long[0] = 4 * original - 1, True  # the buffer's last row
    rows = (pos + long * offsets["yarn"]).to(device)
    got_q, got_k = rotary(q.clone(), k.clone(), rows, table)
    for sel, t in ((long, yarn), (~long, plain)):
        want_q, want_k = rotary_ref(q[sel.to(device)], k[sel.to(device)], pos[sel].to(device), t.to(device))
        torch.testing.assert_close(got_q[sel.to(device)], want_q, **TOL[dtype])
        torch.testing.assert_close(got_k[sel.to(device)], want_k, **TOL[dtype])
    wrong_q, _ = rotary(q.clone(), k.clone(), pos.to(device), table)  # offsets dropped: YaRN tokens read plain rows
    assert (wrong_q[long.to(device)].float() - got_q[long.to(device)].float()).abs().max() > 0.1
