"""kernels/interpreter_compat.py: under the CPU interpreter, bf16 casts round to nearest even and bf16 tl.dot
multiplies values, as on the GPU. (On CUDA the patch is a no-op and these checks hold natively.)"""
import torch
import triton
import triton.language as tl

import qwen2_triton.kernels  # noqa: F401  (importing the package installs the interpreter fixes)


@triton.jit
def _cast_and_dot(x_ptr, a_ptr, b_ptr, cast_ptr, dot_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(cast_ptr + i, tl.load(x_ptr + i).to(tl.bfloat16))
    r = tl.arange(0, 16)
    a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
    b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
    tl.store(dot_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b))


def test_bf16_cast_rounds_to_nearest_even_and_dot_multiplies_values(device):
    g = torch.Generator().manual_seed(0)
    # random values plus exact ties (1 + 2^-8 + k * 2^-7 lies halfway between two bf16 neighbours)
    ties = 1 + 2.0 ** -8 + torch.arange(8) * 2.0 ** -7
    x = torch.cat([torch.randn(248, generator=g) * 10, ties]).to(device)
    a = torch.randn(16, 16, generator=g).to(torch.bfloat16).to(device)
    b = torch.randn(16, 16, generator=g).to(torch.bfloat16).to(device)
    cast = torch.empty(256, dtype=torch.bfloat16, device=device)
    dot = torch.empty(16, 16, device=device)
    _cast_and_dot[(1,)](x, a, b, cast, dot, N=256)
    assert torch.equal(cast, x.to(torch.bfloat16))
    torch.testing.assert_close(dot, a.float() @ b.float(), atol=1e-5, rtol=1e-5)
