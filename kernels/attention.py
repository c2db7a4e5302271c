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
    # sequences with exactly one query token this step (host int, the scheduler knows it); 0 lets a step of
    # prefill chunks skip the decode launches, None (unknown) launches them (their programs exit at once)
    decode_seqs: int | None = None

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


# ---------------------------------------------------------------------------------------------------------------
# Triton: the cache write (one program per token) and the attention launcher, which validates the paged layout
# once and sends each sequence's rows to one kernel: q_len == 1 to the split-KV decode kernel
# (kernels/attention_decode.py), longer chunks to the prefill kernel (kernels/attention_prefill.py).
# ---------------------------------------------------------------------------------------------------------------
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qwen2_triton.kernels._checks import check, check_tensor  # noqa: E402
from qwen2_triton.kernels.attention_decode import attention_decode  # noqa: E402
from qwen2_triton.kernels.attention_prefill import attention_prefill, prefill_grid  # noqa: E402
from qwen2_triton.kernels.launch import (  # noqa: E402
    MAX_SPLITS, MIN_KEYS_PER_SPLIT, AttnConfig, capability_of, num_kv_splits, prefill_config, sm_count_of,
    store_kv_config)


@triton.jit
def store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, n_heads, head_dim,
                    PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)  # int64: slot * row stride passes 2^31 in a large cache
    if slot < 0:  # padding row
        return
    block = slot // PAGE
    row = slot % PAGE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < head_dim)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(kc_ptr + block * stride_kcb + row * stride_kcs + h * stride_kch + d, k.to(kc_ptr.dtype.element_ty),
             mask=mask)
    tl.store(vc_ptr + block * stride_vcb + row * stride_vcs + h * stride_vch + d, v.to(vc_ptr.dtype.element_ty),
             mask=mask)


