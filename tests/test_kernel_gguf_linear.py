"""GGUF weight-only linear (kernels/gguf_linear.py): the repacked layout against model/dequant.py (gguf.quants, an
independent decoder of the file's blocks) bit for bit, and the kernel against the dequantize-then-matmul
reference, on random blocks of every type and on real blocks sliced from the demo model's tensors of its four
types (Q4_0 and Q5_K, which the demo does not use, also get blocks gguf.quants itself wrote for Q4_0)."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from qwen2_triton.kernels.gguf_linear import (FORMATS, NATIVE_BPW, FusedGGUFWeight, GGUFWeight, QuantConfig,
                                              dequantize, fuse_gguf, gguf_linear, gguf_linear_ref, pack_gguf_weight)
from qwen2_triton.kernels.testing import poisoned_allocations
from qwen2_triton.model.dequant import dequantize as file_dequantize
from qwen2_triton.model.gguf_blocks import BLOCK_BYTES, unpack_blocks

# Kernel and reference use the same fp32 weights rounded once to x's dtype and differ only in summation order:
# fp32 ~1e-6 relative; bf16/fp16 outputs one rounding of that (2^-8 / 2^-11 relative), as tests of quant_linear.
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2 ** -7),
       torch.float16: dict(atol=2e-3, rtol=2 ** -10)}
QTYPES = tuple(FORMATS)
DEMO_TYPES = ("Q8_0", "Q5_0", "Q4_K", "Q6_K")  # the demo model's (Q4_K_M)
D_BYTES = {"Q8_0": (0,), "Q5_0": (0,), "Q4_0": (0,), "Q5_1": (0, 2), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2),
           "Q6_K": (208,)}  # offsets of the fp16 d (and m or dmin)
# d ranges that put the largest |weight| (d * 127, d * 16, d * 8, d * 31, d * 15, d * 63 * 15, d * 63 * 31,
# d * 128 * 32) near 1, as in a trained model: the fp32 tolerance is for outputs and partial sums of order 10, not
# the 1e3 of random scales.
D_RANGE = {"Q8_0": (2e-3, 8e-3), "Q5_0": (1e-2, 6e-2), "Q4_0": (2e-2, 1.2e-1), "Q5_1": (1e-2, 3e-2),
           "Q4_1": (2e-2, 6e-2), "Q4_K": (2e-4, 1e-3), "Q5_K": (1e-4, 5e-4), "Q6_K": (5e-5, 2.5e-4)}


def random_blocks(qtype: str, n: int, k: int, seed: int, d_range: tuple | None = None) -> np.ndarray:
    """uint8 (n, row bytes): random bytes, every fp16 d / dmin a finite value in ``d_range`` (default D_RANGE;
    random bytes would give NaN and inf there, which the file's writers never do)."""
    nbytes, nvals = BLOCK_BYTES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n * k // nvals, nbytes), dtype=np.uint8)
    for off in D_BYTES[qtype]:
        raw[:, off: off + 2] = rng.uniform(*(d_range or D_RANGE[qtype]), (raw.shape[0], 1)).astype(np.float16) \
            .view(np.uint8)
    return raw.reshape(n, -1)


@pytest.fixture(scope="module")
def demo_tensors(demo_gguf):
    """One tensor of each kernel type from the demo model: type -> (raw uint8 (rows, row bytes), its QT)."""
    from qwen2_triton.model.gguf_file import read_gguf

    out = {}
    for t in read_gguf(demo_gguf).tensors:
        if t.tensor_type.name in FORMATS and t.name.startswith("blk.") and t.tensor_type.name not in out:
            out[t.tensor_type.name] = (np.asarray(t.data), t.tensor_type)
    assert set(out) == set(DEMO_TYPES)
    return out


def real_blocks(demo_tensors, qtype: str, n: int, k: int, skip: int = 7) -> np.ndarray:
    """n x k values' worth of consecutive real blocks (from block ``skip`` on) reshaped as an (n, k) tensor."""
    raw, _ = demo_tensors[qtype]
    nbytes, nvals = BLOCK_BYTES[qtype]
    blocks = raw.reshape(-1, nbytes)[skip: skip + n * k // nvals]
    return np.ascontiguousarray(blocks).reshape(n, -1)


def weight(raw: np.ndarray, qtype: str) -> tuple[GGUFWeight, torch.Tensor]:
    """(the kernel layout, the float32 (N, K) weight model/dequant.py decodes from the same bytes)."""
    w = pack_gguf_weight(**unpack_blocks(raw, qtype).__dict__)
    return w, torch.from_numpy(file_dequantize(raw, QT[qtype]))


@pytest.mark.parametrize("qtype", QTYPES)
def test_layout_holds_the_files_values_bit_for_bit(qtype, demo_tensors):
    for raw in (random_blocks(qtype, 40, 512, seed=1), random_blocks(qtype, 24, 768, seed=2)):
        w, dense = weight(raw, qtype)
        assert torch.equal(dequantize(w), dense)
        assert w.nbytes * 8 / dense.numel() == FORMATS[qtype].bits_per_weight
    if qtype in ("Q4_0", "Q5_1", "Q4_1"):  # blocks gguf.quants' own writer made from a real weight (it writes no
        from gguf.quants import quantize  # K-quant)

        raw = quantize(np.asarray(weight(real_blocks(demo_tensors, "Q8_0", 64, 512), "Q8_0")[1]), QT[qtype])
        w, dense = weight(raw, qtype)
        assert torch.equal(dequantize(w), dense) and dense.abs().max() > 0
    if qtype not in DEMO_TYPES:
        return
    w, dense = weight(real_blocks(demo_tensors, qtype, 96, 512), qtype)
    assert torch.equal(dequantize(w), dense)
    # the whole first demo tensor of the type (every row, every block), not only a slice
    raw, qt = demo_tensors[qtype]
    w, dense = weight(raw, qtype)
    assert torch.equal(dequantize(w), dense)


def test_bits_per_weight():
    """Ours vs the file's (the kernel layout's docstring): equal but for the K-quants' byte-wide 6-bit sc and m."""
    assert {q: FORMATS[q].bits_per_weight for q in FORMATS} == {"Q8_0": 8.5, "Q5_0": 5.5, "Q4_0": 4.5, "Q5_1": 6.0,
                                                                "Q4_1": 5.0, "Q4_K": 4.625, "Q5_K": 5.625,
                                                                "Q6_K": 6.5625}
    assert {q: NATIVE_BPW[q] for q in FORMATS} == {"Q8_0": 8.5, "Q5_0": 5.5, "Q4_0": 4.5, "Q5_1": 6.0, "Q4_1": 5.0,
                                                   "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}


def _check(w, dense, rows, dtype, device, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    n, k = dense.shape
    x = torch.randn(rows, k, generator=g).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    with poisoned_allocations():  # an output element left unwritten is NaN
        got = w.to(device).linear(x, b)
    torch.testing.assert_close(got, gguf_linear_ref(x, w.to(device), b), **TOL[dtype])
    ref = x.float() @ dense.to(device).to(dtype).float().t() + (0 if b is None else b.float())
    torch.testing.assert_close(got, ref.to(dtype), **TOL[dtype])  # against the file's own values
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 8, 17, 64])
@pytest.mark.parametrize("qtype", QTYPES)
def test_kernel_matches_reference_random_blocks(qtype, rows, dtype, device):
    """N = 96 + 32 + 32 (not a multiple of BLOCK_N), K = 512 (two super-blocks, a split-K for <= 8 rows)."""
    w, dense = weight(random_blocks(qtype, 160, 512, seed=rows), qtype)
    _check(w, dense, rows, dtype, device, seed=rows)


@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("qtype", DEMO_TYPES)
def test_kernel_matches_reference_real_blocks(qtype, rows, demo_tensors, device):
    """Real blocks of the demo model; K = 768 is three K tiles of 256 for 17 rows, a tail for BLOCK_K 128 splits."""
    w, dense = weight(real_blocks(demo_tensors, qtype, 72, 768), qtype)
    _check(w, dense, rows, torch.bfloat16, device, seed=rows)
    _check(w, dense, rows, torch.float32, device, seed=rows, bias=False)


@pytest.mark.parametrize("split", [1, 3, 5])
@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_split_k_uneven_and_gpu_fp32_tiles(qtype, split, device):
    """The GPU's fp32 tile (16 x 32 x 32: a 32-row tile inside a 256-row super-block, Q6_K's 16-row scales two per
    tile) with explicit split counts: 16 K tiles in 3 splits of 6, 6, 4 and 5 of 4, 4, 4, 4."""
    w, dense = weight(random_blocks(qtype, 40, 512, seed=split), qtype)
    x = torch.randn(4, 512).to(device)
    cfg = QuantConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=split, num_warps=4, num_stages=2)
    with poisoned_allocations():
        got = gguf_linear(x, w.to(device), None, config=cfg)
    torch.testing.assert_close(got, x @ dense.to(device).t(), **TOL[torch.float32])


def test_fused_parts_of_different_types(demo_tensors, device):
    """q, k Q5_0 and v Q8_0 (as the demo's layer 0): q and k fuse into one launch, v its own, into one output."""
    parts = [weight(real_blocks(demo_tensors, q, n, 256, skip=s), q)
             for q, n, s in (("Q5_0", 64, 0), ("Q5_0", 32, 100), ("Q8_0", 32, 0))]
    fused = fuse_gguf([w for w, _ in parts])
    assert isinstance(fused, FusedGGUFWeight) and [p.qtype for p in fused.parts] == ["Q5_0", "Q8_0"]
    assert [p.out_features for p in fused.parts] == [96, 32]
    dense = torch.cat([d for _, d in parts])
    assert torch.equal(torch.cat([dequantize(p) for p in fused.parts]), dense)
    _check(fused, dense, 5, torch.float32, device, seed=0)
    _check(fused, dense, 20, torch.bfloat16, device, seed=1)
    one = fuse_gguf([w for w, _ in parts[:2]])
    assert isinstance(one, GGUFWeight) and one.out_features == 96


def test_a_wrong_scale_is_caught(device):
    """The comparison can fail: one Q4_K sub-block scale off by one, or Q6_K's sub-block scales read shifted by one
    sub-block, move outputs past the float32 tolerance the real checks use (seeded input: the size of a one-scale
    error follows x and that block's d, and an unseeded x once left it at 29 x TOL, under a 100 x TOL bound)."""
    from dataclasses import replace

    w, dense = weight(random_blocks("Q4_K", 32, 256, seed=5), "Q4_K")
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(0))
    ref = x @ dense.t()
    sub = w.sub.clone()
    sub[3, 7] += 1
    got = gguf_linear(x.to(device), replace(w, sub=sub).to(device)).cpu()
    assert not torch.allclose(got, ref, **TOL[torch.float32])
    w6, dense6 = weight(random_blocks("Q6_K", 32, 256, seed=6), "Q6_K")
    got = gguf_linear(x.to(device), replace(w6, sub=w6.sub.roll(1, 0)).to(device)).cpu()
    assert not torch.allclose(got, x @ dense6.t(), **TOL[torch.float32])


