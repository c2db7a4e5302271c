"""The demo model (Qwen2.5-Coder-0.5B-Instruct GGUF) end to end against HF transformers' references.

tests/data/demo_refs.json holds HF's prompt ids and greedy tokens; scripts/make_demo_refs.py regenerates it.
"""
from __future__ import annotations

import json
import os

import pytest

from qwen2_triton import LLM, SamplingParams

REFS = json.load(open(os.path.join(os.path.dirname(__file__), "data", "demo_refs.json"), encoding="utf-8"))


@pytest.fixture(scope="module")
def demo_llm(qwen_tokenizer_dir):  # the fixture ensures the demo parts are installed (or fails in CI)
    return LLM(None, dtype="float32", device="cpu", kernels="torch", progress=False, max_model_len=2048)


def prompt_of(llm, case):
    if case["kind"] == "raw":
        return case["prompt"]
    return llm.tokenizer.apply_chat_template(case["messages"], add_generation_prompt=True)


@pytest.mark.parametrize("case", REFS["cases"], ids=lambda c: c["kind"] + ":" + json.dumps(
    c.get("prompt") or c["messages"][-1]["content"], ensure_ascii=False)[:24])
def test_prompt_ids_and_greedy_tokens_match_hf(demo_llm, case):
    out = demo_llm.generate(prompt_of(demo_llm, case), SamplingParams(
        max_tokens=REFS["new_tokens"], temperature=0, ignore_eos=True, skip_special_tokens=False))[0]
    assert out.prompt_token_ids == case["prompt_ids"]
    assert out.token_ids == case["greedy_ids"]
    assert out.text == demo_llm.tokenizer.decode(case["greedy_ids"])


def test_batched_greedy_equals_single(demo_llm):
    cases = REFS["cases"][:3]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    batch = demo_llm.generate([prompt_of(demo_llm, c) for c in cases], params)
    for c, out in zip(cases, batch):
        assert out.token_ids == c["greedy_ids"][:8]


def test_chat_stops_at_im_end(demo_llm):
    out = demo_llm.chat([{"role": "user", "content": "What is 17 * 23?"}],
                        SamplingParams(max_tokens=40, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == 151645  # <|im_end|>
    assert "<|im_end|>" not in out.text and "17" in out.text
