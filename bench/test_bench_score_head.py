"""pytest-benchmark view of the score_head microbenchmark (its quick GPU cases; skipped without CUDA).

    pytest bench/test_bench_score_head.py --benchmark-columns=median,iqr,rounds

Each case is one benchmark group; the providers (full_logits, logits_to_keep, torch_sliced, fastrank)
run on the same inputs. Peak memory above the inputs is stored in each entry's extra_info. For ratios in
one table, and JSON with the GPU name, use `fastrank bench --op score_head [--full] --json PATH`.
"""

import pytest
import torch

from fastrank.benchmarks.harness import cuda_required, peak_bytes
from fastrank.benchmarks.score_head import providers, quick_cases

DEVICE = torch.device("cuda")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=cuda_required(__file__))
CASES = quick_cases(DEVICE)
PROVIDERS = ["full_logits", "logits_to_keep", "torch_sliced", "fastrank"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.mode}-N{c.n}-T{c.t}-{c.dtype}")
def test_score_head(benchmark, case, provider):
    fns = providers(case, DEVICE)
    if provider not in fns:
        pytest.skip(f"{provider} does not apply to mode {case.mode}")
    fn = fns[provider]
    fn()
    run = lambda: (fn(), torch.cuda.synchronize())  # noqa: E731
    benchmark.group = case.label()
    benchmark.extra_info["peak_bytes"] = peak_bytes(fn, DEVICE)
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