def _check_cache(op: str, k_cache: torch.Tensor, v_cache: torch.Tensor, device: torch.device) -> None:
    check_tensor(op, "k_cache", k_cache, ndim=4, device=device)
    check_tensor(op, "v_cache", v_cache, ndim=4, device=device)
    check(k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype, op,
          f"k_cache and v_cache must match: {tuple(k_cache.shape)} {k_cache.dtype} vs "
          f"{tuple(v_cache.shape)} {v_cache.dtype}")
    # The attention kernels address K and V with one set of row offsets (kernels/attention_tile.py).
    check(k_cache.stride() == v_cache.stride(), op,
          f"k_cache and v_cache must have the same strides, got {k_cache.stride()} and {v_cache.stride()}")


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Triton cache write; same contract as ``store_kv_ref``. k, v: (T, Hk, D), unit last stride (views of the
    fused qkv output are fine); caches (num_blocks, block_size, Hk, D); slot_mapping (T,) int, < 0 = skip."""
    op = "store_kv (kernels/attention.py)"
    check_tensor(op, "k", k, ndim=3)
    check_tensor(op, "v", v, ndim=3, device=k.device)
    _check_cache(op, k_cache, v_cache, k.device)
    check_tensor(op, "slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=k.device)
    n_tokens, n_heads, head_dim = k.shape
    check(tuple(v.shape) == tuple(k.shape), op, f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    check(tuple(k_cache.shape[2:]) == (n_heads, head_dim), op,
          f"cache (num_blocks, block_size, Hk, D) must have Hk, D = {(n_heads, head_dim)}, got {tuple(k_cache.shape)}")
    check(slot_mapping.shape[0] == n_tokens, op,
          f"slot_mapping must be ({n_tokens},), got {tuple(slot_mapping.shape)}")
    if n_tokens == 0:
        return
    cfg = store_kv_config(n_heads, head_dim)
    store_kv_kernel[(n_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), n_heads, head_dim, PAGE=k_cache.shape[1], BLOCK_H=cfg.BLOCK,
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=cfg.num_warps)


def _check_attention(op: str, q, k_cache, v_cache, meta: AttentionMetadata) -> None:
    check_tensor(op, "q", q, ndim=3)
    _check_cache(op, k_cache, v_cache, q.device)
    n_tokens, n_q_heads, head_dim = q.shape
    check(k_cache.dtype == q.dtype, op, f"cache dtype {k_cache.dtype} must equal q dtype {q.dtype}")
    check(k_cache.shape[3] == head_dim, op, f"cache head_dim {k_cache.shape[3]} != q head_dim {head_dim}")
    check(n_q_heads % k_cache.shape[2] == 0, op,
          f"query heads {n_q_heads} must be a multiple of KV heads {k_cache.shape[2]}")
    check(head_dim >= 16 and head_dim & (head_dim - 1) == 0 and head_dim <= 256, op,
          f"head_dim must be a power of two in [16, 256] (Qwen2: 64, 128), got {head_dim}")
    # int32 as AttentionMetadata declares: the variants kernels/compile_check.py verifies
    for name in ("seq_lens", "cu_seqlens_q", "block_tables"):
        check_tensor(op, f"meta.{name}", getattr(meta, name), ndim=2 if name == "block_tables" else 1,
                     dtypes=(torch.int32,), device=q.device)
    n_seqs = meta.seq_lens.shape[0]
    check(meta.cu_seqlens_q.shape[0] == n_seqs + 1, op,
          f"meta.cu_seqlens_q must be (B+1,) = ({n_seqs + 1},), got {tuple(meta.cu_seqlens_q.shape)}")
    check(meta.block_tables.shape[0] == n_seqs, op,
          f"meta.block_tables must have B={n_seqs} rows, got {tuple(meta.block_tables.shape)}")
    # Host-only consistency: a max_seqlen_q too small would silently leave query rows uncomputed.
    check(n_tokens <= n_seqs * max(meta.max_seqlen_q, 0), op,
          f"{n_tokens} query tokens cannot fit {n_seqs} sequences of at most meta.max_seqlen_q={meta.max_seqlen_q}")


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float, *, num_splits: int | None = None, sm_count: int | None = None,
              prefill_cfg: AttnConfig | None = None, decode_cfg: AttnConfig | None = None,
              min_split_keys: int = MIN_KEYS_PER_SPLIT) -> torch.Tensor:
    """Triton attention; same contract as ``attention_ref``. q: (T, Hq, D) with unit last stride.

    Sequences with one query token this step (decodes, also inside a mixed step, and 1-token chunks) take the
    split-KV decode kernel; longer chunks take the prefill kernel. A pure decode step (meta.is_decode) launches
    only the decode kernel; any other step launches both, over disjoint rows. ``num_splits``: the most splits
    per sequence (the decode grid; default kernels/launch.py ``num_kv_splits`` from host values only); each
    sequence uses about one per ``min_split_keys`` keys, decided on the device. ``prefill_cfg`` /
    ``decode_cfg``: tile configs (default: kernels/launch.py's heuristics; the runtime passes the ones
    runtime/tuning.py picked).
    """
    op = "attention (kernels/attention.py)"
    _check_attention(op, q, k_cache, v_cache, meta)
    group = q.shape[1] // k_cache.shape[2]
    if decode_cfg is not None:
        check(decode_cfg.BLOCK_M >= max(16, group) and decode_cfg.BLOCK_M & (decode_cfg.BLOCK_M - 1) == 0, op,
              f"decode_cfg.BLOCK_M={decode_cfg.BLOCK_M} must be a power of two >= max(16, GQA group {group})")
    check(isinstance(min_split_keys, int) and min_split_keys >= 1, op,
          f"min_split_keys must be a positive int, got {min_split_keys!r}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return out
    if num_splits is None:
        sm = sm_count if sm_count is not None else sm_count_of(q.device)
        num_splits = num_kv_splits(meta.num_seqs, k_cache.shape[2], meta.max_seqlen_k, sm)
    check(1 <= num_splits <= MAX_SPLITS, op, f"num_splits must be in [1, {MAX_SPLITS}] (the merge configs "
          f"kernels/compile_check.py verifies), got {num_splits}")
    if not meta.is_decode:
        cfg = prefill_cfg or prefill_config(q.shape[2], q.dtype, capability_of(q.device))
        blocks = prefill_grid(q.shape[0], meta.num_seqs, q.shape[1], cfg.BLOCK_M)[1]
        check(blocks < 2 ** 16, op, f"{q.shape[0]} query tokens in {meta.num_seqs} sequences need {blocks} query "
              f"blocks of {cfg.BLOCK_M} rows, above the grid limit of 65535: split the step")
        attention_prefill(q, k_cache, v_cache, meta, scale, out, cfg)
    # Also in a prefill step: its 1-token chunks and the decode rows of a mixed step are the decode kernel's.
    if meta.decode_seqs == 0:  # only longer chunks: every decode program would exit at once
        return out
    return attention_decode(q, k_cache, v_cache, meta, scale, out, num_splits, decode_cfg, min_split_keys)
