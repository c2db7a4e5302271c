"""bench serve: its statistics on known inputs, and its plumbing (prompts, streams, counts, CSV rows) against a
live server over a tiny random checkpoint. Never timings: those are the benchmark's to report."""
from __future__ import annotations

import csv
import math
import shlex

import pytest

from checkpoints import checkpoint_fixture
from live_server import running_server
from qwen2_triton.bench.serve import main
from qwen2_triton.bench.serve_metrics import RequestResult, compute_metrics, summarize
from qwen2_triton.runtime.async_llm import AsyncLLM

NAME = "tiny-bench"
ENGINE = dict(device="cpu", kernels="torch", progress=False, max_model_len=256, max_num_seqs=8)
FIGURES = ("duration_s", "request_throughput", "output_throughput", "total_token_throughput",
           *(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "p50", "p99")),
           "p50_health_ms", "p99_health_ms", "p50_metrics_ms", "p99_metrics_ms")


def test_summarize_interpolates_percentiles_as_numpy():
    mean, p50, p99 = summarize(list(range(1, 101)))  # 1..100
    assert (mean, p50) == (50.5, 50.5)
    assert p99 == pytest.approx(99.01)  # rank 0.99 * 99 = 98.01 -> 99 + 0.01 * (100 - 99)
    assert summarize([3.0]) == (3.0, 3.0, 3.0)
    assert summarize([4, 1, 3, 2]) == (2.5, 2.5, pytest.approx(3.97))  # unsorted input; 3 + 0.97 * (4 - 3)
    assert all(math.isnan(x) for x in summarize([]))


def test_compute_metrics_on_known_requests():
    results = [RequestResult(ok=True, prompt_tokens=10, output_tokens=5, ttft=0.2, itl=[0.1, 0.1, 0.3, 0.1],
                             latency=0.8),
               RequestResult(ok=True, prompt_tokens=12, output_tokens=3, ttft=0.4, itl=[0.2, 0.2], latency=0.8),
               RequestResult(ok=True, prompt_tokens=7, output_tokens=1, ttft=0.5, latency=0.5),  # no TPOT
               RequestResult(error="HTTP 500: boom")]
    m = compute_metrics(results, duration=2.0)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (3, 1, 29, 9)
    assert m["request_throughput"] == 1.5 and m["output_throughput"] == 4.5
    assert m["total_token_throughput"] == 19.0
    assert m["mean_ttft_ms"] == pytest.approx(1100 / 3) and m["p50_ttft_ms"] == pytest.approx(400)
    # TPOT: (0.8 - 0.2) / 4 = 0.15 and (0.8 - 0.4) / 2 = 0.2
    assert m["mean_tpot_ms"] == pytest.approx(175) and m["p99_tpot_ms"] == pytest.approx(199.5)
    # ITL over every gap of every request: 0.1 0.1 0.1 0.2 0.2 0.3
    assert m["mean_itl_ms"] == pytest.approx(1000 / 6) and m["p50_itl_ms"] == pytest.approx(150)
    assert m["p99_itl_ms"] == pytest.approx(295)
    assert m["mean_e2el_ms"] == pytest.approx(700) and m["p50_e2el_ms"] == pytest.approx(800)


ckpt = checkpoint_fixture()


@pytest.fixture(scope="module")
def base_url(ckpt):
    from qwen2_triton.server.metrics import EngineMetrics

    metrics = EngineMetrics(NAME)
    engine = AsyncLLM(ckpt, observer=metrics, **ENGINE)
    try:
        with running_server(engine, NAME, metrics=metrics) as url:
            yield url
    finally:
        engine.shutdown()


def _rows(path):
    return list(csv.DictReader(open(path)))


@pytest.mark.parametrize("endpoint,pacing", [("completions", ["--max-concurrency", "3"]),
                                             ("chat", ["--request-rate", "200"])])
