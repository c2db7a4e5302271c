#!/usr/bin/env bash
# Everything a lent GPU machine should run for this project, in one call (device time is scarce):
#   the test suite natively (no interpreter), the kernel microbenchmarks, the end-to-end benchmark.
#
# Prepare here (no GPU needed), once:
#   echo /.gpu/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
#   python scripts/prepare_gpu_carry.py            # .gpu/tokenizer (from the demo GGUF) and .whl/ (gguf wheel)
# Then run there with the device tool: carry [".gpu", ".whl"], command: OUT=$OUT bash scripts/gpu_session.sh
# The demo model (491 MB) cannot travel, so its tests skip there; everything else runs.
# Results: bench/results/*.csv and logs are copied to $OUT; commit the CSVs and put the figures in the README.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The qwen2_triton namespace maps kernels/ model/ runtime/ bench/ into one package (setup.py); recreate that
# mapping with links rather than installing into the image.
rm -rf /tmp/ns && mkdir -p /tmp/ns && cp -r qwen2_triton /tmp/ns/
for d in kernels model runtime bench; do ln -s "$PWD/$d" "/tmp/ns/qwen2_triton/$d"; done
export PYTHONPATH="/tmp/ns:$PYTHONPATH"
[ -d .gpu/tokenizer ] && export QWEN2_TRITON_TOKENIZER_DIR="$PWD/.gpu/tokenizer"
# The tuning cache comes back with the results: which attention tiles won on this GPU, with every timing.
export QWEN2_TRITON_CACHE="$OUT/qwen2_triton_cache"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m qwen2_triton.cli env --tune 2>&1 | tee "$OUT/env.log"  # tunes the seed shapes once, for all below
python3 -m pytest tests -q --durations=20 -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
python3 -m pytest bench -q -p no:cacheprovider 2>&1 | tee "$OUT/bench_kernels.log"
python3 -m qwen2_triton.cli bench e2e --out bench/results/e2e.csv 2>&1 | tee "$OUT/bench_e2e.log"
cp bench/results/*.csv "$OUT/" 2>/dev/null || true
