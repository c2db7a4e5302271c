"""The one place that decides launch settings (BLOCK sizes, num_warps, num_stages, split-KV count).

Every launcher in kernels/ asks these functions, and kernels/compile_check.py compiles exactly the configs they
return, so a setting changed here is register/spill-checked for sm_80 and sm_90 before it reaches a GPU.

Register counts quoted as "sm_80 | sm_90" come from ``python -m qwen2_triton.kernels.compile_check`` (triton
3.9's ptxas). They were chosen without a GPU at hand: the throughput side is still to be measured with bench/.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

# Elementwise / row kernels: 8 elements per thread gives one 16-byte vector load per thread for bf16/fp16.
_ELEMS_PER_THREAD = 8


@dataclass(frozen=True)
class RowConfig:
    BLOCK: int
    num_warps: int


@dataclass(frozen=True)
class AttnConfig:
    BLOCK_M: int  # query rows per program (prefill) / padded GQA group rows (decode)
    BLOCK_N: int  # keys per inner-loop tile
    num_warps: int
    num_stages: int
    dot_precision: str = "tf32"  # ignored by Triton for bf16/fp16 operands (tensor cores are exact for them)


def row_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel: ~8 elements per thread, between 1 and 16 warps (Liger's
    calculate_settings also gives 8 warps at 2048; it stays at 8 up to 8192, we move to 16 at 4096 to keep
    8 elements per thread)."""
    return max(1, min(16, block // (32 * _ELEMS_PER_THREAD)))


def rmsnorm_config(hidden: int) -> RowConfig:
    """The whole row stays in registers (one pass): BLOCK = next_pow2(hidden), e.g. 896 -> 1024 with 4 warps,
    3584 -> 4096 with 16 warps; at most 32 registers, no spill, for every Qwen2 hidden size and dtype."""
    block = triton.next_power_of_2(hidden)
    return RowConfig(BLOCK=block, num_warps=row_warps(block))


def swiglu_config(intermediate: int) -> RowConfig:
    """Grid (T, cdiv(I, BLOCK)). BLOCK=1024 with 4 warps: 8 elements/thread, and 4864..18944 columns give
    5..19 programs per row, enough to fill the SMs already at a handful of tokens."""
    block = min(1024, triton.next_power_of_2(intermediate))
    return RowConfig(BLOCK=block, num_warps=row_warps(block))


def rotary_config(num_heads: int, head_dim: int) -> RowConfig:
    """One program per token rotates all of its q (or k) heads: BLOCK = padded head count; the tile is
    (BLOCK, head_dim/2) per half, e.g. 28 heads x 64 -> 32 x 64 = 2048 elements -> 8 warps."""
    block = triton.next_power_of_2(num_heads)
    return RowConfig(BLOCK=block, num_warps=row_warps(block * head_dim // 2))


def store_kv_config(num_kv_heads: int, head_dim: int) -> RowConfig:
    """One program per token copies its (Hk, D) key and value rows: 1 warp for 2 x 64 (0.5B), 16 for
    20 x 128 (Qwen1.5-4B, MHA); at most 50 registers."""
    block = triton.next_power_of_2(num_kv_heads)
    return RowConfig(BLOCK=block, num_warps=row_warps(block * head_dim))


def prefill_config(head_dim: int, dtype: torch.dtype, cap: int | None = None) -> AttnConfig:
    """Flash-attention forward tiles for compute capability ``cap`` (None: unknown, the sm_80 choice).
    Registers / spills from kernels/compile_check.py, sm_80 | sm_90, triton 3.9.

    bf16/fp16 on sm_90 (wgmma): a warpgroup (4 warps) issues m64 instructions, so a tile needs 64 rows per
      warpgroup or the warpgroups compute the same rows: 64x64 with 8 warps had its QK^T laid out
      warpsPerCTA [8, 1] (both warpgroups the whole 64x64 QK^T and softmax: 16 wgmma m64n32k16 per tile each,
      68 ex2 per thread). 128x64, 8 warps, 3 stages: 64 rows per warpgroup, K/V triple-buffered, 186 registers
      (184 on triton 3.6), no spill, 132,096 B shared. head_dim 64 keeps 64x64 with 4 warps (one warpgroup).
    bf16/fp16 elsewhere (mma.sync, m16 per warp): head_dim 64: 128x64 tiles, 8 warps: 177 | 182 registers on
      sm_80 | sm_86 (174 on triton 3.6), no spill; 64x64 with 4 warps spilled 8-12 B at 168 registers on 3.9.
      head_dim 128: 64x64 tiles, 8 warps: with 4 warps sm_80 hit 255 registers and spilled 56 B; 8 warps: 174,
      no spill, 56 KB shared memory.
    fp32 (tests and debugging, not a serving dtype): "ieee" dots on CUDA cores spilled kilobytes at every tile
      size tried; tf32x3 (three tf32 mma passes, ~1e-6 relative, within the fp32 test tolerance) with 16x32
      tiles, 8 warps: 108 | 103 (head_dim 64), 178 | 179 (head_dim 128) registers, and no spill under triton
      3.6 either (186 | 187), where 32x32 tiles (no spill on 3.9) spilled 8-28 B.
    """
    if dtype == torch.float32:
        return AttnConfig(BLOCK_M=16, BLOCK_N=32, num_warps=8, num_stages=2, dot_precision="tf32x3")
    if head_dim <= 64:
        if cap == 90:
            return AttnConfig(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
        return AttnConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
    if cap == 90:
        return AttnConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return AttnConfig(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)


def decode_config(head_dim: int, dtype: torch.dtype, group: int) -> AttnConfig:
    """Split-KV decode: the GQA group's query heads are the rows of one tl.dot, padded to >= 16 because the
    smallest mma tile has 16 rows (the padding costs tensor-core cycles, not memory traffic: decode is memory
    bound). bf16/fp16: BLOCK_N=64 keys per tile, 4 warps, 3 stages: the K and V tiles double-buffered in shared
    memory (2 stages leave them single-buffered: the next tile's copy waits for this tile's dots); head_dim 128:
    152 | 158 registers sm_90 | sm_80 (164 | 168 on triton 3.6), 72,192 B shared, no spill.
    fp32: "ieee" dots (a 16-row tile is small enough for CUDA cores), BLOCK_N=32, not pipelined (1 stage):
    72 | 64 registers with 4 warps at head_dim 64, 64 | 64 with 8 warps at head_dim 128, no spill; pipelined
    (2 stages) the CUDA-core dot's operands took 211 | 170 and spilled 300 B at head_dim 128 (tf32x3: 168)."""
    block_m = max(16, triton.next_power_of_2(group))
    if dtype == torch.float32:
        return AttnConfig(BLOCK_M=block_m, BLOCK_N=32, num_warps=4 if head_dim <= 64 else 8, num_stages=1,
                          dot_precision="ieee")
    return AttnConfig(BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=3)


def duplicates_rows(cfg: AttnConfig, cap: int | None) -> bool:
    """Whether a prefill tile leaves warps computing the same query rows: on sm_90 a warpgroup's wgmma covers
    64 rows, so BLOCK_M < 64 x warpgroups duplicates the QK^T and softmax across warpgroups.
    kernels/compile_check.py reads the same fact off the compiled code (the dot's warpsPerCTA)."""
    if cap != 90 or cfg.dot_precision != "tf32" or cfg.num_warps < 4:
        return False
    return cfg.BLOCK_M < 64 * (cfg.num_warps // 4)


# Dynamic shared memory a block may use, per compute capability (CUDA programming guide, "opt-in" limit).
# sm_86 / sm_89 / sm_120 parts (A10, L4, L40, RTX) have 99 KB; A100 / A30 163 KB; H100 / B200 227 KB.
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
# Triton's floor for the NVIDIA backend (its README: "Compute Capability 8.0+"); bf16 also starts at sm_80.
MIN_CAPABILITY = 80


def max_shared_bytes(cap: int) -> int:
    """Per-block shared-memory limit of ``cap`` (e.g. 90); unknown parts get the smallest (99 KB)."""
    return MAX_SHARED_BYTES.get(cap, min(MAX_SHARED_BYTES.values()))


def attn_shared_estimate(cfg: AttnConfig, head_dim: int, elem_bytes: int, cap: int | None = None) -> int:
    """Estimate of the shared memory of an attention tile config: the buffered K and V tiles plus the query
    tile. Triton's pipeliner keeps num_stages - 1 K/V buffers for mma.sync and num_stages for sm_90's async
    wgmma (compiled: decode 16x64 at 3 stages 71,712 B on sm_80; prefill 128x64x128 at 3 stages 132,096 B on
    sm_90); ``cap`` None assumes the larger. kernels/compile_check.py measures the real figure for every
    candidate on every arch; this only keeps candidates that cannot fit a 99 KB part out of its list."""
    buffers = cfg.num_stages if cap in (None, 90) else max(1, cfg.num_stages - 1)
    return (buffers * 2 * cfg.BLOCK_N + cfg.BLOCK_M) * head_dim * elem_bytes


def _fits(cfgs, head_dim: int, dtype: torch.dtype, cap: int | None) -> list[AttnConfig]:
    if cap is None:
        return list(cfgs)
    limit = max_shared_bytes(cap)
    elem = torch.empty((), dtype=dtype).element_size()
    return [c for c in cfgs if attn_shared_estimate(c, head_dim, elem, cap) <= limit]


# Tuning candidates after the heuristic default, per MMA family (sm_90: wgmma, 64 rows per warpgroup; else
# mma.sync) and head_dim, as (BLOCK_M, BLOCK_N, warps, stages). Each compiles without a spill on its arch
# (kernels/compile_check.py, triton 3.6 and 3.9). Left out for spilling there: on mma.sync 64x64w4s2, 64x64w4s3
# and 64x32w4s2 at head_dim 64 (4-12 B), 128x64w8s2 and 128x128w8s2 at 128 (68-76 B); in decode at head_dim
# 128 16x64w8s3 (4 B on sm_90), 16x128w8s3 (12 B on sm_90), at head_dim 64 16x128w4s3 (4 B on sm_80).
_PREFILL_CANDIDATES = {
    ("wgmma", 64): [(64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 2), (128, 128, 8, 2),
                    (64, 32, 4, 2)],
    ("wgmma", 128): [(128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    ("mma", 64): [(128, 64, 8, 3), (128, 32, 4, 2)],
    ("mma", 128): [(64, 64, 8, 3), (128, 32, 8, 2), (64, 32, 4, 2)],
}
_DECODE_CANDIDATES = {  # BLOCK_N, warps, stages (BLOCK_M is the padded group)
    64: [(64, 4, 2), (32, 4, 3), (64, 8, 3), (128, 8, 3), (64, 4, 4)],
    128: [(64, 4, 2), (32, 4, 3), (128, 4, 3), (64, 4, 4)],
}


def prefill_candidates(head_dim: int, dtype: torch.dtype, cap: int | None) -> list[AttnConfig]:
    """What runtime/tuning.py times for prefill on compute capability ``cap`` (None: no GPU); the heuristic
    ``prefill_config`` first (the choice when tuning is off). fp32 is a test dtype: no alternatives. On sm_90
    every tile has 64 rows per warpgroup (``duplicates_rows``), 128x64 and 128x128 with 8 warps among them."""
    default = prefill_config(head_dim, dtype, cap)
    if dtype == torch.float32:
        return [default]
    family = "wgmma" if cap == 90 else "mma"
    others = [AttnConfig(*t) for t in _PREFILL_CANDIDATES[family, 64 if head_dim <= 64 else 128]]
    others = [c for c in others if c != default and not duplicates_rows(c, cap)]
    return [default] + _fits(others, head_dim, dtype, cap)


def decode_candidates(head_dim: int, dtype: torch.dtype, group: int, cap: int | None) -> list[AttnConfig]:
    """What runtime/tuning.py times for split-KV decode; ``decode_config`` first."""
    default = decode_config(head_dim, dtype, group)
    if dtype == torch.float32:
        return [default]
    others = [AttnConfig(default.BLOCK_M, *t) for t in _DECODE_CANDIDATES[64 if head_dim <= 64 else 128]]
    return [default] + _fits([c for c in others if c != default], head_dim, dtype, cap)


def merge_config(num_splits: int, head_dim: int) -> RowConfig:
    """Split-KV merge: one program per (sequence, query head) holds a (splits, head_dim) fp32 tile; 8 elements per
    thread (1 warp up to 4 splits at head_dim 64), 16 warps from 4096 elements (16 per thread at 32 x 128 ... 32
    at 128 x 128). One warp for 32 x 128 took 184 registers."""
    block = triton.next_power_of_2(num_splits)
    return RowConfig(BLOCK=block, num_warps=row_warps(block * head_dim))


# A split should stream at least 4 tiles of 64 keys, so its partial write and merge stay small next to its K/V
# reads (a guess, not yet measured: tune with bench/test_bench_kernels.py::test_attention_decode). Applied per
# sequence on the device (kernels/attention_decode.py ``split_plan``): a 1k-token sequence runs 4 splits even in
# a graph captured for 32k.
MIN_KEYS_PER_SPLIT = 256
# Batch-1 decode with 2 KV heads (Qwen2-0.5B/1.5B): 128 splits make 256 programs, about two per SM on an H100
# (132); the cap of 64 left it at 128 programs, fewer than the SMs. A split count is a grid size: the per-sequence
# count (above) decides how many of them read anything.
MAX_SPLITS = 128


def num_kv_splits(num_seqs: int, num_kv_heads: int, max_seqlen_k: int, sm_count: int | None) -> int:
    """The most splits per (sequence, kv head) for decode (the grid's third axis), from host values only (no
    device sync, graph friendly); each sequence then uses about one per MIN_KEYS_PER_SPLIT of its own keys.

    Aim for about two programs per SM (decode is bandwidth bound; every SM must be streaming K/V), capped by
    MAX_SPLITS and MIN_KEYS_PER_SPLIT of the longest sequence. Batches with enough (sequence, kv head) pairs get
    1-2 splits. Without a GPU (sm_count None, the interpreter) use at most 4 splits.
    """
    work = max(1, num_seqs * num_kv_heads)
    target = 4 if sm_count is None else triton.cdiv(2 * sm_count, work)
    by_length = triton.cdiv(max(max_seqlen_k, 1), MIN_KEYS_PER_SPLIT)
    return max(1, min(target, by_length, MAX_SPLITS))


def capability_of(device: torch.device) -> int | None:
    """Compute capability as an int (90 for sm_90), None off CUDA."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def sm_count_of(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count
