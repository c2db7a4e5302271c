"""Async output (runtime/step_loop.py): a step's outputs are processed while the next step runs, and users get
exactly what the synchronous loop gives them: the same tokens, text, stops, log-probs and streamed deltas, with
every block freed at the end. On the CPU the default is off, so these tests turn it on."""
from __future__ import annotations

import asyncio
import time

import pytest

from checkpoints import checkpoint_fixture
from qwen2_triton import LLM, SamplingParams
from qwen2_triton.runtime.async_llm import AsyncLLM
from qwen2_triton.runtime.engine_config import EngineConfig

ENGINE = dict(device="cpu", kernels="torch", progress=False, max_model_len=128, max_num_seqs=4,
              max_num_batched_tokens=32)  # prompts are chunked and steps mix prefill with decodes


ckpt = checkpoint_fixture()


@pytest.fixture(scope="module")
def sync(ckpt):
    return LLM(ckpt, **ENGINE, async_output="off")


@pytest.fixture(scope="module")
def overlapped(ckpt):
    return LLM(ckpt, **ENGINE, async_output="on")


def idle(llm) -> bool:
    core = llm.core
    return not core.has_unfinished_requests() and len(core.blocks.free) == core.blocks.num_blocks - 1


PROMPTS = ["The quick brown fox", "def fib(n):", "Once upon a time " * 6, "1, 2, 3,", "Hello"]


def mixed_params() -> list[SamplingParams]:
    """Greedy, seeded sampling with penalties, n > 1, log-probs, prompt log-probs, eos and max_tokens: requests
    that end at different steps. (Stop strings: below, alone; a request a stop string ends stays in the batch one
    step longer, and on the CPU a matmul's rounding depends on the batch's rows, so the others' log-probs would
    differ in the last bits.)"""
    return [SamplingParams(max_tokens=12, temperature=0, logprobs=2),
            SamplingParams(max_tokens=9, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=3),
            SamplingParams(max_tokens=14, temperature=0, prompt_logprobs=1),
            SamplingParams(max_tokens=7, temperature=1.0, n=2, seed=5, presence_penalty=0.4),
            SamplingParams(max_tokens=1, temperature=0)]


def test_async_output_is_off_on_the_cpu_by_default_and_validated(ckpt, sync, overlapped):
    assert not sync.core.async_output and overlapped.core.async_output
    assert any("async output off" in line for line in sync.core.describe())
    with pytest.raises(ValueError, match="async_output must be one of"):
        EngineConfig(model=ckpt, async_output="yes")


def test_outputs_are_those_of_the_synchronous_loop(sync, overlapped):
    want = sync.generate(PROMPTS, mixed_params())
    got = overlapped.generate(PROMPTS, mixed_params())
    for w, g in zip(want, got):
        assert g.prompt_logprobs == w.prompt_logprobs
        for wc, gc in zip(w.outputs, g.outputs, strict=True):
            assert (gc.text, gc.token_ids, gc.finish_reason, gc.stop_reason, gc.logprobs) == \
                (wc.text, wc.token_ids, wc.finish_reason, wc.stop_reason, wc.logprobs)
    assert idle(overlapped)


def test_streamed_deltas_are_those_of_the_synchronous_loop(sync, overlapped):
    sp = [SamplingParams(max_tokens=10, temperature=0.7, seed=s) for s in (1, 2)]
    for llm in (sync, overlapped):
        streams = [llm.stream(p, q) for p, q in zip(PROMPTS, sp)]
        deltas = [[], []]
        live = [True, True]
        while any(live):  # interleaved: each stream's next() steps every running request
            for i, s in enumerate(streams):
                if live[i]:
                    d = next(s, None)
                    live[i] = d is not None
                    if d is not None:
                        deltas[i].append((d.text, tuple(d.token_ids), d.finish_reason))
        if llm is sync:
            want = deltas
    assert deltas == want and all(d[-1][2] == "length" for d in deltas)
    assert "".join(t for t, *_ in want[0]) == sync.generate(PROMPTS[0], sp[0])[0].outputs[0].text
    assert idle(overlapped)


