"""Kernel microbenchmarks at Qwen2 shapes: Triton vs torch eager vs torch.compile (torch SDPA for attention, bf16
cuBLAS for the weight-only quantized linear).

    pytest bench/test_bench_kernels.py [-k rms_norm] [--benchmark-disable]

On CUDA, times come from triton.testing.do_bench (median ms, CUDA events, L2 flushed between runs). Every row
goes to bench/results/kernels-<gpu>-<date>.csv with GPU name, torch and triton versions, the achieved GB/s or
TFLOP/s from the byte / FLOP formula next to each test, and ``frac_roofline``: the fraction of the roofline
that bounds the kernel, measured device-copy bandwidth for memory-bound ones and the GPU's dense bf16 peak
(``PEAK_TFLOPS``) for prefill attention. pytest-benchmark's own table times the Triton launch wall-clock
(synchronised) as a cross-check; the figures of record are in the CSV.

Without CUDA the same tests collect and run as a smoke test (CI): one tiny shape each (the quantized linear: both
launch shapes, each format), the Triton kernels through the interpreter, each checked against its reference,
nothing timed or written. A benchmark broken by a kernel change is found here, not in a GPU session's scarce
device time.
"""
from __future__ import annotations

import csv
import datetime
import math
import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available():  # the smoke run: kernels through the interpreter, set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qwen2_triton.kernels.attention import attention, attention_ref  # noqa: E402
from qwen2_triton.kernels.quant_linear import dequantize, quant_linear, quant_linear_ref  # noqa: E402
from qwen2_triton.kernels.rmsnorm import rms_norm, rms_norm_ref  # noqa: E402
from qwen2_triton.kernels.rotary import build_cos_sin_cache, default_inv_freq, rotary, rotary_ref  # noqa: E402
from qwen2_triton.kernels.swiglu import swiglu, swiglu_ref  # noqa: E402
from qwen2_triton.kernels.testing import make_paged_batch, random_quant_weight  # noqa: E402

CUDA = torch.cuda.is_available()
DEV, DT = torch.device("cuda" if CUDA else "cpu"), torch.bfloat16
ES = 2  # bytes per bf16 element
if CUDA:
    TOKENS = [1, 256, 4096, 16384]
    MODELS = {"0.5B": dict(hidden=896, inter=4864, hq=14, hk=2, d=64),
              "1.5B": dict(hidden=1536, inter=8960, hq=12, hk=2, d=128),
              "7B": dict(hidden=3584, inter=18944, hq=28, hk=4, d=128)}
    ATTN_MODELS, PREFILL_SEQ, DECODE_BATCH, DECODE_CTX = ["0.5B", "7B"], [512, 2048, 8192, 16384], [1, 16, 64], \
        [512, 4096, 32768]
    # Qwen2-7B's projections, (in, out): hidden 3584, q 3584, kv 512 (4 heads x 128), intermediate 18944
    LINEARS = {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}
    LINEAR_ROWS = [1, 8, 32, 256, 2048]  # decode batches (split-K: the GEMV launch <= 8 rows, small <= 32), prefill
else:  # smoke: Qwen2-0.5B's head layout at toy widths, a few tokens, one case per test
    TOKENS = [3]
    MODELS = {"tiny": dict(hidden=96, inter=80, hq=7, hk=1, d=64)}
    ATTN_MODELS, PREFILL_SEQ, DECODE_BATCH, DECODE_CTX = ["tiny"], [40], [2], [70]
    LINEARS, LINEAR_ROWS = {"tiny": (256, 96)}, [3, 24, 40]  # the three launch shapes: decode, small, prefill
# Qwen's GPTQ releases (QWEN2_NOTES.md): int4 g128 symmetric, and the other layouts the kernel takes: int4 with
# per-group zeros (AWQ, asymmetric GPTQ) and int8 g128. (bits, symmetric)
QUANT_FORMATS = {"int4-g128-sym": (4, True), "int4-g128-zeros": (4, False), "int8-g128-sym": (8, True)}
GEMV_TARGET = "frac_copy_bw>=0.75"  # issue 11: decode GEMV streams the packed weights at >= 75% of copy bandwidth
# Dense bf16 tensor-core peak, TFLOP/s (vendor datasheets), for prefill attention's roofline fraction.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}
if not CUDA:  # the benchmark fixture is requested but not timed in the smoke run
    pytestmark = pytest.mark.filterwarnings("ignore::pytest_benchmark.logger.PytestBenchmarkWarning")