def test_bad_inputs(device):
    w, _ = weight(random_blocks("Q8_0", 16, 256, seed=0), "Q8_0")
    w = w.to(device)
    with pytest.raises(ValueError, match="Q8_0 weight has in_features 256"):
        gguf_linear(torch.randn(2, 128, device=device), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        gguf_linear(torch.randn(2, 256, device=device), w, torch.randn(3, device=device))
    with pytest.raises(ValueError, match="unit stride"):
        gguf_linear(torch.randn(256, 2, device=device).t(), w)
    with pytest.raises(ValueError, match="multiple of 32"):
        gguf_linear(torch.randn(2, 256, device=device), w, config=QuantConfig(16, 32, 16, 1, 4, 2))
    with pytest.raises(ValueError, match="GGUF type Q3_K has no block unpacker"):
        unpack_blocks(np.zeros((4, 110), dtype=np.uint8), "Q3_K")
    with pytest.raises(ValueError, match="no GGUF kernel layout for type Q3_K"):
        pack_gguf_weight("Q3_K", torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 1).half())
    with pytest.raises(ValueError, match="whole 144-byte blocks"):
        unpack_blocks(np.zeros((4, 100), dtype=np.uint8), "Q4_K")
    # a slice of the input dim must carry a scale for every value (model/gguf_quant.py rank_fields)
    with pytest.raises(ValueError, match="sub has 1 columns for 48 values"):
        pack_gguf_weight("Q8_0", torch.zeros(4, 48, dtype=torch.uint8), torch.ones(4, 1).half())
    f = unpack_blocks(random_blocks("Q4_K", 4, 512, seed=0), "Q4_K")
    with pytest.raises(ValueError, match="sup has 2 columns for 320 values \\(k_offset 224\\), expected 3"):
        pack_gguf_weight("Q4_K", f.codes[:, :320], f.sub[:, :10], f.sub_min[:, :10], f.sup, f.sup_min, k_offset=224)
    parts = [pack_gguf_weight("Q4_K", f.codes[:, 32:288], f.sub[:, 1:9], f.sub_min[:, 1:9], f.sup, f.sup_min,
                              k_offset=o) for o in (32, 32)]
    fuse_gguf(parts)
    with pytest.raises(ValueError, match="same input column"):
        fuse_gguf([parts[0], pack_gguf_weight("Q4_K", f.codes[:, :256], f.sub[:, :8], f.sub_min[:, :8], f.sup[:, :1],
                                              f.sup_min[:, :1])])
