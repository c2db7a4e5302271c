"""Paged KV cache bookkeeping: a pool of fixed-size blocks and each sequence's block table.

Blocks are handed out on demand as a sequence grows and returned when it finishes or is preempted. Block 0
is reserved as the dummy target of padding rows (CUDA-graph batches write their padding there).
"""
from __future__ import annotations

from collections import deque

from qwen2_triton.runtime.sequence import Sequence

DUMMY_BLOCK = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free = deque(range(1, num_blocks))

    @property
    def capacity_tokens(self) -> int:
        """Tokens one sequence could hold if it had the whole pool."""
        return (self.num_blocks - 1) * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make the block table cover ``num_tokens`` tokens."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > len(self.free):
            raise RuntimeError("KV pool exhausted; the scheduler must check can_grow first")
        for _ in range(need):
            seq.block_table.append(self.free.popleft())

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size
