"""The op interface the model graph calls, and the one place that decides which implementation runs it.

The graph (model/qwen2.py) only ever calls ``ops.<name>(...)``; an ``Ops`` object is chosen once at start-up by
``select_ops`` and never inside a step. ``TorchOps`` is the plain-torch oracle (float32-accurate, the CPU path);
``TritonOps`` (runtime/triton_backend.py) launches the kernels in kernels/.

Op contracts (T tokens, H hidden, Hq/Hk heads, D head_dim, I intermediate):
    linear(x (T,in), weight (out,in), bias (out,) or None) -> (T,out)
    rms_norm(x (T,H), weight (H,), eps, residual=None) -> out, or (out, x + residual) with a residual
    rotary(q (T,Hq,D), k (T,Hk,D), rows (T,), cos_sin (P,D) float32) -> (q, k)  (may work in place);
        rows: each token's cos/sin row, its position + its rope mode's table offset (kernels/rotary.py)
    swiglu(gate_up (T,2I)) -> (T,I)
    store_kv(k, v (T,Hk,D), k_cache, v_cache (N,block,Hk,D), slot_mapping (T,)) -> None
    rotary_store_kv(q, k, v, rows, cos_sin, k_cache, v_cache, slot_mapping) -> rotated q (may be in place);
        rotary and store_kv in one: rotated k and v go to the cache only (the graph's op; kernels/rotary_store_kv.py)
    attention(q (T,Hq,D), k_cache, v_cache, meta: AttentionMetadata, scale) -> (T,Hq,D)
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from qwen2_triton.kernels.attention import attention_ref, store_kv_ref
from qwen2_triton.kernels.rmsnorm import rms_norm_ref
from qwen2_triton.kernels.rotary import rotary_ref
from qwen2_triton.kernels.rotary_store_kv import rotary_store_kv_ref
from qwen2_triton.kernels.swiglu import swiglu_ref

class TorchOps:
    """Every op in plain torch, the references from kernels/ (tests import the same functions)."""

    name = "torch"
    capturable = False  # attention_ref reads sequence lengths on the host

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T + bias. float32 on CPU goes through numpy's OpenBLAS: on the 2-core CI machine its GEMV
        streams weights at 23-24 GB/s against torch's 9-17 GB/s (24 distinct weights, so from memory), and its
        GEMM is 1.3x torch's at 16-300 rows. Zero-copy views both ways; same math, another summation order."""
        if x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32:
            out = torch.from_numpy(np.matmul(x.contiguous().numpy(), weight.numpy().T))
            return out if bias is None else out.add_(bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def step_context():
        """Run a model step with torch's own thread pool at one thread on CPU: OpenBLAS brings its own, and two
        pools spinning against each other on 2 cores cut decode from 10.7 to 3.1 tokens/s."""
        return _torch_threads(1)

    rms_norm = staticmethod(rms_norm_ref)
    rotary = staticmethod(rotary_ref)
    swiglu = staticmethod(swiglu_ref)
    store_kv = staticmethod(store_kv_ref)
    rotary_store_kv = staticmethod(rotary_store_kv_ref)
    attention = staticmethod(attention_ref)


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_ops(name: str, device: torch.device):
    """The Ops object for an already chosen kernel set, "triton" or "torch"."""
    if name == "torch":
        return TorchOps()
    from qwen2_triton.runtime.triton_backend import TritonOps

    return TritonOps(device)


def select_ops(kernels: str, device: torch.device):
    """The Ops object for ``kernels`` ("auto" | "triton" | "torch") on ``device``; the rule (Triton on CUDA from
    sm_80, torch otherwise) is runtime/kernel_plan.py ``choose_kernels``."""
    from qwen2_triton.runtime.kernel_plan import DeviceInfo, choose_kernels

    return make_ops(choose_kernels(kernels, DeviceInfo.of(device))[0], device)
