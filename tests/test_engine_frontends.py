"""The engine split: EngineCore outputs are immutable token-level records; the offline LLM and the asyncio
AsyncLLM on top give the same tokens, n completions are seeded per completion, and every way of leaving a
request early frees its KV blocks."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from checkpoints import checkpoint_fixture
from qwen2_triton import LLM, SamplingParams
from qwen2_triton.runtime.async_llm import AsyncLLM, EngineDeadError
from qwen2_triton.runtime.request import EngineCoreOutput

ENGINE = dict(device="cpu", kernels="torch", progress=False, max_model_len=256, max_num_seqs=4)


ckpt = checkpoint_fixture("qwen2-1.5b")


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, **ENGINE)


def idle(engine_core) -> bool:
    return not engine_core.has_unfinished_requests() and \
        len(engine_core.blocks.free) == engine_core.blocks.num_blocks - 1


def test_core_step_returns_immutable_token_records(llm):
    (pp,) = [llm.inputs.process("Hello", SamplingParams(max_tokens=3, temperature=0, logprobs=1), "r")]
    llm.core.add_request(pp.engine_requests[0])
    outs = []
    while llm.core.has_unfinished_requests():
        outs += llm.core.step()
    assert all(isinstance(o, EngineCoreOutput) and o.request_id == "r" for o in outs)
    assert [len(o.new_token_ids) for o in outs] == [1, 1, 1] and outs[-1].finish_reason == "length"
    with pytest.raises(dataclasses.FrozenInstanceError):
        outs[0].new_token_ids = ()
    assert all(not hasattr(o, "text") for o in outs)  # the core never sees text


@pytest.mark.parametrize("how", ["close_before_start", "drop_before_start", "close_mid_stream"])
def test_a_stream_left_early_frees_its_request(llm, how):
    s = llm.stream("Once upon a time", SamplingParams(max_tokens=20, ignore_eos=True))
    if how == "close_mid_stream":
        next(s)
        s.close()
    elif how == "close_before_start":
        s.close()
    else:
        del s
    assert idle(llm.core)
    assert llm.generate("x", SamplingParams(max_tokens=2))[0].finish_reason  # still usable


def test_streamed_deltas_share_one_prompt_list(ckpt, llm):
    """AsyncLLM's deltas carry the prompt ids without copying them each step (a copy per token per request was
    O(prompt)); the ids are the prompt's."""
    engine = AsyncLLM(ckpt, **ENGINE)
    try:
        async def main():
            return [d async for d in await engine.generate("Once upon a time",
                                                           SamplingParams(max_tokens=5, ignore_eos=True))]
        deltas = asyncio.run(main())
    finally:
        engine.shutdown()
    assert len(deltas) >= 3
    assert all(d.prompt_token_ids is deltas[0].prompt_token_ids for d in deltas)
    whole = llm.generate("Once upon a time", SamplingParams(max_tokens=1))[0]
    assert deltas[0].prompt_token_ids == whole.prompt_token_ids


def test_n_completions_are_seeded_per_completion(llm):
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=3, ignore_eos=True)
    (out,) = llm.generate("The sky is", sp)
    texts = [c.token_ids for c in out.outputs]
    assert [c.index for c in out.outputs] == [0, 1, 2] and len({tuple(t) for t in texts}) == 3
    assert texts == [c.token_ids for c in llm.generate("The sky is", sp)[0].outputs]  # reproducible
    single = llm.generate("The sky is", dataclasses.replace(sp, n=1))[0].token_ids
    assert texts[0] == single
    greedy = llm.generate("The sky is", SamplingParams(max_tokens=6, temperature=0, n=2))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids
    streamed = {}
    for d in llm.stream("The sky is", sp):
        streamed.setdefault(d.index, []).extend(d.token_ids)
    assert [streamed[i] for i in range(3)] == texts
    assert idle(llm.core)