RESULTS = pathlib.Path(__file__).parent / "results"
ROWS: list[dict] = []
TOL = dict(atol=2 ** -6, rtol=2 ** -6)  # bf16 kernels against their fp32-math references (smoke check)
TOL_QUANT = dict(atol=2e-2, rtol=2 ** -7)  # tests/test_kernel_quant_linear.py's bf16 tolerance: unit-size outputs


def ms(fn) -> float:
    if not CUDA:  # smoke: run once, time nothing
        fn()
        return math.nan
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_tflops() -> float | None:
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    """Device copy bandwidth (read + write of 1 GiB), the ceiling for every memory-bound kernel here."""
    if not CUDA:
        return math.nan
    src = torch.empty(1 << 29, dtype=DT, device=DEV)
    dst = torch.empty_like(src)
    return 2 * src.numel() * ES / ms(lambda: dst.copy_(src)) * 1e-6


@pytest.fixture(scope="session", autouse=True)
def write_csv():
    yield
    if not ROWS or not CUDA:
        return
    import triton

    RESULTS.mkdir(exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    path = RESULTS / f"kernels-{gpu}-{datetime.date.today()}.csv"
    common = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  date=datetime.datetime.now().isoformat(timespec="seconds"))
    fields = list(common) + list(ROWS[0])
    # several runs a day (scripts/gpu_session.sh runs the ops and the attention benchmarks as separate parts)
    # add to one file; a file with other columns is replaced
    append = False
    if path.exists():
        with open(path, newline="") as f:
            append = next(csv.reader(f), None) == fields
    with open(path, "a" if append else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if not append:
            writer.writeheader()
        writer.writerows({**common, **r} for r in ROWS)


def record(benchmark, op, shape, impls: dict, *, nbytes=None, flops=None, copy_gbps=None, check=None, tol=TOL,
           bound=None, baseline=None, target=""):
    """Time every implementation; one CSV row per implementation; the Triton one also through pytest-benchmark.
    ``check``: (triton output fn, reference output fn) compared once before timing (the smoke test's point).
    ``nbytes``: one byte count, or one per implementation (a quantized weight streams fewer bytes than bf16).
    ``bound``: which roofline ``frac_roofline`` measures, "memory" (copy bandwidth; the default with nbytes) or
    "compute" (the GPU's bf16 peak). ``baseline``: the implementation every row's ``speedup`` is relative to.
    ``target``: the goal written next to the Triton row (unmeasured until a GPU runs it)."""
    if check is not None:
        got, want = check
        torch.testing.assert_close(got().float(), want().float(), **tol)
    bound = bound or ("memory" if nbytes is not None else "compute")
    rows, times = {}, {}
    for impl, fn in impls.items():
        t = times[impl] = ms(fn)
        row = dict(op=op, shape=shape, impl=impl, ms=round(t, 5), **{"GB/s": "", "frac_copy_bw": "",
                                                                      "TFLOP/s": "", "frac_roofline": "",
                                                                      "speedup": "", "target": ""})
        b = nbytes.get(impl) if isinstance(nbytes, dict) else nbytes
        if b is not None:
            row["GB/s"] = round(b / t * 1e-6, 1)
            row["frac_copy_bw"] = round(b / t * 1e-6 / copy_gbps, 3)
            if bound == "memory":
                row["frac_roofline"] = row["frac_copy_bw"]
        if flops is not None:
            row["TFLOP/s"] = round(flops / t * 1e-9, 1)
            if bound == "compute" and peak_tflops():
                row["frac_roofline"] = round(flops / t * 1e-9 / peak_tflops(), 3)
        rows[impl] = row
    for impl, row in rows.items():
        if baseline is not None:
            row["speedup"] = round(times[baseline] / times[impl], 3) if CUDA else ""
        if impl == "triton":
            row["target"] = target
        ROWS.append(row)
        benchmark.extra_info[impl] = row
    if CUDA:
        triton_fn = impls["triton"]
        benchmark.pedantic(lambda: (triton_fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)


def reference_impls(ref, *args) -> dict:
    """Eager reference, and torch.compile of it on CUDA (compiling on the CPU smoke run would only add time)."""
    impls = {"eager": lambda: ref(*args)}
    if CUDA:
        compiled = torch.compile(ref, dynamic=False)
        impls["compile"] = lambda: compiled(*args)
    return impls


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm(benchmark, model, tokens, copy_gbps):
    h = MODELS[model]["hidden"]
    x, r = torch.randn(tokens, h, device=DEV, dtype=DT), torch.randn(tokens, h, device=DEV, dtype=DT)
    w = torch.randn(h, device=DEV, dtype=DT)
    nbytes = (4 * tokens * h + h) * ES  # read x, residual; write out, new residual; read weight
    record(benchmark, "rms_norm+residual", f"{model} T={tokens}",
           {"triton": lambda: rms_norm(x, w, 1e-6, r), **reference_impls(rms_norm_ref, x, w, 1e-6, r)},
           nbytes=nbytes, copy_gbps=copy_gbps,
           check=(lambda: rms_norm(x, w, 1e-6, r)[0], lambda: rms_norm_ref(x, w, 1e-6, r)[0]))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_swiglu(benchmark, model, tokens, copy_gbps):
    inter = MODELS[model]["inter"]
    gate_up = torch.randn(tokens, 2 * inter, device=DEV, dtype=DT)
    nbytes = 3 * tokens * inter * ES  # read gate and up, write out
    record(benchmark, "swiglu", f"{model} T={tokens}",
           {"triton": lambda: swiglu(gate_up), **reference_impls(swiglu_ref, gate_up)},
           nbytes=nbytes, copy_gbps=copy_gbps, check=(lambda: swiglu(gate_up), lambda: swiglu_ref(gate_up)))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_rotary(benchmark, model, tokens, copy_gbps):
    m = MODELS[model]
    hq, hk, d = m["hq"], m["hk"], m["d"]
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, device=DEV, dtype=DT)  # q, k as strided views, as in the model
    q, k = qkv[:, : hq * d].view(tokens, hq, d), qkv[:, hq * d: (hq + hk) * d].view(tokens, hk, d)
    max_pos = 32768 if CUDA else 64
    pos = torch.randint(0, max_pos, (tokens,), device=DEV)
    cos_sin = build_cos_sin_cache(default_inv_freq(d, 1e6), max_pos, device=DEV)
    nbytes = 2 * tokens * (hq + hk) * d * ES + tokens * (d * 4 + 8)  # q, k read + written; cos/sin row; position
    want = rotary_ref(q, k, pos, cos_sin)  # before the in-place kernel runs
    record(benchmark, "rotary", f"{model} T={tokens}",
           {"triton": lambda: rotary(q, k, pos, cos_sin), **reference_impls(rotary_ref, q, k, pos, cos_sin)},
           nbytes=nbytes, copy_gbps=copy_gbps,
           check=(lambda: torch.cat([t.flatten(1) for t in rotary(q.clone(), k.clone(), pos, cos_sin)], 1),
                  lambda: torch.cat([t.flatten(1) for t in want], 1)))


def _contiguous_kv(k_cache, v_cache, meta, n):
    """The first sequence's keys/values gathered to (1, Hk, n, D) for SDPA (gather not timed)."""
    from qwen2_triton.kernels.attention import gather_kv
    k = gather_kv(k_cache, meta.block_tables[0], n).transpose(0, 1)[None]
    v = gather_kv(v_cache, meta.block_tables[0], n).transpose(0, 1)[None]
    return k.contiguous(), v.contiguous()


@pytest.mark.parametrize("model", ATTN_MODELS)
@pytest.mark.parametrize("seq", PREFILL_SEQ)
def test_attention_prefill(benchmark, model, seq):
    m = MODELS[model]
    q, kc, vc, meta = make_paged_batch([seq], [seq], m["hq"], m["hk"], m["d"], DT, device=DEV)
    scale = m["d"] ** -0.5
    flops = 4 * m["hq"] * m["d"] * seq * seq / 2  # QK^T and PV, 2 FLOP per MAC, causal half
    k, v = _contiguous_kv(kc, vc, meta, seq)
    qs = q.transpose(0, 1)[None]
    impls = {"triton": lambda: attention(q, kc, vc, meta, scale),
             "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale,
                                                                              enable_gqa=True)}
    if seq <= 4096:  # the fp32 reference materialises (Hq, S, S) scores: 16k x 16k x 28 x 4 B = 30 GB
        impls["eager"] = lambda: attention_ref(q, kc, vc, meta, scale)
    record(benchmark, "attention_prefill", f"{model} S={seq}", impls, flops=flops,
           check=(lambda: attention(q, kc, vc, meta, scale), lambda: attention_ref(q, kc, vc, meta, scale)))


