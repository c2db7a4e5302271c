"""The step's block tables, kept on the device between steps: only entries that changed travel.

Row i of ``table`` holds the block table of the step's i-th sequence. A running sequence's table only grows
(a block every ``block_size`` tokens), and steps keep their sequences in the same order, so most steps send
nothing, and the others send the new entries as (flat index, block) pairs in one host->device copy and one
scatter; a row is resent whole when another sequence takes it over. Before this, every eager step (prefill and
mixed prefill + decode steps) built and sent the whole padded (B, width) table: 1.4 ms on this project's CPU for
64 sequences of 8k tokens, 5.5 ms at 32k. The decode graphs (runtime/decode_graphs.py) read the same buffer, so
a sequence's table is sent once whichever path its steps take. Entries past a row's table are stale (the
kernels read a sequence's blocks only up to its length); padding rows of a graph bucket point at the dummy
block.
"""
from __future__ import annotations

import torch

from qwen2_triton.runtime.block_manager import DUMMY_BLOCK

PAD = "pad"  # owner of a graph bucket's padding row


class DeviceBlockTables:
    def __init__(self, rows: int, max_blocks: int, device: torch.device):
        self.max_blocks = max_blocks
        self.table = torch.full((rows, max_blocks), DUMMY_BLOCK, dtype=torch.int32, device=device)
        self._owner: list = [None] * rows  # seq_id whose table row i holds on the device, PAD, or None
        self._len = [0] * rows  # entries of that table already on the device
        self._row_of: dict = {}  # seq_id -> the row holding its table
        self.copies = 0  # updates that had to send entries
        self.sent = 0  # entries sent, in all
        self.moves = 0  # rows moved on the device (a sequence's table changing rows)

    def fits(self, n: int, width: int) -> bool:
        return n <= len(self._owner) and width <= self.max_blocks

    def forget(self, seq_id) -> None:
        """The sequence left the running set (finished or preempted: a preempted one comes back with other
        blocks), so no row may keep its table."""
        row = self._row_of.pop(seq_id, None)
        if row is not None and self._owner[row] == seq_id:
            self._owner[row] = None

    def update(self, seq_ids: list, tables: list[list[int]], rows: int | None = None) -> torch.Tensor:
        """Make rows [0, len(seq_ids)) hold these tables and rows up to ``rows`` (a graph bucket) padding; returns
        ``table[:rows]``. A sequence whose table is in another row (the batch shifted: one before it finished) is
        moved there on the device, then only entries new to it are sent."""
        rows = len(seq_ids) if rows is None else rows
        owner, length, row_of = self._owner, self._len, self._row_of
        moves = [(i, row_of[sid]) for i, sid in enumerate(seq_ids) if owner[i] != sid and sid in row_of]
        if moves:
            dst, src = (list(x) for x in zip(*moves))
            self.table[dst] = self.table[src]  # the gather copies first: overlapping moves are safe
            self.moves += len(moves)
            moved = [(owner[j], length[j]) for j in src]
            for j in src:
                owner[j] = None
            for i, (sid, n) in zip(dst, moved):
                self._own(i, sid, n)
        idx, val = [], []
        mb = self.max_blocks
        for i in range(rows):
            if i < len(seq_ids):
                sid, t = seq_ids[i], tables[i]
                start = length[i] if owner[i] == sid else 0
                if start < len(t):
                    idx.extend(range(i * mb + start, i * mb + len(t)))
                    val.extend(t[start:])
                self._own(i, sid, len(t))
            elif owner[i] != PAD:  # its one key sits in the dummy block
                idx.append(i * mb)
                val.append(DUMMY_BLOCK)
                self._own(i, PAD, 1)
        if idx:
            self.copies += 1
            self.sent += len(idx)
            pairs = torch.tensor(idx + val, dtype=torch.int64).to(self.table.device, non_blocking=True)
            self.table.view(-1).index_copy_(0, pairs[: len(idx)], pairs[len(idx):].to(torch.int32))
        return self.table[:rows]

    def _own(self, row: int, sid, n: int) -> None:
        old = self._owner[row]
        if old is not sid and old != sid and self._row_of.get(old) == row:
            del self._row_of[old]
        self._owner[row], self._len[row] = sid, n
        if sid != PAD:
            self._row_of[sid] = row
