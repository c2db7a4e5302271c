"""What crosses the boundary of the engine core, both ways: immutable, token ids only, never text.

request -> ``EngineRequest`` (input_processor.py) -> EngineCore.add_request; EngineCore.step() ->
``EngineCoreOutput`` per request that advanced -> output_processor.py (text, stop strings, RequestOutputs).
"""
from __future__ import annotations

from dataclasses import dataclass

from qwen2_triton.runtime.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams  # resolved (checkpoint defaults filled) and validated
    seed: int  # 32-bit seed of the sampler's noise: the request's seed or a random one
    arrival_time: float  # time.monotonic() when the frontend received it
    # "plain" | "yarn": the RoPE table this request runs with from its first token to its last (runtime/rope_mode.py,
    # chosen at admission); its keys are rotated with it, so it belongs to the prefix-cache key too. None: the
    # engine core applies its rope_scaling setting itself.
    rope_mode: str | None = None
    # Prefix caching: requests share cached KV blocks only when their cache_salt is equal too (vLLM's name; a tenant
    # id keeps tenants from timing each other's prompts). The core adds what else changes K/V (the rope mode).
    cache_salt: str = ""


@dataclass(frozen=True)
class EngineCoreOutput:
    """What one step added to one request."""
    request_id: str
    new_token_ids: tuple[int, ...] = ()
    new_logprobs: tuple[dict[int, float], ...] | None = None  # one per new token, when the request asked
    new_prompt_logprobs: tuple[dict[int, float], ...] | None = None  # prompt positions scored in this step
    finish_reason: str | None = None  # "stop" | "length" | "abort", once, on the request's last output
    stop_reason: int | None = None  # the eos / stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
