"""Launch configs of the weight-only quantized linears (kernels/quant_linear.py, kernels/gguf_linear.py), chosen per
GPU and weight shape at start-up, with runtime/tuning.py's ``tune`` and its cache file.

What is planned: one config per distinct ``QuantShape`` (format, bits, group, N, K) of the model's quantized
projections and per launch shape, timed at these rows (``LAUNCH_ROWS``):
- decode, M=1: every step of <= DECODE_ROWS (8) rows runs the same tiles (BLOCK_M 16 covers 8 rows) and the same
  split count (it depends on N, K and the SMs, not on M), and batch-1 decode is where a linear's weight stream is
  the whole step;
- small, M=32: steps of 9 to SPLIT_ROWS (32) rows (a mid-size decode batch), one 32-row tile split over K as
  decode; timed at its full 32 rows, the most x it reads;
- prefill, M=256: more than one row tile for every candidate (the largest has 128 rows), so each is timed with
  full tiles as in a long prompt; a longer prompt only repeats them (and 256 rows of x are a few MB at most).
Candidates: ``quant_candidates`` / ``gguf_candidates`` (the heuristic first), each compile-checked for sm_80 and
sm_90 by kernels/compile_check.py. Timed on the model's own weights (the engine) or random ones of the same layout
(``qwen2-triton env --tune``), x random. Key: ``<GPU>|sm_<cap>|triton <v>|quant_linear.decode|<bucket>`` (or
gguf_linear.prefill ...), the bucket naming the dtype, the shape, the timed rows and a hash of the kernel's source.
No GPU, tune off or float32: the heuristic, nothing timed.
How the choice reaches the launches: runtime/triton_backend.py ``TritonOps.use_plan`` keeps the choices that
differ from the heuristic, keyed by (QuantShape, launch shape), and hands the weight's ``linear`` a lookup; a
choice equal to the heuristic is not passed at all, so an untuned start launches exactly what it did before.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwen2_triton.kernels.gguf_linear import FORMATS, FusedGGUFWeight, GGUFWeight, gguf_candidates, gguf_linear
from qwen2_triton.kernels.quant_linear import DECODE_ROWS, SPLIT_ROWS, FusedQuantWeight, QuantWeight, \
    quant_candidates, quant_linear
from qwen2_triton.runtime.tuning import TuneResult, TuningCache, config_label, source_hash, tune, tuning_key

log = logging.getLogger(__name__)

LAUNCH_ROWS = {"decode": 1, "small": 32, "prefill": 256}


@dataclass(frozen=True)
class QuantShape:
    """What decides a quantized linear's launch: ``format`` int4 / int8 (+zeros: loaded zeros, +perm: act-order) or
    a GGUF type (Q4_K ...), bits per code, rows per scale group (K: one group), N outputs, K inputs."""
    format: str
    bits: int
    group: int
    n: int
    k: int

    @property
    def kernel(self) -> str:
        return "gguf_linear" if self.format in FORMATS else "quant_linear"

    def describe(self) -> str:
        return f"{self.format} g{self.group} N={self.n} K={self.k}"


def shape_of(w: QuantWeight | GGUFWeight) -> QuantShape:
    if isinstance(w, GGUFWeight):
        f = w.fmt
        return QuantShape(w.qtype, f.lo_bits + f.hi_bits, f.sub_rows, w.out_features, w.in_features)
    fmt = f"int{w.bits}" + ("+zeros" if w.zeros is not None else "") + ("+perm" if w.perm is not None else "")
    return QuantShape(fmt, w.bits, w.group_size, w.out_features, w.in_features)


def launch_of(m: int) -> str:
    return "decode" if m <= DECODE_ROWS else "small" if m <= SPLIT_ROWS else "prefill"


def quant_shapes(params) -> dict[QuantShape, QuantWeight | GGUFWeight]:
    """The distinct shapes of a model's quantized linears (``model.params`` values), each with one weight of it
    (fused projections count per part: each part is its own launch). A packed embedding table counts only when it
    is the (tied) lm_head: otherwise it is looked up, never multiplied."""
    from qwen2_triton.model.qwen2 import lm_head_name

    out: dict = {}
    for name, w in params.items():
        if name == "model.embed_tokens.weight" and lm_head_name(params) != name:
            continue
        for p in (w.parts if isinstance(w, (FusedQuantWeight, FusedGGUFWeight)) else (w,)):
            if isinstance(p, (QuantWeight, GGUFWeight)):
                out.setdefault(shape_of(p), p)
    return out


def candidates(shape: QuantShape, launch: str, dtype: torch.dtype, sm_count: int | None) -> list:
    m = LAUNCH_ROWS[launch]
    if shape.kernel == "gguf_linear":
        return gguf_candidates(m, shape.n, shape.k, dtype, sm_count)
    return quant_candidates(m, shape.n, shape.k, shape.group, dtype, sm_count)


def quant_key(info, dtype: torch.dtype, shape: QuantShape, launch: str) -> str:
    import triton

    bucket = (f"{str(dtype).replace('torch.', '')} {shape.format} bits={shape.bits} group={shape.group} "
              f"N={shape.n} K={shape.k} M={LAUNCH_ROWS[launch]} src={source_hash(shape.kernel)}")
    return tuning_key(info.name, info.capability, triton.__version__, f"{shape.kernel}.{launch}", bucket)


def plan_quant(info, dtype: torch.dtype, shapes: dict, *, tune_now: bool, cache: TuningCache | None = None,
               timers: dict | None = None, device: torch.device | None = None):
    """(results, candidates), both keyed by (QuantShape, launch shape). ``shapes``: QuantShape -> a weight of it
    on ``device`` or None (random weights of its layout are then made to time on). ``timers``: key -> (config ->
    ms), for tests; default ``quant_timer`` with triton's do_bench, built only on a cache miss."""
    cands = {(s, launch): candidates(s, launch, dtype, info.sm_count) for s in shapes for launch in LAUNCH_ROWS}
    if not tune_now or info.type != "cuda" or dtype == torch.float32:
        why = ("tuning off" if not tune_now else "no GPU to time on" if info.type != "cuda" else
               "float32 has one config") + "; kernels/quant_linear.py heuristic"
        return {key: TuneResult(c[0], "default", why) for key, c in cands.items()}, cands
    cache = cache if cache is not None else TuningCache()
    results = {}
    for (shape, launch), c in cands.items():
        time_ms = timers[shape, launch] if timers is not None else _lazy(
            lambda shape=shape, launch=launch: quant_timer(shape, launch, dtype, device or torch.device("cuda"),
                                                           info.sm_count, shapes[shape]))
        results[shape, launch] = r = tune(quant_key(info, dtype, shape, launch), c, time_ms, cache,
                                          what=f"{shape.kernel} {launch}")
        log.info("%s %s: %s (%s, %s)", shape.kernel, shape.describe(), launch, r.source, r.detail)
    return results, cands


