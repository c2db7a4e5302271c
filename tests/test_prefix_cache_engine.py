"""Prefix caching through the whole engine on a tiny checkpoint: the same outputs as without the cache (shared
prefixes, multi-turn chat, n completions, eviction and preemption under a tiny pool, a randomized fuzz, the
padded decode path, a failed step, grammars, the Triton kernels reading shared blocks), and the setting, CLI flag
and server metrics. The block-level logic alone: tests/test_prefix_cache.py."""
from __future__ import annotations

import random

import pytest

from checkpoints import checkpoint_fixture
from qwen2_triton import LLM, SamplingParams


# ------------------------------------------------------------------------------------------- tiny checkpoint
CPU = dict(device="cpu", kernels="torch", progress=False, max_model_len=512, block_size=8)


ckpt = checkpoint_fixture()


@pytest.fixture(scope="module")
def plain(ckpt):
    """The reference: every prompt prefilled in full."""
    return LLM(ckpt, enable_prefix_caching=False, **CPU)


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 5000) for _ in range(n)]


def same(got, want, lp_tol: float = 1e-4) -> None:
    """Greedy tokens equal; log-probs (sampled and prompt) equal up to float32 rounding: a prefix computed in
    another batch, or in other chunks, goes through matmuls of other shapes, so bits may differ."""
    assert got.prompt_token_ids == want.prompt_token_ids
    for g, w in zip(got.outputs, want.outputs):
        assert g.token_ids == w.token_ids
        if w.logprobs is not None:
            for a, b in zip(g.logprobs, w.logprobs):
                assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < lp_tol for k in a)
    if want.prompt_logprobs is not None:
        assert len(got.prompt_logprobs) == len(want.prompt_logprobs) == len(want.prompt_token_ids)
        for a, b in zip(got.prompt_logprobs[1:], want.prompt_logprobs[1:]):
            assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < lp_tol for k in a)


def test_shared_prefix_batches_match_no_caching(ckpt, plain):
    llm = LLM(ckpt, **CPU)
    system = ids(0, 43)  # 5 full blocks of 8 and 3 tokens into the 6th
    prompts = [system + ids(1, 9), system + ids(2, 1), system[:37] + ids(3, 20),  # diverges inside block 4
               system + ids(1, 9) + ids(4, 5), system[:16]]  # the 3rd: a prefix of exactly 2 blocks
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    want = plain.generate(prompts, greedy)
    first = llm.generate(prompts[0], greedy)  # fills the cache ...
    same(first[0], want[0])
    got = llm.generate(prompts, greedy)  # ... which the batch reuses, also within the batch
    for g, w in zip(got, want):
        same(g, w)
    s = llm.stats()
    # batch: p0 cached to its last full block (48 of 52 tokens), p1 43 -> 40, p2 diverges at token 37 -> 32,
    # p3 = p0 + its 6 generated tokens + 5: p0's 48, p4 16 tokens -> 8 (the last block is recomputed)
    assert s["prefix_cache_hits"] == 48 + 40 + 32 + 48 + 8
    assert s["prefix_cache_queries"] == 52 + sum(len(p) for p in prompts)
    assert s["kv_blocks_used"] == 0 and all(r == 0 for r in llm.blocks.ref_counts)
    # prompt log-probs: all of them, equal, though the prompt is cached
    plp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=2, logprobs=1)
    (g,) = llm.generate(prompts[0], plp)
    (w,) = plain.generate(prompts[0], plp)
    same(g, w)


def test_multi_turn_chat_reuses_the_history(ckpt, plain):
    llm = LLM(ckpt, **CPU)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 8}]
    hits = []
    for turn in range(3):
        messages.append({"role": "user", "content": f"Question {turn}: what is {turn} + {turn}?"})
        before = llm.stats()["prefix_cache_hits"]
        (got,) = llm.chat(messages, sp)
        (want,) = plain.chat(messages, sp)
        assert got.outputs[0].token_ids == want.outputs[0].token_ids and got.outputs[0].text == want.outputs[0].text
        hits.append(llm.stats()["prefix_cache_hits"] - before)
        messages.append({"role": "assistant", "content": got.outputs[0].text})
    # every turn after the first reuses at least the previous turn's prompt (less its last partial block)
    assert hits[0] == 0 and all(h >= 40 for h in hits[1:]), hits


