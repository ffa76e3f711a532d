"""pytest-benchmark view of every op's benchmark: the quick cases `fastrank bench` runs on this machine (on
CUDA when there is a GPU, else the CPU-sized cases on the CPU), one test per op, case and provider.

    pytest bench/test_bench.py --benchmark-columns=median,iqr,rounds
    pytest bench/test_bench.py -k "pool or score_head" --benchmark-columns=median,rounds   # some ops

Each case is one benchmark group; its providers run on the same inputs, built once for all of them. Kernels
are timed by pytest-benchmark's own calibration (so --benchmark-min-rounds, --benchmark-max-time apply); whole
jobs (rerank, encode, the training steps) with the warm-up and the rounds `fastrank bench` gives them. Peak
memory above the inputs is in each entry's extra_info. A baseline that cannot be built, or a case whose
inputs cannot be loaded, skips with the reason. On a CPU the whole file takes about as long as
`fastrank bench` (minutes, most of them the training steps). For ratios in one table, and JSON with the
hardware, use `fastrank bench --op OP [--full] --json PATH`.
"""

import dataclasses
import gc

import pytest
import torch

from fastrank.benchmarks.harness import MissingInput, Unavailable, peak_bytes
from fastrank.benchmarks.runner import OPS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case_id(case) -> str:
    """``mean_fwd-sequences16-seq_len128-...``: names -k can select."""
    return "-".join(
        value if isinstance(value, str) else f"{key}{value}" for key, value in dataclasses.asdict(case).items()
    )


PARAMS = [
    pytest.param(op, case, provider, id=f"{op}-{_case_id(case)}-{provider}")
    for op, bench in OPS.items()
    for case in bench.quick_cases(DEVICE)
    for provider in bench.provider_names
]

# The providers of the case whose tests run now (they run one after another), or why it has none; building
# them (a model, its inputs) once per case rather than once per provider, and only one case's at a time.
_BUILT: dict = {}


def _providers(op: str, case):
    key = (op, case)
    if key not in _BUILT:
        _BUILT.clear()
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        try:
            _BUILT[key] = OPS[op].providers_of(case, DEVICE)
        except MissingInput as e:
            _BUILT[key] = e
    return _BUILT[key]


@pytest.mark.parametrize("op, case, provider", PARAMS)
def test_bench(benchmark, op, case, provider):
    fns = _providers(op, case)
    if isinstance(fns, MissingInput):
        pytest.skip(f"not run: {fns}")
    if provider not in fns:
        pytest.skip(f"{provider} is not a provider of {op} {case.label()}")
    fn = fns[provider]
    if isinstance(fn, Unavailable):
        pytest.skip(f"{provider}: not run: {fn.reason}")

    def call():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    end_to_end = OPS[op].end_to_end.get(DEVICE.type)
    for _ in range(end_to_end["warmup"] if end_to_end else 1):  # compilation stays out of the numbers
        call()
    benchmark.group = f"{op} {case.label()}"
    benchmark.extra_info["peak_bytes"] = peak_bytes(fn, DEVICE)
    if end_to_end:
        benchmark.pedantic(call, rounds=end_to_end["repeats"])
    else:
        benchmark(call)
