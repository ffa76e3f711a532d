"""The contrastive loss on a GPU under each float32 matmul precision, against torch at the same setting: the
fp32 case of issue 15 (0.29x torch at "highest" on an H100 before) and the distillation case (0.87x).

    python bench/contrastive_precision.py OUT_DIR      # writes OUT_DIR/contrastive-precision-<gpu>.json
"""

import dataclasses
import sys

import torch

from fastrank.benchmarks import contrastive, runner
from fastrank.benchmarks.harness import cuda_required, gpu_slug

if not torch.cuda.is_available():
    sys.exit(cuda_required(__file__))
out_dir = sys.argv[1] if len(sys.argv) > 1 else "bench/results"
gpu = gpu_slug()
cases = [
    contrastive.Case(mode="train", queries=4096, group_size=8, dim=1024, dtype="float32"),
    contrastive.Case(mode="train_kd", queries=4096, group_size=8, dim=1024, dtype="bfloat16"),
]
runner.OPS["contrastive"] = dataclasses.replace(contrastive.BENCHMARK, quick_cases=lambda device: cases)
merged = None
for precision in ("highest", "high"):
    torch.set_float32_matmul_precision(precision)
    results = runner.run(["contrastive"], torch.device("cuda"))
    for case in results["cases"]:
        case["case"]["float32_matmul_precision"] = precision
    if merged is None:
        merged = results
    else:
        merged["cases"].extend(results["cases"])
    print(f"float32 matmul precision {precision!r}")
    print(runner.format_table(results))
torch.set_float32_matmul_precision("highest")
merged["command"] = "python bench/contrastive_precision.py " + out_dir
runner.write_json(merged, f"{out_dir}/contrastive-precision-{gpu}.json")