def test_prompt_logprobs_come_once_with_n(llm):
    out = llm.generate("a b c d", SamplingParams(max_tokens=2, n=2, prompt_logprobs=0, seed=1))[0]
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids) and out.prompt_logprobs[0] is None


def run_async(engine, coro):
    return asyncio.run(coro)


def test_async_llm_gives_the_offline_tokens_and_aborts_free_blocks(ckpt, llm):
    engine = AsyncLLM(ckpt, **ENGINE)
    try:
        prompts = [f"prompt number {i}" for i in range(6)]  # more than max_num_seqs: some wait
        sps = [SamplingParams(max_tokens=10, temperature=0.8, seed=i, ignore_eos=True) for i in range(6)]

        async def one(p, sp):
            ids = []
            async for out in await engine.generate(p, sp):
                ids += out.outputs[0].token_ids if out.outputs else []
            return ids

        async def early_exit():
            gen = await engine.generate("abandon me", SamplingParams(max_tokens=100, ignore_eos=True))
            async for _ in gen:
                break  # leaving the loop aborts the request
            await gen.aclose()

        async def cancelled():
            async def consume():
                async for _ in await engine.generate("cancel me", SamplingParams(max_tokens=100, ignore_eos=True)):
                    await asyncio.sleep(0)
            task = asyncio.ensure_future(consume())
            while engine.stats()["running"] == 0:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        async def main():
            got = await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, sps)), early_exit(), cancelled())
            return got[:6]

        got = asyncio.run(main())
        want = [o.token_ids for o in llm.generate(prompts, sps)]
        assert got == want

        async def settle():
            while engine.stats()["unfinished"] or engine.stats()["kv_blocks_used"]:
                await asyncio.sleep(0.01)
        asyncio.run(asyncio.wait_for(settle(), 60))

        async def bad():
            with pytest.raises(ValueError, match="empty"):
                await engine.generate("", SamplingParams())
        asyncio.run(bad())
    finally:
        engine.shutdown()


def test_an_engine_error_reaches_every_request_and_the_engine_says_so(ckpt, monkeypatch):
    engine = AsyncLLM(ckpt, **ENGINE)
    try:
        def boom():
            raise RuntimeError("planted failure")
        monkeypatch.setattr(engine.core, "step", boom)

        async def main():
            async def one():
                async for _ in await engine.generate("x", SamplingParams(max_tokens=3)):
                    pass
            results = await asyncio.gather(one(), one(), return_exceptions=True)
            assert all(isinstance(r, EngineDeadError) and "planted failure" in str(r) for r in results)
            with pytest.raises(EngineDeadError):
                await engine.generate("y", SamplingParams(max_tokens=1))
        asyncio.run(main())
        assert engine.dead is not None
    finally:
        engine.shutdown()


def test_a_request_that_reaches_the_inbox_after_the_engine_died_is_told(ckpt, monkeypatch):
    """The window between generate's liveness check and the request reaching the engine: a request whose prompt
    processing ends only after the engine thread died (here held until then) gets EngineDeadError, not a wait
    forever (two copies of the suite on 2 cores hung here before the fix)."""
    engine = AsyncLLM(ckpt, **ENGINE)
    try:
        def boom():
            raise RuntimeError("planted failure")
        monkeypatch.setattr(engine.core, "step", boom)
        process = engine.inputs.process

        def late(prompt, *a):
            out = process(prompt, *a)
            deadline = time.monotonic() + 60
            while prompt == "late" and engine.dead is None and time.monotonic() < deadline:
                time.sleep(0.01)
            return out
        monkeypatch.setattr(engine.inputs, "process", late)

        async def one(prompt):
            async for _ in await engine.generate(prompt, SamplingParams(max_tokens=3)):
                pass

        async def main():
            return await asyncio.gather(one("late"), one("x"), return_exceptions=True)
        results = asyncio.run(asyncio.wait_for(main(), 60))
        assert all(isinstance(r, EngineDeadError) and "planted failure" in str(r) for r in results), results
    finally:
        engine.shutdown()
