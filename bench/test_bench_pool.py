"""pytest-benchmark view of the pool microbenchmark (its quick GPU cases; skipped without CUDA).

    pytest bench/test_bench_pool.py --benchmark-columns=median,iqr,rounds
"""

import pytest
import torch

from fastrank.benchmarks.harness import cuda_required, peak_bytes
from fastrank.benchmarks.pool import providers, quick_cases

DEVICE = torch.device("cuda")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=cuda_required(__file__))


@pytest.mark.parametrize("provider", ["torch_unfused", "fastrank"])
@pytest.mark.parametrize("case", quick_cases(DEVICE), ids=lambda c: f"{c.mode}-N{c.n}-T{c.t}-H{c.hidden}")
def test_pool(benchmark, case, provider):
    fn = providers(case, DEVICE)[provider]
    run = lambda: (fn(), torch.cuda.synchronize())  # noqa: E731
    benchmark.group = case.label()
    benchmark.extra_info["peak_bytes"] = peak_bytes(fn, DEVICE)
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
