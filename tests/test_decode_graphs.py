"""Decode on static padded buffers (the CUDA-graph path): same tokens as the plain eager path.

On CPU the padded path runs eagerly, which checks the static buffers, bucket padding and the dummy-block rows;
on a GPU the same tests replay captured graphs.
"""
from __future__ import annotations

import pytest
import torch

from checkpoints import make_checkpoint
from qwen2_triton import LLM, SamplingParams
from qwen2_triton.runtime.decode_graphs import DecodeGraphs, batch_buckets

CUDA = torch.cuda.is_available()


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, qwen_tokenizer_dir):
    path = str(tmp_path_factory.mktemp("graph_ckpt"))
    make_checkpoint(path, "qwen2-0.5b", qwen_tokenizer_dir)
    return path


def make(ckpt, padded: bool, **kw):
    llm = LLM(ckpt, dtype="float32", progress=False, max_num_seqs=6, max_model_len=256, enforce_eager=not padded,
              **({"device": "cpu", "kernels": "torch"} if not CUDA else {}), **kw)
    if padded and llm.runner.decode_graphs is None:  # CPU: run the same padded path without capture
        r = llm.runner
        r.decode_graphs = DecodeGraphs(llm.model, r.kv_caches, 6, 256, llm.blocks.block_size, use_graphs=False)
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
