"""The sampler without a full-vocabulary sort, and sampling settings kept on the device per slot (issue 9).

The reference is the previous implementation, kept here verbatim (sort every row, dense penalty tables): the new
one must draw the same token for every seed wherever the support is the same, and the same support everywhere
except where tokens tie exactly on a top-p edge (an order the old unstable sort left undefined too).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoints import checkpoint_fixture
from qwen2_triton import LLM, SamplingParams
from qwen2_triton.runtime.sampler import (SamplingTensors, apply_penalties, draw, exponential_noise,
                                         filter_logits, make_plan, sample, window_width)


# ---------------------------------------------------------------------------------------- the old implementation
def old_apply_penalties(logits, t):
    if t.seen_mask is not None:
        p = t.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(t.seen_mask, penalised, logits)
    if t.output_counts is not None:
        logits = logits - t.frequency_penalty[:, None] * t.output_counts \
            - t.presence_penalty[:, None] * (t.output_counts > 0).float()
    return logits


def old_filter_logits(logits, t):
    temp = torch.where(t.temperature > 0, t.temperature, torch.ones_like(t.temperature))
    logits = logits / temp[:, None]
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)
    k = t.top_k.clamp(1, V)
    kth = sorted_logits.gather(-1, (V - k)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum <= (1 - t.top_p)[:, None]
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(-1)
    drop = probs < (t.min_p[:, None] * probs[:, -1:])
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def old_sample(logits, t):
    logits = old_apply_penalties(logits, t)
    greedy = logits.argmax(-1)
    probs = old_filter_logits(logits, t).softmax(-1)
    drawn = (probs / exponential_noise(t.seeds, t.steps, logits.shape[-1])).argmax(-1)
    return torch.where(t.temperature == 0, greedy, drawn)


# ---------------------------------------------------------------------------------------------------- helpers
TEMPS = [0.0, 0.3, 0.7, 1.0, 1.5]
TOP_KS = [-1, 1, 5, 20, 50, 200]
TOP_PS = [1.0, 0.95, 0.8, 0.3]
MIN_PS = [0.0, 0.05, 0.2]


def random_settings(B, V, rng, **fixed):
    def pick(name, values):
        if name in fixed:
            return torch.full((B,), fixed[name]) if not isinstance(fixed[name], torch.Tensor) else fixed[name]
        return torch.tensor([values[i] for i in rng.integers(0, len(values), B)])

    k = pick("top_k", TOP_KS).long()
    return SamplingTensors(
        temperature=pick("temperature", TEMPS).float(), top_k=torch.where(k > 0, k, V), top_p=pick("top_p", TOP_PS).float(),
        min_p=pick("min_p", MIN_PS).float(), repetition_penalty=torch.ones(B), presence_penalty=torch.zeros(B),
        frequency_penalty=torch.zeros(B), seeds=torch.from_numpy(rng.integers(0, 2**32, B)),
        steps=torch.from_numpy(rng.integers(0, 5000, B)))


def support(masked):
    return torch.isfinite(masked)


@pytest.mark.parametrize("trial", range(4))
def test_same_tokens_and_support_as_the_old_sampler(trial):
    """4 x 512 rows of random settings (greedy, top-k on/off, top-p, min-p, temperatures) over a 4,096-token
    vocabulary: identical supports and identical tokens, row by row."""
    rng = np.random.default_rng(trial)
    B, V = 512, 4096
    logits = torch.from_numpy(rng.standard_normal((B, V)).astype(np.float32)) * 3
    t = random_settings(B, V, rng)
    want = old_sample(logits, t)
    got = sample(logits, t)
    assert torch.equal(got, want), f"rows {torch.nonzero(got != want).flatten().tolist()[:8]} differ"
    sampled = t.temperature > 0
    old_mask, new_mask = support(old_filter_logits(logits, t)), support(filter_logits(logits, t))
    assert torch.equal(old_mask[sampled], new_mask[sampled])


@pytest.mark.parametrize("group", ["greedy", "window", "full-neutral", "full-top-p", "full-min-p"])
def test_each_path_alone_matches_the_old_sampler(group):
    """Batches whose rows all take one path (no row gathers): 256 rows x 4 steps each."""
    rng = np.random.default_rng(1)
    B, V = 256, 4096
    fixed = {"greedy": dict(temperature=0.0), "window": dict(temperature=0.8, top_k=40),
             "full-neutral": dict(temperature=0.9, top_k=-1, top_p=1.0, min_p=0.0),
             "full-top-p": dict(temperature=0.9, top_k=-1, min_p=0.0),
             "full-min-p": dict(temperature=0.9, top_k=-1, top_p=1.0)}[group]
    for step in range(4):
        logits = torch.from_numpy(rng.standard_normal((B, V)).astype(np.float32)) * 4
        t = random_settings(B, V, rng, **fixed)
        plan = make_plan(t.temperature.numpy(), t.top_k.numpy(), t.top_p.numpy(), t.min_p.numpy(), V, "cpu")
        assert sum(g is not None for g in (plan.greedy_rows, plan.window_rows, plan.full_rows)) == 1
        assert (plan.full_top_p, plan.full_min_p) == (group == "full-top-p", group == "full-min-p")
        assert torch.equal(sample(logits, t), old_sample(logits, t)), f"step {step}"


def test_real_vocabulary_rows():
    """The shipped vocabulary (152,064 rows), 32 rows of Qwen's defaults and variations, 2 steps."""
    rng = np.random.default_rng(5)
    B, V = 32, 152064
    for step in range(2):
        logits = torch.from_numpy(rng.standard_normal((B, V)).astype(np.float32)) * 4
        t = random_settings(B, V, rng, top_k=torch.tensor([20, 20, 40, 1] * 8))
        assert torch.equal(sample(logits, t), old_sample(logits, t))


