"""Which kernels, dtype and launch settings run on this device: decided once at start-up, with the reasons.

    info = DeviceInfo.of(device)                       # name, compute capability, SMs, shared memory
    dtype, why_dtype = choose_dtype("auto", info)
    kernels, why_kernels = choose_kernels("auto", info)
    plan = plan_kernels(info, dtype, kernels, shape, tune=True)   # times attention tiles on a GPU
    ops.use_plan(plan)                                 # before the KV pool is sized and graphs are captured

The rules, one function each:
- kernels (``choose_kernels``): the Triton kernels on CUDA from sm_80, Triton's floor for NVIDIA GPUs; plain
  torch below it and on CPU (kernels="triton" on CPU runs the Triton interpreter, for tests).
- dtype (``choose_dtype``): bfloat16, the checkpoints' own dtype, where the GPU has it natively (sm_80+), else
  float16 (every kernel accumulates in float32); float32 on CPU.
- attention tiles (``plan_kernels``): the candidates kernels/launch.py offers for the capability (its shared
  memory per block: 99 KB on sm_86/89, 163 KB on sm_80, 227 KB on sm_90; on sm_90 only tiles with 64 query
  rows per warpgroup, as wgmma needs) and head_dim, timed once and cached on disk by runtime/tuning.py, or the
  heuristic first candidate when tuning is off or there is no GPU.
- decode split-KV count: the most splits per sequence (the grid) from the SM count at every launch
  (kernels/launch.py ``num_kv_splits``); each sequence's own count from its length, on the device, so a
  captured decode graph splits a short context less than a long one.
- quantized linears (GPTQ / AWQ / GGUF projections kept packed): per distinct weight shape, a decode (M=1) and a
  prefill (M=256) launch config from kernels/quant_linear.py ``quant_candidates``, timed and cached the same way
  by runtime/quant_tuning.py, or its heuristic ``quant_config``.
- row kernels (RMSNorm, SwiGLU, rotary, store_kv): one setting per shape (kernels/launch.py), not tuned.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from qwen2_triton.kernels import launch
from qwen2_triton.kernels.launch import AttnConfig
from qwen2_triton.runtime.tuning import TuneResult, TuningCache, attention_timers, config_label, shape_bucket, \
    tune, tuning_key

KERNEL_CHOICES = ("auto", "triton", "torch")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "half": torch.float16,
          "float": torch.float32}
# What `qwen2-triton env --arch sm_XX` assumes without such a GPU at hand: a common part of each capability.
ASSUMED = {80: ("NVIDIA A100-SXM4-80GB", 108, 80), 86: ("NVIDIA A10", 72, 24), 89: ("NVIDIA L4", 58, 24),
           90: ("NVIDIA H100 80GB HBM3", 132, 80)}


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "cuda" | "cpu"
    name: str
    capability: int | None = None  # 90 for sm_90
    sm_count: int | None = None
    shared_bytes: int | None = None  # dynamic shared memory a block may opt in to
    memory_bytes: int | None = None
    assumed: bool = False  # made up from an arch name (env --arch), not read off a device

    @classmethod
    def of(cls, device: torch.device) -> DeviceInfo:
        if device.type != "cuda":
            import platform

            return cls("cpu", f"CPU ({platform.machine()})")
        p = torch.cuda.get_device_properties(device)
        cap = p.major * 10 + p.minor
        shared = getattr(p, "shared_memory_per_block_optin", None) or launch.max_shared_bytes(cap)
        return cls("cuda", p.name, cap, p.multi_processor_count, shared, p.total_memory)

    @classmethod
    def assume(cls, arch: str) -> DeviceInfo:
        cap = int(arch.lower().removeprefix("sm_"))
        name, sms, gib = ASSUMED.get(cap, (f"an sm_{cap} GPU", 100, 16))
        return cls("cuda", name, cap, sms, launch.max_shared_bytes(cap), gib * 2 ** 30, assumed=True)

    @property
    def arch(self) -> str:
        return f"sm_{self.capability}" if self.capability is not None else "cpu"

    def describe(self) -> str:
        if self.type == "cpu":
            return f"device: {self.name}, no CUDA device"
        return (f"device: {self.name}{' (assumed)' if self.assumed else ''}, {self.arch}, {self.sm_count} SMs, "
                f"{self.shared_bytes // 1024} KB shared memory per block, {self.memory_bytes / 2 ** 30:.0f} GiB")


def choose_kernels(requested: str, info: DeviceInfo) -> tuple[str, str]:
    """("triton" | "torch", why)."""
    if requested not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {requested!r}")
    if info.type == "cpu":
        if requested == "triton":
            if os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("kernels='triton' on CPU runs through the Triton interpreter: set "
                                 "TRITON_INTERPRET=1 before qwen2_triton is imported (tests/conftest.py does), or "
                                 "use kernels='torch'")
            return "triton", "kernels=triton on CPU: the Triton interpreter (numpy; for tests, slow)"
        return "torch", ("kernels=torch: " + ("asked for" if requested == "torch" else
                         "no CUDA device, so the plain-torch backend (float32 matmuls through OpenBLAS)"))
    below = info.capability < launch.MIN_CAPABILITY
    if requested == "triton" and below:
        raise ValueError(f"kernels='triton' needs compute capability sm_{launch.MIN_CAPABILITY} or newer (Triton's "
                         f"floor for NVIDIA GPUs); {info.name} is {info.arch}: use kernels='torch'")
    if requested == "torch":
        return "torch", "kernels=torch: asked for (the plain-torch references; no CUDA graphs)"
    if below:
        return "torch", (f"kernels=torch: {info.arch} is below Triton's sm_{launch.MIN_CAPABILITY} floor, so the "
                         "plain-torch references run (no CUDA graphs)")
    return "triton", f"kernels=triton: {info.arch} >= sm_{launch.MIN_CAPABILITY}" + (
        "" if requested == "auto" else " (asked for)")


def choose_dtype(requested, info: DeviceInfo) -> tuple[torch.dtype, str]:
    """(dtype, why) for the weights, activations and KV cache."""
    if isinstance(requested, torch.dtype):
        if requested not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"unsupported dtype {requested}; use bfloat16, float16 or float32")
        dtype, why = requested, "asked for"
    elif requested == "auto":
        if info.type == "cpu":
            return torch.float32, "dtype float32: CPU (bf16 matmuls are slow there)"
        if info.capability >= 80:
            return torch.bfloat16, f"dtype bfloat16: {info.arch} has native bf16, the checkpoints' own dtype"
        return torch.float16, (f"dtype float16: {info.arch} has no native bf16 (sm_80+); the kernels accumulate in "
                               "float32")
    elif requested in DTYPES:
        dtype, why = DTYPES[requested], "asked for"
    else:
        raise ValueError(f"unknown dtype {requested!r}; use 'bfloat16', 'float16', 'float32' or 'auto'")
    if dtype == torch.bfloat16 and info.type == "cuda" and info.capability < 80:
        raise ValueError(f"dtype bfloat16 needs sm_80 or newer; {info.name} is {info.arch}: use dtype='float16'")
    return dtype, f"dtype {str(dtype).replace('torch.', '')}: {why}"


@dataclass(frozen=True)
class AttentionShape:
    n_q_heads: int
    n_kv_heads: int
    head_dim: int
    block_size: int  # KV cache page

    @classmethod
    def of(cls, cfg, block_size: int) -> AttentionShape:
        return cls(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, block_size)


@dataclass
class KernelPlan:
    device: DeviceInfo
    dtype: torch.dtype
    kernels: str  # "triton" | "torch"
    reasons: list[str]
    prefill: TuneResult | None = None  # attention tiles; None with the torch backend
    decode: TuneResult | None = None
    candidates: dict[str, list[AttnConfig]] | None = None  # per kernel, what could be (or was) timed
    # quantized linears (runtime/quant_tuning.py), keyed by (QuantShape, "decode" | "small" | "prefill")
    quant: dict[tuple, TuneResult] = field(default_factory=dict)
    quant_candidates: dict[tuple, list] = field(default_factory=dict)

    def describe(self) -> list[str]:
        lines = [self.device.describe(), *self.reasons]
        for name in ("prefill", "decode"):
            r = getattr(self, name)
            if r is not None:
                lines.append(f"{name} attention tiles {config_label(r.config)} "
                             f"(BLOCK_M x BLOCK_N, warps, stages): {r.source}, {r.detail}")
        if self.quant:
            from qwen2_triton.runtime.quant_tuning import describe

            lines.append("quantized linear launches (BLOCK_M x BLOCK_N x BLOCK_K / SPLIT_K, warps, stages):")
            lines += [f"  {line}" for line in describe(self.quant, self.quant_candidates)]
        return lines

    def quant_configs(self) -> dict[tuple, object]:
        """(QuantShape, launch shape) -> the chosen QuantConfig, where it is not the heuristic's: what the launches
        receive (runtime/triton_backend.py); the heuristic ones are left to the launchers, as without a plan."""
        return {key: r.config for key, r in self.quant.items() if r.config != self.quant_candidates[key][0]}


def plan_kernels(info: DeviceInfo, dtype: torch.dtype, kernels: str, shape: AttentionShape, *, tune_now: bool,
                 reasons: list[str] = (), cache: TuningCache | None = None, timers: dict | None = None,
                 device: torch.device | None = None, quant: dict | None = None,
                 quant_timers: dict | None = None) -> KernelPlan:
    """The plan for one model. With ``tune_now`` on a GPU the attention candidates are timed (``timers``: per
    kernel, config -> ms; default runtime/tuning.py ``attention_timers`` on random data of ``shape``), unless the
    cache at ``cache`` (default ~/.cache/qwen2_triton/tuning.json) already holds this GPU's choice. ``quant``:
    the model's quantized shapes (runtime/quant_tuning.py ``quant_shapes``), planned the same way
    (``quant_timers``: per (shape, launch shape), config -> ms)."""
    plan = KernelPlan(info, dtype, kernels, list(reasons))
    if kernels != "triton":
        return plan
    if quant:
        from qwen2_triton.runtime.quant_tuning import plan_quant

        if tune_now and info.type == "cuda" and cache is None:
            cache = TuningCache()
        plan.quant, plan.quant_candidates = plan_quant(info, dtype, quant, tune_now=tune_now, cache=cache,
                                                       timers=quant_timers, device=device)
    group = shape.n_q_heads // shape.n_kv_heads
    plan.candidates = candidates = {"prefill": launch.prefill_candidates(shape.head_dim, dtype, info.capability),
                  "decode": launch.decode_candidates(shape.head_dim, dtype, group, info.capability)}
    if not tune_now or info.type != "cuda" or dtype == torch.float32:
        why = ("tuning off" if not tune_now else "no GPU to time on" if info.type != "cuda" else
               "float32 has one config") + "; kernels/launch.py heuristic"
        plan.prefill, plan.decode = (TuneResult(candidates[k][0], "default", why) for k in ("prefill", "decode"))
        return plan
    cache = cache if cache is not None else TuningCache()
    if timers is None:  # random test data only on a cache miss: a cached start allocates nothing
        built = {}

        def timer(kernel):
            def time_ms(cfg):
                if not built:
                    built.update(attention_timers(device or torch.device("cuda"), dtype, shape.n_q_heads,
                                                  shape.n_kv_heads, shape.head_dim, shape.block_size, info.sm_count))
                return built[kernel](cfg)
            return time_ms

        timers = {kernel: timer(kernel) for kernel in ("prefill", "decode")}
    for kernel, key in attention_keys(info, dtype, shape).items():
        setattr(plan, kernel, tune(key, candidates[kernel], timers[kernel], cache))
    return plan


def attention_keys(info: DeviceInfo, dtype: torch.dtype, shape: AttentionShape) -> dict[str, str]:
    """The tuning-cache keys of this GPU, Triton version and shape, per attention kernel."""
    import triton

    return {kernel: tuning_key(info.name, info.capability, triton.__version__, kernel,
                               shape_bucket(kernel, dtype, shape.n_q_heads, shape.n_kv_heads, shape.head_dim,
                                            shape.block_size))
            for kernel in ("prefill", "decode")}
