"""bench/test_bench_kernels.py collects and runs without a GPU (tiny shapes, kernels through the interpreter,
each checked against its reference), so a GPU session never finds the benchmarks broken. CI runs tests/ only,
hence this test: it runs the benchmark file in a fresh pytest process, as a GPU session would."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).parent.parent / "bench" / "test_bench_kernels.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmarks themselves run (gpu_session.sh)")
def test_kernel_benchmarks_collect_and_smoke_run():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(BENCH)],
                          capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # one smoke case per benchmark: rms_norm, swiglu, rotary, prefill and decode attention; the quantized linear
    # in its three formats at its three launch shapes (split-K decode and small step, prefill tile)
    assert "14 passed" in out and "skipped" not in out, out
