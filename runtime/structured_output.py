"""Structured output: JSON (any object, or one that matches a JSON schema) enforced by masking the logits of every
step with xgrammar, the grammar engine vLLM and SGLang use.

    SamplingParams(structured_output=StructuredOutput(json_schema={...}))   # or StructuredOutput(json_object=True)

A request's way through the engine (each step below is one hook, the work is here):
1. InputProcessor -> ``check_structured_output``: xgrammar converts the schema to a grammar (under 1 ms), so a
   schema it cannot use is a ValueError before the request is queued.
2. EngineCore.add_request -> ``StructuredOutputManager.add``: the grammar compiles against the vocabulary on a
   small thread pool (xgrammar releases the GIL), cached by schema text. The scheduler asks ``ready`` before it
   admits the request, so the request waits while the others keep stepping.
3. ModelRunner, each step -> ``apply_masks``: each row with a grammar gets its token bitmask from its matcher and
   -inf outside it, before penalties, temperature, top-k/p/min-p and the draw (greedy too), so the support is the
   grammar's. Log-probs stay the model's (they are taken from the logits before the mask).
4. Scheduler.update_from_output -> ``accept``: the matcher advances by the sampled token; once it has accepted a
   stop token (the engine's eos ids) the request finishes with "stop", ignore_eos or not.
5. Scheduler.finish -> ``release``. Preemption needs nothing: a preempted sequence keeps its output tokens, so its
   matcher's state stays right and nothing rolls back.

A step in which no row has a grammar makes no xgrammar call and no tensor, and xgrammar (1.3 s to import) is
imported only when the first structured request arrives.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only annotations: importing SamplingParams stays free of torch and xgrammar
    import torch

log = logging.getLogger(__name__)

# Whitespace between JSON tokens: any, as vLLM's default (a forced layout makes models write worse JSON:
# xgrammar PR 123, vLLM PR 58067), but at most 20 characters a run (llama.cpp's json.gbnf bound), because unbounded
# runs let small models spin on newlines until max_tokens (vLLM PR 12744). 20 fits a newline plus 4-space indents
# to depth 4.
SCHEMA_OPTIONS = {"any_whitespace": True, "max_whitespace_cnt": 20}
CACHE_ENTRIES = 256  # compiled grammars kept (by schema text); a compiled JSON grammar is tens of kB
COMPILE_WORKERS = 2  # grammars compiling at once; each compile is tens of ms for a typical schema
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # OpenAI's json_object mode: any JSON object (not any JSON value)


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must be: exactly one of ``json_schema`` (a JSON schema as a dict or as JSON text) and
    ``json_object=True`` (any JSON object). The server maps OpenAI's response_format onto it."""
    json_schema: dict | str | None = None
    json_object: bool = False
    schema_text: str = field(init=False, repr=False, compare=False)  # the schema as JSON text: the cache key

    def __post_init__(self):
        if not isinstance(self.json_object, bool):
            raise ValueError(f"StructuredOutput.json_object must be True or False, got {self.json_object!r}")
        if (self.json_schema is not None) == self.json_object:
            raise ValueError("StructuredOutput takes exactly one of json_schema=<a JSON schema> and json_object=True, "
                             f"got json_schema={self.json_schema!r}, json_object={self.json_object!r}")
        if self.json_object:
            text = JSON_OBJECT_SCHEMA
        else:
            schema = self.json_schema
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"StructuredOutput.json_schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise ValueError("StructuredOutput.json_schema must be a JSON object (a dict or its JSON text), "
                                 f"got {type(schema).__name__}")
            try:  # key order kept: xgrammar emits properties in the schema's order
                text = json.dumps(schema, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ValueError(f"StructuredOutput.json_schema cannot be written as JSON: {e}") from None
        object.__setattr__(self, "schema_text", text)  # frozen: fixed at construction, as the cache key must be


def check_structured_output(so: StructuredOutput) -> None:
    """Raise ValueError naming the problem when xgrammar cannot turn the schema into a grammar (an unknown type,
    a dangling $ref, a bad regex pattern, minimum > maximum, ...). Converts only: no vocabulary work."""
    xgr = _xgrammar()
    try:
        xgr.Grammar.from_json_schema(so.schema_text, **SCHEMA_OPTIONS)
    except RuntimeError as e:  # xgrammar's C++ errors arrive as RuntimeError
        raise ValueError(f"StructuredOutput.json_schema cannot be used: {xgrammar_message(e)}") from None


def xgrammar_message(e: BaseException) -> str:
    """xgrammar's message without its '[hh:mm:ss] /project/cpp/file.cc:123: ' prefix."""
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(e).strip())


