"""The offline engine users call: ``LLM(model=...).generate(prompts, SamplingParams(...))``, as in vLLM.

A thin frontend: prompts go through the InputProcessor into the EngineCore; the caller's thread steps the core
and the OutputProcessor turns its token ids into RequestOutputs. Several ``stream()`` iterators may be
interleaved: whichever advances steps the core once for every running request, and each reads its own state.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

from qwen2_triton.runtime.engine_config import EngineConfig
from qwen2_triton.runtime.engine_core import EngineCore
from qwen2_triton.runtime.input_processor import InputProcessor, is_token_ids
from qwen2_triton.runtime.output_processor import OutputProcessor, RequestState
from qwen2_triton.runtime.sampling_params import CompletionOutput, RequestOutput, SamplingParams
from qwen2_triton.runtime.step_loop import StepLoop


class LLM:
    """A Qwen2-family model ready to generate. Takes every EngineConfig setting as a keyword (runtime/engine_config.py
    documents them): model, dtype, device, kernels, generation_config, max_model_len, rope_scaling, max_num_seqs,
    max_num_batched_tokens, block_size, kv_cache_tokens, gpu_memory_utilization, enforce_eager, async_output, tune,
    tuning_cache, progress, tensor_parallel_size. ``llm.plan.describe()`` says which kernels were chosen and why.
    ``close()`` (or ``with LLM(...) as llm:``) stops the worker processes of tensor_parallel_size > 1."""

    def __init__(self, model=None, **kwargs):
        self.config = EngineConfig(model=model, **kwargs)
        self.core = EngineCore(self.config)
        self.inputs = InputProcessor(self.core.tokenizer, self.core.vocab_size, self.core.max_model_len,
                                     self.core.capacity_tokens, self.core.generation_defaults, rope=self.core.rope)
        self.outputs = OutputProcessor(self.core.tokenizer)
        self.loop = StepLoop(self.core, overlap=self.core.async_output)
        self._ids = itertools.count()

    # What the engine core knows, for callers and tests.
    model = property(lambda self: self.core.model)
    tokenizer = property(lambda self: self.core.tokenizer)
    plan = property(lambda self: self.core.plan)
    ops = property(lambda self: self.core.ops)
    device = property(lambda self: self.core.device)
    dtype = property(lambda self: self.core.dtype)
    max_model_len = property(lambda self: self.core.max_model_len)
    eos_token_ids = property(lambda self: self.core.eos_token_ids)
    generation_defaults = property(lambda self: self.core.generation_defaults)
    scheduler = property(lambda self: self.core.scheduler)
    runner = property(lambda self: self.core.runner)
    blocks = property(lambda self: self.core.blocks)

    # ----------------------------------------------------------------------------------------------- API
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of those. Results come in input order."""
        states = self._add(prompts, sampling_params)
        try:
            while not all(s.finished for s in states):
                self._step()
        finally:
            self._abort(states)
        return [s.final() for s in states]

    def chat(self, messages, sampling_params=None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None, tools=None) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of conversations,
        rendered with the checkpoint's own chat template."""
        convs = [messages] if _is_conversation(messages) else list(messages)
        if not convs or not all(_is_conversation(c) for c in convs):
            raise ValueError("chat() takes a conversation (a list of {'role': ..., 'content': ...} dicts) "
                             "or a list of conversations")
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt, tools=tools,
                                                      **(chat_template_kwargs or {})) for c in convs]
        return self.generate(prompts, sampling_params)

    def stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[CompletionOutput]:
        """Yields deltas (``.text``, ``.token_ids``, ``.index`` of the completion when n > 1) as tokens are
        produced; per completion they concatenate to what generate returns, and the last one carries
        ``finish_reason``. Text that may be the start of a stop string is held back until it is decided. Bad
        input raises here, before iteration starts. Several streams may be interleaved: each step advances every
        running request. Closing the iterator early aborts the request and frees its KV blocks."""
        (state,) = self._add([prompt], sampling_params)
        return _Stream(self._deltas(state), lambda: self._abort([state]))

    def _deltas(self, state: RequestState) -> Iterator[CompletionOutput]:
        try:
            while True:
                if not state.finished:  # another stream's step may already have finished this one
                    self._step()
                delta = state.take_delta()
                if delta is not None:
                    yield from delta.outputs
                if state.finished and delta is None:
                    return
        finally:
            self._abort([state])

    def room_after(self, num_prompt_tokens: int) -> int:
        """Most tokens a prompt of this length can still generate: within the context and the KV pool."""
        return self.inputs.room_after(num_prompt_tokens)

    def stats(self) -> dict:
        """The engine core's counters (EngineCore.stats documents them)."""
        return self.core.stats()

    def close(self) -> None:
        """Release the engine: with tensor_parallel_size > 1 its worker processes stop and the process group is
        left (so another LLM can form one). Idempotent; also run by ``with LLM(...) as llm:`` and when the LLM
        is garbage-collected. Nothing to release on one device."""
        core = self.__dict__.get("core")
        if core is not None:
            core.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    # ------------------------------------------------------------------------------------------ internals
    def _add(self, prompts, sampling_params) -> list[RequestState]:
        if isinstance(prompts, str) or is_token_ids(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        now = time.monotonic()
        # Every prompt is checked before any is queued, so a bad one leaves nothing behind.
        processed = [self.inputs.process(p, sp, str(next(self._ids)), index=i, arrival_time=now)
                     for i, (p, sp) in enumerate(zip(prompts, params))]
        states = []
        for pp in processed:
            states.append(self.outputs.add_request(pp.request_id, pp.prompt, pp.engine_requests, now))
            for er in pp.engine_requests:
                self.core.add_request(er)
        return states

    def _step(self) -> None:
        self.loop.step(self._handle)

    def _handle(self, outputs) -> list[str]:
        return self.outputs.process(outputs, time.monotonic())[1]

    def _abort(self, states: list[RequestState]) -> None:
        """Drop unfinished requests (after an error or an abandoned stream) so the LLM stays usable: their KV
        blocks are freed at once."""
        ids = [eid for s in states for eid in self.outputs.abort(s.request_id)]
        if ids:
            self.core.abort_requests(ids)


class _Stream:
    """The iterator ``LLM.stream`` returns: closing it (or dropping it) aborts the request even before the first
    ``next()``, which a bare generator would not do (its ``finally`` runs only once started)."""

    def __init__(self, gen: Iterator[CompletionOutput], abort):
        self._gen, self._abort = gen, abort

    def __iter__(self):
        return self

    def __next__(self) -> CompletionOutput:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        self._abort()

    def __del__(self):
        self.close()


def _is_conversation(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(m, dict) for m in x)
