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
    """Static decode buffers for up to ``max_num_seqs`` sequences and one graph per batch-size bucket.

    Host work per step is O(batch): the step's token ids, positions, slots and lengths go to the device in one
    copy (rows of ``inputs``; the int32 lengths the kernels read are converted inside the step), and the block
    tables live on the device, kept up to date from a host mirror that only writes what changed: a running
    sequence gains a block every ``block_size`` tokens, so most steps copy no table at all.
    """

    def __init__(self, model, kv_caches, max_num_seqs: int, max_model_len: int, block_size: int,
                 use_graphs: bool):
        dev = model.device
        self.model, self.kv_caches = model, kv_caches
        self.buckets = batch_buckets(max_num_seqs)
        self.max_bs = self.buckets[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.block_size = block_size
        # rows: token ids, positions, cache slots, sequence lengths (int64; one host->device copy per step)
        self.inputs = torch.zeros((4, self.max_bs), dtype=torch.int64, device=dev)
        self.input_ids, self.positions, self.slot_mapping = self.inputs[0], self.inputs[1], self.inputs[2]
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((self.max_bs, self.max_blocks), DUMMY_BLOCK, dtype=torch.int32, device=dev)
        self.cu_seqlens_q = torch.arange(self.max_bs + 1, dtype=torch.int32, device=dev)
        pin = dev.type == "cuda"
        self._host_inputs = torch.zeros((4, self.max_bs), dtype=torch.int64, pin_memory=pin)
        self._host_tables = torch.full((self.max_bs, self.max_blocks), DUMMY_BLOCK, dtype=torch.int32,
                                       pin_memory=pin)
        self._row_owner = [None] * self.max_bs  # seq_id whose table row i holds, or None
        self._row_len = [0] * self.max_bs  # entries of that table already in _host_tables and on the device
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.replays = 0
        self.eager_runs = 0
        self.table_copies = 0  # steps that had to copy block-table entries to the device
        if use_graphs:
            self._capture()

    def fits(self, n: int, width: int) -> bool:
        return n <= self.max_bs and width <= self.max_blocks

    def forget(self, seq_id: int) -> None:
        """The sequence left the running set (finished or preempted: a preempted one comes back with other
        blocks), so no row may reuse its cached table."""
        for i, owner in enumerate(self._row_owner):
            if owner == seq_id:
                self._row_owner[i] = None

    def _meta(self, bs: int) -> AttentionMetadata:
        # max_seqlen_k fixes the split-KV count at capture; the longest context keeps every length correct
        return AttentionMetadata(cu_seqlens_q=self.cu_seqlens_q[: bs + 1], seq_lens=self.seq_lens[:bs],
                                 block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs],
                                 max_seqlen_q=1, max_seqlen_k=self.max_model_len)

    def _forward(self, bs: int) -> torch.Tensor:
        self.seq_lens[:bs].copy_(self.inputs[3, :bs])  # int64 -> int32 on the device, inside the graph
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

    def _stage_tables(self, seq_ids: list[int], block_tables: list[list[int]], bs: int) -> int:
        """Bring rows [0, bs) of the host mirror up to date; returns the widest row changed (0: none).
        Padding rows need only column 0 (their one key sits in the dummy block)."""
        widest = 0
        for i in range(bs):
            if i < len(seq_ids):
                sid, table = seq_ids[i], block_tables[i]
                start = self._row_len[i] if self._row_owner[i] == sid else 0
                if len(table) > start:
                    self._host_tables[i, start:len(table)] = torch.tensor(table[start:], dtype=torch.int32)
                    widest = max(widest, len(table))
                self._row_owner[i], self._row_len[i] = sid, len(table)
            elif self._row_owner[i] != "pad":
                self._host_tables[i, 0] = DUMMY_BLOCK
                self._row_owner[i], self._row_len[i] = "pad", 1
                widest = max(widest, 1)
        return widest

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            block_tables: list[list[int]], seq_ids: list[int]) -> torch.Tensor:
        """One decode step for n sequences; returns float32 logits (n, vocab).

        The host staging buffers are rewritten every step while the previous step's copies may be queued; that
        is safe because every step ends in a host sync (the sampled tokens are read back) before the next one.
        """
        n = len(input_ids)
        bs = next(b for b in self.buckets if b >= n)
        pad = bs - n
        # Padding rows: token 0 at position 0, writing slot 0 of the dummy block, attending to that one slot.
        self._host_inputs[:, :bs] = torch.tensor([input_ids + [0] * pad, positions + [0] * pad,
                                                  slots + [DUMMY_BLOCK * self.block_size] * pad,
                                                  seq_lens + [1] * pad], dtype=torch.int64)
        self.inputs[:, :bs].copy_(self._host_inputs[:, :bs], non_blocking=True)
        width = self._stage_tables(seq_ids, block_tables, bs)
        if width:
            self.table_copies += 1
            self.block_tables[:bs, :width].copy_(self._host_tables[:bs, :width], non_blocking=True)
        if bs in self.graphs:
            self.graphs[bs].replay()
            self.replays += 1
            return self.outputs[bs][:n]
        self.eager_runs += 1
        return self._forward(bs)[:n]
