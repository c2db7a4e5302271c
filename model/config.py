"""Qwen2 / Qwen1.5 model configuration: read config.json in both layouts, validate, derive rotary settings.

Layouts seen in the wild:
- 2024 releases: top-level ``rope_theta`` and ``rope_scaling = {"type"|"rope_type": "yarn", "factor": 4.0,
  "original_max_position_embeddings": 32768}``.
- newer transformers: ``rope_parameters = {"rope_type": ..., "rope_theta": ..., ...}``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from qwen2_triton.kernels.rotary import default_inv_freq, yarn_attention_factor, yarn_inv_freq

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
SUPPORTED_MODEL_TYPE = "qwen2"  # Qwen2, Qwen2.5 and Qwen1.5 checkpoints all say "qwen2"


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # explicit value wins over 0.1*ln(factor)+1
    truncate: bool = True

    @property
    def scaled(self) -> bool:
        """config.json asks for a context extension (YaRN)."""
        return self.type != "default"

    def inv_freq_and_attention_factor(self, head_dim: int) -> tuple[torch.Tensor, float]:
        if self.type == "default":
            return default_inv_freq(head_dim, self.theta), 1.0
        inv = yarn_inv_freq(head_dim, self.theta, self.factor, self.original_max_position_embeddings,
                            self.beta_fast, self.beta_slow, self.truncate)
        af = self.attention_factor if self.attention_factor is not None else yarn_attention_factor(self.factor)
        return inv, af


@dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    eos_token_id: tuple[int, ...] = ()
    torch_dtype: str | None = None

    @property
    def max_model_len(self) -> int:
        """Usable context: with YaRN, factor x the original context (the release configs keep
        max_position_embeddings at the original 32768)."""
        if self.rope.type == "yarn" and self.rope.original_max_position_embeddings:
            return max(self.max_position_embeddings,
                       int(self.rope.factor * self.rope.original_max_position_embeddings))
        return self.max_position_embeddings

    @property
    def plain_max_model_len(self) -> int:
        """Context of plain RoPE (the checkpoint without its rope_scaling): the original context under YaRN."""
        if self.rope.scaled and self.rope.original_max_position_embeddings:
            return self.rope.original_max_position_embeddings
        return self.max_position_embeddings

    @property
    def static_rope_mode(self) -> str:
        """The rope mode HF and vLLM apply to every request: the config as written."""
        return self.rope.type if self.rope.scaled else "plain"

    def rope_tables(self) -> dict[str, tuple[torch.Tensor, float, int]]:
        """The cos/sin tables a model keeps, by rope mode: (inv_freq, attention_factor, positions).
        "plain": the checkpoint's theta without scaling, for plain_max_model_len positions; and with rope_scaling
        its type ("yarn"): scaled frequencies and attention factor, for max_model_len positions. A request runs
        under one of them from its first token to its last (runtime/rope_mode.py decides which)."""
        tables = {"plain": (*RopeConfig(theta=self.rope.theta).inv_freq_and_attention_factor(self.head_dim),
                            self.plain_max_model_len)}
        if self.rope.scaled:
            tables[self.rope.type] = (*self.rope.inv_freq_and_attention_factor(self.head_dim), self.max_model_len)
        return tables

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_file(cls, path: str) -> "Qwen2Config":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config.json not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(raw, source=path)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "Qwen2Config":
        archs = raw.get("architectures") or []
        runs = f"qwen2-triton runs {', '.join(SUPPORTED_ARCHITECTURES)} (model_type {SUPPORTED_MODEL_TYPE!r})"
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ValueError(f"{source}: unsupported architecture {archs!r}; {runs}")
        # Recent transformers may leave `architectures` out of a saved config; model_type then names the family.
        if not archs and raw.get("model_type") != SUPPORTED_MODEL_TYPE:
            raise ValueError(f"{source}: unsupported model_type {raw.get('model_type')!r} (and no 'architectures' "
                             f"field); {runs}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}")
        heads = int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        hidden = int(raw["hidden_size"])
        if hidden % heads:
            raise ValueError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        if heads % kv_heads:
            raise ValueError(f"{source}: num_attention_heads {heads} is not divisible by "
                             f"num_key_value_heads {kv_heads}")
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if raw.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported (attention is always full); "
                             f"no Qwen2 release enables it")
        eos = raw.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            rope=_parse_rope(raw, source),
            eos_token_id=eos,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )


def _parse_rope(raw: dict, source: str) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    legacy = raw.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type != "yarn":
        raise ValueError(f"{source}: unsupported rope scaling type {rope_type!r} (supported: default, yarn)")
    factor = params.get("factor")
    if factor is None or not math.isfinite(float(factor)) or float(factor) < 1:
        raise ValueError(f"{source}: YaRN needs a finite rope scaling factor >= 1, got {factor!r}")
    original = params.get("original_max_position_embeddings") or raw.get("max_position_embeddings", 32768)
    return RopeConfig(
        theta=theta, type="yarn", factor=float(factor), original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
        truncate=bool(params.get("truncate", True)),
    )
