"""Triton RMSNorm (+ residual) against the plain-torch reference (kernels/rmsnorm.py), fp32 and bf16."""
import pytest
import torch

from qwen2_triton.kernels.rmsnorm import rms_norm, rms_norm_ref
from qwen2_triton.kernels.testing import poisoned_allocations

# bf16: the reference rounds twice (normalised value, then times weight); a 1e-7 difference in the fp32
# normalisation can move either rounding by one ulp, so allow 2 ulp relative (2^-6), nothing absolute-sized.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=2 ** -6)}
SHAPES = [(1, 896), (13, 123), (7, 73), (3, 1536), (2, 3584), (5, 13)]


def _inputs(shape, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
    residual = torch.randn(shape, generator=g).to(dtype).to(device)
    weight = (1 + 0.5 * torch.randn(shape[1], generator=g)).to(dtype).to(device)
    return x, residual, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(shape, dtype, with_residual, device):
    x, residual, weight = _inputs(shape, dtype, seed=shape[0] * 1000 + shape[1], device=device)
    if not with_residual:
        residual = None
    with poisoned_allocations():
        got = rms_norm(x, weight, 1e-6, residual)
    want = rms_norm_ref(x, weight, 1e-6, residual)
    if with_residual:
        (got, got_res), (want, want_res) = got, want
        assert torch.equal(got_res, want_res)  # one rounding of an exact fp32 sum: bitwise equal
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **TOL[dtype])
    if dtype == torch.bfloat16:
        # A wrong cast order (weight times unrounded h, or normalising the unrounded residual sum) stays within
        # 2 ulp but changes ~25% of the elements; the right one leaves only rare rsqrt/sum-order ties (0 here).
        assert (got != want).float().mean().item() <= 0.01


def test_rms_norm_strided_rows_and_fp32_weight(device):
    """Rows of a wider buffer (row stride != H) and an fp32 weight on bf16 activations (output promotes)."""
    g = torch.Generator().manual_seed(7)
    buf = torch.randn(9, 200, generator=g).to(torch.bfloat16).to(device)
    x, residual = buf[:, :123], buf[:, 50:173]
    weight = torch.randn(123, generator=g).to(device)
    with poisoned_allocations():
        out, new_res = rms_norm(x, weight, 1e-6, residual)
    want, want_res = rms_norm_ref(x, weight, 1e-6, residual)
    assert out.dtype == torch.float32 and torch.equal(new_res, want_res)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)  # fp32 result of a bf16-rounded h


def test_rms_norm_bad_inputs(device):
    x = torch.randn(4, 64, device=device)
    w = torch.randn(64, device=device)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.randn(63, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual must have shape"):
        rms_norm(x, w, 1e-6, torch.randn(4, 32, device=device))
    with pytest.raises(ValueError, match="residual dtype"):
        rms_norm(x, w, 1e-6, torch.randn(4, 64, device=device).to(torch.bfloat16))
    with pytest.raises(ValueError, match="dtype must be one of"):
        rms_norm(x.to(torch.int32), w, 1e-6)
    with pytest.raises(ValueError, match="2-D"):
        rms_norm(x[None], w, 1e-6)
    with pytest.raises(ValueError, match="unit stride"):
        rms_norm(torch.randn(64, 4, device=device).t(), w, 1e-6)
