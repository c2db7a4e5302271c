"""Causal grouped-query attention over a paged KV cache: the metadata, the cache write and the reference.

KV cache layout (per layer), the one the paged runtime allocates:
    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim)
A sequence's token t lives in block ``block_tables[b, t // block_size]`` at row ``t % block_size``; the flat
slot of a token is ``block * block_size + row`` (``slot_mapping``).

A step processes a packed batch of T query tokens from B sequences. Sequence b owns query rows
``cu_seqlens_q[b] : cu_seqlens_q[b+1]`` and, after this step's keys are written, ``seq_lens[b]`` keys. Its
queries are the *last* q_len keys' positions, so query i sits at position ``seq_lens[b] - q_len + i`` and sees
keys ``0 ..= that position``. This one rule covers plain prefill, chunked prefill, prefill after a cached
prefix, and decode (q_len = 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    cu_seqlens_q: torch.Tensor  # (B+1,) int32, offsets of each sequence's queries in the packed batch
    seq_lens: torch.Tensor  # (B,) int32, keys per sequence including this step's
    block_tables: torch.Tensor  # (B, max_blocks) int32, physical block ids (unused entries arbitrary)
    slot_mapping: torch.Tensor  # (T,) int64, flat cache slot of each query token's key/value
    max_seqlen_q: int  # host ints: launch grids are sized from them without a device sync
    max_seqlen_k: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        """Every sequence contributes exactly one query token."""
        return self.max_seqlen_q == 1


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Write this step's keys/values (T, Hk, D) into their cache slots. Negative slots are skipped (padding)."""
    nb, bs, hk, d = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(nb * bs, hk, d)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(nb * bs, hk, d)[slots] = v[keep].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """The first n tokens of one sequence from the paged cache: (n, Hk, D)."""
    bs = cache.shape[1]
    blocks = block_table[: (n + bs - 1) // bs].long()
    return cache[blocks].flatten(0, 1)[:n]


def attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Plain-torch reference, float32 math. q: (T, Hq, D) -> (T, Hq, D) in q's dtype."""
    out = torch.empty_like(q)
    hq, hk = q.shape[1], k_cache.shape[2]
    group = hq // hk
    cu = meta.cu_seqlens_q.tolist()
    lens = meta.seq_lens.tolist()
    for b in range(len(lens)):
        s, e, n = cu[b], cu[b + 1], lens[b]
        if e == s:
            continue
        qb = q[s:e].float().transpose(0, 1)  # (Hq, Lq, D)
        kb = gather_kv(k_cache, meta.block_tables[b], n).float().repeat_interleave(group, dim=1).transpose(0, 1)
        vb = gather_kv(v_cache, meta.block_tables[b], n).float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qb @ kb.transpose(1, 2)) * scale  # (Hq, Lq, n)
        q_pos = torch.arange(n - (e - s), n, device=q.device)
        mask = torch.arange(n, device=q.device)[None, :] > q_pos[:, None]
        scores.masked_fill_(mask, float("-inf"))
        out[s:e] = (scores.softmax(-1) @ vb).transpose(0, 1).to(q.dtype)
    return out
