"""Packaging, CLI and benchmark plumbing."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch
from references import REFERENCE_PACKAGES, require

import fastrank
from fastrank.benchmarks import contrastive as bench_contrastive
from fastrank.benchmarks import pool as bench_pool
from fastrank.benchmarks import score_head as bench_score_head
from fastrank.cli import main

REPO = pathlib.Path(__file__).resolve().parents[1]
HF_KERNELS_INSTALLED = importlib.util.find_spec("kernels") is not None and not str(
    importlib.util.find_spec("kernels").origin or ""
).startswith(str(REPO))


def test_public_api():
    assert {"score_head", "ScoreHeadOutput"} <= set(fastrank.__all__)
    assert fastrank.score_head.__doc__ and "[N, T, H]" in fastrank.score_head.__doc__


def test_kernels_install_as_a_subpackage_only():
    import fastrank.kernels.score_head as mod

    assert pathlib.Path(mod.__file__).resolve() == REPO / "kernels" / "score_head.py"
    if HF_KERNELS_INSTALLED:
        pytest.skip("the Hugging Face `kernels` package is installed here")
    # Outside the repository, nothing named `kernels` is importable: fastrank never installs one.
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('kernels') is not None)"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0


def test_transformers_does_not_mistake_the_repository_folder_for_hub_kernels():
    if HF_KERNELS_INSTALLED:
        pytest.skip("the Hugging Face `kernels` package is installed here")
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "sys.exit(1 if is_kernels_available() else 0)" % str(REPO)
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=str(REPO)).returncode == 0


def test_cli_rejects_unknown_benchmark(capsys):
    assert main(["bench", "--op", "nope", "--device", "cpu", "--quiet"]) == 1
    assert "fastrank bench: error: --op 'nope' is not a benchmark" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--op 'nope' is not a benchmark"):
        main(["--traceback", "bench", "--op", "nope", "--device", "cpu", "--quiet"])


@pytest.mark.parametrize("module", REFERENCE_PACKAGES)
def test_reference_package_imports(module):
    """Each reference the parity tests need imports here; a broken one fails (with its error), never skips."""
    require(module)


def test_version_matches_the_installed_distribution():
    import importlib.metadata

    assert fastrank.__version__ == importlib.metadata.version("fastrank-llm")
    out = subprocess.run([sys.executable, "-m", "fastrank.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"fastrank {fastrank.__version__} (distribution fastrank-llm)"


def test_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "fastrank.cli", "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--full" in out.stdout


@pytest.mark.parametrize("mode", ["forward", "train", "lse", "lse_train"])
def test_benchmark_providers_compute_the_same_thing(mode):
    """Every baseline of the benchmark returns the same numbers as fastrank (so the ratios compare like
    with like)."""
    case = bench_score_head.Case(mode=mode, sequences=3, seq_len=7, hidden_size=24, vocab_size=97, dtype="float32")
    results = {name: fn() for name, fn in bench_score_head.BENCHMARK.providers_of(case, torch.device("cpu")).items()}
    ours = results.pop("fastrank")
    for name, got in results.items():
        for a, b in zip(got if isinstance(got, tuple) else (got,), ours if isinstance(ours, tuple) else (ours,)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} differs from fastrank")


@pytest.mark.parametrize("mode", ["mean_fwd", "mean_train", "special_fwd", "special_train"])
def test_pool_benchmark_providers_agree(mode):
    case = bench_pool.Case(mode=mode, sequences=3, seq_len=16, hidden_size=8, dtype="float32")
    fns = bench_pool.BENCHMARK.providers_of(case, torch.device("cpu"))
    got, want = fns["fastrank"](), fns["torch_unfused"]()
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["train", "train_kd"])
def test_contrastive_benchmark_providers_agree(mode):
    case = bench_contrastive.Case(mode=mode, queries=4, group_size=3, dim=8, dtype="float32")
    fns = bench_contrastive.BENCHMARK.providers_of(case, torch.device("cpu"))
    for a, b in zip(fns["fastrank"](), fns["torch"]()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
