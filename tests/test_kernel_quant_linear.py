"""Weight-only quantized linear (kernels/quant_linear.py) against the plain dequantize-then-matmul reference, and
the packed layout against the definition W[n, k] = s[g(k), n] * (q[k, n] - z[g(k), n]) computed here from the
integer codes directly (not through the module's own unpacking)."""
import pytest
import torch

from qwen2_triton.kernels.quant_linear import (FusedQuantWeight, QuantConfig, dequantize, pack_quant_weight,
                                               pack_rows, quant_config, quant_linear, quant_linear_ref, unpack_rows)
from qwen2_triton.kernels.testing import poisoned_allocations

# The kernel and the reference use the same rounded weights (fp32 product, one rounding to x's dtype) and differ
# only in summation order: fp32 ~1e-6 relative; bf16/fp16 outputs one rounding of that (2^-8 / 2^-11 relative).
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2 ** -7),
       torch.float16: dict(atol=2e-3, rtol=2 ** -10)}


def make_weight(k, n, group, bits, *, act_order=False, sym=False, seed=0):
    """Random codes, zeros, fp16 scales and g_idx; returns (QuantWeight, the float32 weight (N, K))."""
    g = torch.Generator().manual_seed(seed)
    gs = k if group == -1 else group
    groups = k // gs
    codes = torch.randint(0, 2 ** bits, (k, n), generator=g, dtype=torch.int32).to(torch.uint8)
    zeros = torch.full((groups, n), 2 ** (bits - 1)) if sym else torch.randint(0, 2 ** bits, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.05 + 0.002).half()
    g_idx = torch.arange(k) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    w = pack_quant_weight(codes, zeros, scales, g_idx, bits, gs)
    dense = torch.empty(n, k)
    for i in range(k):  # the definition, row by row
        dense[:, i] = scales[g_idx[i]].float() * (codes[i].float() - zeros[g_idx[i]].float())
    return w, dense


CASES = [  # (rows, N, K, group, bits, act_order, sym): odd N, K with a tail past BLOCK_K, channelwise groups
    (1, 40, 256, 128, 4, False, True),
    (3, 72, 256, 128, 8, False, False),
    (5, 24, 192, 64, 4, True, False),
    (8, 40, 136, -1, 4, False, False),
    (13, 56, 256, 128, 4, True, True),
    (37, 24, 128, 32, 8, True, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,n,k,group,bits,act_order,sym", CASES)
def test_quant_linear_matches_reference(rows, n, k, group, bits, act_order, sym, dtype, device):
    w, dense = make_weight(k, n, group, bits, act_order=act_order, sym=sym, seed=rows * 1000 + n)
    assert torch.equal(dequantize(w), dense)  # the layout holds the definition exactly
    assert (w.zeros is None) == sym and (w.perm is not None) == act_order
    w = _to(w, device)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g).to(dtype).to(device)
    bias = torch.randn(n, generator=g).to(dtype).to(device)
    with poisoned_allocations():
        got = quant_linear(x, w, bias)
    ref = quant_linear_ref(x, w, bias)
    torch.testing.assert_close(got, ref, **TOL[dtype])
    dense_ref = (x.float() @ dense.to(device).to(dtype).float().t() + bias.float()).to(dtype)
    torch.testing.assert_close(got, dense_ref, **TOL[dtype])


@pytest.mark.parametrize("split", [1, 3, 5])
def test_split_k_uneven_and_small_tiles(split, device):
    """The GPU's fp32 tile (16 x 32 x 32) with explicit split counts, the last split shorter than the others:
    8 K tiles in 3 splits of 3, 3, 2; 5 splits of 2, 2, 2, 2 (cdiv leaves no empty split)."""
    w, dense = make_weight(256, 40, 64, 4, act_order=True, seed=split)
    w = _to(w, device)
    x = torch.randn(4, 256).to(device)
    cfg = QuantConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=split, num_warps=4, num_stages=2)
    with poisoned_allocations():
        got = quant_linear(x, w, None, config=cfg)
    torch.testing.assert_close(got, x @ dense.to(device).t(), **TOL[torch.float32])


def test_fused_parts_with_different_g_idx(device):
    """q, k, v whose act-order g_idx differ: each part its own launch into a column slice of one output."""
    parts = [make_weight(128, n, 32, 4, act_order=True, seed=s) for s, n in enumerate((48, 16, 16))]
    fused = FusedQuantWeight(tuple(_to(w, device) for w, _ in parts))
    dense = torch.cat([d for _, d in parts]).to(device)
    x = torch.randn(6, 128).to(device)
    bias = torch.randn(80).to(device)
    with poisoned_allocations():
        got = fused.linear(x, bias)
    torch.testing.assert_close(got, x @ dense.t() + bias, **TOL[torch.float32])
    torch.testing.assert_close(quant_linear_ref(x, fused, bias), got, **TOL[torch.float32])


