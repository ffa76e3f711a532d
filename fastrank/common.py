"""The leaf every layer may import: the ops' static configurations, their status codes, and the launch
helpers the Triton drivers and the PyTorch references share. It imports torch and nothing of fastrank, so
``kernels/<op>.py`` depends on this module alone, never on the reference implementations it is tested
against.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch

# ------------------------------------------------------------------------------------------------
# static configurations (hashable: kernels and caches key on them)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreHeadConfig:
    """The static part of a score_head call."""

    token_ids: tuple  # K vocabulary rows, validated to lie in [0, V)
    combine: Optional[tuple]  # [C][K] fp32 combination of the K logits, or None
    return_lse: bool
    packed: bool  # hidden is [M, H] with cu_seqlens rather than [N, T, H]


# score_head's status codes, written instead of the resolved row of a sequence that cannot be scored.
ROW_EMPTY = -1  # the sequence has no real token
ROW_OUTSIDE = -2  # the requested position is outside the sequence or on a padding token
ROW_BAD_CU_SEQLENS = -3  # cu_seqlens does not partition the packed rows (must start at 0, rise, end at M)

POOL_MODES = ("cls", "mean", "last", "special")
# The kernels' mode numbers: "special" is MODE_SPECIAL with token ids, MODE_LAST_K with last_k.
MODE_CLS, MODE_MEAN, MODE_LAST, MODE_SPECIAL, MODE_LAST_K = 0, 1, 2, 3, 4
# pool's per-sequence status codes (0 = fine).
POOL_EMPTY = -1  # the sequence has no real token
POOL_NO_SPECIAL = -2  # none of the special token ids occurs among its real tokens
POOL_SHORT = -3  # fewer real tokens than last_k
POOL_BAD_CU_SEQLENS = -4  # cu_seqlens does not partition the packed rows


@dataclass(frozen=True)
class PoolConfig:
    """The static part of a pool call."""

    mode: str  # one of POOL_MODES
    normalize: bool
    token_ids: tuple = ()  # special: pool the positions holding these ids
    last_k: Optional[int] = None  # special: pool the last k real tokens instead

    @property
    def mode_code(self) -> int:
        if self.mode == "special":
            return MODE_LAST_K if self.last_k else MODE_SPECIAL
        return {"cls": MODE_CLS, "mean": MODE_MEAN, "last": MODE_LAST}[self.mode]


@dataclass(frozen=True)
class ContrastiveConfig:
    """The static part of a contrastive_loss call."""

    temperature: float
    group_size: int
    in_batch: bool
    return_lse: bool


@dataclass(frozen=True)
class VarlenAttentionConfig:
    """The static part of a varlen_attention call."""

    causal: bool  # a query sees its own segment's keys up to itself (always all of its prefix's keys)
    scale: float  # softmax scale applied to q.k (1 / sqrt(D) by default)
    softcap: Optional[float] = None  # scores become softcap * tanh(scores / softcap) (Gemma 2), or None
    max_seqlen: int = 0  # the longest segment: sizes the kernels' grids without a host read


# ------------------------------------------------------------------------------------------------
# launch helpers
# ------------------------------------------------------------------------------------------------


def is_interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``).

    The variable is read by ``@triton.jit`` when a kernel module is imported, so it must be set before
    ``fastrank.kernels`` is first imported; tests/conftest.py does that.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 2 elsewhere (the interpreter), so that the drivers' split
    and merge paths run in the CPU tests."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def dot_fp32(dtype: torch.dtype) -> bool:
    """Whether a kernel's ``tl.dot`` must run on fp32 operands: fp32 inputs want the exact dot (not tf32), and
    the interpreter computes a bf16 ``tl.dot`` wrongly, silently."""
    return is_interpreting() or dtype == torch.float32


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every half or single precision input; fp64 stays fp64 (used by gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_MM_OUT_DTYPE_OK: dict = {}


def matmul_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` with the product accumulated and returned in ``acc`` (fp32 or fp64).

    On CUDA, half-precision operands keep the tensor cores through ``torch.mm(..., out_dtype=float32)``
    where this torch has it, without rounding the fp32 accumulator; elsewhere the operands are upcast
    first, which is exact.
    """
    if a.dtype == acc and b.dtype == acc:
        return a @ b
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and acc == torch.float32 and a.dim() == 2:
        key = (a.dtype, a.device.type)
        if _MM_OUT_DTYPE_OK.get(key, True):
            try:
                return torch.mm(a, b.to(a.dtype), out_dtype=torch.float32)
            except (RuntimeError, TypeError):
                _MM_OUT_DTYPE_OK[key] = False
    return a.to(acc) @ b.to(acc)


_DEVICE_CACHE: dict = {}


def cached_device_tensor(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor (token ids, a combination matrix) uploaded once per device.

    Uploading a handful of numbers on every call is a synchronous host-to-device copy; the cache
    makes repeated calls with the same ids free.
    """
    key = (values, dtype, str(device))
    tensor = _DEVICE_CACHE.get(key)
    if tensor is None:
        if len(_DEVICE_CACHE) > 256:
            _DEVICE_CACHE.clear()
        tensor = torch.tensor(values, dtype=dtype, device=device)
        _DEVICE_CACHE[key] = tensor
    return tensor
