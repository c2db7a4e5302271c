"""Sampling semantics: masks and penalties against plain references, seeds, stop conditions, defaults."""
from __future__ import annotations

import math

import pytest
import torch

from checkpoints import make_checkpoint
from qwen2_triton import LLM, SamplingParams
from qwen2_triton.runtime.sampler import (SamplingTensors, apply_penalties, bits_to_exponential, exponential_noise,
                                         filter_logits, sample)


def tensors(B, **kw):
    base = dict(temperature=torch.ones(B), top_k=torch.full((B,), 10**9, dtype=torch.int64), top_p=torch.ones(B),
                min_p=torch.zeros(B), repetition_penalty=torch.ones(B), presence_penalty=torch.zeros(B),
                frequency_penalty=torch.zeros(B), seeds=torch.zeros(B, dtype=torch.int64),
                steps=torch.zeros(B, dtype=torch.int64))
    base.update(kw)
    return SamplingTensors(**base)


def kept_reference(logits_row, temperature, top_k, top_p, min_p):
    """Plain one-row reference of transformers' warpers in order: temperature, top-k, top-p, min-p."""
    x = [v / temperature for v in logits_row.tolist()]
    V = len(x)
    keep = set(range(V))
    if top_k < V:
        kth = sorted(x, reverse=True)[top_k - 1]
        keep = {i for i in keep if x[i] >= kth}

    def probs(ids):
        m = max(x[i] for i in ids)
        z = sum(math.exp(x[i] - m) for i in ids)
        return {i: math.exp(x[i] - m) / z for i in ids}

    p = probs(keep)
    asc = sorted(keep, key=lambda i: (x[i], -i))  # ascending; ties resolved like a stable sort would not matter here
    cum, drop = 0.0, set()
    for j, i in enumerate(asc):
        cum += p[i]
        if cum <= 1 - top_p and j < len(asc) - 1:
            drop.add(i)
    keep -= drop
    p = probs(keep)
    top = max(p.values())
    return {i for i in keep if p[i] >= min_p * top}


