"""``TritonOps``: the op interface of runtime/backend.py implemented by the Triton kernels in kernels/.

Chosen once at start-up by ``select_ops``. Host work per call is argument checks and a launch; nothing here
syncs with the device, so decode steps stay capturable in CUDA graphs. Launch settings (BLOCK sizes, warps,
the split-KV count) come from kernels/launch.py, the single place that decides them; the SM count is read here
once, and the attention tiles come from the start-up KernelPlan (runtime/kernel_plan.py, ``use_plan``).

Note for graph capture: the decode split count is derived from meta.max_seqlen_k; a captured graph bakes in
the count chosen at capture time, which stays correct for any length (splits past a sequence's end are empty
and weigh 0 in the merge), only less balanced.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from qwen2_triton.kernels import attention as _attention
from qwen2_triton.kernels.attention import AttentionMetadata
from qwen2_triton.kernels.launch import sm_count_of
from qwen2_triton.kernels.rmsnorm import rms_norm as _rms_norm
from qwen2_triton.kernels.rotary import rotary as _rotary
from qwen2_triton.kernels.rotary_store_kv import rotary_store_kv as _rotary_store_kv
from qwen2_triton.kernels.swiglu import swiglu as _swiglu


class TritonOps:
    """Every op as a Triton kernel. On CPU this runs through the Triton interpreter (TRITON_INTERPRET=1 set
    before triton is first imported): correct but slow, for tests."""

    name = "triton"
    capturable = True  # no host syncs in any launcher: decode steps can be captured in CUDA graphs

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.sm_count = sm_count_of(self.device)  # None on CPU: kernels/launch.py then picks a small split count
        self.prefill_cfg = self.decode_cfg = None  # attention tiles: kernels/launch.py heuristics until use_plan
        self.quant_cfgs: dict = {}  # (QuantShape, launch shape) -> QuantConfig, where the plan is not the heuristic
        self._quant_seen: dict = {}  # id(weight part), launch shape -> (the part, its config): no shape work per call

    def use_plan(self, plan) -> None:
        """Take the attention tiles of a runtime/kernel_plan.py KernelPlan (tuned or heuristic). Called once at
        start-up, before any decode graph is captured: a captured graph keeps the tiles it was captured with.
        The ops object belongs to the model: two LLMs built on one in-memory LoadedModel share the last plan."""
        self.prefill_cfg = plan.prefill.config if plan.prefill else None
        self.decode_cfg = plan.decode.config if plan.decode else None
        self.quant_cfgs = plan.quant_configs()
        self._quant_seen = {}

    quantized_linear = True  # GPTQ / AWQ / GGUF projections stay packed at load (model/quantization.py)

    def linear(self, x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        """cuBLAS for a dense weight; a quantized one (kernels/quant_linear.py, kernels/gguf_linear.py) runs its
        own weight-only kernel with the plan's launch config for its shape (``_quant_config``)."""
        if isinstance(weight, torch.Tensor):
            return F.linear(x, weight, bias)
        return weight.linear(x, bias, self._quant_config if self.quant_cfgs else None)

    def _quant_config(self, part, rows: int):
        """The plan's QuantConfig for one weight (part) at ``rows`` rows, None for the launcher's heuristic."""
        from qwen2_triton.runtime.quant_tuning import launch_of, shape_of

        launch = launch_of(rows)
        seen = self._quant_seen.get((id(part), launch))
        if seen is None or seen[0] is not part:
            seen = self._quant_seen[id(part), launch] = (part, self.quant_cfgs.get((shape_of(part), launch)))
        return seen[1]

    @staticmethod
    def step_context():
        return contextlib.nullcontext()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
        return _rms_norm(x, weight, eps, residual)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, cos_sin: torch.Tensor):
        return _rotary(q, k, rows, cos_sin)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        return _swiglu(gate_up)

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        _attention.store_kv(k, v, k_cache, v_cache, slot_mapping)

    def rotary_store_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                        cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> torch.Tensor:
        return _rotary_store_kv(q, k, v, rows, cos_sin, k_cache, v_cache, slot_mapping)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float) -> torch.Tensor:
        return _attention.attention(q, k_cache, v_cache, meta, scale, sm_count=self.sm_count,
                                    prefill_cfg=self.prefill_cfg, decode_cfg=self.decode_cfg)
