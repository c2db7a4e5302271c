"""SamplingParams and RequestOutput, following vLLM's offline API.

Fields left as None are "unset": they take the checkpoint's generation_config.json value (temperature, top_p,
top_k, repetition_penalty, min_p, max_new_tokens -> max_tokens) when the LLM was built with
generation_config="auto" (the default), else the neutral value in ``NEUTRAL``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from qwen2_triton.runtime.structured_output import StructuredOutput

NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
           "max_tokens": 16}


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    temperature: float | None = None  # 0 = greedy
    top_p: float | None = None  # (0, 1]
    top_k: int | None = None  # -1 = off, else >= 1
    min_p: float | None = None  # [0, 1]
    repetition_penalty: float | None = None  # > 0; HF semantics over prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI semantics over output tokens
    frequency_penalty: float = 0.0
    stop: list[str] | str | None = None  # stop strings, excluded from the text
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None  # same seed, same tokens, whatever else is in the batch
    logprobs: int | None = None  # top-k alternatives per generated token (plus the sampled one)
    prompt_logprobs: int | None = None  # same for each prompt token (plus the prompt token itself)
    skip_special_tokens: bool = True
    n: int = 1  # completions of the prompt; completion 0 of a seeded request equals the n=1 result
    structured_output: StructuredOutput | None = None  # JSON enforced by a grammar (runtime/structured_output.py)

    def __post_init__(self):
        # Checked at construction, so a typo fails before a model is loaded or a request is queued; the fields
        # left unset (None) are checked again once resolved() has filled them.
        if isinstance(self.stop, (str, tuple)):
            self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        self.validate(allow_unset=True)

    def resolved(self, defaults: dict) -> "SamplingParams":
        """A copy with unset fields filled from ``defaults`` (generation_config) then NEUTRAL, validated."""
        values = {}
        for k, neutral in NEUTRAL.items():
            v = getattr(self, k)
            values[k] = v if v is not None else defaults.get(k, neutral)
        out = replace(self, **values)
        out.validate()
        return out

    def validate(self, allow_unset: bool = False) -> None:
        """Raise ValueError naming the first bad field. ``allow_unset``: the fields of NEUTRAL may still be None."""
        def bad(name, why):
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        def check(name, ok, why):
            if getattr(self, name) is None and allow_unset:
                return
            if getattr(self, name) is None or not ok(getattr(self, name)):
                bad(name, why)

        check("max_tokens", lambda v: _int(v) and v >= 1, "must be an integer >= 1")
        check("temperature", lambda v: _finite(v) and v >= 0, "must be a finite number >= 0 (0 = greedy)")
        check("top_p", lambda v: _finite(v) and 0 < v <= 1, "must be in (0, 1]")
        check("top_k", lambda v: _int(v) and (v >= 1 or v == -1), "must be -1 (off) or an integer >= 1")
        check("min_p", lambda v: _finite(v) and 0 <= v <= 1, "must be in [0, 1]")
        check("repetition_penalty", lambda v: _finite(v) and v > 0, "must be a finite number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _finite(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _int(v) or v < 0):
                bad(name, "must be None or an integer >= 0")
        if not _int(self.n) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.seed is not None and not _int(self.seed):
            bad("seed", "must be an integer")
        if self.stop is not None and (not isinstance(self.stop, list) or
                                      not all(isinstance(s, str) and s for s in self.stop)):
            bad("stop", "must be a non-empty string or a list of non-empty strings")
        if self.stop_token_ids is not None and (not isinstance(self.stop_token_ids, (list, tuple)) or
                                                not all(_int(t) for t in self.stop_token_ids)):
            bad("stop_token_ids", "must be a list of integers")
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            bad("structured_output", "must be None or a StructuredOutput(json_schema=...) / StructuredOutput("
                "json_object=True)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length"
    logprobs: list[dict[int, float]] | None = None
    stop_reason: int | str | None = None  # the eos/stop token id or stop string that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finished: bool = True
    rope_mode: str | None = None  # "plain" | "yarn": the RoPE the request ran with (EngineConfig.rope_scaling)

    # Shortcuts to the single completion, for users who think of one output per prompt.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self):
        return self.outputs[0].logprobs

    @property
    def stop_reason(self):
        return self.outputs[0].stop_reason


__all__ = ["SamplingParams", "RequestOutput", "CompletionOutput", "NEUTRAL", "StructuredOutput"]
