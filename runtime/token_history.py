"""Per-sequence token history on the device, for the repetition, presence and frequency penalties.

Each running sequence that needs penalties holds one row of two (rows, vocab) tables: ``seen`` (prompt and
output tokens) and ``counts`` (output tokens). A row is filled once when the sequence first samples (from its
prompt and any output it already has, e.g. after a preemption), then updated with one scatter per sampled
token, so a step does no host work proportional to sequence length. Rows are returned when the scheduler
finishes or preempts the sequence.
"""
from __future__ import annotations

import torch


class TokenHistory:
    def __init__(self, num_rows: int, vocab: int, device: torch.device):
        self.num_rows, self.vocab, self.device = num_rows, vocab, device
        self.seen: torch.Tensor | None = None  # allocated on first use: most workloads without penalties
        self.counts: torch.Tensor | None = None  # never pay for them
        self.free = list(range(num_rows))
        self.row_of: dict[int, int] = {}  # seq_id -> row

    def rows(self, seqs) -> torch.Tensor:
        """The rows of these sequences, (B,) int64 on the device, filling rows for newcomers."""
        if self.seen is None:
            self.seen = torch.zeros(self.num_rows, self.vocab, dtype=torch.bool, device=self.device)
            self.counts = torch.zeros(self.num_rows, self.vocab, dtype=torch.float32, device=self.device)
        out = []
        for s in seqs:
            row = self.row_of.get(s.seq_id)
            if row is None:
                if not self.free:
                    raise RuntimeError("more sequences need penalty rows than max_num_seqs; release() missing?")
                row = self.row_of[s.seq_id] = self.free.pop()
                self._fill(row, s.prompt_ids, s.output_ids)
            out.append(row)
        return torch.tensor(out, dtype=torch.int64, device=self.device)

    def _fill(self, row: int, prompt: list[int], output: list[int]) -> None:
        self.seen[row].zero_()
        self.counts[row].zero_()
        self.seen[row, torch.tensor(prompt + output, dtype=torch.int64, device=self.device)] = True
        if output:
            out = torch.tensor(output, dtype=torch.int64, device=self.device)
            self.counts[row].index_add_(0, out, torch.ones(len(output), device=self.device))

    def record(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Each row sampled one more token (rows are distinct within a step)."""
        self.seen[rows, tokens] = True
        self.counts[rows, tokens] += 1

    def release(self, seq) -> None:
        row = self.row_of.pop(seq.seq_id, None)
        if row is not None:
            self.free.append(row)