def test_n_completions_share_the_prompt_blocks(ckpt, plain):
    llm = LLM(ckpt, **CPU)
    prompt = ids(5, 30)
    sp = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True, logprobs=1)
    (got,) = llm.generate(prompt, sp)
    (want,) = plain.generate(prompt, sp)
    same(got, want)
    # admitted in one step: completions 1 and 2 took completion 0's 3 full blocks before it computed them
    assert llm.stats()["prefix_cache_hits"] == 2 * 24


def test_eviction_under_a_tiny_pool_and_preemption(ckpt, plain):
    llm = LLM(ckpt, **{**CPU, "kv_cache_tokens": 96, "max_num_batched_tokens": 32})  # 12 blocks of 8
    prefixes = [ids(10 + i, 30) for i in range(3)]
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)
    order = [0, 1, 0, 2, 1, 0, 2, 2]  # each request alone: older prefixes are evicted by newer ones
    for k, i in enumerate(order):
        prompt = prefixes[i] + ids(100 + k, 3)
        same(llm.generate(prompt, sp)[0], plain.generate(prompt, sp)[0])
    s = llm.stats()
    assert 0 < s["prefix_cache_hits"] < 24 * (len(order) - 3)  # some hits, some prefixes evicted
    # all at once: 8 x 43 tokens cannot fit 96 at once: preemption, and sharing between the running ones
    prompts = [prefixes[i] + ids(200 + k, 3) for k, i in enumerate(order)]
    for g, w in zip(llm.generate(prompts, sp), plain.generate(prompts, sp)):
        same(g, w)
    assert llm.stats()["preemptions"] > 0
    assert llm.stats()["kv_blocks_used"] == 0 and all(r == 0 for r in llm.blocks.ref_counts)


def test_engine_fuzz_random_shared_prefixes_with_preemption(ckpt, plain):
    rng = random.Random(3)
    llm = LLM(ckpt, **{**CPU, "kv_cache_tokens": 96, "max_num_batched_tokens": 24, "max_num_seqs": 5})
    bases = [ids(30 + i, 40) for i in range(3)]
    for round_ in range(3):
        prompts, params = [], []
        for k in range(6):
            base = rng.choice(bases)
            prompts.append(base[: rng.randint(5, 40)] + ids(1000 * round_ + k, rng.choice([0, 1, 4, 11])))
            params.append(SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0, 0.8]),
                                         seed=k, ignore_eos=True, logprobs=1,
                                         prompt_logprobs=1 if rng.random() < 0.2 else None))
        want = plain.generate(prompts, params)
        for g, w in zip(llm.generate(prompts, params), want):
            same(g, w)
        bm = llm.blocks
        assert all(r == 0 for r in bm.ref_counts) and len(bm.free) == bm.num_blocks - 1
        assert {b: h for h, b in bm.cache.block_of.items()} == bm.cache.hash_of
    s = llm.stats()
    assert s["preemptions"] > 0 and s["prefix_cache_hits"] > 0, s


def test_padded_decode_path_keeps_its_device_block_tables_right(ckpt, plain):
    """The CUDA-graph decode keeps each row's block table on the device by seq id; shared blocks, preemption
    and re-admission with cached blocks must not leave a stale row (on CPU the padded path runs eagerly)."""
    from qwen2_triton.runtime.decode_graphs import DecodeGraphs

    llm = LLM(ckpt, **{**CPU, "kv_cache_tokens": 160, "max_num_seqs": 6, "max_model_len": 256})
    r = llm.runner
    if r.decode_graphs is None:
        r.decode_graphs = DecodeGraphs(llm.model, r.kv_caches, 6, 256, llm.blocks.block_size, use_graphs=False,
                                       tables=r.tables)
    system = ids(50, 20)
    prompts = [system + ids(60 + i, 2 + 3 * i) for i in range(5)]
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    for g, w in zip(llm.generate(prompts, sp), plain.generate(prompts, sp)):
        same(g, w)
    s = llm.stats()
    assert s["preemptions"] > 0 and s["prefix_cache_hits"] > 0 and s["eager_decode_fallbacks"] == 0
    assert r.decode_graphs.eager_runs + r.decode_graphs.replays > 10


