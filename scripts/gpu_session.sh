#!/usr/bin/env bash
# Everything a lent GPU machine should run for this project, in parts that each fit one 10-minute device call:
#   env              GPU, versions, and the attention tile tuning (qwen2-triton env --tune), cached for the rest
#   tests_kernels    the kernel and decode-graph tests, natively (no interpreter)
#   tests_rest       the rest of the test suite
#   bench_ops        kernel microbenchmarks: RMSNorm, SwiGLU, rotary (vs torch eager and torch.compile)
#   bench_attention  prefill and decode attention (vs SDPA), TFLOP/s and GB/s
#   bench_quant      weight-only int4/int8 linear vs bf16 cuBLAS at Qwen2-7B's projections, M 1/8/32/256/2048
#   bench_e2e_small  the end-to-end benchmark (release shapes: graphs vs eager, prefill, offline with async
#                    output on and off, HF as the peer) for Qwen2-0.5B and 1.5B
#   bench_e2e_large  the same for Qwen2-7B and Qwen1.5-4B (bench_e2e: both parts, one after the other)
#   bench_e2e_quant  Qwen2-7B batch-1 decode with random int4 / int8 packed weights vs bf16 (over_dense)
#
#   OUT=$OUT bash scripts/gpu_session.sh [PART ...]     (no PART: all, in the order above)
#
# Each part runs under `timeout` ($PART_LIMIT_S, default 540 s: a part never eats a whole device call), writes
# $OUT/<part>.log and a line "<part> rc=<status> <seconds>s" to $OUT/parts.txt, and copies the result CSVs to
# $OUT; a part that fails or times out does not stop the next (rc 124: timed out). After the benchmark parts
# $OUT/roofline.txt lists per kernel and shape the Triton row's fraction of its roofline (frac_roofline: of the
# measured copy bandwidth for memory-bound kernels, of the GPU's dense bf16 peak for prefill attention).
# Suggested calls, one device call each: "env tests_kernels", "tests_rest", "bench_ops bench_attention",
# "bench_e2e_small", "bench_e2e_large", "bench_quant", "bench_e2e_quant" (the e2e and quant parts are not yet
# timed on a GPU: each gets a call of its own until a session has seen them fit together).
#
# Prepare here (no GPU needed), once:
#   echo /.gpu/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
#   python scripts/prepare_gpu_carry.py            # .gpu/tokenizer (from the demo GGUF) and .whl/ (gguf wheel)
# Then run there with the device tool: carry [".gpu", ".whl"], command: OUT=$OUT bash scripts/gpu_session.sh ...
# The demo model (491 MB) cannot travel, so its tests skip there; everything else runs.
# Results: commit the CSVs from $OUT under bench/results and put the figures in the README.
set -uo pipefail
OUT="${OUT:-/tmp/gpu_out}"
LIMIT="${PART_LIMIT_S:-540}"
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
# The qwen2_triton namespace maps kernels/ model/ runtime/ bench/ server/ into one package (setup.py); recreate
# that mapping with links rather than installing into the image.
rm -rf /tmp/ns && mkdir -p /tmp/ns && cp -r qwen2_triton /tmp/ns/
for d in kernels model runtime bench server; do [ -d "$d" ] && ln -s "$PWD/$d" "/tmp/ns/qwen2_triton/$d"; done
export PYTHONPATH="/tmp/ns${PYTHONPATH:+:$PYTHONPATH}"
# ... and keep the repository root off sys.path, where its bare qwen2_triton/ would shadow /tmp/ns: no cwd for
# `python -m` (PYTHONSAFEPATH, Python 3.11+), and bench/ (a package) imported by pytest without inserting its
# parent (--import-mode=importlib).
export PYTHONSAFEPATH=1
[ -d .gpu/tokenizer ] && export QWEN2_TRITON_TOKENIZER_DIR="$PWD/.gpu/tokenizer"
# The tuning cache comes back with the results: which attention tiles won on this GPU, with every timing.
export QWEN2_TRITON_CACHE="$OUT/qwen2_triton_cache"

roofline() {  # per kernel and shape, the Triton row's fraction of its roofline, from the kernel-bench CSVs
  python3 - "$OUT" <<'PY' > "$OUT/roofline.txt" 2>&1
import csv, glob, sys
rows = [r for f in sorted(glob.glob("bench/results/kernels-*.csv")) for r in csv.DictReader(open(f))]
print(f"{'op':28} {'shape':26} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'frac_roofline':>13} {'speedup':>8}  target")
for r in rows:
    if r["impl"] == "triton":
        print(f"{r['op']:28} {r['shape']:26} {r['ms']:>9} {r['GB/s']:>8} {r['TFLOP/s']:>8} {r['frac_roofline']:>13} "
              f"{r.get('speedup', ''):>8}  {r.get('target', '')}")
PY
  cat "$OUT/roofline.txt"
}

run_part() {  # name, command...: bounded by $LIMIT, logged, never stopping the next part
  local name=$1; shift
  local start=$SECONDS
  timeout -s INT -k 30 "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/parts.txt"
  tail -n 5 "$OUT/$name.log"
  cp bench/results/*.csv "$OUT/" 2>/dev/null || true
}

part() {
  case "$1" in
    env)
      nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt"
      cat "$OUT/gpu.txt"
      run_part env python3 -m qwen2_triton.cli env --tune ;;
    tests_kernels)
      run_part tests_kernels python3 -m pytest tests/test_kernel_*.py tests/test_decode_graphs.py -q \
        --durations=20 -p no:cacheprovider ;;
    tests_rest)
      run_part tests_rest python3 -m pytest tests -q --durations=20 -p no:cacheprovider \
        --ignore-glob='tests/test_kernel_*.py' --ignore=tests/test_decode_graphs.py ;;
    bench_ops)
      run_part bench_ops python3 -m pytest bench/test_bench_kernels.py -q -p no:cacheprovider \
        --import-mode=importlib -k "rms_norm or swiglu or rotary"
      roofline ;;
    bench_attention)
      run_part bench_attention python3 -m pytest bench/test_bench_kernels.py -q -p no:cacheprovider \
        --import-mode=importlib -k attention
      roofline ;;
    bench_quant)
      run_part bench_quant python3 -m pytest bench/test_bench_kernels.py -q -p no:cacheprovider \
        --import-mode=importlib -k quant_linear
      roofline ;;
    bench_e2e_small)
      run_part bench_e2e_small python3 -m qwen2_triton.cli bench e2e --models qwen2-0.5b,qwen2-1.5b \
        --out bench/results/e2e.csv ;;
    bench_e2e_large)
      run_part bench_e2e_large python3 -m qwen2_triton.cli bench e2e --models qwen2-7b,qwen1.5-4b \
        --out bench/results/e2e.csv ;;
    bench_e2e)
      part bench_e2e_small
      part bench_e2e_large ;;
    bench_e2e_quant)
      run_part bench_e2e_quant python3 -m qwen2_triton.cli bench e2e --quant-only --models qwen2-7b \
        --quant-random int4,int8 --out bench/results/e2e.csv ;;
    *)
      echo "unknown part '$1' (env tests_kernels tests_rest bench_ops bench_attention bench_quant" \
        "bench_e2e_small bench_e2e_large bench_e2e bench_e2e_quant)" | tee -a "$OUT/parts.txt"
      return 2 ;;
  esac
}

PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(env tests_kernels tests_rest bench_ops bench_attention bench_quant \
  bench_e2e_small bench_e2e_large bench_e2e_quant)
for p in "${PARTS[@]}"; do part "$p"; done
exit 0
