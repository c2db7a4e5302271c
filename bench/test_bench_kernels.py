"""Kernel microbenchmarks at Qwen2 shapes: Triton vs torch eager vs torch.compile (and torch SDPA for attention).

    pytest bench/test_bench_kernels.py [-k rms_norm] [--benchmark-disable]     (CUDA only; skips elsewhere)

Times come from triton.testing.do_bench (median ms, CUDA events, L2 flushed between runs). Memory-bound kernels
report achieved GB/s from the byte formula next to each test and the fraction of the measured device-copy
bandwidth; attention reports TFLOP/s from the causal FLOP formula. Every row goes to
bench/results/kernels-<gpu>-<date>.csv with GPU name, torch and triton versions. pytest-benchmark's own table
times the Triton launch wall-clock (synchronised) as a cross-check; the figures of record are in the CSV.
"""
from __future__ import annotations

import csv
import datetime
import pathlib

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("kernel benchmarks need a CUDA device", allow_module_level=True)

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from qwen2_triton.kernels.attention import attention, attention_ref  # noqa: E402
from qwen2_triton.kernels.rmsnorm import rms_norm, rms_norm_ref  # noqa: E402
from qwen2_triton.kernels.rotary import build_cos_sin_cache, default_inv_freq, rotary, rotary_ref  # noqa: E402
from qwen2_triton.kernels.swiglu import swiglu, swiglu_ref  # noqa: E402
from qwen2_triton.kernels.testing import make_paged_batch  # noqa: E402

DEV, DT = torch.device("cuda"), torch.bfloat16
ES = 2  # bytes per bf16 element
TOKENS = [1, 256, 4096, 16384]
MODELS = {"0.5B": dict(hidden=896, inter=4864, hq=14, hk=2, d=64),
          "1.5B": dict(hidden=1536, inter=8960, hq=12, hk=2, d=128),
          "7B": dict(hidden=3584, inter=18944, hq=28, hk=4, d=128)}
RESULTS = pathlib.Path(__file__).parent / "results"
ROWS: list[dict] = []


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


@pytest.fixture(scope="session")
def copy_gbps() -> float:
    """Device copy bandwidth (read + write of 1 GiB), the ceiling for every memory-bound kernel here."""
    src = torch.empty(1 << 29, dtype=DT, device=DEV)
    dst = torch.empty_like(src)
    return 2 * src.numel() * ES / ms(lambda: dst.copy_(src)) * 1e-6


@pytest.fixture(scope="session", autouse=True)
def write_csv():
    yield
    if not ROWS:
        return
    RESULTS.mkdir(exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    path = RESULTS / f"kernels-{gpu}-{datetime.date.today()}.csv"
    common = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  date=datetime.datetime.now().isoformat(timespec="seconds"))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(common) + list(ROWS[0]))
        writer.writeheader()
        writer.writerows({**common, **r} for r in ROWS)


def record(benchmark, op, shape, impls: dict, *, nbytes=None, flops=None, copy_gbps=None):
    """Time every implementation; one CSV row per implementation; the Triton one also through pytest-benchmark."""
    for impl, fn in impls.items():
        t = ms(fn)
        row = dict(op=op, shape=shape, impl=impl, ms=round(t, 5))
        if nbytes is not None:
            row["GB/s"] = round(nbytes / t * 1e-6, 1)
            row["frac_copy_bw"] = round(nbytes / t * 1e-6 / copy_gbps, 3)
        if flops is not None:
            row["TFLOP/s"] = round(flops / t * 1e-9, 1)
        ROWS.append({**row, **{k: row.get(k, "") for k in ("GB/s", "frac_copy_bw", "TFLOP/s")}})
        benchmark.extra_info[impl] = row
    triton_fn = impls["triton"]
    benchmark.pedantic(lambda: (triton_fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)


def compiled(fn):
    return torch.compile(fn, dynamic=False)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm(benchmark, model, tokens, copy_gbps):
    h = MODELS[model]["hidden"]
    x, r = torch.randn(tokens, h, device=DEV, dtype=DT), torch.randn(tokens, h, device=DEV, dtype=DT)
    w = torch.randn(h, device=DEV, dtype=DT)
    nbytes = (4 * tokens * h + h) * ES  # read x, residual; write out, new residual; read weight
    ref_c = compiled(rms_norm_ref)
    record(benchmark, "rms_norm+residual", f"{model} T={tokens}", {
        "triton": lambda: rms_norm(x, w, 1e-6, r), "eager": lambda: rms_norm_ref(x, w, 1e-6, r),
        "compile": lambda: ref_c(x, w, 1e-6, r)}, nbytes=nbytes, copy_gbps=copy_gbps)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_swiglu(benchmark, model, tokens, copy_gbps):
    inter = MODELS[model]["inter"]
    gate_up = torch.randn(tokens, 2 * inter, device=DEV, dtype=DT)
    nbytes = 3 * tokens * inter * ES  # read gate and up, write out
    ref_c = compiled(swiglu_ref)
    record(benchmark, "swiglu", f"{model} T={tokens}", {
        "triton": lambda: swiglu(gate_up), "eager": lambda: swiglu_ref(gate_up), "compile": lambda: ref_c(gate_up)},
        nbytes=nbytes, copy_gbps=copy_gbps)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_rotary(benchmark, model, tokens, copy_gbps):
    m = MODELS[model]
    hq, hk, d = m["hq"], m["hk"], m["d"]
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, device=DEV, dtype=DT)  # q, k as strided views, as in the model
    q, k = qkv[:, : hq * d].view(tokens, hq, d), qkv[:, hq * d: (hq + hk) * d].view(tokens, hk, d)
    pos = torch.randint(0, 32768, (tokens,), device=DEV)
    cos_sin = build_cos_sin_cache(default_inv_freq(d, 1e6), 32768, device=DEV)
    nbytes = 2 * tokens * (hq + hk) * d * ES + tokens * (d * 4 + 8)  # q, k read + written; cos/sin row; position
    ref_c = compiled(rotary_ref)
    record(benchmark, "rotary", f"{model} T={tokens}", {
        "triton": lambda: rotary(q, k, pos, cos_sin), "eager": lambda: rotary_ref(q, k, pos, cos_sin),
        "compile": lambda: ref_c(q, k, pos, cos_sin)}, nbytes=nbytes, copy_gbps=copy_gbps)


def _contiguous_kv(k_cache, v_cache, meta, n):
    """The first sequence's keys/values gathered to (1, Hk, n, D) for SDPA (gather not timed)."""
    from qwen2_triton.kernels.attention import gather_kv
    k = gather_kv(k_cache, meta.block_tables[0], n).transpose(0, 1)[None]
    v = gather_kv(v_cache, meta.block_tables[0], n).transpose(0, 1)[None]
    return k.contiguous(), v.contiguous()


@pytest.mark.parametrize("model", ["0.5B", "7B"])
@pytest.mark.parametrize("seq", [512, 2048, 8192, 16384])
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
    record(benchmark, "attention_prefill", f"{model} S={seq}", impls, flops=flops)


@pytest.mark.parametrize("model", ["0.5B", "7B"])
@pytest.mark.parametrize("batch", [1, 16, 64])
@pytest.mark.parametrize("ctx", [512, 4096, 32768])
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
        nbytes=nbytes, flops=4 * batch * m["hq"] * m["d"] * ctx, copy_gbps=copy_gbps)

