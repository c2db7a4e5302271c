"""Triton SwiGLU against the plain-torch reference (kernels/swiglu.py)."""
import pytest
import torch

from qwen2_triton.kernels.swiglu import swiglu, swiglu_ref
from qwen2_triton.kernels.testing import poisoned_allocations

# bf16: one rounding of an fp32 value within ~1e-7 relative of the reference's: <= 1 ulp (2^-7 relative).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=2 ** -7)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_tokens,inter", [(1, 4864), (3, 8960), (2, 18944), (13, 123), (7, 73), (5, 13),
                                            (1, 1)])
def test_swiglu_matches_reference(n_tokens, inter, dtype, device):
    g = torch.Generator().manual_seed(n_tokens * 100_003 + inter)
    gate_up = (torch.randn(n_tokens, 2 * inter, generator=g) * 4).to(dtype).to(device)
    with poisoned_allocations():
        got = swiglu(gate_up)
    torch.testing.assert_close(got, swiglu_ref(gate_up), **TOL[dtype])


def test_swiglu_strided_rows(device):
    """gate_up rows inside a wider buffer (row stride 300 != 2I)."""
    buf = torch.randn(11, 300, device=device).to(torch.bfloat16)
    gate_up = buf[:, 10:156]
    with poisoned_allocations():
        got = swiglu(gate_up)
    torch.testing.assert_close(got, swiglu_ref(gate_up), **TOL[torch.bfloat16])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp(1e4) = inf
def test_swiglu_extreme_values(device):
    """Large |gate|: silu saturates to gate (positive) or -0 (negative) without NaN from exp overflow."""
    gate = torch.tensor([[-1e4, -100.0, 0.0, 100.0, 3e4]], device=device)
    gate_up = torch.cat([gate, torch.full_like(gate, 2.0)], dim=1)
    got = swiglu(gate_up)
    assert not got.isnan().any()
    torch.testing.assert_close(got, swiglu_ref(gate_up), **TOL[torch.float32])


def test_swiglu_bad_inputs(device):
    with pytest.raises(ValueError, match="must be even"):
        swiglu(torch.randn(3, 7, device=device))
    with pytest.raises(ValueError, match="2-D"):
        swiglu(torch.randn(8, device=device))
    with pytest.raises(ValueError, match="dtype must be one of"):
        swiglu(torch.ones(3, 8, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="unit stride"):
        swiglu(torch.randn(8, 3, device=device).t())
