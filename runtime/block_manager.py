"""Paged KV cache bookkeeping: a pool of fixed-size blocks, each sequence's block table, and (with prefix caching)
the blocks sequences share.

Blocks are handed out on demand as a sequence grows and returned when it finishes or is preempted. Block 0
is reserved as the dummy target of padding rows (CUDA-graph batches write their padding there).

Prefix caching (runtime/prefix_cache.py names the blocks): a full block whose K/V are computed keeps its name
(hash) after its sequence lets go of it, so a later request with the same prefix takes it instead of computing
it again. Every block has a reference count (the running sequences whose table holds it); ``free`` holds the
blocks no sequence holds, in the order they are reused: blocks with no cached content first, then cached ones,
least recently released first (LRU), a cached block losing its name only when it is taken for new content. A
sequence's blocks are released last-first, so a prefix outlives its tails: evicting a prefix's first block makes
all of its later blocks unreachable.

Shared blocks are never written: a sequence shares only full blocks of its leading prefix, and it writes only
positions from ``num_computed`` on, which lie in blocks of its own.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

from qwen2_triton.runtime.prefix_cache import PrefixCache, extend_block_hashes
from qwen2_triton.runtime.sequence import Sequence

log = logging.getLogger(__name__)

DUMMY_BLOCK = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))  # taken from the front
        self.ref_counts = [0] * num_blocks
        self.cache = PrefixCache()
        self._pending: list[int] = []  # blocks named in the step being scheduled, before their K/V exist
        self.prefix_cache_queries = 0  # tokens of admitted sequences looked up
        self.prefix_cache_hits = 0  # ... of which were found cached (not computed)

    @property
    def capacity_tokens(self) -> int:
        """Tokens one sequence could hold if it had the whole pool."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def num_used(self) -> int:
        """Blocks held by running sequences (cached blocks no one holds count as free: they are evictable)."""
        return self.num_blocks - 1 - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(seq.block_table) <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make the block table cover ``num_tokens`` tokens."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > len(self.free):
            raise RuntimeError("KV pool exhausted; the scheduler must check can_grow first")
        for _ in range(need):
            seq.block_table.append(self._take_free())

    def admit(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing the longest cached prefix of full blocks, and
        set ``num_computed`` to the tokens found; False (nothing changed) if the pool cannot hold it."""
        assert not seq.block_table and seq.num_computed == 0, "admit() takes a sequence that holds no blocks"
        hit = self._lookup(seq)
        need = self.blocks_needed(seq.num_tokens) - len(hit)
        if need > len(self.free) - sum(1 for b in hit if self.ref_counts[b] == 0):  # hit blocks now free are taken
            return False
        if self._may_hit(seq):
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += len(hit) * self.block_size
        for b in hit:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        seq.block_table = list(hit)
        seq.num_hashed_blocks = len(hit)
        seq.num_computed = seq.num_cached_tokens = len(hit) * self.block_size
        self.grow(seq, seq.num_tokens)
        return True

    def _may_hit(self, seq: Sequence) -> bool:
        """The sequence is looked up at all (and counted in the statistics): caching is on and the cache may
        supply some of its tokens (not so for a new request that asks for prompt log-probs, as in vLLM)."""
        return self.enable_prefix_caching and self._max_hit_tokens(seq) > 0

    def _max_hit_tokens(self, seq: Sequence) -> int:
        """Most leading tokens the cache may supply. The last token is always computed, so its logits exist; a
        request asking for prompt log-probs computes every prompt position not scored yet (logits at position p
        score token p+1, so positions from num_prompt_scored - 1 on), which a cached block cannot give."""
        n = seq.num_tokens - 1
        if seq.params.prompt_logprobs is not None:
            n = min(n, seq.num_prompt_scored - 1)
        return n

    def _lookup(self, seq: Sequence) -> list[int]:
        if not self._may_hit(seq):
            return []
        n_blocks = self._max_hit_tokens(seq) // self.block_size
        hashes = extend_block_hashes(seq.block_hashes, seq.kv_key, seq.token_slice, n_blocks, self.block_size)
        return self.cache.longest_prefix(hashes[:n_blocks])

    def cache_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """The step being scheduled computes the sequence's K/V up to ``num_tokens``: name the blocks that will then
        be full. Naming them now, not after the step, lets a sequence admitted later in the same step (the other
        completions of an n > 1 request, an equal prompt) share them: each layer writes all of a step's keys and
        values before any attention reads them. ``step_failed`` takes the names back if the step never ran."""
        if not self.enable_prefix_caching:
            return
        full = num_tokens // self.block_size
        if full <= seq.num_hashed_blocks:
            return
        hashes = extend_block_hashes(seq.block_hashes, seq.kv_key, seq.token_slice, full, self.block_size)
        for i in range(seq.num_hashed_blocks, full):
            b = seq.block_table[i]
            if self.cache.register(b, hashes[i]):
                self._pending.append(b)
        seq.num_hashed_blocks = full

    def step_done(self) -> None:
        """The scheduled step ran: the blocks named for it hold their K/V."""
        self._pending.clear()

    def step_failed(self) -> None:
        """The scheduled step did not run (or ran partly): forget the names given to blocks it was to fill."""
        for b in self._pending:
            self.cache.evict(b)
        self._pending.clear()

    def release(self, seq: Sequence) -> None:
        for b in reversed(seq.block_table):  # last-first: a cached prefix outlives its tails
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} released more often than taken"
            if self.ref_counts[b] == 0:
                self.free[b] = None
                if b not in self.cache.hash_of:  # nothing to keep: reused before any cached block
                    self.free.move_to_end(b, last=False)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_hashed_blocks = 0

    def reset_prefix_cache(self) -> int:
        """Forget the content of every cached block no sequence holds; returns how many were forgotten."""
        dropped = [b for b in self.free if b in self.cache.hash_of]
        for b in dropped:
            self.cache.evict(b)
            self.free.move_to_end(b, last=False)
        return len(dropped)

    def slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _take_free(self) -> int:
        b, _ = self.free.popitem(last=False)
        self.cache.evict(b)  # its old content, if any, is about to be overwritten
        self.ref_counts[b] = 1
        return b
