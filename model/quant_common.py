"""What GPTQ and AWQ have in common: config.json's ``quantization_config``, the format-independent integer form of
one quantized Linear (``IntLinear``), its dequantization (the torch path's oracle) and the shape checks."""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED = ("GPTQ bits 4|8 (format gptq or gptq_v2, any group_size dividing the dims or -1, desc_act, sym), "
             "AWQ bits 4 version gemm with zero_point")


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "gptq" | "awq"
    bits: int
    group_size: int  # -1: one group over the whole input dim
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"  # gptq: "gptq" (v1, stores zero - 1) | "gptq_v2"; awq: "gemm"

    @classmethod
    def from_dict(cls, raw: dict, source: str) -> "QuantConfig":
        bad = f"{source}: quantization_config {raw!r}"
        method = str(raw.get("quant_method", "")).lower()
        try:
            bits, group = int(raw["bits"]), int(raw.get("group_size", raw.get("q_group_size", 128)))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{bad} needs integer 'bits' and 'group_size'; supported: {SUPPORTED}") from None
        if group != -1 and group < 1:
            raise ValueError(f"{bad}: group_size must be -1 or positive, got {group}")
        if method == "gptq":
            fmt = str(raw.get("checkpoint_format") or raw.get("format") or "gptq").lower()
            if bits not in (4, 8) or fmt not in ("gptq", "gptq_v2"):
                raise ValueError(f"{bad}: unsupported GPTQ bits {bits} / format {fmt!r}; supported: {SUPPORTED}")
            if raw.get("lm_head"):
                raise ValueError(f"{bad}: a quantized lm_head is not supported; supported: {SUPPORTED}")
            if raw.get("dynamic"):
                raise ValueError(f"{bad}: per-module 'dynamic' overrides are not supported; supported: {SUPPORTED}")
            return cls("gptq", bits, group, bool(raw.get("desc_act", False)), bool(raw.get("sym", True)), fmt)
        if method == "awq":
            version = str(raw.get("version", "gemm")).lower()
            if bits != 4 or version != "gemm" or not raw.get("zero_point", True):
                raise ValueError(f"{bad}: unsupported AWQ bits {bits} / version {version!r} / zero_point "
                                 f"{raw.get('zero_point', True)}; supported: {SUPPORTED}")
            return cls("awq", 4, group, False, False, "gemm")
        raise ValueError(f"{bad}: unsupported quant_method {method!r}; supported: {SUPPORTED}")

    def describe(self) -> str:
        if self.method == "awq":
            return f"AWQ int4 group {self.group_size} (gemm, zero_point)"
        return (f"GPTQ int{self.bits} group {self.group_size} {'sym' if self.sym else 'asym'}"
                f"{' desc_act' if self.desc_act else ''} (format {self.checkpoint_format})")


@dataclass
class IntLinear:
    """One quantized Linear(in=K, out=N) in integers: W[n, k] = scales[g_idx[k], n] * (codes[k, n] - zeros[g, n])."""
    codes: torch.Tensor  # uint8 (K, N)
    zeros: torch.Tensor  # int16 (G, N), the real zero
    scales: torch.Tensor  # fp16 (G, N) as stored
    g_idx: torch.Tensor  # int64 (K,)
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """(N, K) in ``dtype``: the product in float32 (exact: |q - z| <= 256 times an fp16 scale), rounded once."""
        z = self.zeros.to(torch.float32)[self.g_idx]
        s = self.scales.to(torch.float32)[self.g_idx]
        return ((self.codes.to(torch.float32) - z) * s).t().to(dtype)


def groups_of(k: int, group_size: int, name: str, source: str) -> int:
    if group_size == -1:
        return 1
    if k % group_size:
        raise ValueError(f"{source}: {name}: group_size {group_size} does not divide in_features {k}")
    return k // group_size


def expect(t: dict[str, torch.Tensor], name: str, leaf: str, shape: tuple, dtypes: tuple, source: str,
           what: str) -> torch.Tensor:
    """Tensor ``name.leaf`` with exactly ``shape`` and one of ``dtypes``, or a ValueError that names both."""
    if leaf not in t:
        raise ValueError(f"{source}: missing tensor {name}.{leaf} ({what})")
    x = t[leaf]
    if tuple(x.shape) != tuple(shape) or x.dtype not in dtypes:
        raise ValueError(f"{source}: tensor {name}.{leaf} is {tuple(x.shape)} {x.dtype}, expected {tuple(shape)} "
                         f"{' or '.join(str(d) for d in dtypes)} ({what})")
    return x