def test_run_against_a_live_server_writes_a_row(base_url, tmp_path, endpoint, pacing):
    out = tmp_path / "serve.csv"
    args = ["--base-url", base_url, "--endpoint", endpoint, "--num-prompts", "5", "--input-len", "16",
            "--output-len", "4", "--probe-interval", "0.05", "--out", str(out), *pacing]
    assert main(args) == 0
    assert main(args + ["--seed", "1"]) == 0  # a second row under the same header
    first, second = _rows(out)
    assert first["model"] == NAME  # the first of /v1/models
    assert first["endpoint"] == endpoint and first["machine"] and first["torch"] and first["date"]
    assert first["server"] == base_url and (first["num_prompts"], first["input_len"], first["output_len"]) == \
        ("5", "16", "4")
    assert (first["completed"], first["failed"]) == ("5", "0")
    assert first["total_output_tokens"] == "20"  # ignore_eos: exactly output-len each
    if endpoint == "completions":  # random-token prompts re-tokenize to exactly input-len
        assert first["total_input_tokens"] == "80"
    else:  # the chat template adds the same tokens to each
        assert int(first["total_input_tokens"]) > 80 and int(first["total_input_tokens"]) % 5 == 0
    for col in FIGURES:
        assert float(first[col]) >= 0, col
    assert "offline_output_throughput" not in first
    assert float(first["other_cpu_cores"]) >= 0 or first["other_cpu_cores"] == "nan"  # nan off Linux
    assert float(first["client_cpu_ms_per_token"]) >= 0 or first["client_cpu_ms_per_token"] == "nan"
    assert first["server_cpu_ms_per_token"] == "nan"  # a server this benchmark did not start: its pid is unknown
    assert second["seed"] == "1" and second["completed"] == "5"


def test_word_prompts_and_a_model_name_that_does_not_exist(base_url, tmp_path):
    out = tmp_path / "serve.csv"
    common = ["--base-url", base_url, "--num-prompts", "2", "--input-len", "8", "--output-len", "3", "--out",
              str(out)]
    assert main(common + ["--prompt-source", "words"]) == 0
    (row,) = _rows(out)
    assert row["prompt_source"] == "words" and row["total_output_tokens"] == "6"
    with pytest.raises(Exception, match="404"):  # the warm-up request names the problem
        main(common + ["--model", "no-such-model"])


def test_bad_flags_fail_before_any_request():
    with pytest.raises(ValueError, match="--offline-compare needs --launch"):
        main(["--offline-compare"])
    with pytest.raises(ValueError, match="--num-prompts"):
        main(["--num-prompts", "0"])
    with pytest.raises(SystemExit):  # parsed as `qwen2-triton serve` parses it
        main(["--launch", "--serve-args=--no-such-flag"])


def test_launch_and_offline_compare(ckpt, tmp_path):
    out = tmp_path / "serve.csv"
    serve_args = shlex.join(["--model", ckpt, "--device", "cpu", "--kernels", "torch", "--max-model-len", "128",
                             "--served-model-name", "launched"])
    assert main(["--launch", "--serve-args", serve_args, "--offline-compare", "--num-prompts", "4",
                 "--input-len", "8", "--output-len", "4", "--max-concurrency", "2", "--out", str(out)]) == 0
    (row,) = _rows(out)
    assert row["model"] == "launched" and row["server"] == f"qwen2-triton serve {serve_args}"
    assert (row["completed"], row["total_output_tokens"]) == ("4", "16")
    assert float(row["offline_output_throughput"]) > 0
    for col in ("offline_other_cpu_cores", "offline_cpu_ms_per_token", "server_cpu_ms_per_token",
                "cpu_offline_over_server"):
        assert float(row[col]) >= 0 or row[col] == "nan", col  # nan off Linux; CPU time counts in 10 ms ticks
    assert float(row["server_over_offline"]) == pytest.approx(
        float(row["output_throughput"]) / float(row["offline_output_throughput"]), rel=0.02)