def _lazy(make: Callable[[], Callable]) -> Callable:
    """A timer built on its first call: a cached start allocates no random data."""
    built = []

    def time_ms(cfg):
        if not built:
            built.append(make())
        return built[0](cfg)
    return time_ms


def quant_timer(shape: QuantShape, launch: str, dtype: torch.dtype, device: torch.device, sm_count: int | None,
                weight=None, bench: Callable | None = None) -> Callable:
    """config -> ms per launch of ``weight`` (default: random of ``shape``'s layout) on random x of the launch
    shape's rows. ``bench(fn) -> ms`` defaults to triton.testing.do_bench (CUDA); tests pass their own."""
    if bench is None:
        from triton.testing import do_bench as bench
    w = weight if weight is not None else random_weight(shape, device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(LAUNCH_ROWS[launch], shape.k, generator=g, device=device).to(dtype)
    out = torch.empty(x.shape[0], shape.n, dtype=dtype, device=device)
    fn = gguf_linear if shape.kernel == "gguf_linear" else quant_linear
    return lambda cfg: bench(lambda: fn(x, w, None, out=out, sm_count=sm_count, config=cfg))


def random_weight(shape: QuantShape, device: torch.device) -> QuantWeight | GGUFWeight:
    """A weight of ``shape``'s layout with random codes and small scales: what a timing run reads is the layout,
    not the values."""
    g = torch.Generator(device=device).manual_seed(1)
    n, k = shape.n, shape.k

    def words(rows: int):
        return torch.randint(-2 ** 31, 2 ** 31 - 1, (rows, n), generator=g, device=device, dtype=torch.int32)

    def small(rows, dt=torch.float16):
        if dt.is_floating_point:
            return (torch.rand(rows, n, generator=g, device=device) * 0.01).to(dt)
        return torch.randint(0, 64, (rows, n), generator=g, device=device, dtype=torch.int32).to(dt)

    if shape.kernel == "gguf_linear":
        f = FORMATS[shape.format]
        fields = {name: None if spec is None else words(spec[0]) if spec[1] == torch.int32 else small(*spec)
                  for name, spec in f.field_rows(k).items()}
        return GGUFWeight(f.name, **fields, in_features=k, out_features=n)
    groups = k // shape.group
    zeros = small(groups) if "+zeros" in shape.format else None
    perm = torch.randperm(k, generator=g, device=device).to(torch.int32) if "+perm" in shape.format else None
    zero = -1 if zeros is not None else 2 ** (shape.bits - 1)
    return QuantWeight(words(k * shape.bits // 32), small(groups), zeros, zero,
                       perm, shape.bits, shape.group, k, n)


def describe(results: dict, cands: dict) -> list[str]:
    """One line per quantized shape: each launch shape's config and where it came from."""
    by_shape: dict = {}
    for (shape, launch), r in results.items():
        n = len(cands[shape, launch])
        how = {"default": f"heuristic: {r.detail.split(';')[0]}", "cache": "cached", "tuned": f"tuned: {r.detail}"}
        by_shape.setdefault(shape, []).append(f"{launch} {config_label(r.config)} [{how[r.source]}; {n} "
                                              f"candidate{'s' if n > 1 else ''}]")
    return [f"{shape.kernel} {shape.describe()}: " + " | ".join(parts) for shape, parts in by_shape.items()]


def checkpoint_shapes(path: str) -> list[QuantShape]:
    """The QuantShapes a checkpoint's kept-quantized projections load as, from its config and metadata only (for
    ``qwen2-triton env --model``): a GPTQ / AWQ directory's four fused projections, a GGUF file's projections of
    the kernel's types (runs of one type in a fused projection are one launch). Assumes, as real GPTQ checkpoints
    do, one act-order g_idx per fused projection (parts with different ones launch per part: other N)."""
    import os

    from qwen2_triton.model.loader import is_gguf_file

    path = os.path.expanduser(path)
    if os.path.isdir(path):
        from qwen2_triton.model.config import Qwen2Config
        from qwen2_triton.model.quantization import read_quant_config

        qc = read_quant_config(path)
        if qc is None:
            return []
        cfg = Qwen2Config.from_file(os.path.join(path, "config.json"))
        h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
        fmt = f"int{qc.bits}" + ("" if qc.method == "gptq" and qc.sym else "+zeros") + ("+perm" if qc.desc_act else "")
        out = [QuantShape(fmt, qc.bits, k if qc.group_size == -1 else qc.group_size, n, k)
               for k, n in ((h, q + 2 * kv), (q, h), (h, 2 * i), (i, h))]
        return list(dict.fromkeys(out))
    if not is_gguf_file(path):
        return []
    from qwen2_triton.model.gguf_loader import load_gguf
    from qwen2_triton.model.gguf_quant import EMBEDDING, LM_HEAD, plan

    g = load_gguf(path, progress=False)
    keep, _ = plan(g.tensors, g.config["num_hidden_layers"])
    if LM_HEAD in keep:  # a separate lm_head: the table is looked up, never multiplied
        keep.pop(EMBEDDING, None)
    out = []
    for names in keep.values():
        runs: list[list] = []  # [qtype, N, K] per run of one type, as kernels/gguf_linear.py fuse_gguf merges them
        for x in names:
            qtype, (n, k) = g.tensors.ggml_types[x], tuple(g.tensors.shapes[x])
            if runs and runs[-1][0] == qtype:
                runs[-1][1] += n
            else:
                runs.append([qtype, n, k])
        for qtype, n, k in runs:
            f = FORMATS[qtype]
            out.append(QuantShape(qtype, f.lo_bits + f.hi_bits, f.sub_rows, n, k))
    return list(dict.fromkeys(out))
