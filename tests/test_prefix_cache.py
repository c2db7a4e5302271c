"""Automatic prefix caching (runtime/prefix_cache.py, runtime/block_manager.py): shared blocks are right, counted
right and freed right.

Two kinds of check:
- model-free: the real Scheduler and BlockManager drive a simulated KV cache whose every slot records which token
  prefix produced it, so a wrong hit, a block written while shared or a refcount that frees a block too early
  shows up as a slot holding another prefix's K/V; a fuzz runs random shared prefixes, n > 1, prompt log-probs,
  preemption, aborts and failed steps through it;
- a tiny random checkpoint on CPU (tests/test_prefix_cache_engine.py): greedy tokens, log-probs and prompt
  log-probs with the cache on equal those with it off.
"""
from __future__ import annotations

import random
from collections import Counter

import pytest

from qwen2_triton.runtime import prefix_cache
from qwen2_triton.runtime.block_manager import BlockManager
from qwen2_triton.runtime.prefix_cache import block_hash, extend_block_hashes, root_hash
from qwen2_triton.runtime.sampling_params import SamplingParams as SP
from qwen2_triton.runtime.scheduler import Scheduler
from qwen2_triton.runtime.sequence import Sequence, Status


# --------------------------------------------------------------------------------------------------- hashing
def test_a_block_hash_names_its_whole_prefix_and_the_kv_key():
    a = extend_block_hashes([], "", lambda s, e: list(range(s, e)), 3, 4)
    assert len(set(a)) == 3
    assert extend_block_hashes([], "", lambda s, e: list(range(s, e)), 3, 4) == a  # deterministic
    assert a[1] == block_hash(a[0], [4, 5, 6, 7]) and a[0] == block_hash(root_hash(""), [0, 1, 2, 3])
    # same tokens in block 1 after another block 0: another name
    b = extend_block_hashes([], "", lambda s, e: [9, 9, 9, 9] if s == 0 else list(range(s, e)), 2, 4)
    assert b[0] != a[0] and b[1] != a[1]
    # the same tokens under another key (a rope mode, a salt): other names, all the way down
    c = extend_block_hashes([], "yarn", lambda s, e: list(range(s, e)), 3, 4)
    assert not set(c) & set(a)
    # fixed-width encoding: [1, 256] and [256, 1] differ, and so do token ids past 2^16
    assert block_hash(a[0], [1, 256]) != block_hash(a[0], [256, 1])
    assert block_hash(a[0], [151643, 7]) != block_hash(a[0], [151643 % 65536, 7])


