#!/usr/bin/env bash
# One GPU session of issue 15, prepared to run in under 8 minutes on one H100/H200 (device tool; each step is
# cut at its budget, 450 s in all, so a slow step leaves the others their time):
#   1. install fastrank from this tree into the machine's Python (no network: --no-deps);
#   2. the kernels compiled for the GPU: the op tests of the fused decoder ops, the attention, the contrastive
#      loss, the fusion (with Liger's kernels too), CUDA-graph and torch.compile tests (the CPU runs them
#      interpreted; here they compile);
#   3. the benchmarks with JSON: end-to-end reranking (tokens/s, MFU, fused + graphs against the unfused
#      engine, plain transformers and FlagEmbedding when installed); the three routes to the fused decoder
#      end to end (fastrank's kernels, Liger-Kernel's behind the same forwards, Inductor's through
#      torch.compile of HF's layers or of the fused ones); the fused ops alone against HF's formulas,
#      torch.compile and Liger-Kernel; the contrastive loss under each float32 matmul precision;
#   4. a profile of the reranking case (top kernels, device-busy against wall time).
# Everything lands in $OUT (the device tool's output folder; bench/results/gpu-session when run by hand):
# copy the JSON and logs to bench/results/ and cite them.
#
#   pip download liger-kernel==0.8.5 --no-deps -d .wheels   # here, once (the GPU machine has no network)
#   bash bench/gpu_session.sh                                # there, from the repository root (carry .wheels)
set -uo pipefail
OUT="${OUT:-bench/results/gpu-session}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
step() { echo "== $(date +%T) $*"; }

step "install"
$PY -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -2
# Wheels carried in .wheels/ (the device tool's carry): liger-kernel, the other kernel library compared.
if compgen -G ".wheels/*.whl" > /dev/null; then
  $PY -m pip install --no-deps --no-index -q .wheels/*.whl 2>&1 | tail -2
fi
GPU="$($PY -c 'from fastrank.benchmarks.harness import gpu_slug; print(gpu_slug())' 2>/dev/null || echo none)"
if [ "$GPU" = "none" ]; then
  echo "bench/gpu_session.sh needs a CUDA GPU; on a CPU run 'fastrank bench'" >&2
  exit 2
fi
$PY - <<'PY' | tee "$OUT/environment-$GPU.txt"
import torch, triton, transformers
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
PY


step "compiled tests (budget 80 s)"
timeout 80 $PY -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/test_rms_norm.py tests/test_rope.py tests/test_gated_activation.py tests/test_fusion.py \
  tests/test_graphs.py tests/test_contrastive.py tests/test_varlen_attention.py \
  "tests/test_torch_compile.py::test_custom_ops_pass_torch_opcheck" \
  "tests/test_torch_compile.py::test_inductor_on_cuda_scores_as_eager" \
  2>&1 | tail -40 | tee "$OUT/tests-issue15-$GPU.log"

# Separate benchmark runs, each writing its own JSON, so a step cut at its budget loses only itself.
step "end-to-end reranking (budget 100 s)"
timeout 100 $PY -m fastrank.cli bench --device cuda --op rerank \
  --provider hf_full_logits --provider hf_logits_to_keep --provider flagembedding \
  --provider fastrank_padded --provider fastrank_unfused \
  --json "$OUT/rerank-issue15-$GPU.json" 2>&1 | tail -25 | tee "$OUT/bench-rerank-issue15-$GPU.log"
# The other two routes to the fused decoder, against fastrank's kernels: Liger's kernels behind the same forwards,
# then Inductor's code (compilation, in the warm-up call, may take most of its budget: apart, so it cannot cost
# Liger's figure).
step "route: Liger's kernels (budget 35 s)"
timeout 35 $PY -m fastrank.cli bench --device cuda --op rerank --provider fastrank_liger \
  --json "$OUT/rerank-liger-$GPU.json" 2>&1 | tail -25 | tee "$OUT/bench-rerank-liger-$GPU.log"
step "route: torch.compile of HF's and of the fused layers (budget 95 s)"
timeout 95 $PY -m fastrank.cli bench --device cuda --op rerank \
  --provider fastrank_compiled --provider fastrank_fused_compiled \
  --json "$OUT/rerank-compiled-$GPU.json" 2>&1 | tail -25 | tee "$OUT/bench-rerank-compiled-$GPU.log"
step "fused decoder ops against HF, torch.compile and Liger (budget 60 s)"
timeout 60 $PY -m fastrank.cli bench --device cuda --op rms_norm --op rope --op gated_activation \
  --json "$OUT/decoder-ops-$GPU.json" 2>&1 | tail -40 | tee "$OUT/bench-decoder-ops-$GPU.log"
step "contrastive under each float32 matmul precision (budget 35 s)"
timeout 35 $PY bench/contrastive_precision.py "$OUT" 2>&1 | tail -20 | tee "$OUT/bench-contrastive-precision-$GPU.log"

step "profile (budget 45 s)"
timeout 45 $PY bench/profile_rerank.py 2>&1 | tee "$OUT/profile_rerank-$GPU.log" | tail -5
step "done"
