"""Weight-only quantized linear (W4A16 / W8A16): out = x @ W^T + bias with W dequantized group-wise on the fly.

    W[n, k] = scales[g(k), n] * (q[k, n] - zero[g(k), n]),   g(k) = k // group_size   (rows in kernel order)

The layout (``QuantWeight``, built once at load by ``pack_quant_weight`` from any format's integer codes): codes
packed along the input dim, ``32 // bits`` per int32 word, field j of word r = row ``r * pack + j`` at bits
[bits*j, bits*(j+1)) (GPTQ's own qweight layout, so a column's words are contiguous across a warp's lanes);
fp16 scales [G, N] kept as the checkpoint stores them (a bf16 copy would drop 3 mantissa bits); zeros as fp16
[G, N], or none when every zero is one constant (symmetric GPTQ: 8 for int4, 128 for int8; ~3% of the bytes
a group column streams at int4 g128). GPTQ act-order (desc_act) g_idx: rows are re-sorted by group at load so
groups are contiguous again, and the kernel reads x through that permutation (``perm``) instead of gathering
scales per row.

One kernel, three launch shapes (``quant_config``):
- decode (<= 8 rows): 16-row tiles (the smallest mma), split-K over the input dim so ~2 programs per SM stream
  the packed weights; each weight word is loaded once ((BLOCK_K / pack, BLOCK_N) words, unpacked to fields in
  registers: loading a word per row instead staged 8x the words, 90 KB of shared memory per program) and
  dequantized in registers; the fp32 partials [S, M, N] are summed after the launch (a torch reduction:
  deterministic and capturable; one more small launch per linear).
- small (9-32 rows, a mid-size decode batch): one 32-row tile, split-K as decode. Still a weight stream (32
  rows do 64 FLOP per weight, 128 per int4 byte, under the ~300 an H100 needs to be compute-bound), so it needs
  the programs decode has: unsplit, 7B's o_proj / down_proj (N=3584) ran 28 programs on 132 SMs.
- prefill (> 32 rows): 64-row tiles, no split; the dequantized tile goes straight into the tensor-core dot.
The math is done in fp32 ((q - z) * s), rounded once to the activation dtype for the dot: bit-identical to the
weights the torch path dequantizes at load (model/quantization.py), so the two paths differ only in summation.
On a GPU the start-up plan (runtime/quant_tuning.py) may replace the heuristic by one of ``quant_candidates``,
timed per weight shape and launch shape; the launcher takes it as ``config`` (None: ``quant_config``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from qwen2_triton.kernels._checks import check, check_tensor


@dataclass(frozen=True)
class QuantWeight:
    """One Linear(in_features=K, out_features=N) in the kernel's layout (module docstring)."""
    qweight: torch.Tensor  # int32 (K // pack, N)
    scales: torch.Tensor  # fp16 (G, N)
    zeros: torch.Tensor | None  # fp16 (G, N); None: every zero is ``zero``
    zero: int  # the constant zero when zeros is None, else -1
    perm: torch.Tensor | None  # int32 (K,): kernel row r reads input column perm[r]; None: identity
    bits: int
    group_size: int  # rows per group (K when the checkpoint says -1)
    in_features: int
    out_features: int

    @property
    def pack(self) -> int:
        return 32 // self.bits

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.perm)
                   if t is not None)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, config_of=None) -> torch.Tensor:
        """``config_of(weight, rows) -> QuantConfig | None``: the start-up plan's launch config (None: heuristic)."""
        return quant_linear(x, self, bias, config=config_of(self, x.shape[0]) if config_of else None)


@dataclass(frozen=True)
class FusedParts:
    """Column blocks of one fused projection (qkv, gate_up) that cannot share one launch: each part runs its own
    launch (``_launch``, the subclass's kernel) into its slice of one output. Shared by the GPTQ/AWQ and GGUF
    weights (kernels/gguf_linear.py)."""
    parts: tuple

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def _launch(self, x, part, bias, out, config):
        raise NotImplementedError

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, config_of=None) -> torch.Tensor:
        """``config_of(part, rows) -> QuantConfig | None``: the start-up plan's launch config (None: heuristic)."""
        out = torch.empty((x.shape[0], self.out_features), dtype=x.dtype, device=x.device)
        off = 0
        for p in self.parts:
            n = p.out_features
            self._launch(x, p, None if bias is None else bias[off: off + n], out[:, off: off + n],
                         config_of(p, x.shape[0]) if config_of else None)
            off += n
        return out


@dataclass(frozen=True)
class FusedQuantWeight(FusedParts):
    """GPTQ parts whose act-order g_idx differ, so no single input permutation serves them all. Real GPTQ
    checkpoints give the parts of a fused projection one g_idx (they share the input, hence the Hessian order),
    and load as one QuantWeight."""
    parts: tuple[QuantWeight, ...]

    def _launch(self, x, part, bias, out, config):
        return quant_linear(x, part, bias, out=out, config=config)