def test_a_failed_step_leaves_no_half_written_block_in_the_cache(ckpt, plain, monkeypatch):
    llm = LLM(ckpt, **CPU)
    prompt = ids(70, 40)
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    real = llm.runner.launch
    calls = []

    def dies_once(chunks, blocks):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C inside the prefill, after its blocks were named
        return real(chunks, blocks)

    monkeypatch.setattr(llm.runner, "launch", dies_once)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompt, sp)
    assert len(llm.blocks.cache) == 0 and llm.stats()["kv_blocks_used"] == 0
    same(llm.generate(prompt, sp)[0], plain.generate(prompt, sp)[0])


def test_structured_output_request_waiting_for_its_grammar(ckpt, plain):
    pytest.importorskip("xgrammar")
    from qwen2_triton.runtime.structured_output import StructuredOutput

    llm = LLM(ckpt, **CPU)
    system = ids(80, 35)
    schema = StructuredOutput(json_schema={"type": "object", "properties": {"a": {"type": "integer"}},
                                           "required": ["a"]})
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0, structured_output=schema)]
    prompts = [system + ids(81, 3), system + ids(82, 4)]
    for g, w in zip(llm.generate(prompts, params), plain.generate(prompts, params)):
        same(g, w)
    assert llm.stats()["prefix_cache_hits"] == 32


def test_triton_kernels_read_shared_blocks(ckpt):
    """Through the Triton kernels (the interpreter on CPU: kept tiny)."""
    kw = dict(device="cpu", kernels="triton", dtype="float32", progress=False, max_model_len=64, block_size=8)
    on, off = LLM(ckpt, **kw), LLM(ckpt, enable_prefix_caching=False, **kw)
    system = ids(90, 17)
    prompts = [system + [101], system + [102, 103]]
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, logprobs=1)
    on.generate(prompts[0], sp)
    for g, w in zip(on.generate(prompts, sp), off.generate(prompts, sp)):
        same(g, w)
    assert on.stats()["prefix_cache_hits"] == 16 + 16


# ------------------------------------------------------------------------------------------ settings, metrics
def test_setting_and_cli_flag():
    from qwen2_triton.cli import _engine_kwargs, build_parser
    from qwen2_triton.runtime.engine_config import EngineConfig

    assert EngineConfig().enable_prefix_caching is True  # the default, as vLLM V1
    with pytest.raises(ValueError, match="enable_prefix_caching must be True or False"):
        EngineConfig(enable_prefix_caching="yes")
    p = build_parser()
    assert _engine_kwargs(p.parse_args(["generate", "x"]))["enable_prefix_caching"] is True
    assert _engine_kwargs(p.parse_args(["serve", "--no-enable-prefix-caching"]))["enable_prefix_caching"] is False


def test_server_metrics_count_prefix_cache_tokens():
    from qwen2_triton.server.metrics import EngineMetrics

    m = EngineMetrics("tiny")
    base = dict(running=0, waiting=0, kv_blocks_used=0, kv_blocks_total=10, preemptions=0)
    m.step({**base, "prefix_cache_queries": 50, "prefix_cache_hits": 0}, 1)
    m.step({**base, "prefix_cache_queries": 120, "prefix_cache_hits": 48}, 1)
    m.step({**base, "prefix_cache_queries": 120, "prefix_cache_hits": 48}, 1)
    text = m.render().decode()
    assert 'qwen2_triton:prefix_cache_queries_total{model_name="tiny"} 120.0' in text
    assert 'qwen2_triton:prefix_cache_hits_total{model_name="tiny"} 48.0' in text
