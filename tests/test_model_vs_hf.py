"""The whole model against HF transformers on tiny random checkpoints of every seed shape (torch backend).

HF applies a checkpoint's rope_scaling (YaRN) to every input, so these engines run with rope_scaling="static"; the
default "auto" would run these prompts, shorter than the original context, with plain RoPE
(tests/test_rope_scaling.py checks that against HF without rope_scaling)."""
from __future__ import annotations

import pytest
import torch

from checkpoints import SEEDS, hf_prompt_logprobs, make_checkpoint
from qwen2_triton import LLM, SamplingParams

TOL = 2e-3  # prompt log-prob agreement in float32 asked of the model (observed ~2e-6)

MIXED_TEXT = (
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "Qwen2 是阿里云研发的通义千问大模型系列的新一代模型。它支持多种语言,包括中文、英语和日语。\n"
    "Emoji test: 🚀🔥👩‍💻 and accents: naïve café, Straße, Ελληνικά, русский текст.\n"
    "    Indented   with   runs   of   spaces\n\n\n\tand tabs.\n"
    "SELECT id, name FROM users WHERE created_at > '2024-01-01' ORDER BY name;\n"
    "Numbers 3.14159, 2718281828, 1e-6 and a URL https://example.com/path?q=1&r=2.\n"
)


def long_prompt(tokenizer, n_min=300) -> list[int]:
    ids = tokenizer.encode(MIXED_TEXT)
    while len(ids) < n_min:
        ids = ids + tokenizer.encode(MIXED_TEXT)
    return ids


@pytest.fixture(scope="module")
def ckpt_factory(module_tmp, qwen_tokenizer_dir):
    cache = {}

    def make(seed, yarn=False, legacy=False, shards=False):
        key = (seed, yarn, legacy, shards)
        if key not in cache:
            path = module_tmp("ckpt")
            cache[key] = (path, make_checkpoint(path, seed, qwen_tokenizer_dir, yarn=yarn, legacy_layout=legacy,
                                                shards=shards, rng_seed=hash(key) % 1000))
        return cache[key]

    return make


def our_prompt_logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    out = llm.generate(ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    return torch.tensor([d[t] for d, t in zip(out.prompt_logprobs[1:], ids[1:])], dtype=torch.float64)


@pytest.mark.parametrize("seed", list(SEEDS))
@pytest.mark.parametrize("yarn,legacy", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["default-new", "yarn-new", "default-legacy", "yarn-legacy"])
def test_prompt_logprobs_match_hf(ckpt_factory, seed, yarn, legacy):
    path, hf = ckpt_factory(seed, yarn, legacy, shards=(seed == "qwen2-7b"))
    llm = LLM(path, dtype="float32", device="cpu", kernels="torch", progress=False, rope_scaling="static")
    ids = long_prompt(llm.tokenizer)
    ours, ref = our_prompt_logprobs(llm, ids), hf_prompt_logprobs(hf, ids)
    assert ref.std() > 0.3  # the random model is far from uniform, so a dropped term would show
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=0)


def test_dropped_bias_is_caught(ckpt_factory):
    """The parity check above can fail: zeroing the q/k/v bias of one layer moves log-probs well past TOL."""
    path, hf = ckpt_factory("qwen2-0.5b")
    llm = LLM(path, dtype="float32", device="cpu", kernels="torch", progress=False, rope_scaling="static")
    ids = long_prompt(llm.tokenizer, 100)
    llm.model.params["model.layers.1.self_attn.qkv_proj.bias"].zero_()
    assert (our_prompt_logprobs(llm, ids) - hf_prompt_logprobs(hf, ids)).abs().max() > 50 * TOL


def test_chunked_prefill_and_packed_batch_match_hf(ckpt_factory):
    path, hf = ckpt_factory("qwen2-1.5b", yarn=True)
    llm = LLM(path, dtype="float32", device="cpu", kernels="torch", progress=False, rope_scaling="static",
              max_num_batched_tokens=96, block_size=16)
    base = long_prompt(llm.tokenizer, 250)
    prompts = [base[:250], base[7:90], base[3:4] + base[50:211]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))
    for ids, out in zip(prompts, outs):
        ours = torch.tensor([d[t] for d, t in zip(out.prompt_logprobs[1:], ids[1:])], dtype=torch.float64)
        torch.testing.assert_close(ours, hf_prompt_logprobs(hf, ids), atol=TOL, rtol=0)
        assert all(len(d) in (2, 3) for d in out.prompt_logprobs[1:])  # top-2 plus the prompt token


def test_greedy_generation_matches_hf_and_batch_matches_single(ckpt_factory):
    path, hf = ckpt_factory("qwen1.5-4b")
    llm = LLM(path, dtype="float32", device="cpu", kernels="torch", progress=False, rope_scaling="static",
              max_num_batched_tokens=64)
    prompts = [llm.tokenizer.encode(t) for t in ("Hello world, this is", "def add(a, b):", "北京是")]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    batch = llm.generate(prompts, params)
    for ids, out in zip(prompts, batch):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
        assert out.token_ids == ref
        assert llm.generate(ids, params)[0].token_ids == out.token_ids
        assert out.finish_reason == "length" and out.prompt_token_ids == ids


@pytest.mark.parametrize("seed,yarn,legacy", [("qwen2-0.5b", True, False), ("qwen2-1.5b", False, True),
                                              ("qwen1.5-4b", False, False), ("qwen2-7b", True, True)])
def test_triton_backend_matches_hf(ckpt_factory, seed, yarn, legacy):
    """The Triton kernels run the whole model (through the interpreter without a GPU): chunked prefill with a
    cache offset, then split-KV decode steps, agree with HF and with the torch backend."""
    path, hf = ckpt_factory(seed, yarn, legacy, shards=(seed == "qwen2-7b"))
    tri = LLM(path, dtype="float32", device="cpu" if not torch.cuda.is_available() else None, kernels="triton",
              progress=False, rope_scaling="static", max_num_batched_tokens=128)
    assert tri.ops.name == "triton"
    ids = long_prompt(tri.tokenizer)
    params = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0, ignore_eos=True)
    out = tri.generate(ids, params)[0]
    ours = torch.tensor([d[t] for d, t in zip(out.prompt_logprobs[1:], ids[1:])], dtype=torch.float64)
    torch.testing.assert_close(ours, hf_prompt_logprobs(hf, ids), atol=TOL, rtol=0)
    ref = LLM(path, dtype="float32", device="cpu", kernels="torch", progress=False,
              rope_scaling="static").generate(ids, params)[0]
    assert out.token_ids == ref.token_ids
