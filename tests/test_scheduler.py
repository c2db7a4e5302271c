"""Continuous batching under memory pressure: requests wait or are preempted, all finish, results unchanged."""
from __future__ import annotations

import pytest

from checkpoints import checkpoint_fixture
from qwen2_triton import LLM, SamplingParams
from qwen2_triton.runtime.block_manager import BlockManager
from qwen2_triton.runtime.sampling_params import SamplingParams as SP
from qwen2_triton.runtime.scheduler import Scheduler
from qwen2_triton.runtime.sequence import Sequence


ckpt = checkpoint_fixture()


def test_pool_exhaustion_preempts_and_recomputes_without_changing_results(ckpt):
    roomy = LLM(ckpt, device="cpu", kernels="torch", progress=False)
    tight = LLM(ckpt, device="cpu", kernels="torch", progress=False, kv_cache_tokens=96, block_size=8,
                max_num_batched_tokens=40)
    prompts = [f"request number {i}: " + "tokens " * (5 + 3 * i) for i in range(5)]
    params = [SamplingParams(max_tokens=20 + 7 * i, temperature=0.8 if i % 2 else 0, seed=i, ignore_eos=True)
              for i in range(5)]
    want = [roomy.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]
    got = tight.generate(prompts, params)
    assert [o.token_ids for o in got] == want
    assert tight.stats()["preemptions"] > 0  # the pool really was too small for all at once
    assert tight.stats()["eager_steps"] > 0
    assert len(tight.blocks.free) == tight.blocks.num_blocks - 1  # every block came back


def test_request_that_can_never_fit_is_rejected_up_front(ckpt):
    llm = LLM(ckpt, device="cpu", kernels="torch", progress=False, kv_cache_tokens=64, block_size=16)
    with pytest.raises(ValueError, match="can never fit the KV cache of 64 tokens"):
        llm.generate("x " * 40, SamplingParams(max_tokens=30))
    assert len(llm.generate("x", SamplingParams(max_tokens=30, ignore_eos=True))[0].token_ids) == 30


def test_scheduler_mixes_decode_and_chunked_prefill():
    blocks = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=16)
    sp = SP(max_tokens=4).resolved({})
    a = Sequence(0, "a", list(range(10)), sp, seed=0)
    b = Sequence(1, "b", list(range(30)), sp, seed=0)
    sched.add(a)
    sched.add(b)
    step1 = sched.schedule()
    assert [(c.seq.seq_id, c.start, c.length) for c in step1] == [(0, 0, 10), (1, 0, 6)]
    for c in step1:
        c.seq.num_computed = c.start + c.length
    a.output_ids.append(5)  # a sampled its first token
    step2 = sched.schedule()
    assert [(c.seq.seq_id, c.start, c.length) for c in step2] == [(0, 10, 1), (1, 6, 15)]
    assert step2[0].samples and not step2[1].samples