def test_ties_past_the_window_keep_every_tied_token():
    """k=5 with 100 tokens tied at the k-th value: the window (k + slack) cannot hold them, the row is redone on
    the full row, and the draws spread over all 100 tied tokens exactly as the old sampler's do."""
    V, B = 2000, 400
    row = torch.full((V,), -5.0)
    row[:4] = torch.tensor([3.0, 2.5, 2.0, 1.5])
    tied = torch.arange(500, 600)
    row[tied] = 1.0
    logits = row.expand(B, V).contiguous()
    t = SamplingTensors(temperature=torch.ones(B), top_k=torch.full((B,), 5), top_p=torch.ones(B),
                        min_p=torch.zeros(B), repetition_penalty=torch.ones(B), presence_penalty=torch.zeros(B),
                        frequency_penalty=torch.zeros(B), seeds=torch.arange(B), steps=torch.zeros(B, dtype=torch.int64))
    assert window_width(5, V) < 104
    d = draw(logits, t)
    assert d.flagged and bool((d.tokens < 0).all())
    got = d.resolve()[0]
    assert torch.equal(got, old_sample(logits, t))
    assert len(set(got.tolist()) & set(tied.tolist())) > 50  # the tied tokens past the window are drawn
    assert torch.equal(support(filter_logits(logits, t)), support(old_filter_logits(logits, t)))


def test_bf16_logits_ties_at_the_kth_value():
    """bf16-rounded logits (what the GPU model returns): ties at the k-th place are common. With top-p off, the
    support (top-k with ties, then min-p) is defined without any tie order, so supports and tokens must match."""
    rng = np.random.default_rng(3)
    B, V = 256, 8192
    logits = (torch.from_numpy(rng.standard_normal((B, V)).astype(np.float32)) * 3).bfloat16().float()
    t = random_settings(B, V, rng, top_p=1.0, temperature=1.0)
    kth = logits.topk(200, -1).values.gather(1, (t.top_k.clamp(max=200) - 1)[:, None])
    assert ((logits == kth).sum(-1) > 1).sum() > 20  # ties at the k-th value in many rows
    assert torch.equal(sample(logits, t), old_sample(logits, t))
    assert torch.equal(support(filter_logits(logits, t)), support(old_filter_logits(logits, t)))


