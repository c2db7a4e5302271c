"""Structured output (runtime/structured_output.py): JSON enforced by xgrammar's logits mask.

A tiny random checkpoint sampled at temperature 1 writes garbage unless masked, so valid JSON from it is the
mask's doing; json.loads and jsonschema (not xgrammar) judge it. The demo model checks a real model's answer.
"""
from __future__ import annotations

import json
import threading

import jsonschema
import pytest

from checkpoints import checkpoint_fixture
from qwen2_triton import LLM, SamplingParams
from qwen2_triton.runtime.structured_output import (SCHEMA_OPTIONS, StructuredOutput, StructuredOutputManager,
                                                    check_structured_output)

# Tight bounds so a random model's output closes: every string, number and array is bounded, whitespace runs are
# bounded by SCHEMA_OPTIONS. Measured: 65-85 tokens per output.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["name", "age", "color", "tags"],
}
SEEDS = (0, 1, 2)
MAX_TOKENS = 150  # well above the outputs' length, and fits the tight pool of the preemption test


ckpt = checkpoint_fixture()


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, device="cpu", kernels="torch", progress=False, max_model_len=1024)


def person_params(seed: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
                          structured_output=StructuredOutput(json_schema=PERSON), **kw)


@pytest.fixture(scope="module")
def person_outputs(llm):
    return llm.generate(["hello"] * len(SEEDS), [person_params(s) for s in SEEDS])


def assert_person(out, eos_ids):
    assert out.finish_reason == "stop", f"cut at {len(out.token_ids)} tokens: {out.text!r}"
    assert out.stop_reason in eos_ids and out.token_ids[-1] == out.stop_reason  # the grammar ends on an eos
    value = json.loads(out.text)
    jsonschema.validate(value, PERSON)
    return value


# --------------------------------------------------------------------------------------------- API checks
def test_structured_output_is_checked_on_construction():
    with pytest.raises(ValueError, match="exactly one of json_schema"):
        StructuredOutput()
    with pytest.raises(ValueError, match="exactly one of json_schema"):
        StructuredOutput(json_schema=PERSON, json_object=True)
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutput(json_schema='{"type": ')
    with pytest.raises(ValueError, match="must be a JSON object"):
        StructuredOutput(json_schema="[1, 2]")
    with pytest.raises(ValueError, match="json_object must be True or False"):
        StructuredOutput(json_object="yes")
    with pytest.raises(ValueError, match="SamplingParams.structured_output"):
        SamplingParams(structured_output={"type": "object"})
    # the text form and the dict form are the same schema (one cache entry), key order kept
    text = StructuredOutput(json_schema=PERSON).schema_text
    assert StructuredOutput(json_schema=json.dumps(PERSON)).schema_text == text
    assert list(json.loads(text)["properties"]) == list(PERSON["properties"])


@pytest.mark.parametrize("schema, problem", [
    ({"type": "objectx"}, 'Unsupported type "objectx"'),
    ({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}, "nope"),
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum greater than maximum"),
    ({"type": "string", "pattern": "(("}, "parenthesis is not closed"),
])
def test_unusable_schema_is_refused_before_queueing(llm, schema, problem):
    with pytest.raises(ValueError, match="json_schema cannot be used") as e:
        check_structured_output(StructuredOutput(json_schema=schema))
    assert problem in str(e.value) and "/project/cpp" not in str(e.value)  # xgrammar's file:line prefix dropped
    with pytest.raises(ValueError, match="json_schema cannot be used"):
        llm.generate("hello", SamplingParams(max_tokens=4, structured_output=StructuredOutput(json_schema=schema)))
    assert not llm.core.has_unfinished_requests()


# --------------------------------------------------------------------------------------------- tiny model
def test_schema_output_parses_and_validates(llm, person_outputs):
    values = [assert_person(o, llm.eos_token_ids) for o in person_outputs]
    assert len({json.dumps(v) for v in values}) == len(values)  # the seeds really drew different outputs


def test_json_object_output_is_an_object_or_a_prefix_of_one(llm):
    """Free strings from random weights rarely close, so some outputs are cut by max_tokens: each must still be a
    prefix of a JSON object (checked on the text by a separate grammar over a one-token vocabulary), and each that
    stopped must parse."""
    import xgrammar as xgr

    checker = xgr.GrammarCompiler(xgr.TokenizerInfo(["<eos>"], stop_token_ids=[0])).compile_json_schema(
        StructuredOutput(json_object=True).schema_text, **SCHEMA_OPTIONS)
    so = StructuredOutput(json_object=True)
    outs = llm.generate(["hello"] * 4, [SamplingParams(max_tokens=20, temperature=1.0, seed=s, structured_output=so)
                                         for s in range(4)])
    for o in outs:
        assert o.text.startswith("{") and xgr.GrammarMatcher(checker).accept_string(o.text), o.text
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
        else:
            assert len(o.token_ids) == 20


