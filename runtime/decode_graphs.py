"""Decode steps on static, padded buffers, captured as one CUDA graph per batch-size bucket.

A decode step (every sequence contributes its one newest token) has the same shapes for every step at a given
batch size, so it can be replayed from a CUDA graph: one launch instead of hundreds of kernel launches. The
inputs live in static buffers sized for ``max_num_seqs``; a batch of n runs in the smallest bucket >= n, and
its padding rows point at the reserved dummy block (block 0: their K/V writes and reads land there), with a
sequence length of 1, so they compute harmless garbage that is never read back.

Order at start-up (as nano-vllm does): load weights -> allocate the KV cache -> capture, largest bucket first,
all graphs sharing one memory pool. Without CUDA (or with ``enforce_eager``) the same padded path runs eagerly,
which is how the CPU tests check the padding logic.
"""
from __future__ import annotations

import torch

from qwen2_triton.kernels.attention import AttentionMetadata
from qwen2_triton.runtime.block_manager import DUMMY_BLOCK


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to max_num_seqs (vLLM's and nano-vllm's ladder)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    def __init__(self, model, kv_caches, max_num_seqs: int, max_model_len: int, block_size: int,
                 use_graphs: bool):
        dev = model.device
        self.model, self.kv_caches = model, kv_caches
        self.buckets = batch_buckets(max_num_seqs)
        self.max_bs = self.buckets[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.input_ids = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(self.max_bs, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((self.max_bs, self.max_blocks), DUMMY_BLOCK, dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.arange(self.max_bs + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = 0
        self.eager_runs = 0
        if use_graphs:
            self._capture()

    def fits(self, n: int, width: int) -> bool:
        return n <= self.max_bs and width <= self.max_blocks

    def _meta(self, bs: int) -> AttentionMetadata:
        # max_seqlen_k fixes the split-KV count at capture; the longest context keeps every length correct
        return AttentionMetadata(cu_seqlens_q=self.cu_seqlens_q[: bs + 1], seq_lens=self.seq_lens[:bs],
                                 block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs],
                                 max_seqlen_q=1, max_seqlen_k=self.max_model_len)

    def _forward(self, bs: int) -> torch.Tensor:
        return self.model.forward(self.input_ids[:bs], self.positions[:bs], self._meta(bs), self.kv_caches, None)

    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool memory
            self._forward(bs)  # warm-up: compiles kernels and settles allocations outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """One decode step for n sequences; returns float32 logits (n, vocab)."""
        n = len(input_ids)
        bs = next(b for b in self.buckets if b >= n)
        dev = self.input_ids.device
        pad = bs - n
        # Padding rows: token 0 at position 0, writing slot 0 of the dummy block, attending to that one slot.
        self.input_ids[:bs].copy_(torch.tensor(input_ids + [0] * pad, dtype=torch.int64), non_blocking=True)
        self.positions[:bs].copy_(torch.tensor(positions + [0] * pad, dtype=torch.int64), non_blocking=True)
        self.slot_mapping[:bs].copy_(torch.tensor(slots + [DUMMY_BLOCK * self.block_size] * pad,
                                                  dtype=torch.int64), non_blocking=True)
        self.seq_lens[:bs].copy_(torch.tensor(seq_lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        table = torch.full((bs, self.max_blocks), DUMMY_BLOCK, dtype=torch.int32)
        for i, row in enumerate(block_tables):
            table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        self.block_tables[:bs].copy_(table.to(dev, non_blocking=True))
        if bs in self.graphs:
            self.graphs[bs].replay()
            self.replays += 1
            return self.outputs[bs][:n]
        self.eager_runs += 1
        return self._forward(bs)[:n]
