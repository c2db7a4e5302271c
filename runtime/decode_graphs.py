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
from qwen2_triton.runtime.block_tables import DeviceBlockTables


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to max_num_seqs (vLLM's and nano-vllm's ladder)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class DecodeGraphs:
    """Static decode buffers for up to ``max_num_seqs`` sequences and one graph per batch-size bucket.

    Host work per step is O(batch): the step's token ids, positions, slots and lengths go to the device in one
    contiguous pinned copy (rows of ``inputs``; the int32 lengths the kernels read are converted inside the
    step), and the block tables live on the device (runtime/block_tables.py, shared with the runner's eager
    steps): only entries that changed travel.
    """

    def __init__(self, model, kv_caches, max_num_seqs: int, max_model_len: int, block_size: int,
                 use_graphs: bool, tables: DeviceBlockTables | None = None):
        dev = model.device
        self.model, self.kv_caches = model, kv_caches
        self.buckets = batch_buckets(max_num_seqs)
        self.max_bs = self.buckets[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        self.block_size = block_size
        # rows: token ids, positions, cache slots, sequence lengths, rope table rows (position + the sequence's
        # rope table offset, so one graph serves plain-RoPE and YaRN sequences); int64, one host->device copy
        self.inputs = torch.zeros((5, self.max_bs), dtype=torch.int64, device=dev)
        self.inputs[3] = 1  # capture-time lengths: one key each
        self.input_ids, self.positions, self.slot_mapping = self.inputs[0], self.inputs[1], self.inputs[2]
        self.rope_rows = self.inputs[4]
        self.seq_lens = torch.ones(self.max_bs, dtype=torch.int32, device=dev)
        # the runner's device block tables (shared with its eager steps), or this object's own
        self.tables = tables if tables is not None else DeviceBlockTables(self.max_bs, self.max_blocks, dev)
        assert self.tables.fits(self.max_bs, self.max_blocks), "the block tables are smaller than the graphs"
        self.block_tables = self.tables.table
        self.cu_seqlens_q = torch.arange(self.max_bs + 1, dtype=torch.int32, device=dev)
        self._host_inputs = torch.zeros((5, self.max_bs), dtype=torch.int64, pin_memory=dev.type == "cuda")
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
        """The sequence left the running set: no row may keep its table."""
        self.tables.forget(seq_id)

    def _meta(self, bs: int) -> AttentionMetadata:
        # max_seqlen_k fixes the most splits per sequence (the decode grid) at capture, sized for the longest
        # context; each replay's sequences then split by their own lengths on the device
        # (kernels/attention_decode.py split_plan), so a 1k-token context runs 4 splits, not the capture's 64.
        return AttentionMetadata(cu_seqlens_q=self.cu_seqlens_q[: bs + 1], seq_lens=self.seq_lens[:bs],
                                 block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs],
                                 max_seqlen_q=1, max_seqlen_k=self.max_model_len, decode_seqs=bs)

    def _forward(self, bs: int) -> torch.Tensor:
        self.seq_lens[:bs].copy_(self.inputs[3, :bs])  # int64 -> int32 on the device, inside the graph
        return self.model.forward(self.input_ids[:bs], self.positions[:bs], self._meta(bs), self.kv_caches, None,
                                  rope_rows=self.rope_rows[:bs])

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
            block_tables: list[list[int]], seq_ids: list[int], *, rope_rows: list[int]) -> torch.Tensor:
        """One decode step for n sequences; returns float32 logits (n, vocab). rope_rows: each token's cos/sin row
        (position + its sequence's rope table offset, model/qwen2.py ``rope_offsets``).

        The host staging buffers are rewritten every step while the previous step's copies may be queued; that
        is safe because every step ends in a host sync (the sampled tokens are read back) before the next one.
        """
        n = len(input_ids)
        bs = next(b for b in self.buckets if b >= n)
        pad = bs - n
        # Padding rows: token 0 at position 0, writing slot 0 of the dummy block, attending to that one slot.
        self._host_inputs[:, :bs] = torch.tensor([input_ids + [0] * pad, positions + [0] * pad,
                                                  slots + [DUMMY_BLOCK * self.block_size] * pad,
                                                  seq_lens + [1] * pad,
                                                  rope_rows + [0] * pad],
                                                 dtype=torch.int64)
        self.inputs.copy_(self._host_inputs, non_blocking=True)  # whole buffer: contiguous, so a direct DMA
        copies = self.tables.copies
        self.tables.update(seq_ids, block_tables, rows=bs)
        self.table_copies += self.tables.copies - copies
        if bs in self.graphs:
            self.graphs[bs].replay()
            self.replays += 1
            return self.outputs[bs][:n]
        self.eager_runs += 1
        return self._forward(bs)[:n]
