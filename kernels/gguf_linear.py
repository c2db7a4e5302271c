"""Weight-only linear over GGUF block types (Q8_0, Q5_0, Q4_0, Q5_1, Q4_1, Q4_K, Q5_K, Q6_K: every type of the
Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 files and of the Q4_K and Q5_K ones, including the fallbacks llama.cpp writes for rows
that are not whole 256-value super-blocks): out = x @ W^T + bias, W rebuilt on the fly.

Per weight, in float32 and in the order gguf.quants / model/dequant.py use (so the value is bit-identical to the
dequantize-at-load path), with q = u - OFFSET the signed code of the unsigned code u:
    Q8_0, Q5_0, Q4_0:  w = d[b] * q                    (d per 32-row block)
    Q5_1, Q4_1:        w = d[b] * q + m[b]             (fp16 d and m per 32-row block)
    Q6_K:              w = (d[B] * sc[j]) * q          (int8 sc per 16 rows, fp16 d per 256)
    Q4_K, Q5_K:        w = (d[B] * sc[j]) * q - (dmin[B] * m[j])   (6-bit sc, m per 32 rows, fp16 d, dmin per 256)
rounded once to the activation dtype for the tensor-core dot: the two paths differ only in summation order. The
kernel is compiled with ``enable_fp_fusion=False``: Q4_K's ``a * q - b`` would otherwise become one fma, rounded
once instead of twice, and differ from the reference in the last bit.

Layout (``GGUFWeight``, built once at load by ``pack_gguf_weight``; the format is the file's, the memory layout
ours): everything transposed to (rows along K, N) so a warp's lanes read consecutive columns, as in
kernels/quant_linear.py.
    lo      int32 (K / pack, N): the low LO_BITS of u (8 for Q8_0, else 4), ``32 / LO_BITS`` rows per word
    hi      int32 (K / (32 / HI_BITS), N): the bits above 4 (Q5_0, Q5_K: 1, Q6_K: 2), else None
    sub     (K / SUB, N): fp16 d (the 32-value block types), uint8 sc (Q4_K, Q5_K), int8 sc (Q6_K)
    sub_min (K / 32, N): fp16 m (Q5_1, Q4_1), uint8 m (Q4_K, Q5_K);  sup, sup_min fp16 (K / 256, N): d (and dmin)
            of the K-quants
Bits per weight, ours vs the file's: Q8_0 8.5, Q5_0 5.5, Q4_0 4.5, Q5_1 6, Q4_1 5 and Q6_K 6.5625 the same; Q4_K
4.625 vs 4.5 and
Q5_K 5.625 vs 5.5 (+2.8%, +2.3%): their 6-bit sc/m are unpacked to one byte each, so a tile reads its scales with
two plain loads instead of reassembling them from the 12-byte packing across sub-blocks (bits split over bytes
0-3 and 8-11).

Launch shapes (``gguf_config``) are quant_linear's: decode (<= 8 rows) and small (<= 32 rows) split-K with
each weight word loaded once, prefill tiled; the same tile sizes and tuning candidates (``gguf_candidates``),
checked for spills by kernels/compile_check.py. Not timed on a GPU here; runtime/quant_tuning.py times the
candidates at start-up.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from qwen2_triton.kernels._checks import check, check_tensor
from qwen2_triton.kernels.quant_linear import FusedParts, QuantConfig, pack_rows, quant_candidates, quant_config, \
    unpack_rows


@dataclass(frozen=True)
class GGUFFormat:
    name: str
    lo_bits: int
    hi_bits: int  # 0: no high plane
    sub_rows: int  # rows per ``sub`` scale
    offset: int  # q = u - offset
    super_rows: int  # rows per ``sup`` (0: none)
    has_min: bool  # a min per 32 rows: subtracted, times dmin, with super-blocks (Q4_K, Q5_K); added without (Q4_1)

    @property
    def sub_dtype(self) -> torch.dtype:
        """The ``sub`` field's: fp16 d of a 32-value block, or a K-quant's sub-block scale (Q6_K's signed)."""
        return torch.float16 if self.super_rows == 0 else torch.int8 if self.name == "Q6_K" else torch.uint8

    @property
    def min_dtype(self) -> torch.dtype:
        """The ``sub_min`` field's: a K-quant's 6-bit m as a byte, or a 32-value block's fp16 m."""
        return torch.uint8 if self.super_rows else torch.float16

    def field_rows(self, k: int, k_offset: int = 0) -> dict:
        """GGUFWeight field -> (rows along the input dim, dtype) for ``k`` values starting ``k_offset`` into a
        super-block, or None where the type has no such field: the layout's one definition (the packer checks
        against it, the tuner's random weights and the compile check build from it)."""
        sup = -(-(k_offset + k) // self.super_rows) if self.super_rows else 0
        return {"lo": (k * self.lo_bits // 32, torch.int32),
                "hi": (k * self.hi_bits // 32, torch.int32) if self.hi_bits else None,
                "sub": (k // self.sub_rows, self.sub_dtype),
                "sub_min": (k // 32, self.min_dtype) if self.has_min else None,
                "sup": (sup, torch.float16) if self.super_rows else None,
                "sup_min": (sup, torch.float16) if self.has_min and self.super_rows else None}

    @property
    def bits_per_weight(self) -> float:
        scale_bits = 16 if self.super_rows == 0 else 8  # fp16 d per block; byte-wide sc (and m) per sub-block
        per_super = (16 * (1 + self.has_min) / self.super_rows) if self.super_rows else 0
        return self.lo_bits + self.hi_bits + scale_bits * (1 + self.has_min) / self.sub_rows + per_super


FORMATS = {"Q8_0": GGUFFormat("Q8_0", 8, 0, 32, 128, 0, False), "Q5_0": GGUFFormat("Q5_0", 4, 1, 32, 16, 0, False),
           "Q4_0": GGUFFormat("Q4_0", 4, 0, 32, 8, 0, False), "Q5_1": GGUFFormat("Q5_1", 4, 1, 32, 0, 0, True),
           "Q4_1": GGUFFormat("Q4_1", 4, 0, 32, 0, 0, True),
           "Q4_K": GGUFFormat("Q4_K", 4, 0, 32, 0, 256, True), "Q5_K": GGUFFormat("Q5_K", 4, 1, 32, 0, 256, True),
           "Q6_K": GGUFFormat("Q6_K", 4, 2, 16, 32, 256, False)}
NATIVE_BPW = {"Q8_0": 34 * 8 / 32, "Q5_0": 22 * 8 / 32, "Q4_0": 18 * 8 / 32, "Q5_1": 24 * 8 / 32, "Q4_1": 20 * 8 / 32,
              "Q4_K": 144 * 8 / 256,
              "Q5_K": 176 * 8 / 256, "Q6_K": 210 * 8 / 256}
_TENSORS = ("lo", "hi", "sub", "sub_min", "sup", "sup_min")


@dataclass(frozen=True)
class GGUFWeight:
    """One Linear(in_features=K, out_features=N) of GGUF type ``qtype`` in the kernel's layout (module docstring)."""
    qtype: str
    lo: torch.Tensor
    hi: torch.Tensor | None
    sub: torch.Tensor
    sub_min: torch.Tensor | None
    sup: torch.Tensor | None
    sup_min: torch.Tensor | None
    in_features: int
    out_features: int
    # values of the first super-block that lie before row 0 (a tensor-parallel slice of the input dim starting
    # inside a 256-value K-quant block: model/gguf_quant.py); row k's super-block is (k + k_offset) // 256
    k_offset: int = 0

    @property
    def fmt(self) -> GGUFFormat:
        return FORMATS[self.qtype]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (getattr(self, f) for f in _TENSORS) if t is not None)

    def to(self, device) -> "GGUFWeight":
        return replace(self, **{f: getattr(self, f).to(device) for f in _TENSORS if getattr(self, f) is not None})

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, config_of=None) -> torch.Tensor:
        """``config_of(weight, rows) -> QuantConfig | None``: the start-up plan's launch config (None: heuristic)."""
        return gguf_linear(x, self, bias, config=config_of(self, x.shape[0]) if config_of else None)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of this table (N rows of K values) in ``dtype`` (kernels/gguf_embedding.py)."""
        from qwen2_triton.kernels.gguf_embedding import gguf_embedding

        return gguf_embedding(ids, self, dtype)


@dataclass(frozen=True)
class FusedGGUFWeight(FusedParts):
    """Parts of one fused projection whose GGUF types differ (Q4_K_M files mix them: e.g. q, k Q5_0 and v Q8_0).
    Consecutive parts of one type are one part."""
    parts: tuple[GGUFWeight, ...]

    def to(self, device) -> "FusedGGUFWeight":
        return FusedGGUFWeight(tuple(p.to(device) for p in self.parts))

    def _launch(self, x, part, bias, out, config):
        return gguf_linear(x, part, bias, out=out, config=config)


# ------------------------------------------------------------------------------------------------ packing
def pack_gguf_weight(qtype: str, codes: torch.Tensor, sub: torch.Tensor, sub_min: torch.Tensor | None = None,
                     sup: torch.Tensor | None = None, sup_min: torch.Tensor | None = None,
                     k_offset: int = 0) -> GGUFWeight:
    """The fields of model/gguf_blocks.py (all (N, ...): codes uint8 (N, K), scales per sub- and super-block)
    -> the kernel layout. ``k_offset``: see GGUFWeight (sup and sup_min then cover the first, partial block)."""
    if qtype not in FORMATS:
        raise ValueError(f"no GGUF kernel layout for type {qtype} (supported: {sorted(FORMATS)})")
    f = FORMATS[qtype]
    n, k = codes.shape
    if k_offset and not (f.super_rows and k_offset % f.sub_rows == 0 and 0 < k_offset < f.super_rows):
        raise ValueError(f"{qtype}: k_offset {k_offset} must be whole sub-blocks inside one super-block")
    layout = f.field_rows(k, k_offset)  # a scale for every value, no more
    for name, t in (("sub", sub), ("sub_min", sub_min), ("sup", sup), ("sup_min", sup_min)):
        if t is not None and (k % f.sub_rows or layout[name] is None or t.shape[1] != layout[name][0]):
            raise ValueError(f"{qtype}: {name} has {t.shape[1]} columns for {k} values (k_offset {k_offset}), "
                             f"expected {layout[name] and layout[name][0]}")
    u = codes.t().contiguous()  # (K, N)
    lo = pack_rows(u & ((1 << f.lo_bits) - 1), f.lo_bits)
    hi = pack_rows(u >> 4, f.hi_bits) if f.hi_bits else None
    col = lambda t: None if t is None else t.t().contiguous()  # noqa: E731
    return GGUFWeight(qtype, lo, hi, col(sub), col(sub_min), col(sup), col(sup_min), k, n, k_offset)


def fuse_gguf(parts: list[GGUFWeight]) -> GGUFWeight | FusedGGUFWeight:
    """Parts of one fused projection (same K) -> one weight: runs of one type concatenated along N."""
    runs: list[list[GGUFWeight]] = []
    for p in parts:
        if runs and runs[-1][0].qtype == p.qtype:
            runs[-1].append(p)
        else:
            runs.append([p])
    if len({p.k_offset for p in parts}) > 1:
        raise ValueError("parts of one fused projection must start at the same input column (k_offset)")
    merged = [r[0] if len(r) == 1 else replace(
        r[0], out_features=sum(p.out_features for p in r),
        **{f: torch.cat([getattr(p, f) for p in r], 1) for f in _TENSORS if getattr(r[0], f) is not None})
        for r in runs]
    return merged[0] if len(merged) == 1 else FusedGGUFWeight(tuple(merged))


def dequantize(w: GGUFWeight) -> torch.Tensor:
    """float32 weight (N, K) from the layout, by the module docstring's formulas: the kernel's reference."""
    f = w.fmt
    u = unpack_rows(w.lo, f.lo_bits).to(torch.int32)  # (K, N)
    if w.hi is not None:
        u = u | (unpack_rows(w.hi, f.hi_bits).to(torch.int32) << 4)
    q = u.float() - f.offset
    s = w.sub.float()
    if w.sup is not None:  # each sub-block's super-block, counting the k_offset values before row 0
        def sup_of(rows: int) -> torch.Tensor:
            return ((torch.arange(w.in_features // rows) * rows + w.k_offset) // f.super_rows).to(w.sup.device)

        s = w.sup.float()[sup_of(f.sub_rows)] * s
    wk = s.repeat_interleave(f.sub_rows, 0) * q
    if f.has_min and f.super_rows:
        mn = w.sup_min.float()[sup_of(32)] * w.sub_min.float()
        wk = wk - mn.repeat_interleave(32, 0)
    elif f.has_min:
        wk = wk + w.sub_min.float().repeat_interleave(32, 0)
    return wk.t().contiguous()


def gguf_linear_ref(x: torch.Tensor, w: GGUFWeight | FusedGGUFWeight, bias: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Plain torch: dequantize, round the weight to x's dtype (as the kernel does), matmul in float32."""
    parts = w.parts if isinstance(w, FusedGGUFWeight) else (w,)
    weight = torch.cat([dequantize(p) for p in parts]).to(x.dtype).float()
    out = x.float() @ weight.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------ kernel
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def gguf_config(m: int, n: int, k: int, dtype: torch.dtype, sm_count: int | None) -> QuantConfig:
    """quant_linear's shapes for a K with no group constraint; every BLOCK_K it picks (32, 64, 128) is a multiple
    of 32, the rows of Q5_0's high-bit word and of every scale."""
    return quant_config(m, n, k, k, dtype, sm_count)


def gguf_candidates(m: int, n: int, k: int, dtype: torch.dtype, sm_count: int | None) -> list[QuantConfig]:
    """quant_linear's tuning candidates (``quant_candidates``) for a K with no group constraint, ``gguf_config``
    first; each BLOCK_K (64, 128) a multiple of 32."""
    return quant_candidates(m, n, k, k, dtype, sm_count)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _unpack(ptr, k0, N, K, cols, mask_n, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_K, BLOCK_N) int32 fields of BITS bits from (BLOCK_K / (32 / BITS), BLOCK_N) words, each loaded once."""
    PACK: tl.constexpr = 32 // BITS
    kw = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    words = tl.load(ptr + kw[:, None] * N + cols[None, :], mask=(kw < K // PACK)[:, None] & mask_n[None, :], other=0)
    fields = (words[:, None, :] >> (tl.arange(0, PACK) * BITS)[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(fields, (BLOCK_K, BLOCK_N))


@triton.jit
def _per_row(v, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_K / ROWS, BLOCK_N) per-block values -> (BLOCK_K, BLOCK_N), each repeated over its ROWS rows."""
    return tl.reshape(tl.broadcast_to(v[:, None, :], (BLOCK_K // ROWS, ROWS, BLOCK_N)), (BLOCK_K, BLOCK_N))


@triton.jit
def dequant_tile(lo_ptr, hi_ptr, sub_ptr, min_ptr, sup_ptr, supmin_ptr, k0, N, K, k_off, cols, mask_n,
                 LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, SUB: tl.constexpr, OFFSET: tl.constexpr,
                 SUPER: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """float32 weights (BLOCK_K, BLOCK_N) of rows [k0, k0 + BLOCK_K) and columns ``cols`` (any, e.g. token ids),
    by the module docstring's formulas; masked entries are 0 (a row past K, a column off ``mask_n``). ``k_off``:
    GGUFWeight.k_offset, the values before row 0 in its first super-block."""
    u = _unpack(lo_ptr, k0, N, K, cols, mask_n, LO_BITS, BLOCK_K, BLOCK_N)
    if HI_BITS > 0:
        u = u | (_unpack(hi_ptr, k0, N, K, cols, mask_n, HI_BITS, BLOCK_K, BLOCK_N) << 4)
    q = u.to(tl.float32) - OFFSET  # small integers: exact
    sr = k0 // SUB + tl.arange(0, BLOCK_K // SUB)  # this tile's sub-blocks
    smask = (sr < K // SUB)[:, None] & mask_n[None, :]
    s = tl.load(sub_ptr + sr[:, None] * N + cols[None, :], mask=smask, other=0).to(tl.float32)
    if SUPER > 0:
        s = tl.load(sup_ptr + ((sr * SUB + k_off) // SUPER)[:, None] * N + cols[None, :], mask=smask,
                    other=0.0).to(tl.float32) * s  # d * sc
    w = _per_row(s, SUB, BLOCK_K, BLOCK_N) * q
    if HAS_MIN and SUPER > 0:  # Q4_K, Q5_K: SUB == 32, one m per sub-block
        mn = tl.load(supmin_ptr + ((sr * SUB + k_off) // SUPER)[:, None] * N + cols[None, :], mask=smask,
                     other=0.0).to(tl.float32) * \
            tl.load(min_ptr + sr[:, None] * N + cols[None, :], mask=smask, other=0).to(tl.float32)
        w = w - _per_row(mn, SUB, BLOCK_K, BLOCK_N)
    elif HAS_MIN:  # Q4_1, Q5_1: SUB == 32, an fp16 m per block, added
        mn = tl.load(min_ptr + sr[:, None] * N + cols[None, :], mask=smask, other=0.0).to(tl.float32)
        w = w + _per_row(mn, SUB, BLOCK_K, BLOCK_N)
    return w


@triton.jit
def gguf_linear_kernel(x_ptr, lo_ptr, hi_ptr, sub_ptr, min_ptr, sup_ptr, supmin_ptr, b_ptr, out_ptr,
                       M, N, K, k_off, stride_xm, stride_om, stride_os, tiles_per_split,
                       LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, SUB: tl.constexpr, OFFSET: tl.constexpr,
                       SUPER: tl.constexpr, HAS_MIN: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K), as kernels/quant_linear.py's kernel."""
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rows < M, cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_first = pid_s * tiles_per_split * BLOCK_K
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(K - k_first, BLOCK_K))
    for t in range(0, n_tiles):
        k0 = k_first + t * BLOCK_K
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & (ks < K)[None, :], other=0.0)
        w = dequant_tile(lo_ptr, hi_ptr, sub_ptr, min_ptr, sup_ptr, supmin_ptr, k0, N, K, k_off, cols, mask_n,
                         LO_BITS, HI_BITS, SUB, OFFSET, SUPER, HAS_MIN, BLOCK_K, BLOCK_N)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_s.to(tl.int64) * stride_os + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gguf_linear(x: torch.Tensor, w: GGUFWeight, bias: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None, sm_count: int | None = None,
                config: QuantConfig | None = None) -> torch.Tensor:
    """x (M, K) fp16/bf16/fp32 with unit last stride -> (M, N) in x's dtype (into ``out`` when given: a (M, N)
    view with unit last stride, e.g. a column slice of a wider output)."""
    op = "gguf_linear (kernels/gguf_linear.py)"
    check_tensor(op, "x", x, ndim=2)
    m, k = x.shape
    n, f = w.out_features, w.fmt
    check(k == w.in_features, op, f"x has {k} columns, the {w.qtype} weight has in_features {w.in_features}")
    check(w.lo.device == x.device, op, f"weight is on {w.lo.device}, x on {x.device}")
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
    cfg = config or gguf_config(m, n, k, x.dtype, sm_count)
    check(cfg.BLOCK_K % 32 == 0, op, f"BLOCK_K {cfg.BLOCK_K} must be a multiple of 32 (a Q5_0 high-bit word)")
    tiles = triton.cdiv(k, cfg.BLOCK_K)
    per_split = triton.cdiv(tiles, cfg.SPLIT_K)
    split = triton.cdiv(tiles, per_split)  # no empty split
    dst = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.BLOCK_M), triton.cdiv(n, cfg.BLOCK_N), split)
    dummy = w.lo  # never read: its flag is off
    bias_in = bias is not None and split == 1
    gguf_linear_kernel[grid](
        x, w.lo, dummy if w.hi is None else w.hi, w.sub, dummy if w.sub_min is None else w.sub_min,
        dummy if w.sup is None else w.sup, dummy if w.sup_min is None else w.sup_min,
        bias if bias_in else dummy, dst,
        m, n, k, w.k_offset, x.stride(0), dst.stride(-2), dst.stride(0) if split > 1 else 0, per_split,
        LO_BITS=f.lo_bits, HI_BITS=f.hi_bits, SUB=f.sub_rows, OFFSET=f.offset, SUPER=f.super_rows,
        HAS_MIN=f.has_min, HAS_BIAS=bias_in, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=False)  # Q4_K: d*sc*q - dmin*m rounded twice, as the reference (module docstring)
    if split > 1:
        red = dst.sum(0)
        if bias is not None:
            red += bias.float()
        out.copy_(red)
    return out
