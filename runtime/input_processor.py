"""Prompt + SamplingParams -> EngineRequests: tokenizing, checkpoint defaults, validation, seeds, n > 1.

The one place for the request-level rules: unset sampling fields take generation_config's values; an unset
max_tokens takes the checkpoint's max_new_tokens, else the frontend's fallback (16 offline, as vLLM; the rest of
the context for the server and chat), never more than the context left; a prompt + max_tokens that cannot fit
the context or the KV pool is refused with the lengths named. A request with n completions becomes n engine
requests with ids ``{request_id}`` (completion 0) and ``{request_id}#{i}``; completion 0 of a seeded request
draws exactly the tokens the same request with n=1 draws. Each request's rope mode is chosen here, from prompt +
max_tokens (runtime/rope_mode.py): with rope_scaling="auto", "the rest of the context" as an unset max_tokens
means the rest of plain RoPE's context for a prompt that fits it, so a default does not push it into YaRN.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace

from qwen2_triton.runtime.request import EngineRequest
from qwen2_triton.runtime.rope_mode import RopePolicy
from qwen2_triton.runtime.sampling_params import NEUTRAL, SamplingParams
from qwen2_triton.runtime.structured_output import check_structured_output

REST_OF_CONTEXT = None  # a max_tokens fallback: as many tokens as the context and the KV pool leave


@dataclass(frozen=True)
class ProcessedPrompt:
    request_id: str
    prompt: str | None  # the text, when the prompt was given as text
    prompt_ids: tuple[int, ...]
    engine_requests: list[EngineRequest]  # one per completion (n)


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, capacity_tokens: int,
                 generation_defaults: dict, default_max_tokens: int | None = NEUTRAL["max_tokens"],
                 rope: RopePolicy | None = None):
        """rope: the engine's RopePolicy (EngineCore.rope); None leaves each request's mode to the core."""
        self.tokenizer = tokenizer
        self.rope = rope
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.capacity_tokens = capacity_tokens
        self.generation_defaults = generation_defaults
        self.default_max_tokens = default_max_tokens

    def room_after(self, num_prompt_tokens: int) -> int:
        """Most tokens a prompt of this length can still generate: within the context and the KV pool."""
        return min(self.max_model_len, self.capacity_tokens) - num_prompt_tokens

    def resolve_max_tokens(self, num_prompt_tokens: int, fallback: int | None) -> int:
        """An unset max_tokens: the checkpoint's max_new_tokens, else ``fallback`` (REST_OF_CONTEXT = None), at
        most the room left and at least 1 (a prompt with no room left is refused by ``process``)."""
        room = self.room_after(num_prompt_tokens)
        rest = room
        if self.rope is not None and self.rope.mode_for(num_prompt_tokens + 1) == "plain":
            rest = min(room, self.rope.plain_len - num_prompt_tokens)  # "auto": stay within plain RoPE
        want = self.generation_defaults.get("max_tokens") or fallback or rest
        return max(1, min(want, room))

    def process(self, prompt, params: SamplingParams, request_id: str, index: int = 0,
                arrival_time: float = 0.0) -> ProcessedPrompt:
        """``index`` names the prompt in error messages (its position in a batch)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params[{index}] is a {type(params).__name__}, not SamplingParams")
        ids, text = self.prompt_ids(prompt, index)
        unset_max = params.max_tokens is None
        sp = params.resolved(self.generation_defaults)
        if unset_max:
            sp = replace(sp, max_tokens=self.resolve_max_tokens(len(ids), self.default_max_tokens))
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(sp, name) or 0) > self.vocab_size:
                raise ValueError(f"SamplingParams.{name}={getattr(sp, name)} exceeds the vocabulary "
                                 f"({self.vocab_size})")
        if sp.structured_output is not None:  # a schema xgrammar cannot use fails here, before anything is queued
            check_structured_output(sp.structured_output)
        total = len(ids) + sp.max_tokens
        if total > self.max_model_len:
            why = ""
            if self.rope is not None and self.rope.setting == "none" and self.rope.scaled_mode is not None:
                why = (f" (rope_scaling='none' keeps the original context of {self.rope.plain_len} tokens; "
                       f"'auto' or 'static' extends it with {self.rope.scaled_mode})")
            raise ValueError(f"prompt {index}: {len(ids)} prompt tokens + max_tokens {sp.max_tokens} = {total} "
                             f"exceeds the model's context of {self.max_model_len} tokens{why}")
        if total > self.capacity_tokens:
            raise ValueError(f"prompt {index}: {total} tokens can never fit the KV cache of "
                             f"{self.capacity_tokens} tokens; raise kv_cache_tokens")
        rope_mode = self.rope.mode_for(total) if self.rope is not None else None  # n completions share it
        reqs = []
        for i in range(sp.n):
            child = sp if i == 0 else replace(sp, prompt_logprobs=None)  # the prompt is scored once
            if sp.seed is None:
                seed = random.getrandbits(32)
            else:
                seed = seed32(sp.seed) if i == 0 else seed32(f"{sp.seed}#{i}")
            reqs.append(EngineRequest(request_id if i == 0 else f"{request_id}#{i}", tuple(ids), child, seed,
                                      arrival_time, rope_mode=rope_mode))
        return ProcessedPrompt(request_id, text, tuple(ids), reqs)

    def prompt_ids(self, prompt, i: int) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            ids, text = self.tokenizer.encode(prompt), prompt
            if not ids:
                raise ValueError(f"prompt {i} encodes to no tokens")
        else:
            if isinstance(prompt, (list, tuple)) and len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty")
            if not is_token_ids(prompt):
                raise ValueError(f"prompt {i} must be a string or a list of int token ids, "
                                 f"got {type(prompt).__name__}")
            ids, text = [int(t) for t in prompt], None
        vocab = self.vocab_size  # also for text: a tokenizer larger than the embedding is caught here
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i}: token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
        return ids, text


def seed32(seed) -> int:
    """Any Python int (or str) to 32 bits, distinct seeds (negative and > 2^64 too) landing apart: a hash, not a
    mask."""
    return int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=4).digest(), "little")


def is_token_ids(x) -> bool:
    return isinstance(x, Seq) and not isinstance(x, str) and len(x) > 0 and all(
        isinstance(t, int) and not isinstance(t, bool) for t in x)
