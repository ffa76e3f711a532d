"""pytest-benchmark view of the pool microbenchmark (quick cases of this machine).

    pytest bench/test_bench_pool.py --benchmark-columns=median,iqr,rounds
"""

import pytest
import torch

from fastrank.benchmarks.harness import peak_bytes
from fastrank.benchmarks.pool import providers, quick_cases

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("provider", ["torch_unfused", "fastrank"])
@pytest.mark.parametrize("case", quick_cases(DEVICE), ids=lambda c: f"{c.mode}-N{c.n}-T{c.t}-H{c.hidden}")
def test_pool(benchmark, case, provider):
    fn = providers(case, DEVICE)[provider]
    run = (lambda: (fn(), torch.cuda.synchronize())) if DEVICE.type == "cuda" else fn
    benchmark.group = case.label()
    benchmark.extra_info["peak_bytes"] = peak_bytes(fn, DEVICE)
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