# ------------------------------------------------------------------------------------- model-free simulation
class SimulatedKV:
    """Drives the real Scheduler/BlockManager; the 'KV cache' is a dict slot -> (kv_key, token prefix) that wrote it.
    ``run`` writes every chunk's slots first and then checks every position each chunk attends to, as a layer
    stores a whole step's K/V before attention reads any."""

    def __init__(self, num_blocks: int, block_size: int, budget: int = 32, max_num_seqs: int = 6,
                 caching: bool = True):
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.sched = Scheduler(self.blocks, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
        self.slots: dict[int, tuple] = {}
        self.ids = 0
        self.finished: list[Sequence] = []
        self.steps = 0

    def add(self, prompt: list[int], max_tokens: int, prompt_logprobs: int | None = None, key: str = "",
            n: int = 1) -> list[Sequence]:
        out = []
        for i in range(n):
            sp = SP(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                    prompt_logprobs=prompt_logprobs if i == 0 else None).resolved({})
            seq = Sequence(self.ids, f"r{self.ids}", list(prompt), sp, seed=0)
            seq.kv_key = key
            self.ids += 1
            self.sched.add(seq)
            out.append(seq)
        return out

    @staticmethod
    def content(seq: Sequence, pos: int) -> tuple:
        return seq.kv_key, tuple(seq.token_slice(0, pos + 1))

    def step(self, fail: bool = False) -> None:
        chunks = self.sched.schedule()
        assert chunks, "no progress with work pending"
        self.steps += 1
        held = Counter(b for q in self.sched.running for b in q.block_table)
        named_now = set(self.blocks._pending)  # named in this step: their K/V are written in it
        for c in chunks:
            for p in range(c.start, c.start + c.length):
                b = c.seq.block_table[p // self.blocks.block_size]
                # a block is written only before its K/V are known: never once named by an earlier step, and
                # shared only with sequences admitted in this step, which read it after this step wrote it
                assert b not in self.blocks.cache.hash_of or b in named_now, \
                    f"{c.seq.request_id} overwrites the cached block {b} at position {p}"
                assert held[b] == 1 or b in named_now, \
                    f"{c.seq.request_id} writes position {p} into block {b}, shared {held[b]}x"
                self.slots[self.blocks.slot(c.seq, p)] = self.content(c.seq, p) if not fail else ("garbage",)
        if fail:  # the step died half-way: what it wrote is garbage, and the engine says so
            self.sched.step_failed(chunks)
            self.check_invariants()
            return
        for c in chunks:
            for p in range(c.start + c.length):
                got = self.slots.get(self.blocks.slot(c.seq, p))
                assert got == self.content(c.seq, p), f"{c.seq.request_id} reads wrong K/V at position {p}"
        self.blocks.step_done()
        result = _FakeResult(chunks)
        done = [c.seq for c in chunks]
        self.sched.update_from_output(chunks, result)
        self.finished += [q for q in done if q.finished and q not in self.finished]
        self.check_invariants()

    def abort(self, seq: Sequence) -> None:
        self.sched.abort([seq.request_id])
        self.check_invariants()

    def check_invariants(self) -> None:
        bm = self.blocks
        held = Counter(b for q in self.sched.running for b in q.block_table)
        assert all(q.status is Status.WAITING and not q.block_table for q in self.sched.waiting)
        for b in range(1, bm.num_blocks):
            assert bm.ref_counts[b] == held[b], f"block {b}: refcount {bm.ref_counts[b]}, held by {held[b]}"
            assert (b in bm.free) == (held[b] == 0), f"block {b}: free={b in bm.free}, held by {held[b]}"
        assert bm.ref_counts[0] == 0 and 0 not in bm.free  # the dummy block is nobody's
        assert {b: h for h, b in bm.cache.block_of.items()} == bm.cache.hash_of
        for q in self.sched.running:  # a shared block is a full, named block of the leading prefix
            for i, b in enumerate(q.block_table):
                if held[b] > 1:
                    assert i < q.num_hashed_blocks and b in bm.cache.hash_of, (q.request_id, i, b)
        # free blocks: the uncached ones come first, then the cached ones (reused last)
        kinds = [b in bm.cache.hash_of for b in bm.free]
        assert kinds == sorted(kinds)

    def run_all(self) -> None:
        while self.sched.has_work():
            self.step()

    def assert_pool_free(self) -> None:
        bm = self.blocks
        assert not self.sched.has_work()
        assert all(r == 0 for r in bm.ref_counts) and len(bm.free) == bm.num_blocks - 1 and bm.num_used == 0


class _FakeResult:
    """A StepResult: each sampling row draws a token that depends on the sequence's tokens (so equal sequences
    draw equal tokens), each prompt row one entry."""

    def __init__(self, chunks):
        self.tokens, self.logprobs, self.prompt_logprobs = {}, {}, {}
        for c in chunks:
            seq = c.seq
            if seq.params.prompt_logprobs is not None:  # model_runner's rule: positions not scored yet
                for p in range(max(c.start, seq.num_prompt_scored - 1), min(c.start + c.length, len(seq.prompt_ids) - 1)):
                    self.prompt_logprobs.setdefault(seq.seq_id, []).append({seq.prompt_ids[p + 1]: -1.0})
            if c.samples:
                self.tokens[seq.seq_id] = (hash((seq.request_id, seq.num_tokens)) % 997) + 3


def test_second_request_reuses_the_prefix_and_computes_only_the_rest():
    sim = SimulatedKV(num_blocks=32, block_size=4)
    prompt = list(range(10, 30))  # 20 tokens = 5 full blocks
    (a,) = sim.add(prompt, max_tokens=3)
    sim.run_all()
    assert (sim.blocks.prefix_cache_queries, sim.blocks.prefix_cache_hits) == (20, 0)
    (b,) = sim.add(prompt + [7, 8], max_tokens=2)
    (c,) = sim.add(prompt, max_tokens=2)  # the same prompt: the last block is recomputed, so its logits exist
    chunks = sim.sched.schedule()
    assert [(ch.seq.request_id, ch.start, ch.length) for ch in chunks] == [("r1", 20, 2), ("r2", 16, 4)]
    assert b.block_table[:5] == a_blocks(sim, prompt) and c.block_table[:4] == b.block_table[:4]
    assert c.block_table[4] != b.block_table[4]  # c's last block is its own: it writes it
    assert (sim.blocks.prefix_cache_queries, sim.blocks.prefix_cache_hits) == (20 + 22 + 20, 20 + 16)
    sim.sched.step_failed(chunks)  # hand the step back (not run) and finish normally
    sim.run_all()
    sim.assert_pool_free()


def a_blocks(sim, prompt):
    hashes = extend_block_hashes([], "", lambda s, e: prompt[s:e], len(prompt) // 4, 4)
    return sim.blocks.cache.longest_prefix(hashes)


def test_same_step_sharing_for_n_completions_and_prompt_logprobs_computed_in_full():
    sim = SimulatedKV(num_blocks=64, block_size=4, budget=64)
    prompt = list(range(100, 126))  # 26 tokens: 6 full blocks
    seqs = sim.add(prompt, max_tokens=4, prompt_logprobs=1, n=3)
    chunks = sim.sched.schedule()
    # completion 0 asks for prompt log-probs: it computes everything; 1 and 2 share its 6 full blocks at once
    assert [(c.start, c.length) for c in chunks] == [(0, 26), (24, 2), (24, 2)]
    assert seqs[1].block_table[:6] == seqs[0].block_table[:6] == seqs[2].block_table[:6]
    sim.sched.step_failed(chunks)
    sim.run_all()
    assert seqs[0].num_prompt_scored == len(prompt)
    # a later request asking for prompt log-probs computes its whole prompt again, cache or not
    (d,) = sim.add(prompt, max_tokens=1, prompt_logprobs=0)
    (c,) = sim.sched.schedule()
    assert (c.start, c.length) == (0, 26)


def test_different_kv_keys_share_nothing():
    sim = SimulatedKV(num_blocks=32, block_size=4)
    prompt = list(range(40))
    sim.add(prompt, 2, key="plain")
    sim.run_all()
    sim.add(prompt, 2, key="yarn")
    sim.run_all()
    assert sim.blocks.prefix_cache_hits == 0
    sim.add(prompt, 2, key="plain")
    sim.run_all()
    assert sim.blocks.prefix_cache_hits == 36


def test_freed_blocks_stay_cached_until_the_pool_needs_them_then_lru():
    sim = SimulatedKV(num_blocks=15, block_size=4, budget=64)  # 14 usable blocks
    p1, p2 = [list(range(k, k + 17)) for k in (1000, 2000)]  # 4 full blocks + 1 token: 5 blocks each
    for p in (p1, p2):
        sim.add(p, max_tokens=1)
        sim.run_all()
    assert len(sim.blocks.cache) == 8 and sim.blocks.num_used == 0  # cached, yet all free
    sim.add(p1, max_tokens=1)  # touch p1: p2 is now the least recently used
    sim.run_all()
    assert sim.blocks.prefix_cache_hits == 16
    # 28 tokens = 7 blocks: the 6 blocks without content first, then one cached block: p2's (least recently
    # used), and of p2's its last one (released last-first), so p2 keeps a prefix of 3 blocks
    sim.add(list(range(3000, 3025)), max_tokens=4)
    sim.run_all()
    assert len(sim.blocks.cache) == 8 - 1 + 7  # p3 names its 7 blocks (28 tokens computed, decode ones too)
    sim.add(p1, max_tokens=1)
    sim.run_all()
    assert sim.blocks.prefix_cache_hits == 16 + 16  # p1 kept all 4 blocks
    # p1's 5th block was new: every free block holds a prefix now, so it took p2's next block from the tail
    sim.add(p2, max_tokens=1)
    sim.run_all()
    assert sim.blocks.prefix_cache_hits == 16 + 16 + 8  # p2 lost its last two blocks only
    sim.assert_pool_free()
    n = len(sim.blocks.cache)
    assert sim.blocks.reset_prefix_cache() == n > 0 and len(sim.blocks.cache) == 0
    sim.assert_pool_free()


def fuzz(seed: int, steps_check: bool = True) -> SimulatedKV:
    """Random prompts over a few shared prefixes (cut at random points, so they diverge inside blocks too), random
    lengths, n > 1, prompt log-probs, aborts and failed steps, in a pool small enough to preempt."""
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    sim = SimulatedKV(num_blocks=rng.randint(12, 24) * 8 // bs, block_size=bs, budget=rng.choice([8, 16, 48]),
                      max_num_seqs=rng.choice([2, 4, 8]))
    cap = (sim.blocks.num_blocks - 1) * bs
    bases = [[rng.randrange(1, 50) for _ in range(60)] for _ in range(3)]
    live: list[Sequence] = []
    for _ in range(120):
        r = rng.random()
        if r < 0.35:
            base = rng.choice(bases)
            prompt = base[: rng.randint(1, 40)] + [rng.randrange(1, 50) for _ in range(rng.choice([0, 0, 1, 3, 9]))]
            max_tokens = rng.randint(1, 12)
            if len(prompt) + max_tokens <= cap:
                live += sim.add(prompt, max_tokens, prompt_logprobs=1 if rng.random() < 0.15 else None,
                                key=rng.choice(["", "", "", "yarn"]), n=rng.choice([1, 1, 1, 2, 3]))
        elif r < 0.4 and live:
            sim.abort(rng.choice(live))
        elif sim.sched.has_work():
            sim.step(fail=rng.random() < 0.03)
    sim.run_all()
    sim.assert_pool_free()
    for q in sim.finished:
        if q.params.prompt_logprobs is not None and q.status is Status.FINISHED and len(q.output_ids) == q.params.max_tokens:
            assert q.num_prompt_scored == len(q.prompt_ids), "prompt log-probs went missing"
    return sim


def test_fuzz_shared_prefixes_with_preemption_keeps_refcounts_and_kv_right():
    totals = Counter()
    for seed in range(40):
        sim = fuzz(seed)
        totals.update(hits=sim.blocks.prefix_cache_hits, preemptions=sim.sched.num_preemptions,
                      cached=len(sim.blocks.cache))
    # the fuzz really exercised what it is for
    assert totals["hits"] > 1000 and totals["preemptions"] > 20 and totals["cached"] > 0, totals


def test_the_fuzz_catches_a_hash_that_ignores_the_parent(monkeypatch):
    """The checks above can fail: a block named by its own tokens alone is reused at the wrong place."""
    monkeypatch.setattr(prefix_cache, "block_hash", lambda parent, tokens: block_hash(b"", tokens))
    with pytest.raises(AssertionError, match="wrong K/V|shared"):
        for seed in range(40):
            fuzz(seed)


def test_the_fuzz_catches_a_refcount_off_by_one(monkeypatch):
    real = BlockManager.admit

    def admit(self, seq):  # forgets the reference of the first block it takes from the cache
        ok = real(self, seq)
        if ok and seq.num_cached_tokens:
            self.ref_counts[seq.block_table[0]] -= 1
        return ok

    monkeypatch.setattr(BlockManager, "admit", admit)
    with pytest.raises(AssertionError, match="refcount"):
        fuzz(0)


def test_caching_off_is_todays_behaviour():
    sim = SimulatedKV(num_blocks=32, block_size=4, caching=False)
    for _ in range(2):
        sim.add(list(range(30)), max_tokens=2)
        sim.run_all()
    assert sim.blocks.prefix_cache_queries == sim.blocks.prefix_cache_hits == 0 and len(sim.blocks.cache) == 0
    sim.assert_pool_free()