def test_mixed_batch_rows_are_independent(llm):
    """Constrained and unconstrained requests in one batch: every request draws exactly the tokens it draws alone
    (the mask touches only its own rows). The unconstrained ones sit in rows 0 and 2, which the constrained runs
    alone have filled in the bitmask before: a mask applied to every row would change their tokens."""
    prompts = ["the quick brown fox", "hello", "1 2 3", "hello"]
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True), person_params(7),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), person_params(8)]
    alone = [llm.generate(p, sp)[0].token_ids for p, sp in zip(prompts, params)]
    together = llm.generate(prompts, params)
    assert [o.token_ids for o in together] == alone
    for o in (together[1], together[3]):
        assert_person(o, llm.eos_token_ids)


def test_steps_without_grammar_do_no_grammar_work(ckpt):
    llm = LLM(ckpt, device="cpu", kernels="torch", progress=False, max_model_len=256)
    llm.generate(["a", "b"], SamplingParams(max_tokens=3, temperature=1.0, seed=0))
    so = llm.core.structured
    assert so._compiler is None and so._bitmask is None and so._pool is None


def test_preempted_requests_keep_their_matchers(ckpt, person_outputs):
    """A pool too small for all three: sequences are preempted and recomputed mid-JSON; the matcher must carry on
    from its output tokens, so the results equal the roomy run's."""
    tight = LLM(ckpt, device="cpu", kernels="torch", progress=False, kv_cache_tokens=160, block_size=8,
                max_num_batched_tokens=40)
    got = tight.generate(["hello"] * len(SEEDS), [person_params(s) for s in SEEDS])
    assert tight.stats()["preemptions"] > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in person_outputs]
    assert len(tight.blocks.free) == tight.blocks.num_blocks - 1


def test_grammar_end_finishes_even_with_ignore_eos(llm):
    so = StructuredOutput(json_schema={"enum": ["yes", "no"]})
    out = llm.generate("hello", SamplingParams(max_tokens=40, temperature=1.0, seed=0, ignore_eos=True,
                                               structured_output=so))[0]
    assert out.finish_reason == "stop" and out.stop_reason in llm.eos_token_ids
    assert json.loads(out.text) in ("yes", "no")


def test_grammar_compile_does_not_block_other_requests(llm, monkeypatch):
    """While one request's grammar compiles (held on an Event), another request is admitted and completes; then the
    first one runs and is valid."""
    gate, started = threading.Event(), threading.Event()
    real = StructuredOutputManager._compile

    def slow_compile(self, schema_text):
        started.set()
        gate.wait(timeout=60)
        return real(self, schema_text)

    monkeypatch.setattr(StructuredOutputManager, "_compile", slow_compile)
    schema = {**PERSON, "title": "not cached yet"}
    held = llm.stream("hello", SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=0,
                                              structured_output=StructuredOutput(json_schema=schema)))
    try:
        free = list(llm.stream("count: 1 2", SamplingParams(max_tokens=8, temperature=1.0, seed=1, ignore_eos=True)))
        assert sum(len(d.token_ids) for d in free) == 8 and free[-1].finish_reason == "length"
        assert started.is_set() and not gate.is_set()
        stats = llm.stats()
        assert stats["waiting"] == 1 and stats["running"] == 0  # held back, not admitted
    finally:
        gate.set()
    deltas = list(held)
    assert deltas[-1].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(d.text for d in deltas)), schema)


def test_failed_compile_aborts_only_its_request(llm, monkeypatch):
    def broken(self, schema_text):
        raise RuntimeError("xgrammar exploded")

    monkeypatch.setattr(StructuredOutputManager, "_compile", broken)
    so = StructuredOutput(json_schema={**PERSON, "title": "fails to compile"})
    bad, good = llm.generate(["hello", "hello"], [SamplingParams(max_tokens=4, structured_output=so),
                                                  SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)])
    assert bad.finish_reason == "abort" and bad.token_ids == []
    assert good.finish_reason == "length" and len(good.token_ids) == 4
    assert not llm.core.has_unfinished_requests() and not llm.core.structured._seqs


# --------------------------------------------------------------------------------------------- demo model
@pytest.fixture(scope="module")
def demo_llm(demo_gguf):
    return LLM(demo_gguf, device="cpu", dtype="float32", kernels="torch", progress=False, max_model_len=1024)


def test_demo_model_answers_in_the_schema(demo_llm):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"]}
    sp = SamplingParams(max_tokens=40, temperature=0, structured_output=StructuredOutput(json_schema=schema))
    out = demo_llm.chat([{"role": "user", "content": "Ann is 31 years old. Give her name and age as JSON."}], sp)[0]
    assert out.finish_reason == "stop", out.text  # complete: the grammar closed and the model ended on its eos
    value = json.loads(out.text)
    jsonschema.validate(value, schema)
    assert value == {"name": "Ann", "age": 31}


def test_demo_model_json_object(demo_llm):
    out = demo_llm.chat([{"role": "user", "content": 'Reply with a JSON object whose key "ok" is true.'}],
                        SamplingParams(max_tokens=24, temperature=0,
                                       structured_output=StructuredOutput(json_object=True)))[0]
    assert out.finish_reason == "stop", out.text
    assert json.loads(out.text) == {"ok": True}