@pytest.mark.parametrize("model", ATTN_MODELS)
@pytest.mark.parametrize("batch", DECODE_BATCH)
@pytest.mark.parametrize("ctx", DECODE_CTX)
def test_attention_decode(benchmark, model, batch, ctx, copy_gbps):
    m = MODELS[model]
    if batch * ctx * m["hk"] * m["d"] * 2 * ES > 8 << 30:
        pytest.skip("KV cache above 8 GB")
    q, kc, vc, meta = make_paged_batch([1] * batch, [ctx] * batch, m["hq"], m["hk"], m["d"], DT, device=DEV)
    scale = m["d"] ** -0.5
    nbytes = batch * ctx * m["hk"] * m["d"] * 2 * ES + 2 * q.numel() * ES  # K and V once per group; q in, out
    k, v = _contiguous_kv(kc, vc, meta, ctx)
    k, v = k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous()  # same bytes/seq
    qs = q[:, :, None, :]  # (B, Hq, 1, D)
    record(benchmark, "attention_decode", f"{model} B={batch} ctx={ctx}", {
        "triton": lambda: attention(q, kc, vc, meta, scale),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True)},
        nbytes=nbytes, flops=4 * batch * m["hq"] * m["d"] * ctx, copy_gbps=copy_gbps,
        check=(lambda: attention(q, kc, vc, meta, scale), lambda: attention_ref(q, kc, vc, meta, scale)))