def test_bf16_logits_top_p_supports_differ_only_on_exact_ties():
    rng = np.random.default_rng(4)
    B, V = 256, 8192
    logits = (torch.from_numpy(rng.standard_normal((B, V)).astype(np.float32)) * 3).bfloat16().float()
    t = random_settings(B, V, rng, temperature=1.0, min_p=0.0)
    old_mask, new_mask = support(old_filter_logits(logits, t)), support(filter_logits(logits, t))
    same = (old_mask == new_mask).all(-1)
    for b in torch.nonzero(~same).flatten().tolist():  # only which members of a tied group stay may differ:
        old_vals, new_vals = logits[b][old_mask[b]].sort().values, logits[b][new_mask[b]].sort().values
        assert torch.equal(old_vals, new_vals), f"row {b}: the supports hold different values"
    assert same.float().mean() > 0.9
    got, want = sample(logits, t), old_sample(logits, t)
    assert torch.equal(got[same], want[same])


def dense_and_sparse(B, V, rng, L):
    """Random penalty state both ways: dense (seen, counts) tables and history ids (B, L) padded with a row's
    first token, plus the per-column output counts."""
    prompt_len = rng.integers(1, L // 2, B)
    hist = np.zeros((B, L), dtype=np.int64)
    seen = torch.zeros(B, V, dtype=torch.bool)
    counts = torch.zeros(B, V)
    for b in range(B):
        n = rng.integers(prompt_len[b], L + 1)
        ids = rng.integers(0, 60, n)  # a small alphabet: many repeats
        hist[b, :n], hist[b, n:] = ids, ids[0]
        seen[b, ids] = True
        for tok in ids[prompt_len[b]:]:
            counts[b, tok] += 1
    ids = torch.from_numpy(hist)
    return seen, counts, ids, counts.gather(1, ids)


def test_sparse_penalties_equal_the_dense_ones():
    rng = np.random.default_rng(7)
    B, V = 64, 1000
    logits = torch.from_numpy(rng.standard_normal((B, V)).astype(np.float32)) * 3
    t = random_settings(B, V, rng)
    t.repetition_penalty = torch.from_numpy(rng.choice([1.0, 1.05, 1.5, 0.8], B)).float()
    t.presence_penalty = torch.from_numpy(rng.choice([0.0, 0.5, -0.3], B)).float()
    t.frequency_penalty = torch.from_numpy(rng.choice([0.0, 0.25, 1.0], B)).float()
    seen, counts, ids, hc = dense_and_sparse(B, V, rng, 40)
    t.seen_mask, t.output_counts = seen, counts
    dense = apply_penalties(logits, t)
    want = old_sample(logits, t)
    t.seen_mask = t.output_counts = None
    t.history_ids, t.history_counts = ids, hc
    before = logits.clone()
    assert torch.equal(apply_penalties(logits, t), dense)
    assert torch.equal(logits, before)  # the caller's logits are not written
    assert torch.equal(sample(logits, t), want)


def test_token_history_rows_give_the_dense_penalties():
    """Slot rows (padded with the row's first token) read into a BatchHistory, one token appended per step, written
    back and read again past its APPEND columns: the dense tables' penalised logits exactly, at every column,
    beside a row without penalties (a slot never filled)."""
    from qwen2_triton.runtime import token_history
    from qwen2_triton.runtime.token_history import BatchHistory, TokenHistory

    V = 50
    table = TokenHistory(num_slots=6, vocab=V, max_len=40, device=torch.device("cpu"))
    prompts, outputs = {3: [7, 8, 7, 9], 1: [20]}, {3: [9], 1: []}
    table.fill([3, 1], [prompts[3], prompts[1]], [outputs[3], outputs[1]], counts=True)
    table.forget([0])
    slots = torch.tensor([3, 0, 1])
    position = torch.tensor([5, 2, 1])  # prompt + output lengths (the unpenalised row's: anything in range)
    g = torch.Generator().manual_seed(0)
    old_append, token_history.APPEND = token_history.APPEND, 4  # a write-back and a fresh read within the test
    try:
        h = BatchHistory(table, slots, slots.numpy(), position)
        for step in range(11):
            if step == 6:  # the batch changes: written back, read again
                h.write_back()
                h = BatchHistory(table, slots, slots.numpy(), h.position)
            ids = h.ids()
            logits = torch.randn(3, V, generator=g) * 2
            t = SamplingTensors(temperature=torch.ones(3), top_k=torch.full((3,), V), top_p=torch.ones(3),
                                min_p=torch.zeros(3), repetition_penalty=torch.tensor([1.3, 1.0, 0.7]),
                                presence_penalty=torch.tensor([0.5, 0.0, -0.4]),
                                frequency_penalty=torch.tensor([0.25, 0.0, 1.0]),
                                seeds=torch.zeros(3, dtype=torch.int64), steps=torch.zeros(3, dtype=torch.int64),
                                history_ids=ids, history_counts=h.counts(ids))
            dense = SamplingTensors(**{**t.__dict__, "history_ids": None, "history_counts": None, "cache": {}})
            dense.seen_mask = torch.zeros(3, V, dtype=torch.bool)
            dense.output_counts = torch.zeros(3, V)
            for b, slot in ((0, 3), (2, 1)):
                dense.seen_mask[b, prompts[slot] + outputs[slot]] = True
                for tok in outputs[slot]:
                    dense.output_counts[b, tok] += 1
            assert torch.equal(apply_penalties(logits, t), apply_penalties(logits, dense)), f"step {step}"
            new = torch.randint(0, V, (3,), generator=g)
            h.append(new)
            outputs[3].append(int(new[0]))
            outputs[1].append(int(new[2]))
    finally:
        token_history.APPEND = old_append
    h.write_back()
    assert table.length[[3, 1, 0]].tolist() == [16, 12, 0]
    assert table.ids[3, :16].tolist() == prompts[3] + outputs[3]


# -------------------------------------------------------------------------------------------------- the engine
ckpt = checkpoint_fixture("qwen2-0.5b", rng_seed=3)


def test_settings_are_sent_once_per_batch_and_counters_survive_preemption(ckpt):
    """Seeded, penalised, sampled requests give the same tokens in a roomy engine (one batch build, then steps that
    send nothing) and in a tiny KV pool that preempts them (slots released and refilled from the output so far)."""
    sps = [SamplingParams(max_tokens=12, temperature=0.8, top_k=20, top_p=0.8, repetition_penalty=1.3, seed=1,
                          ignore_eos=True),
           SamplingParams(max_tokens=12, temperature=1.0, top_k=-1, top_p=0.9, frequency_penalty=0.5,
                          presence_penalty=0.3, seed=2, ignore_eos=True),
           SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.2, ignore_eos=True),
           SamplingParams(max_tokens=12, temperature=1.2, min_p=0.1, seed=4, ignore_eos=True)]
    prompts = ["the cat sat on the mat", "a b c a b c", "hello hello hello", "x"]
    roomy = LLM(ckpt, device="cpu", kernels="torch", progress=False)
    want = [o.token_ids for o in roomy.generate(prompts, sps)]
    state = roomy.runner.sampling
    assert state.batch_builds <= 3  # first sample (prompts), then the same batch until the first finishes
    assert state.slot_of == {} and sorted(state.free) == list(range(state.num_slots))
    alone = [roomy.generate(p, sp)[0].token_ids for p, sp in zip(prompts, sps)]
    assert alone == want  # each request's tokens are its own, whatever the batch
    tight = LLM(ckpt, device="cpu", kernels="torch", progress=False, kv_cache_tokens=48, block_size=8,
                max_num_batched_tokens=16)
    got = [o.token_ids for o in tight.generate(prompts, sps)]
    assert tight.stats()["preemptions"] > 0
    assert got == want
    assert tight.runner.sampling.slot_of == {}


