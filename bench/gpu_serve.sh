#!/usr/bin/env bash
# The serving benchmark on one GPU (device tool), for `fastrank serve`'s GPU figures: requests/s and p50/p99 at
# 1, 8 and 32 clients, cross-request batching on against off and against the model alone in process
# (`fastrank bench --op serve`; the GPU cases: all 24 layers of a Qwen2.5-0.5B-shaped reranker in bf16, 100
# documents of 20-200 words per request, and all-MiniLM-L6-v2 in fp16). Cut at 300 s; everything lands in $OUT
# (the device tool's output folder; bench/results/gpu-serve when run by hand): copy the JSON to bench/results/.
#
#   bash bench/gpu_serve.sh          # there, from the repository root
set -uo pipefail
OUT="${OUT:-bench/results/gpu-serve}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
echo "== $(date +%T) install"
$PY -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -2
GPU="$($PY -c 'from fastrank.benchmarks.harness import gpu_slug; print(gpu_slug())' 2>/dev/null || echo none)"
if [ "$GPU" = "none" ]; then
  echo "bench/gpu_serve.sh needs a CUDA GPU; on a CPU run 'fastrank bench --op serve'" >&2
  exit 2
fi
echo "== $(date +%T) serve benchmark (budget 300 s)"
timeout 300 $PY -m fastrank.cli bench --device cuda --op serve --json "$OUT/serve-$GPU.json" 2>&1 | tail -30 \
  | tee "$OUT/bench-serve-$GPU.log"
echo "== $(date +%T) done"
