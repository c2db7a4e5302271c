"""Per-slot token history on the device, for the repetition, presence and frequency penalties.

Each running sequence owns a slot (runtime/sampling_state.py); one that needs penalties has, here, that slot's row
of ``ids`` (max_len,) int64: its prompt and output token ids, written once when the slot is filled (from the prompt
and any output it already has, e.g. after a preemption). Past its length the row repeats its first token. The
penalties touch only the history's columns (gather, penalise, scatter: O(batch x longest history) per step
instead of several passes over (batch, vocab)); a repeated or padding column computes the same value as the
column it repeats, so the scatter's duplicate writes agree. Presence/frequency penalties also keep ``counts``
(slots, vocab) float32 of output occurrences. Both tables are allocated when a request first needs them:
workloads without penalties never pay for them.

A batch reads its rows once (``BatchHistory``): the rows' histories padded to the longest, then each step's
tokens appended as one column, so a decode step's history costs one copy, not a gather.
"""
from __future__ import annotations

import numpy as np
import torch

APPEND = 64  # columns a BatchHistory holds for new tokens before it writes them back and reads its rows again


class TokenHistory:
    def __init__(self, num_slots: int, vocab: int, max_len: int, device: torch.device):
        self.num_slots, self.vocab, self.max_len, self.device = num_slots, vocab, max_len, device
        self.ids: torch.Tensor | None = None  # (slots, max_len) int64
        self.counts: torch.Tensor | None = None  # (slots, vocab) float32
        self.length = np.zeros(num_slots, dtype=np.int64)  # tokens in each slot's history (host mirror)
        self.kept = np.zeros(num_slots, dtype=np.int64)  # 1 where the slot's sequence has a history here

    def fill(self, slots: list[int], prompts: list[list[int]], outputs: list[list[int]], counts: bool) -> None:
        """Write these slots' histories (prompt + output so far) with one host->device copy. ``counts``: some of
        them need output counts (presence/frequency penalties)."""
        dev = self.device
        if self.ids is None:
            self.ids = torch.zeros(self.num_slots, self.max_len, dtype=torch.int64, device=dev)
        if counts and self.counts is None:
            self.counts = torch.zeros(self.num_slots, self.vocab, dtype=torch.float32, device=dev)
        lens = np.array([len(p) + len(o) for p, o in zip(prompts, outputs)], dtype=np.int64)
        n_out = np.array([len(o) for o in outputs], dtype=np.int64)
        rows = np.repeat(np.asarray(slots, dtype=np.int64), lens)
        cols = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        toks = np.fromiter((t for p, o in zip(prompts, outputs) for t in (*p, *o)), dtype=np.int64,
                           count=int(lens.sum()))
        is_out = cols >= np.repeat(lens - n_out, lens)
        host = torch.from_numpy(np.stack([rows * self.max_len + cols, toks, rows, is_out]))
        flat_idx, toks_d, rows_d, is_out_d = host.to(dev, non_blocking=True).unbind(0)
        slot_t = torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True)
        first = torch.tensor([p[0] for p in prompts], dtype=torch.int64).to(dev, non_blocking=True)
        self.ids.index_copy_(0, slot_t, first[:, None].expand(-1, self.max_len).contiguous())  # padding
        self.ids.view(-1).index_copy_(0, flat_idx, toks_d)
        self.length[slots] = lens
        self.kept[slots] = 1
        if self.counts is not None:
            self.counts.index_fill_(0, slot_t, 0.0)
            self.counts.index_put_((rows_d, toks_d), is_out_d.float(), accumulate=True)

    def forget(self, slots: list[int]) -> None:
        """Slots taken by sequences without penalties: their rows only ever take harmless writes (a batch that
        mixes them with penalised rows gives them neutral penalties), and must not widen a batch's rows."""
        self.length[slots] = 0
        self.kept[slots] = 0


class BatchHistory:
    """The history rows of one batch (B, L) int64 and their output counts, read once and appended to per step.

    ``position`` (B,) int64 on the device: where each row's next token goes in its slot's row of the table."""

    def __init__(self, table: TokenHistory, slots: torch.Tensor, slots_np: np.ndarray, position: torch.Tensor):
        self.table, self.slots, self.slots_np, self.position = table, slots, slots_np, position.clone()
        self._read()

    def _read(self) -> None:
        t = self.table
        self.base = max(1, int(t.length[self.slots_np].max()))
        self.buf = t.ids[:, : min(t.max_len, self.base + APPEND)].index_select(0, self.slots)
        self.n = 0  # tokens appended since the read

    def ids(self) -> torch.Tensor:
        return self.buf.narrow(1, 0, self.base + self.n)  # narrow and select below: cheaper than indexing

    def counts(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) output counts of these history columns."""
        return self.table.counts[self.slots[:, None], ids]

    def append(self, tokens: torch.Tensor) -> None:
        """Each row drew one more token."""
        if self.base + self.n == self.buf.shape[1]:
            self.write_back()
            self._read()
        self.buf.select(1, self.base + self.n).copy_(tokens)
        self.n += 1
        t = self.table
        if t.counts is not None:
            t.counts.index_put_((self.slots, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)

    def write_back(self) -> None:
        """Put the appended tokens in the slots' rows of the table (before the batch changes)."""
        if not self.n:
            return
        t, n = self.table, self.n
        cols = self.position[:, None] + torch.arange(n, device=self.position.device)
        t.ids[self.slots[:, None].expand(-1, n), cols] = self.buf[:, self.base: self.base + n]
        t.length[self.slots_np] += n * t.kept[self.slots_np]
        self.position += n
        self.n = 0
