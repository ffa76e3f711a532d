"""Test set-up. The first lines must run before anything imports fastrank.kernels: Triton decides between
compiled and interpreted kernels when ``@triton.jit`` runs, at import time."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every model the tests use is built in code or shipped in a package: never wait on the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture(autouse=True)
def _seed_and_env(monkeypatch):
    torch.manual_seed(1234)
    monkeypatch.delenv("FASTRANK_BACKEND", raising=False)
    monkeypatch.delenv("FASTRANK_CHECKS", raising=False)
    # fastrank warns some things once per process: each test starts with none warned yet, so a test that
    # expects such a warning sees it whichever tests ran before it
    from fastrank.engine import attention

    attention._WARNED.clear()
    yield


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test once on the reference path and once on the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("FASTRANK_BACKEND", request.param)
    if request.param == "triton" and INTERPRETING and request.node.get_closest_marker("attention_kernel") is None:
        # The interpreted varlen attention kernel takes seconds per layer: whole-model tests run it only where
        # marked (tests/test_varlen_attention.py, the engine's kernel tests); elsewhere the packed attention
        # runs its reference path while score_head and pool run their kernels.
        monkeypatch.setenv("FASTRANK_ATTENTION_BACKEND", "torch")
    return request.param


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="large shape: too slow for the Triton interpreter")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and INTERPRETING:
            item.add_marker(skip_slow)
