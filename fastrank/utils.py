"""Backend selection and value-check switches for the ops, and small argument helpers for every layer."""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from fastrank.common import is_interpreting

BACKENDS = ("auto", "triton", "torch")


def requested_backend(variable: str = "FASTRANK_BACKEND") -> str:
    """The value of ``variable`` (``auto`` when unset), checked. An op's own variable (such as
    ``FASTRANK_ATTENTION_BACKEND``) falls back to ``FASTRANK_BACKEND`` when it is unset."""
    raw = os.environ.get(variable)
    if raw is None and variable != "FASTRANK_BACKEND":
        variable, raw = "FASTRANK_BACKEND", os.environ.get("FASTRANK_BACKEND")
    value = (raw or "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"{variable}={value!r} is not a backend; use one of {', '.join(BACKENDS)} "
            "(auto = Triton on CUDA tensors, the PyTorch reference on CPU tensors)"
        )
    return value


def select_backend(tensor: torch.Tensor, variable: str = "FASTRANK_BACKEND") -> str:
    """Which implementation runs an op whose main input is ``tensor``: ``"triton"`` or ``"torch"``.

    ``auto`` picks Triton for CUDA tensors and the reference for everything else. ``triton`` on a CPU
    tensor is allowed only under the interpreter, which is how CI runs the kernels. ``variable`` names the
    environment variable that chooses (an op's own, falling back to ``FASTRANK_BACKEND``).
    """
    backend = requested_backend(variable)
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if backend == "triton" and not tensor.is_cuda and not is_interpreting():
        raise ValueError(
            f"{variable}=triton needs CUDA tensors, got a tensor on {tensor.device}; "
            "move the inputs to a GPU, set TRITON_INTERPRET=1 to run the kernels on CPU (slow, for tests), "
            "or use FASTRANK_BACKEND=torch"
        )
    return backend


_LOCAL = threading.local()


def env_switch(variable: str) -> bool:
    """Whether the on/off switch ``variable`` is on: on unless set to 0, false, no or off (any case)."""
    return os.environ.get(variable, "1").strip().lower() not in ("0", "false", "no", "off")


def checks_enabled() -> bool:
    """Data-dependent input checks (empty rows, positions outside their sequence) cost one device-to-host
    copy of a few bytes per call. They are on unless ``FASTRANK_CHECKS=0`` or inside ``value_checks(False)``."""
    override = getattr(_LOCAL, "checks", None)
    if override is not None:
        return override
    return env_switch("FASTRANK_CHECKS")


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Turn the read-back value checks on or off in this thread, for code that builds its inputs itself
    (fastrank's own batches cannot hold an empty row) and must not sync the device per call."""
    previous = getattr(_LOCAL, "checks", None)
    _LOCAL.checks = bool(enabled)
    try:
        yield
    finally:
        _LOCAL.checks = previous


def can_sync(tensor: torch.Tensor) -> bool:
    """False while a CUDA graph is being captured or torch.compile is tracing: no host reads then."""
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return False
    return True


def first_line(error: BaseException) -> str:
    """An exception's message as one line: its first non-empty line (Hugging Face's errors run to paragraphs),
    or the exception's type name when it has no message."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "") or type(error).__name__


def positive_int(name: str, value, *, none_ok: bool = False):
    """``value`` checked to be a positive int (or None when ``none_ok``); a ValueError naming ``name`` otherwise.

    ``bool`` is refused (``True`` is an int to Python, never a length), and so are 0 and negatives: nothing
    falls back to a default silently."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be a positive int{' or None' if none_ok else ''}, got {value!r}")
    return value