def old_tensors(seqs, vocab):
    """SamplingTensors built the old way, every step from the host: settings, seeds, steps = len(output_ids),
    dense penalty tables from prompt + output."""
    p = [s.params for s in seqs]
    f32 = lambda vals: torch.tensor(vals, dtype=torch.float32)  # noqa: E731
    seen = torch.zeros(len(seqs), vocab, dtype=torch.bool)
    counts = torch.zeros(len(seqs), vocab)
    for b, s in enumerate(seqs):
        seen[b, s.prompt_ids + s.output_ids] = True
        for tok in s.output_ids:
            counts[b, tok] += 1
    return SamplingTensors(
        temperature=f32([x.temperature for x in p]),
        top_k=torch.tensor([x.top_k if x.top_k > 0 else vocab for x in p]), top_p=f32([x.top_p for x in p]),
        min_p=f32([x.min_p for x in p]), repetition_penalty=f32([x.repetition_penalty for x in p]),
        presence_penalty=f32([x.presence_penalty for x in p]), frequency_penalty=f32([x.frequency_penalty for x in p]),
        seeds=torch.tensor([s.seed for s in seqs]), steps=torch.tensor([len(s.output_ids) for s in seqs]),
        seen_mask=seen, output_counts=counts)


def test_every_engine_step_draws_what_the_old_sampler_draws(ckpt):
    """The engine's sampler (settings, seeds and output indices on the device per slot, sparse penalty history)
    against the old one fed from the host every step, on the very logits of each step: 7 requests of mixed
    settings in a pool small enough to preempt, so slots are released, refilled and batches rebuilt."""
    llm = LLM(ckpt, device="cpu", kernels="torch", progress=False, kv_cache_tokens=40, block_size=4,
              max_num_batched_tokens=24, max_num_seqs=4)
    state = llm.runner.sampling
    steps = []
    batch, draw, take = state.batch, state.draw, state.take

    def spy_batch(seqs):
        spy_batch.seqs = list(seqs)
        return batch(seqs)

    def spy_draw(logits, b):  # the runner draws (launch), then takes the tokens (collect)
        spy_draw.before = (logits.clone(), old_tensors(spy_batch.seqs, logits.shape[-1]))
        return draw(logits, b)

    def spy_take(b, d):
        tokens, host = take(b, d)
        steps.append((*spy_draw.before, host))
        return tokens, host

    state.batch, state.draw, state.take = spy_batch, spy_draw, spy_take
    sps = [SamplingParams(max_tokens=10, temperature=0.8, top_k=20, top_p=0.8, repetition_penalty=1.3, seed=1),
           SamplingParams(max_tokens=9, temperature=1.0, top_p=0.9, frequency_penalty=0.5, presence_penalty=0.3,
                          seed=2),
           SamplingParams(max_tokens=11, temperature=0.0, repetition_penalty=1.2),
           SamplingParams(max_tokens=8, temperature=1.2, min_p=0.1, seed=4),
           SamplingParams(max_tokens=10, temperature=0.7, top_k=3, seed=5),
           SamplingParams(max_tokens=7, temperature=0.0),
           SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.95, min_p=0.02, seed=7,
                          presence_penalty=-0.5)]
    sps = [SamplingParams(**{**sp.__dict__, "ignore_eos": True}) for sp in sps]
    llm.generate([f"prompt {i} " + "word " * i for i in range(len(sps))], sps)
    assert llm.stats()["preemptions"] > 0 and state.batch_builds > 5
    assert sum(len(h) for *_, h in steps) >= 60
    for i, (logits, t, host) in enumerate(steps):
        assert old_sample(logits, t).tolist() == host, f"step {i}"
