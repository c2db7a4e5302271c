#!/usr/bin/env bash
# Everything a lent GPU machine should run for this project, in one call (device time is scarce):
#   the test suite natively (no interpreter), the kernel microbenchmarks, the end-to-end benchmark.
# Usage on the GPU machine, from the repo root:  OUT=/some/dir bash scripts/gpu_session.sh
# Results: bench/results/*.csv (commit them) and logs under $OUT. The image has its own torch and triton;
# missing pure-Python dependencies travel as wheels in .whl/ (see the device tool's README).
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest tests -q -x --durations=20 2>&1 | tee "$OUT/tests.log"
python3 -m pytest bench -q 2>&1 | tee "$OUT/bench_kernels.log"
python3 -m qwen2_triton.bench.e2e --out bench/results/e2e.csv 2>&1 | tee "$OUT/bench_e2e.log"
cp bench/results/*.csv "$OUT/" 2>/dev/null || true