def tokenizer_info(tokenizer, vocab_size: int, stop_token_ids):
    """xgrammar's view of a byte-level BPE vocabulary (Qwen2's), ``vocab_size`` wide: the logits' width (151936
    rows for 151665 tokens: the rows past the tokenizer have no text, so xgrammar never allows them)."""
    xgr = _xgrammar()
    backend = getattr(tokenizer, "backend", tokenizer)  # model/tokenizer.Tokenizer wraps a tokenizers.Tokenizer
    encoded = [""] * vocab_size
    for text, i in backend.get_vocab(with_added_tokens=True).items():
        if i < vocab_size:
            encoded[i] = text
    stops = set(stop_token_ids)
    # Special tokens (<|im_start|>, <|fim_prefix|>, ...) are dropped from the text by the detokenizer, so the grammar
    # must not take them as literal text: an empty string makes xgrammar treat them as special, never allowed. The
    # stop ids are allowed by id once the grammar is complete.
    for i, tok in backend.get_added_tokens_decoder().items():
        if tok.special and i < vocab_size and i not in stops:
            encoded[i] = ""
    return xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size,
                             stop_token_ids=list(stop_token_ids) or None, add_prefix_space=False)


@dataclass
class _SeqGrammar:
    request_id: str
    compiled: Future  # -> xgrammar CompiledGrammar
    matcher: object | None = None  # xgrammar GrammarMatcher, made when the sequence is admitted


