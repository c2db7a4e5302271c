"""Which RoPE a request runs with: the engine's ``rope_scaling`` setting applied to one request at admission.

Qwen2-7B-Instruct and Qwen2.5 ship YaRN (``rope_scaling {"type": "yarn", "factor": 4.0,
"original_max_position_embeddings": 32768}``), and their model cards warn that static YaRN "may impact
performance on shorter texts". Settings (EngineConfig.rope_scaling):
    "auto"   (default) per request: prompt + max_tokens within the original context -> plain RoPE (the checkpoint
             as if it had no rope_scaling); longer -> the checkpoint's YaRN (frequencies and attention factor);
    "static" the config as written for every request (what HF transformers and vLLM do);
    "none"   plain RoPE for every request; the context is then the original one.
A checkpoint without rope_scaling runs plain RoPE in every setting.

The mode is fixed for a request's whole life, preemption and recompute included: its cached keys were rotated
with one table (vLLM bug 27414 came from switching a running sequence's table). Mode names are the table names of
model/qwen2.py: "plain", and the scaling type ("yarn").
"""
from __future__ import annotations

from dataclasses import dataclass

ROPE_SCALING_CHOICES = ("auto", "static", "none")


@dataclass(frozen=True)
class RopePolicy:
    setting: str  # one of ROPE_SCALING_CHOICES
    scaled_mode: str | None  # the checkpoint's scaling type ("yarn"), None without rope_scaling
    plain_len: int  # context of plain RoPE: original_max_position_embeddings under YaRN

    @classmethod
    def of(cls, setting: str, cfg) -> "RopePolicy":
        """For a model/config.py Qwen2Config."""
        if setting not in ROPE_SCALING_CHOICES:
            raise ValueError(f"rope_scaling must be one of {ROPE_SCALING_CHOICES}, got {setting!r}")
        return cls(setting, cfg.rope.type if cfg.rope.scaled else None, cfg.plain_max_model_len)

    def max_model_len(self, model_len: int) -> int:
        """The engine's context under this setting: "none" keeps plain RoPE's."""
        if self.setting == "none" and self.scaled_mode is not None:
            return min(model_len, self.plain_len)
        return model_len

    def mode_for(self, total_tokens: int) -> str:
        """The mode of a request that may hold ``total_tokens`` tokens (prompt + max_tokens)."""
        if self.scaled_mode is None or self.setting == "none":
            return "plain"
        if self.setting == "static" or total_tokens > self.plain_len:
            return self.scaled_mode
        return "plain"

    def describe(self) -> str:
        if self.scaled_mode is None:
            return f"rope_scaling={self.setting}: the checkpoint has none, plain RoPE for every request"
        what = {"auto": f"plain RoPE when prompt + max_tokens <= {self.plain_len} (the original context), "
                        f"{self.scaled_mode} beyond, decided per request",
                "static": f"{self.scaled_mode} for every request (the config as written, as HF and vLLM)",
                "none": f"plain RoPE for every request, context {self.plain_len} (the original)"}[self.setting]
        return f"rope_scaling={self.setting}: {what}"
