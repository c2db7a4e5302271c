"""Sampling settings on the device, one slot per running sequence, so a step sends only what changed.

A sequence takes a slot the first time it samples and keeps it until the scheduler finishes or preempts it
(``release``). Taking a slot writes the sequence's row once: settings (temperature, top-p, min-p, penalties),
top-k, seed, output index and, for penalties, its token history (runtime/token_history.py). Host mirrors of the
same rows (numpy) let the batch's plan (runtime/sampler.py ``SamplingPlan``: greedy / top-k window / full rows)
be computed without reading the device.

Per step, the batch (its sequences in order) is compared with the previous step's: in steady decoding it is the
same, and the step sends nothing: the settings gathered for it, and the constants the sampler derived from them,
are reused, and the rows' output indices (the noise's step counter) advance as one host-side offset of the whole
batch. When the batch changes (a request joins, finishes or is preempted), the advanced indices are written back
to the table, new rows are written (one copy each for the float and the integer columns) and the batch's rows are
gathered again. A batch of greedy rows without penalties is one argmax.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qwen2_triton.runtime.row_select import argmax
from qwen2_triton.runtime.sampler import ALL, Draft, SamplingPlan, SamplingTensors, draw, make_plan
from qwen2_triton.runtime.token_history import BatchHistory, TokenHistory

# columns of the float table, and of the int64 one
TEMPERATURE, TOP_P, MIN_P, REPETITION, PRESENCE, FREQUENCY = range(6)
TOP_K, SEED, STEP, HISTORY_BASE = range(4)  # HISTORY_BASE: prompt length (history position = base + step)


@dataclass
class SamplingBatch:
    """What one batch composition needs, built when it first appears and reused while it repeats."""
    key: tuple  # seq_ids in row order
    plan: SamplingPlan
    tensors: SamplingTensors | None  # None: greedy without penalties, nothing on the device is needed
    slots: torch.Tensor | None = None  # (B,) int64 on the device
    slots_np: np.ndarray | None = None
    history: BatchHistory | None = None  # the rows' token histories, when some row has a penalty
    logprobs: int | None = None  # the largest top-logprobs count asked by a row, None when no row asks
    grammar: bool = False  # some row has structured output (its mask is written into the logits)


class SamplingState:
    def __init__(self, num_slots: int, vocab: int, max_len: int, device: torch.device):
        self.num_slots, self.vocab, self.device = num_slots, vocab, device
        self.fparams = torch.zeros(num_slots, 6, dtype=torch.float32, device=device)
        self.iparams = torch.zeros(num_slots, 4, dtype=torch.int64, device=device)
        self.host_f = np.zeros((num_slots, 6), dtype=np.float32)  # mirrors of the two tables
        self.host_i = np.zeros((num_slots, 4), dtype=np.int64)
        self.host_logprobs = np.full(num_slots, -1, dtype=np.int64)
        self.host_grammar = np.zeros(num_slots, dtype=bool)
        self.history = TokenHistory(num_slots, vocab, max_len, device)
        self.free = list(range(num_slots - 1, -1, -1))
        self.slot_of: dict[int, int] = {}  # seq_id -> slot
        self._batch: SamplingBatch | None = None
        self.batch_builds = 0  # batches built (a new composition), for tests and the host benchmark

    @torch.inference_mode()  # as the step (ModelRunner.run): the batch's tensors are inference tensors
    def release(self, seq) -> None:
        """The sequence left the running set (finished or preempted: a preempted one takes a fresh slot later)."""
        slot = self.slot_of.pop(seq.seq_id, None)
        if slot is not None:
            self.free.append(slot)
            if self._batch is not None:
                self._flush()

    # -------------------------------------------------------------------------------------------------- per step
    def batch(self, seqs) -> SamplingBatch:
        """The sampling batch of these sequences (rows in this order), reused when the previous step had the same."""
        key = tuple(s.seq_id for s in seqs)
        b = self._batch
        if b is not None and b.key == key:
            return b
        if b is not None:
            self._flush()
        self._batch = b = self._build(seqs, key)
        return b

    def sample(self, logits: torch.Tensor, b: SamplingBatch) -> tuple[torch.Tensor, list[int]]:
        """Draw one token per row: (tokens on the device, the same as a host list). ``draw`` then ``take``."""
        return self.take(b, self.draw(logits, b))

    def draw(self, logits: torch.Tensor, b: SamplingBatch) -> Draft:
        """Queue the draw of one token per row (no host sync). Called in inference mode (ModelRunner.launch): the
        logits, the model's output, are written in place. ``take`` must follow before this batch draws again."""
        t = b.tensors
        if t is None:
            return Draft(argmax(logits), logits, None)
        h = b.history
        if h is not None:
            t.history_ids = h.ids()
            t.history_counts = h.counts(t.history_ids) if b.plan.frequency else None
        return draw(logits, t, writable=True)

    def take(self, b: SamplingBatch, d: Draft) -> tuple[torch.Tensor, list[int]]:
        """The drawn tokens, read back (on the device, and as a host list); advances the rows' output indices and
        penalty histories."""
        tokens, host = d.resolve()
        t = b.tensors
        if t is not None:
            if b.history is not None:
                b.history.append(tokens)
            t.step_offset += 1
        return tokens, host

    # -------------------------------------------------------------------------------------------------- internals
    def _flush(self) -> None:
        """Write the current batch's advanced output indices back to the table (before its slots are reused)."""
        b, self._batch = self._batch, None
        if b is not None and b.tensors is not None and b.tensors.step_offset:
            self.iparams[:, STEP].index_copy_(0, b.slots, b.tensors.steps + b.tensors.step_offset)
        if b is not None and b.history is not None:
            b.history.write_back()

    def _build(self, seqs, key: tuple) -> SamplingBatch:
        self.batch_builds += 1
        slot_of = self.slot_of
        new = [s for s in seqs if s.seq_id not in slot_of]
        if new:
            self._admit(new)
        slots_np = np.fromiter((slot_of[sid] for sid in key), dtype=np.int64, count=len(key))
        f, i = self.host_f[slots_np], self.host_i[slots_np]
        lp = self.host_logprobs[slots_np]
        logprobs = int(lp.max()) if (lp >= 0).any() else None
        grammar = bool(self.host_grammar[slots_np].any())
        repetition = bool((f[:, REPETITION] != 1).any())
        frequency = bool(((f[:, PRESENCE] != 0) | (f[:, FREQUENCY] != 0)).any())
        if not repetition and not frequency and not f[:, TEMPERATURE].any():
            return SamplingBatch(key, SamplingPlan(greedy_rows=ALL), None, logprobs=logprobs, grammar=grammar)
        dev = self.device
        slots = torch.from_numpy(slots_np).to(dev, non_blocking=True)
        plan = make_plan(f[:, TEMPERATURE], i[:, TOP_K], f[:, TOP_P], f[:, MIN_P], self.vocab, dev,
                         repetition=repetition, frequency=frequency, masked=grammar)
        fp = self.fparams.index_select(0, slots)
        ip = self.iparams.index_select(0, slots)
        steps = ip[:, STEP].contiguous()
        t = SamplingTensors(temperature=fp[:, TEMPERATURE], top_k=ip[:, TOP_K], top_p=fp[:, TOP_P],
                            min_p=fp[:, MIN_P], repetition_penalty=fp[:, REPETITION],
                            presence_penalty=fp[:, PRESENCE], frequency_penalty=fp[:, FREQUENCY],
                            seeds=ip[:, SEED], steps=steps, plan=plan)
        history = BatchHistory(self.history, slots, slots_np, ip[:, HISTORY_BASE] + steps) \
            if repetition or frequency else None
        return SamplingBatch(key, plan, t, slots, slots_np, history, logprobs, grammar)

    def _admit(self, seqs) -> None:
        """Give these sequences slots and write their rows: one copy for the float columns, one for the int."""
        if len(seqs) > len(self.free):
            raise RuntimeError(f"{len(self.slot_of) + len(seqs)} sequences need sampling slots, there are "
                               f"{self.num_slots}; release() missing?")
        slots, frows, irows, hist, plain = [], [], [], [], []
        for s in seqs:
            p = s.params
            slot = self.slot_of[s.seq_id] = self.free.pop()
            slots.append(slot)
            frows.append((p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                          p.frequency_penalty))
            irows.append((p.top_k if 0 < p.top_k < self.vocab else self.vocab, s.seed, len(s.output_ids),
                          len(s.prompt_ids)))
            self.host_logprobs[slot] = -1 if p.logprobs is None else p.logprobs
            self.host_grammar[slot] = p.structured_output is not None
            if p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty:
                hist.append(s)
            else:
                plain.append(slot)
        self.host_f[slots] = frows
        self.host_i[slots] = irows
        dev = self.device
        idx = torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True)
        self.fparams.index_copy_(0, idx, torch.tensor(frows, dtype=torch.float32).to(dev, non_blocking=True))
        self.iparams.index_copy_(0, idx, torch.tensor(irows, dtype=torch.int64).to(dev, non_blocking=True))
        if plain:
            self.history.forget(plain)
        if hist:
            self.history.fill([self.slot_of[s.seq_id] for s in hist], [s.prompt_ids for s in hist],
                              [s.output_ids for s in hist],
                              counts=any(s.params.presence_penalty or s.params.frequency_penalty for s in hist))