@pytest.mark.parametrize("fmt", QUANT_FORMATS)
@pytest.mark.parametrize("proj", LINEARS)
@pytest.mark.parametrize("rows", LINEAR_ROWS)
def test_quant_linear(benchmark, rows, proj, fmt, copy_gbps):
    """Weight-only quantized linear (W4A16 / W8A16) against bf16 cuBLAS (F.linear) on the same weights,
    dequantized. GB/s and frac_copy_bw count the weight stream alone, what bounds a decode GEMV: the packed
    bytes (QuantWeight.nbytes: codes, scales, zeros) for Triton, N x K x 2 for cuBLAS. Up to 32 rows the roofline
    is that bandwidth (the issue's >= 75% target is set for the <= 8-row GEMV); prefill rows (256, 2048) are
    compute bound, their roofline the bf16 peak. ``speedup``: cuBLAS time over each row's time."""
    k, n = LINEARS[proj]
    bits, sym = QUANT_FORMATS[fmt]
    w = random_quant_weight(k, n, bits=bits, group_size=128, sym=sym, device=DEV)
    dense = dequantize(w).to(DT)  # (N, K): the values the kernel computes with, for cuBLAS
    x = torch.randn(rows, k, device=DEV, dtype=DT)
    gemv = rows <= 8
    record(benchmark, f"quant_linear {fmt}", f"{proj} {k}->{n} M={rows}",
           {"triton": lambda: quant_linear(x, w), "cublas": lambda: torch.nn.functional.linear(x, dense)},
           nbytes={"triton": w.nbytes, "cublas": n * k * ES}, flops=2 * rows * n * k, copy_gbps=copy_gbps,
           bound="memory" if rows <= 32 else "compute", baseline="cublas", target=GEMV_TARGET if gemv else "",
           check=(lambda: quant_linear(x, w), lambda: quant_linear_ref(x, w)), tol=TOL_QUANT)