# ------------------------------------------------------------------------------------------------ packing
def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (K, N), K % (32 // bits) == 0 -> int32 (K // pack, N), low bits first."""
    pack = 32 // bits
    k, n = codes.shape
    fields = codes.to(torch.int64).view(k // pack, pack, n)
    shifts = torch.arange(pack, device=codes.device, dtype=torch.int64).view(1, pack, 1) * bits
    words = (fields << shifts).sum(1)  # < 2^32: the fields do not overlap
    return (words - (words >= 2 ** 31).to(torch.int64) * 2 ** 32).to(torch.int32)


def unpack_rows(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: int32 (K // pack, N) -> uint8 (K, N)."""
    pack = 32 // bits
    shifts = torch.arange(pack, device=qweight.device, dtype=torch.int32).view(1, pack, 1) * bits
    fields = (qweight.unsqueeze(1) >> shifts) & (2 ** bits - 1)
    return fields.reshape(-1, qweight.shape[1]).to(torch.uint8)


def pack_quant_weight(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int, group_size: int) -> QuantWeight:
    """Integer codes uint8 (K, N), real zeros (G, N) (any integer dtype), fp16 scales (G, N), g_idx (K,) ->
    the kernel layout. Raises ValueError when g_idx does not sort into contiguous groups of ``group_size`` rows
    (no GPTQ writer produces that; the caller then keeps the weight dequantized)."""
    k, n = codes.shape
    if group_size % 16 and group_size < k:
        raise ValueError(f"group_size {group_size} is not a multiple of 16 (the kernel's smallest K tile)")
    g_idx = g_idx.to(device=codes.device, dtype=torch.int64)
    perm = None
    natural = torch.arange(k, device=codes.device) // group_size
    if not torch.equal(g_idx, natural):
        order = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[order], natural):
            raise ValueError(f"g_idx does not sort into contiguous groups of {group_size} rows")
        codes, perm = codes[order], order.to(torch.int32)
    zero = -1
    zf = zeros.to(torch.float32)
    if bool((zf == zf.flatten()[0]).all()):
        zero, zeros_out = int(zf.flatten()[0]), None
    else:
        zeros_out = zf.to(torch.float16)  # integers <= 256: exact in fp16
    return QuantWeight(pack_rows(codes, bits).contiguous(), scales.to(torch.float16).contiguous(),
                       None if zeros_out is None else zeros_out.contiguous(), zero,
                       None if perm is None else perm.contiguous(), bits, group_size, k, n)


def dequantize(w: QuantWeight) -> torch.Tensor:
    """The float32 weight (N, K) in the input's column order: the reference for the kernel and its layout."""
    q = unpack_rows(w.qweight, w.bits).float()  # (K, N) kernel row order
    rows = torch.arange(w.in_features, device=q.device) // w.group_size
    z = torch.full_like(w.scales, w.zero, dtype=torch.float32) if w.zeros is None else w.zeros.float()
    wk = (q - z[rows]) * w.scales.float()[rows]
    if w.perm is not None:
        out = torch.empty_like(wk)
        out[w.perm.long()] = wk
        wk = out
    return wk.t().contiguous()


def quant_linear_ref(x: torch.Tensor, w: QuantWeight | FusedQuantWeight, bias: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Plain torch: dequantize, round the weight to x's dtype (as the kernel does), matmul in float32."""
    parts = w.parts if isinstance(w, FusedQuantWeight) else (w,)
    weight = torch.cat([dequantize(p) for p in parts]).to(x.dtype).float()
    out = x.float() @ weight.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------ kernel
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@dataclass(frozen=True)
class QuantConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int
    num_warps: int
    num_stages: int


DECODE_ROWS = 8  # up to this many rows (a decode batch) take the decode launch (16-row tiles, split K)
SPLIT_ROWS = 32  # up to this many rows split K (the small launch: one 32-row tile)
MAX_SPLIT_K = 16


def _block_k(group_size: int, k: int, cap: int) -> int:
    """Largest power of two <= cap that divides the group (one scale row per K tile), at least 16 (mma K)."""
    b = cap
    while b > 16 and group_size % b and group_size < k:
        b //= 2
    return b


def quant_config(m: int, n: int, k: int, group_size: int, dtype: torch.dtype, sm_count: int | None) -> QuantConfig:
    """Launch shape for a GPU with ``sm_count`` SMs; None (no GPU: the CPU interpreter, where there are no
    registers to spill and every program iteration costs Python time) takes the largest tiles and 2 splits for
    decode, so tests still go through the split-K reduction. Not yet timed on a GPU (bench/ rows pending); what
    decided each number (registers / shared memory from kernels/compile_check.py, sm_80 | sm_90, triton 3.9):
    decode (<= 8 rows): 16 x 64 x 128 tiles (4 KB of int4 words), 4 warps, 3 stages: 96-128 | 96-128 registers,
      32 KB shared (int8 40 KB), no spill; split-K to ~2 programs per SM (7B qkv, N=4608: 72 column tiles x 4
      splits on 132 SMs), at most MAX_SPLIT_K, at least one K tile per split.
    small (9-32 rows): 32 x 128 x 64 tiles, 8 warps, 3 stages, split-K as decode (7B o_proj: 28 column tiles x
      10 splits).
    prefill: 64 x 128 x 64 tiles, 8 warps, 3 stages: 128-187 | 80-109 registers, 33-49 KB shared; 4 warps hit
      255 registers and spilled 8 B on sm_80 (asymmetric zeros).
    float32 (tests, debugging): 16 x 32 x 32 tiles, "ieee" dots (no tf32: the oracle comparison is in fp32)."""
    if sm_count is None:
        block_m = min(64, max(16, triton.next_power_of_2(m)))
        block_m, block_n, block_k, warps, stages = block_m, 128, _block_k(group_size, k, 128), 4, 1
    elif dtype == torch.float32:
        block_m, block_n, block_k, warps, stages = 16, 32, _block_k(group_size, k, 32), 4, 2
    elif m <= DECODE_ROWS:
        block_m, block_n, block_k, warps, stages = 16, 64, _block_k(group_size, k, 128), 4, 3
    else:
        block_m = 32 if m <= SPLIT_ROWS else 64
        block_n, block_k, warps, stages = 128, _block_k(group_size, k, 64), 8, 3
    split = _split_k(n, k, block_n, block_k, sm_count, 2) if m <= SPLIT_ROWS else 1
    return QuantConfig(block_m, block_n, block_k, split, warps, stages)


def _split_k(n: int, k: int, block_n: int, block_k: int, sm_count: int | None, per_sm: int) -> int:
    """Splits of the input dim for ~``per_sm`` programs per SM (2 without a GPU), at most MAX_SPLIT_K, at least
    one K tile each."""
    target = 2 if sm_count is None else triton.cdiv(per_sm * sm_count, triton.cdiv(n, block_n))
    return max(1, min(target, MAX_SPLIT_K, triton.cdiv(k, block_k)))


# Tuning candidates after the heuristic, per launch shape: (BLOCK_M, BLOCK_N, BLOCK_K cap, warps, stages, programs
# per SM for split-K). BLOCK_K is the largest power of two <= the cap that divides the group. Every one compiles
# without a spill on sm_80 and sm_90 (kernels/compile_check.py quant and GGUF variants, triton 3.9). Decode:
# 4 programs per SM (more weight loads in flight), 128-column tiles (the x tile read once per 128 columns; 8 warps
# keep the unpacked fields at 64 per thread), a shorter K tile with a deeper pipeline. Small: the 32-row tile
# with 4 programs per SM, or 64-column tiles with 4 warps (twice the column tiles, fewer splits to sum). Prefill:
# 128-row tiles (half the weight re-reads of 64), 64-column tiles with 4 warps (twice the programs).
_DECODE_CANDIDATES = [(16, 64, 128, 4, 3, 4), (16, 128, 128, 8, 3, 2), (16, 64, 64, 4, 4, 2)]
_SMALL_CANDIDATES = [(32, 128, 64, 8, 3, 4), (32, 64, 64, 4, 3, 2)]
_PREFILL_CANDIDATES = [(128, 128, 64, 8, 3, 0), (64, 64, 64, 4, 3, 0)]


def quant_candidates(m: int, n: int, k: int, group_size: int, dtype: torch.dtype,
                     sm_count: int | None) -> list[QuantConfig]:
    """What runtime/quant_tuning.py times for an (M, N, K, group) launch on a GPU with ``sm_count`` SMs: the
    heuristic ``quant_config`` first (the choice when tuning is off), then the distinct alternatives of the launch
    shape (decode: M <= DECODE_ROWS, small: M <= SPLIT_ROWS). fp32 (a test dtype) and no GPU (sm_count None): the
    heuristic alone. They
    live here, beside the heuristic they extend and the group constraint on BLOCK_K, so kernels/gguf_linear.py
    takes the same list (launch.py would have to import this module's rules to build them)."""
    default = quant_config(m, n, k, group_size, dtype, sm_count)
    if sm_count is None or dtype == torch.float32:
        return [default]
    out = [default]
    table = _DECODE_CANDIDATES if m <= DECODE_ROWS else _SMALL_CANDIDATES if m <= SPLIT_ROWS else _PREFILL_CANDIDATES
    for bm, bn, bk, warps, stages, per_sm in table:
        bk = _block_k(group_size, k, bk)
        split = _split_k(n, k, bn, bk, sm_count, per_sm) if m <= SPLIT_ROWS else 1
        cfg = QuantConfig(bm, bn, bk, split, warps, stages)
        if cfg not in out:
            out.append(cfg)
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def quant_linear_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, b_ptr, out_ptr,
                        M, N, K, stride_xm, stride_om, stride_os, group_size, tiles_per_split,
                        BITS: tl.constexpr, ZERO: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K). Program (m, n, s) accumulates rows m, columns n over
    K tiles [s * tiles_per_split, (s + 1) * tiles_per_split) and writes out[s] (partials) or out (SPLIT_K 1)."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rows < M, cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_first = pid_s * tiles_per_split * BLOCK_K
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(K - k_first, BLOCK_K))  # the last split may be shorter
    for t in range(0, n_tiles):
        k0 = k_first + t * BLOCK_K
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < K
        if HAS_PERM:
            kx = tl.load(perm_ptr + ks, mask=mask_k, other=0)
        else:
            kx = ks
        a = tl.load(x_rows + kx[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # each word once: (BLOCK_K / PACK, BLOCK_N) words -> (.., PACK, ..) fields -> (BLOCK_K, BLOCK_N) rows
        kw = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
        words = tl.load(qw_ptr + kw[:, None] * N + cols[None, :], mask=(kw < K // PACK)[:, None] & mask_n[None, :],
                        other=0)
        fields = (words[:, None, :] >> (tl.arange(0, PACK) * BITS)[None, :, None]) & MASK
        q = tl.reshape(fields, (BLOCK_K, BLOCK_N)).to(tl.float32)
        g = k0 // group_size  # BLOCK_K divides group_size (or one group spans K): one scale row per tile
        s = tl.load(s_ptr + g * N + cols, mask=mask_n, other=0.0).to(tl.float32)
        if ZERO >= 0:
            w = (q - ZERO) * s[None, :]
        else:
            z = tl.load(z_ptr + g * N + cols, mask=mask_n, other=0.0).to(tl.float32)
            w = (q - z[None, :]) * s[None, :]
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_s.to(tl.int64) * stride_os + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def quant_linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None, *,
                 out: torch.Tensor | None = None, sm_count: int | None = None,
                 config: QuantConfig | None = None) -> torch.Tensor:
    """x (M, K) fp16/bf16/fp32 with unit last stride -> (M, N) in x's dtype (written into ``out`` when given: a
    (M, N) view with unit last stride, e.g. a column slice of a wider output)."""
    op = "quant_linear (kernels/quant_linear.py)"
    check_tensor(op, "x", x, ndim=2)
    m, k = x.shape
    n = w.out_features
    check(k == w.in_features, op, f"x has {k} columns, the weight has in_features {w.in_features}")
    check(w.qweight.device == x.device, op, f"weight is on {w.qweight.device}, x on {x.device}")
    if bias is not None:
        check(tuple(bias.shape) == (n,), op, f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    check(tuple(out.shape) == (m, n) and out.dtype == x.dtype and (out.stride(-1) == 1 or n == 1), op,
          f"out must be ({m}, {n}) {x.dtype} with unit last stride, got {tuple(out.shape)} {out.dtype}")
    if m == 0:
        return out
    if sm_count is None and x.device.type == "cuda":
        sm_count = _sm_count(x.device)
    cfg = config or quant_config(m, n, k, w.group_size, x.dtype, sm_count)
    check(w.group_size % cfg.BLOCK_K == 0 or w.group_size >= k, op,
          f"BLOCK_K {cfg.BLOCK_K} must divide group_size {w.group_size}")
    tiles = triton.cdiv(k, cfg.BLOCK_K)
    per_split = triton.cdiv(tiles, cfg.SPLIT_K)
    split = triton.cdiv(tiles, per_split)  # no empty split
    dst = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.BLOCK_M), triton.cdiv(n, cfg.BLOCK_N), split)
    dummy = w.scales  # never read: its flag is off
    quant_linear_kernel[grid](
        x, w.qweight, w.scales, w.zeros if w.zeros is not None else dummy,
        w.perm if w.perm is not None else dummy, bias if (bias is not None and split == 1) else dummy, dst,
        m, n, k, x.stride(0), dst.stride(-2), dst.stride(0) if split > 1 else 0, w.group_size, per_split,
        BITS=w.bits, ZERO=w.zero, HAS_PERM=w.perm is not None, HAS_BIAS=bias is not None and split == 1,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        red = dst.sum(0)
        if bias is not None:
            red += bias.float()
        out.copy_(red)
    return out