@pytest.mark.parametrize("trial", range(6))
def test_filter_masks_match_reference(trial):
    g = torch.Generator().manual_seed(trial)
    B, V = 5, 257  # prime vocab
    logits = torch.randn(B, V, generator=g) * 3
    temperature = torch.tensor([1.0, 0.7, 1.3, 0.5, 2.0])
    top_k = torch.tensor([V, 20, 1, 100, 7])
    top_p = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.95])
    min_p = torch.tensor([0.0, 0.05, 0.0, 0.2, 0.1])
    out = filter_logits(logits, tensors(B, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
    for b in range(B):
        ref = kept_reference(logits[b], temperature[b].item(), int(top_k[b]), top_p[b].item(), min_p[b].item())
        got = set(torch.nonzero(torch.isfinite(out[b])).flatten().tolist())
        assert got == ref, f"row {b}"
        torch.testing.assert_close(out[b][list(ref)], (logits[b] / temperature[b])[list(ref)])


def test_penalties_match_reference():
    g = torch.Generator().manual_seed(0)
    V = 50
    logits = torch.randn(2, V, generator=g)
    prompt, output = [[1, 2, 3], [4]], [[3, 3, 7], []]
    seen = torch.zeros(2, V, dtype=torch.bool)
    counts = torch.zeros(2, V)
    for b in range(2):
        seen[b, prompt[b] + output[b]] = True
        for t in output[b]:
            counts[b, t] += 1
    t = tensors(2, repetition_penalty=torch.tensor([1.3, 0.8]), presence_penalty=torch.tensor([0.5, 0.0]),
                frequency_penalty=torch.tensor([0.25, 1.0]))
    t.seen_mask, t.output_counts = seen, counts
    got = apply_penalties(logits, t)
    ref = logits.clone()
    for b, (rp, pp, fp) in enumerate([(1.3, 0.5, 0.25), (0.8, 0.0, 1.0)]):
        for i in set(prompt[b] + output[b]):
            ref[b, i] = ref[b, i] / rp if ref[b, i] > 0 else ref[b, i] * rp
        for i in set(output[b]):
            ref[b, i] -= pp + fp * output[b].count(i)
    torch.testing.assert_close(got, ref)


def test_noise_is_exponential_and_depends_only_on_seed_and_step():
    e = exponential_noise(torch.tensor([7, 7, 8]), torch.tensor([3, 3, 3]), 100_000)
    assert torch.equal(e[0], e[1]) and not torch.equal(e[0], e[2])
    assert abs(e[0].mean().item() - 1) < 0.02 and abs(e[0].var().item() - 1) < 0.05
    assert (e > 0).all() and torch.isfinite(e).all()


def test_noise_extremes_exhaustive():
    """Every 24-bit value the hash's top bits can take (the low 8 bits are dropped) maps to a finite E > 0: a draw
    of 0 made a filtered token's 0 / 0 a NaN that won the argmax (issue 8)."""
    k = torch.arange(1 << 24, dtype=torch.int64)
    for low in (0, 255):  # the dropped bits, both extremes
        e = bits_to_exponential((k << 8) | low)
        assert torch.isfinite(e).all() and (e > 0).all(), f"low bits {low}: E = {e[~(torch.isfinite(e) & (e > 0))][:4]}"
    # monotone: a larger uniform gives a smaller draw (ties only where float32 rounds two neighbours together)
    assert (e[1:] <= e[:-1]).all()
    assert torch.equal(bits_to_exponential(torch.tensor([0, (1 << 32) - 1])), e[[0, -1]])


def support_violations(logits, tokens, temperature, top_k, top_p, min_p):
    """Rows whose sampled token lies outside the top-k -> top-p -> min-p support, checked in float64 per token:
    rank within top-k; the probability mass (renormalised over the top-k) of strictly better tokens < top_p; the
    token's probability >= min_p x the best one's."""
    x = logits.double() / temperature[:, None].double()
    mine = x.gather(-1, tokens[:, None])
    rank = (x > mine).sum(-1)
    kth = x.topk(int(top_k.max()), dim=-1).values.gather(-1, (top_k - 1)[:, None])
    p = torch.where(x >= kth, x, torch.tensor(float("-inf"), dtype=x.dtype)).softmax(-1)
    above = torch.where(x > mine, p, torch.zeros_like(p)).sum(-1)
    p_tok = p.gather(-1, tokens[:, None]).squeeze(-1)
    # 1e-6: float32 (the sampler) and float64 (this check) may disagree on a token sitting on the top-p edge;
    # an out-of-support draw from the bug sits at a random rank of 152k, far from any edge.
    bad = (rank >= top_k) | (above >= top_p.double() + 1e-6) | (p_tok < min_p.double() * p.max(-1).values - 1e-6)
    return torch.nonzero(bad).flatten().tolist()


def test_every_draw_lies_in_the_support_over_many_seeds():
    """1,024 draws over the real 152,064-row vocabulary (the bug hit ~1% of them), 256 seeds x 4 steps, with
    top-k, top-p and min-p settings that leave small supports."""
    V, B = 152064, 256
    g = torch.Generator().manual_seed(0)
    settings = dict(temperature=torch.tensor([0.7, 1.0, 1.3, 0.5]).repeat(B // 4),
                    top_k=torch.tensor([20, 5, 50, V]).repeat(B // 4),
                    top_p=torch.tensor([0.8, 1.0, 0.9, 0.5]).repeat(B // 4),
                    min_p=torch.tensor([0.0, 0.0, 0.05, 0.1]).repeat(B // 4))
    for step in range(4):
        logits = torch.randn(B, V, generator=g) * 4
        t = tensors(B, seeds=torch.arange(B, dtype=torch.int64) * 7919 + step, steps=torch.full((B,), step),
                    **settings)
        tokens = sample(logits, t)
        bad = support_violations(logits, tokens, **settings)
        assert not bad, f"step {step}: rows {bad[:8]} sampled outside their support"


@pytest.fixture(scope="module")
def llm(module_tmp, qwen_tokenizer_dir):
    path = module_tmp("sampling_ckpt")
    make_checkpoint(path, "qwen2-1.5b", qwen_tokenizer_dir)
    return LLM(path, dtype="float32", device="cpu", kernels="torch", progress=False, max_model_len=1024)


def test_seeded_sampling_is_independent_of_batch(llm):
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=1234, ignore_eos=True)
    alone = llm.generate("Once upon a time", sp)[0].token_ids
    other = SamplingParams(max_tokens=6, temperature=1.2, seed=5, ignore_eos=True)
    mixed = llm.generate(["Other prompt here", "Once upon a time", "x"], [other, sp, SamplingParams(max_tokens=3)])
    assert mixed[1].token_ids == alone
    assert llm.generate("Once upon a time", SamplingParams(**{**sp.__dict__, "seed": 99}))[0].token_ids != alone


def test_temperature_zero_is_greedy(llm):
    ids = llm.tokenizer.encode("The quick brown fox")
    out = llm.generate(ids, SamplingParams(max_tokens=1, temperature=0, logprobs=1))[0]
    ((best, _),) = [(k, v) for k, v in out.logprobs[0].items()]
    assert out.token_ids[0] == best  # the sampled token is the top-1 raw log-prob


def test_logprobs_hold_sampled_token_and_top_k(llm):
    out = llm.generate("Hello", SamplingParams(max_tokens=5, temperature=1.0, seed=3, logprobs=4,
                                              ignore_eos=True))[0]
    assert len(out.logprobs) == 5
    for tok, d in zip(out.token_ids, out.logprobs):
        assert tok in d and len(d) in (4, 5)
        assert all(v <= 0 for v in d.values())
        top4 = sorted(d.values(), reverse=True)[:4]
        assert d[tok] <= top4[0]


def test_stop_string_excluded_and_included(llm):
    base = llm.generate("Count:", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    cut = llm.generate("Count:", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == base.text[: base.text.find(stop)]
    incl = llm.generate("Count:", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=stop,
                                                include_stop_str_in_output=True))[0]
    assert incl.text == base.text[: base.text.find(stop) + len(stop)]


def test_stop_token_ids_and_eos(llm):
    base = llm.generate("abc", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    stop_tok = base.token_ids[2]
    out = llm.generate("abc", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                            stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_tok) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert 151645 in llm.eos_token_ids and 151643 in llm.eos_token_ids


def test_streaming_deltas_concatenate_to_generate(llm):
    sp = SamplingParams(max_tokens=24, temperature=0.8, seed=11, ignore_eos=True, stop=["\n\n"])
    full = llm.generate("北京欢迎你 🚀", sp)[0]
    deltas = list(llm.stream("北京欢迎你 🚀", sp))
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert all("\ufffd" not in d.text for d in deltas[:-1])
    assert deltas[-1].finish_reason == full.finish_reason


def test_generation_config_defaults(tmp_path, qwen_tokenizer_dir):
    import json

    make_checkpoint(str(tmp_path), "qwen2-0.5b", qwen_tokenizer_dir)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
         "eos_token_id": [151645, 151643]}))
    llm = LLM(str(tmp_path), device="cpu", kernels="torch", progress=False)
    resolved = SamplingParams(max_tokens=4, top_k=5).resolved(llm.generation_defaults)
    assert (resolved.temperature, resolved.top_p, resolved.top_k, resolved.repetition_penalty) == (0.7, 0.8, 5, 1.05)
    plain = LLM(str(tmp_path), device="cpu", kernels="torch", progress=False, generation_config="none")
    resolved = SamplingParams(max_tokens=4).resolved(plain.generation_defaults)
    assert (resolved.temperature, resolved.top_p, resolved.top_k, resolved.repetition_penalty) == (1.0, 1.0, -1, 1.0)


def test_default_max_tokens_is_clamped_to_the_context(tmp_path, qwen_tokenizer_dir):
    import json

    make_checkpoint(str(tmp_path), "qwen2-0.5b", qwen_tokenizer_dir)
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 2048, "do_sample": False}))
    llm = LLM(str(tmp_path), device="cpu", kernels="torch", progress=False, max_model_len=24)
    ids = llm.tokenizer.encode("a short prompt")
    out = llm.generate(ids, SamplingParams(ignore_eos=True))[0]  # max_tokens unset: 2048 from the config
    assert len(out.token_ids) == 24 - len(ids) and out.finish_reason == "length"
    with pytest.raises(ValueError, match="exceeds the model's context"):  # an explicit value is not clamped
        llm.generate(ids, SamplingParams(max_tokens=2048))


@pytest.fixture(scope="module")
def ckpt_and_hf(module_tmp, qwen_tokenizer_dir):
    path = module_tmp("penalty_ckpt")
    return path, make_checkpoint(path, "qwen2-0.5b", qwen_tokenizer_dir, rng_seed=7)


def penalised_greedy_reference(hf, prompt, n, rep, presence, frequency):
    """Greedy decoding with penalties, recomputed from scratch every step with HF's full-prefix logits."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].float()
        for tok in set(prompt + out):
            logits[tok] = logits[tok] / rep if logits[tok] > 0 else logits[tok] * rep
        for tok in set(out):
            logits[tok] -= presence + frequency * out.count(tok)
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("pen", [dict(repetition_penalty=1.5), dict(presence_penalty=0.6, frequency_penalty=0.4)],
                         ids=["repetition", "presence+frequency"])
def test_penalties_follow_the_history_across_steps_batches_and_preemption(ckpt_and_hf, pen):
    """Each penalty alone (so a stale seen-mask or stale counts would show) against a from-scratch reference."""
    path, hf = ckpt_and_hf
    roomy = LLM(path, device="cpu", kernels="torch", progress=False)
    prompt = roomy.tokenizer.encode("the cat sat on the mat and the cat sat")
    want = penalised_greedy_reference(hf, prompt, 14, pen.get("repetition_penalty", 1.0),
                                      pen.get("presence_penalty", 0.0), pen.get("frequency_penalty", 0.0))
    assert want != penalised_greedy_reference(hf, prompt, 14, 1.0, 0.0, 0.0)  # the penalties matter here
    sp = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, **pen)
    assert roomy.generate(prompt, sp)[0].token_ids == want
    # in a batch beside other penalised and plain requests, and through preemptions in a tiny KV pool
    tight = LLM(path, device="cpu", kernels="torch", progress=False, kv_cache_tokens=64, block_size=8,
                max_num_batched_tokens=24)
    others = [SamplingParams(max_tokens=10, temperature=0.9, seed=i, ignore_eos=True, repetition_penalty=1.2,
                             frequency_penalty=0.5) for i in range(2)] + [SamplingParams(max_tokens=10)]
    outs = tight.generate(["x y z", prompt, "hello there", "a b"], [others[0], sp, others[1], others[2]])
    assert outs[1].token_ids == want
    assert tight.stats()["preemptions"] > 0
    assert tight.runner.sampling.slot_of == {}  # every slot came back


def test_interleaved_streams_each_match_generate(llm):
    a_sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    b_sp = SamplingParams(max_tokens=4, temperature=0.8, seed=2, ignore_eos=True)
    want_a, want_b = llm.generate("first stream", a_sp)[0], llm.generate("second", b_sp)[0]
    a, b = llm.stream("first stream", a_sp), llm.stream("second", b_sp)
    got_a, got_b, done = [], [], set()
    while len(done) < 2:  # advance them in turns, as two consumers in one thread would
        for name, it, acc in (("a", a, got_a), ("b", b, got_b)):
            if name not in done:
                try:
                    acc.append(next(it))
                except StopIteration:
                    done.add(name)
    for got, want in ((got_a, want_a), (got_b, want_b)):
        assert [t for d in got for t in d.token_ids] == want.token_ids
        assert "".join(d.text for d in got) == want.text
        assert got[-1].finish_reason == "length"


def test_generation_config_top_k_zero_means_off_and_default_max_tokens_fits_the_pool(tmp_path, qwen_tokenizer_dir):
    import json

    make_checkpoint(str(tmp_path), "qwen2-0.5b", qwen_tokenizer_dir)
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": 0, "max_new_tokens": 2048}))
    llm = LLM(str(tmp_path), device="cpu", kernels="torch", progress=False, kv_cache_tokens=64, block_size=16)
    assert llm.generation_defaults["top_k"] == -1
    out = llm.generate("hi", SamplingParams(ignore_eos=True))[0]  # 2048 unset-by-caller -> what the pool holds
    assert len(out.token_ids) == 64 - len(out.prompt_token_ids)


def test_generated_tokens_lie_in_the_support(llm):
    """End to end, raw logits (no penalties): each sampled token's log-prob and the top-20 returned beside it show
    it is inside top-k 20 -> top-p 0.8 -> min-p 0.05 at temperature 0.7, over 512 draws and 16 seeds."""
    T, K, P, MIN_P = 0.7, 20, 0.8, 0.05
    sps = [SamplingParams(max_tokens=32, temperature=T, top_k=K, top_p=P, min_p=MIN_P, seed=s, logprobs=K,
                          ignore_eos=True) for s in range(16)]
    outs = llm.generate([f"Item {i}: the" for i in range(16)], sps)
    draws = 0
    for o in outs:
        for tok, d in zip(o.token_ids, o.logprobs):
            draws += 1
            top = sorted(d.items(), key=lambda kv: -kv[1])[:K]  # the K best (d may also hold the sampled token)
            assert tok in dict(top), f"token {tok} (log-prob {d[tok]:.2f}) is outside the top-{K}"
            w = {i: math.exp(lp / T) for i, lp in top}  # top-k renormalised, at temperature T
            z = sum(w.values())
            above = sum(v for i, v in w.items() if d[i] > d[tok]) / z
            assert above < P + 1e-6, f"token {tok}: {above:.4f} of the mass ranks above it (top_p {P})"
            assert w[tok] >= MIN_P * max(w.values()) - 1e-9
    assert draws == 16 * 32
