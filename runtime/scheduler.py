"""Continuous batching: every step packs decode tokens of running sequences and prefill chunks of new ones.

Each step has a token budget (``max_num_batched_tokens``). Running sequences come first (a decode is one
token; an unfinished prefill continues with its next chunk), then waiting ones are admitted while the budget,
``max_num_seqs`` and free KV blocks allow. When a running sequence cannot get the block it needs, the most
recently admitted one is preempted: its blocks are freed and it is recomputed later (prompt + output so far).
A request that could never fit in the whole pool is rejected before it is queued, so nothing waits forever.
With prefix caching, admission first takes the longest run of cached full blocks of the request's tokens
(runtime/block_manager.py) and the request's first chunk starts after them; each scheduled chunk names the blocks
it fills, so even a request admitted later in the same step can share them.
A request whose grammar is still compiling (structured output) is passed over until it is ready, while the ones
behind it are admitted.

After the model ran, ``update_from_output`` applies the step to the sequences (new tokens, prompt log-probs),
checks the token-level stops (eos ids, stop_token_ids, max_tokens) and returns one immutable EngineCoreOutput
per request that advanced. Aborts free a request's blocks between steps. Stop strings are text, so they are
decided by the output processor, which aborts the request here.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from qwen2_triton.runtime.block_manager import BlockManager
from qwen2_triton.runtime.request import EngineCoreOutput
from qwen2_triton.runtime.sequence import Sequence, Status


@dataclass
class Chunk:
    seq: Sequence
    start: int  # first token index (position) computed in this step
    length: int  # tokens computed in this step

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token, so its last row yields the next token."""
        return self.start + self.length == self.seq.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 on_release=lambda seq: None, eos_token_ids: tuple[int, ...] = (), structured=None):
        self.blocks = blocks
        self.structured = structured  # runtime/structured_output.StructuredOutputManager: grammars, or None
        self.eos_token_ids = frozenset(eos_token_ids)
        self.requests: dict[str, Sequence] = {}  # unfinished requests by id
        self.on_release = on_release  # told when a sequence leaves the running set (per-sequence device state)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_ids) -> None:
        """Finish these requests now, freeing their blocks (unknown or finished ids are ignored). Called between
        steps by the thread that steps the engine, so 'now' is the next step boundary."""
        for rid in request_ids:
            seq = self.requests.get(rid)
            if seq is not None:
                self.finish(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Chunk]:
        budget = self.max_num_batched_tokens
        chunks: list[Chunk] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.can_grow(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # seq itself was preempted: everything after it already was
            self.blocks.grow(seq, seq.num_computed + n)
            self._add_chunk(chunks, seq, n)
            budget -= n
            i += 1
        unready = []  # waiting for their grammar: they keep their place in the queue
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.structured is not None and not self.structured.ready(seq):
                unready.append(self.waiting.popleft())
                continue
            # Admission reserves blocks for the whole prompt (+ output so far, after a preemption): admitting
            # on the first chunk alone lets a long prompt be preempted mid-prefill and recomputed over and over.
            if not self.blocks.admit(seq):  # takes the cached prefix, if any, and sets num_computed past it
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            self._add_chunk(chunks, seq, n)
            budget -= n
        self.waiting.extendleft(reversed(unready))
        return chunks

    def _add_chunk(self, chunks: list[Chunk], seq: Sequence, n: int) -> None:
        chunks.append(Chunk(seq, seq.num_computed, n))
        self.blocks.cache_blocks(seq, seq.num_computed + n)

    def step_failed(self, chunks: list[Chunk]) -> None:
        """The model did not finish the step (an error, Ctrl-C): the blocks it was to fill hold nothing reusable,
        and a sequence admitted in it may share such a block, so every sequence of the step starts over."""
        self.blocks.step_failed()
        for c in reversed(chunks):
            if c.seq.status is Status.RUNNING:
                self._preempt(c.seq, count=False)

    def _preempt(self, seq: Sequence, count: bool = True) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        self.on_release(seq)
        seq.status = Status.WAITING
        if count:
            seq.num_preemptions += 1
            self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.blocks.release(seq)
            self.on_release(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.requests.pop(seq.request_id, None)
        if self.structured is not None:
            self.structured.release(seq)

    def update_from_output(self, chunks: list[Chunk], result) -> list[EngineCoreOutput]:
        """Apply a step's results (runtime/model_runner.StepResult) and return what each request gained."""
        outputs = []
        for c in chunks:
            seq = c.seq
            seq.num_computed = c.start + c.length
            prompt_lps = result.prompt_logprobs.get(seq.seq_id)
            if prompt_lps:
                seq.num_prompt_scored += len(prompt_lps)
            token = result.tokens.get(seq.seq_id)
            if token is None:
                if prompt_lps:
                    outputs.append(EngineCoreOutput(seq.request_id, new_prompt_logprobs=tuple(prompt_lps)))
                continue
            seq.output_ids.append(token)
            finish, stop = self._check_stop(seq, token)
            if finish is None and self.structured is not None:
                finish, stop = self.structured.accept(seq, token)  # the grammar ended (or, a bug, was broken)
            lp = result.logprobs.get(seq.seq_id)
            outputs.append(EngineCoreOutput(
                seq.request_id, (token,), (lp,) if seq.params.logprobs is not None else None,
                tuple(prompt_lps) if prompt_lps else None, finish, stop))
            if finish is not None:
                self.finish(seq)
        return outputs

    def _check_stop(self, seq: Sequence, token: int) -> tuple[str | None, int | None]:
        sp = seq.params
        if (not sp.ignore_eos and token in self.eos_token_ids) or (sp.stop_token_ids and token in sp.stop_token_ids):
            return "stop", token
        if len(seq.output_ids) >= sp.max_tokens:
            return "length", None
        return None, None
