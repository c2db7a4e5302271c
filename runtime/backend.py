"""The op interface the model graph calls, and the one place that decides which implementation runs it.

The graph (model/qwen2.py) only ever calls ``ops.<name>(...)``; an ``Ops`` object is chosen once at start-up by
``select_ops`` and never inside a step. ``TorchOps`` is the plain-torch oracle (float32-accurate, the CPU path);
``TritonOps`` (runtime/triton_backend.py) launches the kernels in kernels/.

Op contracts (T tokens, H hidden, Hq/Hk heads, D head_dim, I intermediate):
    rms_norm(x (T,H), weight (H,), eps, residual=None) -> out, or (out, x + residual) with a residual
    rotary(q (T,Hq,D), k (T,Hk,D), positions (T,), cos_sin (P,D) float32) -> (q, k)  (may work in place)
    swiglu(gate_up (T,2I)) -> (T,I)
    store_kv(k, v (T,Hk,D), k_cache, v_cache (N,block,Hk,D), slot_mapping (T,)) -> None
    attention(q (T,Hq,D), k_cache, v_cache, meta: AttentionMetadata, scale) -> (T,Hq,D)
"""
from __future__ import annotations

import torch

from qwen2_triton.kernels.attention import attention_ref, store_kv_ref
from qwen2_triton.kernels.rmsnorm import rms_norm_ref
from qwen2_triton.kernels.rotary import rotary_ref
from qwen2_triton.kernels.swiglu import swiglu_ref

KERNEL_CHOICES = ("auto", "triton", "torch")


class TorchOps:
    """Every op in plain torch, the references from kernels/ (tests import the same functions)."""

    name = "torch"

    rms_norm = staticmethod(rms_norm_ref)
    rotary = staticmethod(rotary_ref)
    swiglu = staticmethod(swiglu_ref)
    store_kv = staticmethod(store_kv_ref)
    attention = staticmethod(attention_ref)


def select_ops(kernels: str, device: torch.device):
    """auto = Triton on CUDA, torch on CPU. kernels="triton" on CPU runs through the Triton interpreter
    (TRITON_INTERPRET=1 must be set before triton is first imported): slow, for tests."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    if kernels == "auto":
        kernels = "triton" if device.type == "cuda" else "torch"
    if kernels == "torch":
        return TorchOps()
    from qwen2_triton.runtime.triton_backend import TritonOps  # imports triton only when asked for

    return TritonOps(device)
