"""From the engine core's token ids to what users read: text, stop strings, log-probs, RequestOutputs.

One ``RequestState`` per request (a prompt and its n completions). ``process`` applies a step's
EngineCoreOutputs: detokenizes incrementally, cuts the text at a stop string (the core knows nothing of text,
so a stop string found here finishes the completion and is returned as an abort for the core), and collects
log-probs. Frontends then read either the whole result (``final``) or what is new since they last looked
(``take_delta``), with text that may be the start of a stop string held back until it is decided.

Runs wherever the frontend's step loop runs: the caller's thread for the offline LLM, the engine thread for
AsyncLLM, never the asyncio event loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from qwen2_triton.model.tokenizer import IncrementalDetokenizer
from qwen2_triton.runtime.request import EngineCoreOutput, EngineRequest
from qwen2_triton.runtime.sampling_params import CompletionOutput, RequestOutput


@dataclass
class Completion:
    """One of a request's n completions (one engine request)."""
    index: int
    engine_id: str
    params: object  # SamplingParams
    detok: IncrementalDetokenizer
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_text: int = 0  # cursors of delta()
    sent_ids: int = 0
    final_sent: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output(self) -> CompletionOutput:
        return CompletionOutput(self.index, self.text, list(self.token_ids), self.finish_reason,
                                list(self.logprobs) if self.logprobs is not None else None, self.stop_reason)

    def delta(self) -> CompletionOutput | None:
        """What is new since the last delta, or None; a finished completion gives one last delta (which carries
        finish_reason) even when it adds nothing. Deltas concatenate to ``output()``."""
        if self.final_sent:
            return None
        hold = 0 if self.finished else stop_prefix_len(self.text, self.params.stop)
        text = self.text[self.sent_text: max(self.sent_text, len(self.text) - hold)]
        ids = self.token_ids[self.sent_ids:]
        if not text and not ids and not self.finished:
            return None
        lps = self.logprobs[self.sent_ids:] if self.logprobs is not None else None
        self.sent_text += len(text)
        self.sent_ids = len(self.token_ids)
        self.final_sent = self.finished
        return CompletionOutput(self.index, text, list(ids), self.finish_reason, lps, self.stop_reason)


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    completions: list[Completion]
    prompt_logprobs: list[dict[int, float] | None] | None = None
    sent_prompt_logprobs: bool = False
    metrics: dict = field(default_factory=dict)  # arrival, first_token, last_token (time.monotonic())
    rope_mode: str | None = None  # chosen at admission (runtime/rope_mode.py)

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.completions)

    def final(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, list(self.prompt_ids),
                             [c.output() for c in self.completions], self.prompt_logprobs, self.finished,
                             rope_mode=self.rope_mode)

    def take_delta(self) -> RequestOutput | None:
        """A RequestOutput holding only what is new (per completion, by its index); None if nothing is."""
        outs = [d for d in (c.delta() for c in self.completions) if d is not None]
        first = not self.sent_prompt_logprobs
        if not outs and not (first and self.prompt_logprobs is not None and self.finished):
            return None
        self.sent_prompt_logprobs = True
        # every delta of a request shares the state's one prompt list (as vLLM's streamed outputs do): a step
        # costs O(new tokens), not a copy of the prompt per request (8k-token prompts x 64 streams)
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, outs,
                             self.prompt_logprobs if first else None, self.finished, rope_mode=self.rope_mode)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self._by_engine_id: dict[str, tuple[RequestState, Completion]] = {}

    def add_request(self, request_id: str, prompt: str | None, engine_requests: list[EngineRequest],
                    arrival_time: float) -> RequestState:
        first = engine_requests[0]
        comps = []
        for i, er in enumerate(engine_requests):
            sp = er.params
            comps.append(Completion(i, er.request_id, sp, IncrementalDetokenizer(
                self.tokenizer, first.prompt_ids, skip_special_tokens=sp.skip_special_tokens),
                logprobs=[] if sp.logprobs is not None else None))
        state = RequestState(request_id, prompt, list(first.prompt_ids), comps,
                             [None] if first.params.prompt_logprobs is not None else None,
                             metrics={"arrival": arrival_time}, rope_mode=first.rope_mode)
        self.requests[request_id] = state
        for c in comps:
            self._by_engine_id[c.engine_id] = (state, c)
        return state

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns the engine ids the core must still abort."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        for c in state.completions:
            self._by_engine_id.pop(c.engine_id, None)
        return [c.engine_id for c in state.completions if not c.finished]

    def process(self, outputs: list[EngineCoreOutput], now: float) -> tuple[list[RequestState], list[str]]:
        """Apply one step. Returns the requests that changed (each once) and the engine ids that a stop string
        finished, which the core must abort. Finished requests are dropped from the table."""
        changed: dict[str, RequestState] = {}
        aborts: list[str] = []
        for out in outputs:
            entry = self._by_engine_id.get(out.request_id)
            if entry is None:  # aborted by its frontend, or already finished by a stop string
                continue
            state, comp = entry
            changed[state.request_id] = state
            if out.new_prompt_logprobs and state.prompt_logprobs is not None:
                state.prompt_logprobs.extend(out.new_prompt_logprobs)
            if out.new_token_ids:
                state.metrics.setdefault("first_token", now)
                state.metrics["last_token"] = now
            if self._add_tokens(comp, out):
                aborts.append(comp.engine_id)
            if comp.finished:
                self._by_engine_id.pop(comp.engine_id, None)
        for rid, state in changed.items():
            if state.finished:
                self.requests.pop(rid, None)
        return list(changed.values()), aborts

    @staticmethod
    def _add_tokens(comp: Completion, out: EngineCoreOutput) -> bool:
        """True when a stop string finished the completion before the core did."""
        sp = comp.params
        for j, token in enumerate(out.new_token_ids):
            comp.token_ids.append(token)
            if comp.logprobs is not None and out.new_logprobs is not None:
                comp.logprobs.append(out.new_logprobs[j])
            last = j == len(out.new_token_ids) - 1
            if last and out.finished and out.stop_reason is not None:
                break  # an eos / stop token: it ends the text without being part of it
            before = len(comp.text)
            comp.text += comp.detok.add(token)
            if sp.stop:
                hit = find_stop(comp.text, sp.stop, before)
                if hit is not None:
                    idx, stop = hit
                    comp.text = comp.text[: idx + (len(stop) if sp.include_stop_str_in_output else 0)]
                    comp.finish_reason, comp.stop_reason = "stop", stop
                    return not out.finished
        if out.finished:
            comp.text += comp.detok.flush()
            comp.finish_reason, comp.stop_reason = out.finish_reason, out.stop_reason
        return False


def find_stop(text: str, stops: list[str], new_from: int):
    """Earliest stop string that ends in the newly added text: (index, stop) or None."""
    best = None
    for s in stops:
        idx = text.find(s, max(0, new_from - len(s) + 1))
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, s)
    return best


def stop_prefix_len(text: str, stops: list[str] | None) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    if not stops:
        return 0
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