class StructuredOutputManager:
    """Grammars of one engine: the compiler (built on first use), the compile pool and cache, one matcher per
    sequence (by seq_id). Called from the thread that steps the engine; only the compiles run elsewhere."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids, max_num_seqs: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_num_seqs = max_num_seqs
        self._compiler = None
        self._compiler_lock = threading.Lock()  # two compile workers may both find it unbuilt
        self._pool: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[str, Future] = OrderedDict()  # schema text -> compile, least recently used first
        self._seqs: dict[int, _SeqGrammar] = {}  # every unfinished sequence with a grammar
        self._unready: dict[int, _SeqGrammar] = {}  # ... of which those without a matcher yet
        self._bitmask: torch.Tensor | None = None  # (max_num_seqs, ceil(vocab / 32)) int32 on the host

    # ------------------------------------------------------------------------------------ scheduler hooks
    def add(self, seq) -> None:
        """A new sequence: start compiling its grammar (or find it cached). No-op without structured_output."""
        so = seq.params.structured_output
        if so is None:
            return
        st = self._seqs[seq.seq_id] = _SeqGrammar(seq.request_id, self._compile_async(so.schema_text))
        self._unready[seq.seq_id] = st

    def ready(self, seq) -> bool:
        """May the scheduler admit this sequence: it has no grammar, or its grammar compiled (its matcher is then
        made here)."""
        st = self._unready.get(seq.seq_id)
        if st is None:
            return True
        if not st.compiled.done() or st.compiled.exception() is not None:
            return False  # a failed compile is reported by failed_requests() and aborted by the engine
        st.matcher = _xgrammar().GrammarMatcher(st.compiled.result())
        del self._unready[seq.seq_id]
        return True

    def accept(self, seq, token: int) -> tuple[str | None, int | None]:
        """Advance the sequence's matcher by its new token: ("stop", token) once the grammar has ended, ("abort",
        None) if the token broke the grammar (the mask makes that impossible: a bug, logged), else (None, None)."""
        st = self._seqs.get(seq.seq_id)
        if st is None:
            return None, None
        if not st.matcher.accept_token(token):
            log.error("request %s: token %d is outside its grammar (the logits mask should make that impossible); "
                      "the request is aborted", seq.request_id, token)
            return "abort", None
        if st.matcher.is_terminated():
            return "stop", token
        return None, None

    def release(self, seq) -> None:
        """The sequence finished (not preempted: a preempted one keeps its matcher)."""
        self._seqs.pop(seq.seq_id, None)
        self._unready.pop(seq.seq_id, None)

    # ------------------------------------------------------------------------------------ engine hooks
    def failed_requests(self) -> list[str]:
        """Requests whose grammar failed to compile (the schema was checked, so an xgrammar or tokenizer error),
        logged here; the engine aborts them."""
        out = []
        for st in self._unready.values():
            if st.compiled.done() and st.compiled.exception() is not None:
                log.error("request %s: its grammar failed to compile: %r", st.request_id, st.compiled.exception())
                out.append(st.request_id)
        return out

    def wait_for_grammars(self, timeout: float) -> bool:
        """Block up to ``timeout`` s until one pending compile ends; False if no sequence waits for its grammar
        (the engine calls this when a step has nothing else to run, instead of spinning)."""
        if not self._unready:
            return False
        pending = {st.compiled for st in self._unready.values() if not st.compiled.done()}
        if pending:
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
        return True

    # ------------------------------------------------------------------------------------ model-runner hook
    def apply_masks(self, logits: torch.Tensor, seqs) -> None:
        """logits: (B, V) float32, row i sampling for seqs[i]. Sets -inf in place outside each grammar row's
        allowed tokens; rows without a grammar are untouched. No work when no row has one."""
        if not self._seqs:
            return
        rows = [i for i, s in enumerate(seqs) if s.seq_id in self._seqs]
        if not rows:
            return
        xgr = _xgrammar()
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits are {logits.shape[-1]} wide, the grammars' vocabulary {self.vocab_size}")
        if self._bitmask is None:
            self._bitmask = xgr.allocate_token_bitmask(self.max_num_seqs, self.vocab_size)
            if logits.device.type == "cuda":
                self._bitmask = self._bitmask.pin_memory()
        for i in rows:
            self._seqs[seqs[i].seq_id].matcher.fill_next_token_bitmask(self._bitmask, i)
        mask = self._bitmask[: len(seqs)]
        if mask.device != logits.device:
            # Rewriting the pinned buffer next step is safe: every step ends in a host sync (the sampled tokens).
            mask = mask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, mask, indices=rows)  # CPU: C++; CUDA: xgrammar's Triton kernel

    # ------------------------------------------------------------------------------------ compiling
    def _compile_async(self, schema_text: str) -> Future:
        fut = self._cache.get(schema_text)
        if fut is not None and not (fut.done() and fut.exception() is not None):  # a failed compile is retried
            self._cache.move_to_end(schema_text)
            return fut
        if self._pool is None:
            self._pool = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="qwen2-triton-grammar")
            weakref.finalize(self, self._pool.shutdown, wait=False)
        fut = self._cache[schema_text] = self._pool.submit(self._compile, schema_text)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)  # sequences holding an evicted compile keep their own reference
        return fut

    def _compile(self, schema_text: str):
        """Runs on the pool: the JSON schema -> an xgrammar CompiledGrammar for this vocabulary."""
        compiler = self._get_compiler()
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(schema_text, **SCHEMA_OPTIONS)
        log.debug("grammar compiled in %.1f ms (%d schema chars)", 1e3 * (time.perf_counter() - t0), len(schema_text))
        return compiled

    def _get_compiler(self):
        with self._compiler_lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise ValueError("structured output needs the model's tokenizer; this engine has none")
                xgr = _xgrammar()
                t0 = time.perf_counter()
                info = tokenizer_info(self.tokenizer, self.vocab_size, self.eos_token_ids)
                # The cache lives in this class (by schema text, bounded): xgrammar's own would be a second one.
                self._compiler = xgr.GrammarCompiler(info, max_threads=min(8, os.cpu_count() or 1),
                                                     cache_enabled=False)
                log.info("xgrammar compiler for %d vocabulary rows built in %.2f s", self.vocab_size,
                         time.perf_counter() - t0)
            return self._compiler


def _xgrammar():
    import xgrammar

    return xgrammar


__all__ = ["StructuredOutput", "StructuredOutputManager", "check_structured_output"]
