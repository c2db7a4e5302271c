"""RMSNorm, optionally fused with the residual add that precedes it in every Qwen2 block.

    r   = x + residual                      (when a residual is given; r is the new residual stream)
    out = weight * (r / sqrt(mean(r^2) + eps)).to(x.dtype)

The cast order is transformers' Qwen2RMSNorm: normalise in float32, cast to the input dtype, then multiply
by the weight. The residual sum is rounded to the activation dtype before normalising, as HF's
``hidden_states = residual + hidden_states`` does.
"""
from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None):
    """Plain-torch reference. x, residual: (T, H); weight: (H,).

    Returns ``out`` when residual is None, else ``(out, new_residual)``.
    """
    if residual is not None:
        x = x + residual
        new_residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, new_residual)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel: one program per row; the row stays in registers, so x and residual are read once and the new
# residual and the output are written once (4 row transfers with a residual, 2 without).
# ---------------------------------------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qwen2_triton.kernels._checks import check, check_shape, check_tensor  # noqa: E402
from qwen2_triton.kernels.launch import rmsnorm_config  # noqa: E402


@triton.jit
def rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
                    stride_x, stride_res, stride_out, stride_res_out, n_cols, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 for 16k tokens x 131k columns
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # HF adds in the activation dtype: the fp32 sum rounded once is exactly torch's bf16/fp16 add.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n_cols
    h = h * tl.rsqrt(var + eps)
    # Cast order of Qwen2RMSNorm: normalised value rounded to the input dtype, then times the weight. The
    # product of two bf16/fp16 values is exact in fp32, so one final rounding reproduces torch's result.
    h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Triton RMSNorm (+ residual add). Same contract and return convention as ``rms_norm_ref``.

    x, residual: (T, H) with unit last stride (any row stride); weight: (H,). Output dtype follows torch's
    promotion of weight and x, as the reference's ``weight * h.to(x.dtype)`` does.
    """
    op = "rms_norm (kernels/rmsnorm.py)"
    check_tensor(op, "x", x, ndim=2)
    n_rows, n_cols = x.shape
    check_tensor(op, "weight", weight, ndim=1, device=x.device)
    check_shape(op, "weight", weight, (n_cols,))
    if residual is not None:
        check_tensor(op, "residual", residual, ndim=2, device=x.device)
        check_shape(op, "residual", residual, (n_rows, n_cols))
        check(residual.dtype == x.dtype, op, f"residual dtype {residual.dtype} must equal x dtype {x.dtype}")
    out = torch.empty((n_rows, n_cols), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if n_rows > 0:
        cfg = rmsnorm_config(n_cols)
        has_res = residual is not None
        rms_norm_kernel[(n_rows,)](
            x, residual if has_res else x, weight, out, res_out if has_res else out,
            x.stride(0), residual.stride(0) if has_res else 0, out.stride(0), res_out.stride(0) if has_res else 0,
            n_cols, float(eps), HAS_RESIDUAL=has_res, BLOCK=cfg.BLOCK, num_warps=cfg.num_warps)
    return out if residual is None else (out, res_out)