def test_a_wrong_zero_or_permutation_is_caught(device):
    """The comparison above can fail: one zero off by one, or a permutation ignored, moves outputs past TOL."""
    w, dense = make_weight(128, 32, 32, 4, act_order=True, seed=3)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0))  # seeded: the error's size follows x
    ref = x @ dense.t()
    zeros = w.zeros.clone()
    zeros[1, 5] += 1
    for bad in (_replace(w, zeros=zeros), _replace(w, perm=None)):
        got = quant_linear(x.to(device), _to(bad, device), None).cpu()
        assert not torch.allclose(got, ref, **TOL[torch.float32])



@pytest.mark.parametrize("rows", [1, 8, 9, 16, 32, 33, 256])
@pytest.mark.parametrize("n,k", [(4608, 3584), (3584, 3584), (3584, 18944)], ids=["qkv", "o", "down"])
def test_weight_streaming_steps_fill_an_h100(rows, n, k):
    """Up to 32 rows a linear streams its weights (a mid-size decode batch): the heuristic puts the rows in one
    row tile and splits K until there are >= 132 programs (an H100's SMs; unsplit, 7B's o_proj and down_proj ran
    28). Past 32 rows, one split and 64-row tiles (prefill)."""
    cfg = quant_config(rows, n, k, 128, torch.bfloat16, 132)
    programs = -(-rows // cfg.BLOCK_M) * -(-n // cfg.BLOCK_N) * cfg.SPLIT_K
    if rows <= 32:
        assert cfg.BLOCK_M >= rows and programs >= 132 and cfg.SPLIT_K > 1, cfg
    else:
        assert cfg.SPLIT_K == 1 and cfg.BLOCK_M == 64, cfg

def test_pack_rows_roundtrip_and_gptq_layout():
    codes = torch.randint(0, 16, (64, 5), dtype=torch.int32).to(torch.uint8)
    words = pack_rows(codes, 4)
    assert words.shape == (8, 5) and words.dtype == torch.int32
    assert torch.equal(unpack_rows(words, 4), codes)
    # GPTQ's definition: field j of word r is row 8r + j at bits [4j, 4j + 4)
    r, j, col = 3, 6, 2
    assert (int(words[r, col]) >> (4 * j)) & 0xF == int(codes[8 * r + j, col])
    assert torch.equal(unpack_rows(pack_rows(codes, 8), 8), codes)


def test_bad_inputs(device):
    w, _ = make_weight(128, 16, 128, 4)
    w = _to(w, device)
    with pytest.raises(ValueError, match="in_features 128"):
        quant_linear(torch.randn(2, 64, device=device), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        quant_linear(torch.randn(2, 128, device=device), w, torch.randn(3, device=device))
    with pytest.raises(ValueError, match="unit stride"):
        quant_linear(torch.randn(128, 2, device=device).t(), w)
    with pytest.raises(ValueError, match="contiguous groups"):  # groups of unequal sizes: no layout for it
        pack_quant_weight(torch.zeros(64, 8, dtype=torch.uint8), torch.zeros(2, 8), torch.ones(2, 8).half(),
                          torch.tensor([0] * 40 + [1] * 24), 4, 32)


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True)])
def test_random_quant_weight_is_the_packed_layout_of_its_codes(bits, sym):
    """The benchmarks' builder (kernels/testing.py) draws packed words directly: they must be what
    pack_quant_weight makes of the same codes and zeros, and give unit-size outputs (so the benchmarks' check
    against the reference compares numbers that can differ)."""
    from qwen2_triton.kernels.testing import random_quant_weight

    w = random_quant_weight(256, 40, bits=bits, sym=sym, generator=torch.Generator().manual_seed(bits))
    zeros = torch.full((2, 40), 2 ** (bits - 1)) if sym else w.zeros.to(torch.int32)
    again = pack_quant_weight(unpack_rows(w.qweight, bits), zeros, w.scales, torch.arange(256) // 128, bits, 128)
    assert torch.equal(again.qweight, w.qweight) and again.zero == w.zero and torch.equal(dequantize(again),
                                                                                           dequantize(w))
    assert len(unpack_rows(w.qweight, bits).unique()) == 2 ** bits  # every code occurs
    out = quant_linear_ref(torch.randn(64, 256, generator=torch.Generator().manual_seed(0)), w)
    assert 0.5 < out.std() < 2


def _replace(w, **kw):
    from dataclasses import replace

    return replace(w, **kw)


def _to(w, device):
    return _replace(w, **{f: getattr(w, f).to(device) for f in ("qweight", "scales", "zeros", "perm")
                          if getattr(w, f) is not None})
