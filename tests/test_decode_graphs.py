"""Decode on static padded buffers (the CUDA-graph path): same tokens as the plain eager path.

On CPU the padded path runs eagerly, which checks the static buffers, bucket padding and the dummy-block rows;
on a GPU the same tests replay captured graphs.
"""
from __future__ import annotations

import pytest
import torch

from checkpoints import checkpoint_fixture, make_checkpoint
from qwen2_triton import LLM, SamplingParams
from qwen2_triton.runtime.decode_graphs import DecodeGraphs, batch_buckets

CUDA = torch.cuda.is_available()


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


ckpt = checkpoint_fixture()


def make(ckpt, padded: bool, **kw):
    llm = LLM(ckpt, dtype="float32", progress=False, max_num_seqs=6, max_model_len=256, enforce_eager=not padded,
              **({"device": "cpu", "kernels": "torch"} if not CUDA else {}), **kw)
    if padded and llm.runner.decode_graphs is None:  # CPU: run the same padded path without capture
        r = llm.runner
        r.decode_graphs = DecodeGraphs(llm.model, r.kv_caches, 6, 256, llm.blocks.block_size, use_graphs=False,
                                       tables=r.tables)
    return llm


def test_padded_decode_matches_eager_across_batch_sizes(ckpt):
    eager, padded = make(ckpt, padded=False), make(ckpt, padded=True)
    prompts = [f"prompt {i} " + "word " * (3 * i) for i in range(5)]  # 5 sequences -> bucket 6, 1 padding row
    params = [SamplingParams(max_tokens=6 + 3 * i, temperature=0.7 * (i % 2), seed=i, ignore_eos=True)
              for i in range(5)]
    # lengths differ, so the batch shrinks 5 -> 4 -> ... -> 1 and walks down the buckets
    want = [o.token_ids for o in eager.generate(prompts, params)]
    got = [o.token_ids for o in padded.generate(prompts, params)]
    assert got == want
    g = padded.runner.decode_graphs
    assert (g.replays if CUDA else g.eager_runs) > 10  # decode steps went through the padded path


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU (the padded path itself is checked above on CPU)")
def test_graph_replay_matches_eager_at_long_context(tmp_path, qwen_tokenizer_dir):
    make_checkpoint(str(tmp_path), "qwen2-7b", qwen_tokenizer_dir)
    kw = dict(dtype="bfloat16", max_num_seqs=4, max_model_len=8192)
    eager = LLM(str(tmp_path), enforce_eager=True, progress=False, **kw)
    graph = LLM(str(tmp_path), progress=False, **kw)
    ids = [[(37 * i + j) % 150000 for j in range(5000 + 700 * i)] for i in range(3)]
    p = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in graph.generate(ids, p)] == [o.token_ids for o in eager.generate(ids, p)]
    assert graph.runner.decode_graphs.replays >= 31


def test_padded_decode_through_preemptions_matches_eager(ckpt):
    """A KV pool too small for all five at once: sequences are preempted and come back with other blocks, and
    rows of the static block table change owner; the cached table rows must never outlive their sequence."""
    eager = make(ckpt, padded=False)
    tight = make(ckpt, padded=True, kv_cache_tokens=160, block_size=8)
    prompts = [f"request {i} " + "tok " * (10 + 4 * i) for i in range(5)]
    p = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in eager.generate(prompts, p)]
    assert [o.token_ids for o in tight.generate(prompts, p)] == want
    assert tight.stats()["preemptions"] > 0
    g = tight.runner.decode_graphs
    decodes = g.replays + g.eager_runs
    # tables change when a sequence joins or leaves a row or crosses into a new 8-token block, not every step
    assert 0 < g.table_copies < decodes
    assert tight.stats()["eager_decode_fallbacks"] == 0


class _RecordingModel:
    """Stands in for Qwen2Model: records the metadata a decode step hands it."""

    device = torch.device("cpu")

    def forward(self, ids, positions, meta, kv_caches, logit_rows, rope_rows):
        self.tables, self.lens, self.slots = meta.block_tables.clone(), meta.seq_lens.clone(), meta.slot_mapping.clone()
        self.rope_rows = rope_rows.clone()
        return torch.zeros(ids.shape[0], 3)


def test_block_tables_follow_growth_departures_and_preemption():
    from qwen2_triton.runtime.block_manager import DUMMY_BLOCK

    m = _RecordingModel()
    g = DecodeGraphs(m, None, max_num_seqs=4, max_model_len=64, block_size=8, use_graphs=False)

    def step(seqs):  # seqs: [(seq_id, table, length)]; odd ids stand for YaRN sequences (rope table offset 64)
        rope_rows = [n - 1 + 64 * (sid % 2) for sid, _, n in seqs]
        g.run([1] * len(seqs), [n - 1 for _, _, n in seqs], [t[-1] * 8 for _, t, _ in seqs], [n for *_, n in seqs],
              [t for _, t, _ in seqs], [sid for sid, _, _ in seqs], rope_rows=rope_rows)
        for row, (_, table, n) in enumerate(seqs):
            assert m.tables[row, : len(table)].tolist() == table and m.lens[row].item() == n
        assert m.rope_rows[: len(seqs)].tolist() == rope_rows and not m.rope_rows[len(seqs):].any()  # pads: row 0
        assert m.lens.dtype == torch.int32

    step([(7, [3, 4], 12), (9, [5], 3)])
    copies = g.table_copies
    step([(7, [3, 4], 13), (9, [5], 4)])  # no block added: nothing to copy
    assert g.table_copies == copies
    step([(7, [3, 4], 14), (9, [5, 1], 9)])  # 9 crossed into a new block
    g.forget(7)  # 7 preempted, and back in row 0 at the same length with other blocks
    step([(7, [6, 2], 14), (9, [5, 1], 10)])
    step([(9, [5, 1], 11)])  # 7 left: 9 moves to row 0
    step([(9, [5, 1], 12), (7, [6, 2], 15), (4, [8], 1)])  # 3 sequences run in the bucket of 4
    assert m.tables.shape[0] == 4 and m.tables[3, 0].item() == DUMMY_BLOCK and m.lens[3].item() == 1
    assert m.slots[3].item() == DUMMY_BLOCK * 8  # the padding row writes into the dummy block