def test_a_steps_outputs_are_processed_between_the_next_launch_and_its_collect(overlapped, monkeypatch):
    core, events = overlapped.core, []
    for name in ("launch", "collect"):
        real = getattr(core, name)
        monkeypatch.setattr(core, name, lambda *a, _real=real, _name=name: events.append(_name) or _real(*a))
    real_process = overlapped.outputs.process
    monkeypatch.setattr(overlapped.outputs, "process", lambda outs, now: events.append("process") or
                        real_process(outs, now))
    overlapped.generate(PROMPTS[1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    # a 1-chunk prompt and 3 decodes: step k+1 is launched before step k's outputs are processed
    assert events == ["launch", "collect"] + ["launch", "process", "collect"] * 3 + ["process"]


def test_a_stop_string_request_computes_one_token_more_and_drops_it(sync, overlapped):
    free = sync.generate(PROMPTS[0], SamplingParams(max_tokens=16, temperature=0))[0].outputs[0]
    stop = free.text[len(free.text) // 2:][:2]
    assert stop.strip()
    sp = SamplingParams(max_tokens=16, temperature=0, stop=[stop])
    want = sync.generate(PROMPTS[0], sp)[0].outputs[0]
    rows = []
    real = overlapped.runner.launch
    overlapped.runner.launch = lambda chunks, blocks: rows.append(len(chunks)) or real(chunks, blocks)
    try:
        got = overlapped.generate(PROMPTS[0], sp)[0].outputs[0]
    finally:
        del overlapped.runner.launch
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop")
    assert len(got.token_ids) < 16 and len(rows) == len(got.token_ids) + 1  # the prefill, then one step more
    assert idle(overlapped)


def test_an_error_while_processing_outputs_still_collects_the_launched_step(sync, overlapped, monkeypatch):
    real, calls = overlapped.outputs.process, []

    def fails_once(outs, now):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("detokenizer broke")
        return real(outs, now)

    monkeypatch.setattr(overlapped.outputs, "process", fails_once)
    core, counts = overlapped.core, {"launch": 0, "collect": 0}
    for name in counts:
        real_fn = getattr(core, name)

        def counted(*a, _real=real_fn, _name=name):
            counts[_name] += 1
            return _real(*a)
        monkeypatch.setattr(core, name, counted)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with pytest.raises(RuntimeError, match="detokenizer broke"):
        overlapped.generate(PROMPTS[3], sp)
    assert counts["launch"] == counts["collect"] >= 2  # the step launched before the error was collected
    assert idle(overlapped)  # the failed generate aborted its request
    monkeypatch.undo()
    assert overlapped.generate(PROMPTS[3], sp)[0].outputs[0].token_ids == \
        sync.generate(PROMPTS[3], sp)[0].outputs[0].token_ids


def test_async_engine_with_async_output(ckpt, sync):
    sps = [SamplingParams(max_tokens=8, temperature=0.9, seed=s, ignore_eos=True) for s in range(3)]
    want = [o.outputs[0].token_ids for o in sync.generate(PROMPTS[:3], sps)]

    async def main():
        engine = AsyncLLM(ckpt, **ENGINE, async_output="on")
        try:
            async def run(p, sp, rid):
                ids = []
                async for out in await engine.generate(p, sp, request_id=rid):
                    ids += out.outputs[0].token_ids
                return ids

            async def leave_early():
                async for _ in await engine.generate(PROMPTS[4], SamplingParams(max_tokens=50, ignore_eos=True)):
                    break

            got = await asyncio.gather(*(run(p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(PROMPTS, sps))),
                                       leave_early())
            deadline = time.monotonic() + 300  # the abandoned request is aborted at the next step boundary:
            while time.monotonic() < deadline:  # usually milliseconds; the deadline only bounds a failure
                if engine.stats()["unfinished"] == 0 and engine.stats()["running"] == 0:
                    break
                await asyncio.sleep(0.01)
            return got[:3], engine.stats()
        finally:
            engine.shutdown()

    got, stats = asyncio.run(main())
    assert got == want
    assert stats["unfinished"] == 0 and stats["running"] == 0 and stats["kv_blocks_used"] == 0
