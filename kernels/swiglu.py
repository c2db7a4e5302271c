"""SwiGLU on the fused gate_up projection: out = silu(gate) * up, with gate_up = [gate | up] on the last dim.

The math runs in float32 and is rounded once to the activation dtype.
"""
from __future__ import annotations

import torch


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference. gate_up: (T, 2*I) -> (T, I)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel: grid (T, cdiv(I, BLOCK)); each program reads a BLOCK of gate and the matching BLOCK of up and
# writes BLOCK outputs: one pass, 3 x T x I elements moved.
# ---------------------------------------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qwen2_triton.kernels._checks import check, check_tensor  # noqa: E402
from qwen2_triton.kernels.launch import swiglu_config  # noqa: E402


@triton.jit
def swiglu_kernel(gu_ptr, out_ptr, stride_gu, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: 16k tokens x 2 x 18944 columns is past 2^29; keep headroom
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols  # odd I (4864, 8960, 18944, test primes) end mid-block
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton SwiGLU. gate_up: (T, 2I) with unit last stride -> (T, I) contiguous, same dtype."""
    op = "swiglu (kernels/swiglu.py)"
    check_tensor(op, "gate_up", gate_up, ndim=2)
    n_rows, two_i = gate_up.shape
    check(two_i % 2 == 0, op, f"gate_up last dim must be even (gate | up), got shape {tuple(gate_up.shape)}")
    n_cols = two_i // 2
    out = torch.empty((n_rows, n_cols), dtype=gate_up.dtype, device=gate_up.device)
    if n_rows > 0 and n_cols > 0:
        cfg = swiglu_config(n_cols)
        grid = (n_rows, triton.cdiv(n_cols, cfg.BLOCK))
        swiglu_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), n_cols,
                            BLOCK=cfg.BLOCK, num_warps=cfg.num_warps)
    return out
