"""What the op rooms share: argument checks that name the argument at fault, and the one contract of their
autograd Functions.

Every op's Function is called as ``Function.apply(*tensors, config, backend)``: ``config`` is the op's frozen
configuration from ``fastrank.common``, and ``backend`` (``"triton"`` or ``"torch"``, from
``fastrank.utils.select_backend``) picks an ``Implementation``, a pair of ``forward`` / ``backward`` with
the same signature on both paths, so the Triton kernels and the PyTorch reference share one autograd
contract: the same inputs, outputs, saved tensors and gradient rules.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence

import torch

MAX_TOKEN_IDS = 16  # token ids per call of score_head and pool
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Implementation(NamedTuple):
    """An op's forward and backward on one path (the Triton kernels' drivers or the PyTorch reference)."""

    forward: Callable
    backward: Callable


def compiling() -> bool:
    """Whether torch.compile (Dynamo) is tracing the caller. The ops then take their Triton path through
    custom ops (``torch.library``): Dynamo cannot trace a Triton launcher, and a custom op with a fake (shape
    only) version is one opaque node of the compiled graph, around which Inductor fuses the rest. Eager calls
    skip the custom op's dispatch, which costs microseconds they do not need."""
    return torch.compiler.is_compiling()


def present(*tensors: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors that are not None, as a custom op returns them (its schema has no optional outputs)."""
    return [t for t in tensors if t is not None]


def restore(outputs: Sequence[torch.Tensor], *flags: bool) -> tuple:
    """``present``'s inverse: one entry per flag, the next output where the flag is set, else None."""
    it = iter(outputs)
    return tuple(next(it) if flag else None for flag in flags)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def require_tensor(name: str, value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor {what}, got {type(value).__name__}")
    return value


def same_device(name: str, tensor: torch.Tensor, ref: torch.Tensor, ref_name: str = "hidden") -> None:
    if tensor.device != ref.device:
        raise ValueError(
            f"{name}: is on {tensor.device} but {ref_name} is on {ref.device}; move it with .to({str(ref.device)!r})"
        )


def integer_tensor(name: str, value, device: torch.device, shape_desc: str) -> torch.Tensor:
    if isinstance(value, (list, tuple)):
        value = torch.tensor(value, dtype=torch.long, device=device)
    require_tensor(name, value, shape_desc)
    if value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{name}: must hold integers, got dtype {dtype_name(value.dtype)}")
    return value


def normalize_token_ids(token_ids, vocab: int) -> tuple:
    """Token ids as a tuple of Python ints, checked against the vocabulary size."""
    if isinstance(token_ids, int) and not isinstance(token_ids, bool):
        token_ids = (token_ids,)
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise ValueError(f"token_ids: must hold integers, got dtype {dtype_name(token_ids.dtype)}")
        if token_ids.dim() > 1:
            raise ValueError(f"token_ids: must be 1-D [K], got shape {tuple(token_ids.shape)}")
        token_ids = token_ids.reshape(-1).tolist()
    if not isinstance(token_ids, Sequence) or isinstance(token_ids, str):
        raise ValueError(
            f"token_ids: expected an int, a list of ints or a 1-D integer tensor, got {type(token_ids).__name__}"
        )
    ids = []
    for i, t in enumerate(token_ids):
        if isinstance(t, bool) or not isinstance(t, int):
            if hasattr(t, "__index__") and not isinstance(t, bool):
                t = int(t.__index__())
            else:
                raise ValueError(f"token_ids[{i}]: expected an int, got {type(t).__name__}")
        if not 0 <= t < vocab:
            raise ValueError(
                f"token_ids[{i}]={t} is out of range for a weight with V={vocab} rows; "
                "look the id up with the model's own tokenizer"
            )
        ids.append(t)
    if not ids:
        raise ValueError("token_ids: is empty (K=0); give at least one vocabulary id to score")
    if len(ids) > MAX_TOKEN_IDS:
        raise ValueError(
            f"token_ids: {len(ids)} ids given, score_head takes at most {MAX_TOKEN_IDS}; "
            "for more rows the full LM head is the right tool"
        )
    return tuple(ids)


def check_layout(hidden: torch.Tensor, attention_mask, cu_seqlens):
    """The layout checks every op on hidden states shares. Packed input (``cu_seqlens`` given): ``hidden``
    ``[M, H]`` or ``[1, M, H]``, no attention mask, ``cu_seqlens`` a 1-D ``[N + 1]`` integer tensor on hidden's
    device. Padded: ``hidden`` ``[N, T, H]`` with T > 0 and an optional ``[N, T]`` mask on its device. Returns
    ``(hidden, cu_seqlens)`` with packed hidden viewed as ``[M, H]``."""
    if cu_seqlens is not None:
        if hidden.dim() == 3 and hidden.shape[0] == 1:
            hidden = hidden[0]
        if hidden.dim() != 2:
            raise ValueError(
                f"hidden: packed input (cu_seqlens given) must be [M, H] or [1, M, H], got shape {tuple(hidden.shape)}"
            )
        if attention_mask is not None:
            raise ValueError(
                "attention_mask: cannot be combined with cu_seqlens; packed sequences are delimited by cu_seqlens alone"
            )
        cu_seqlens = integer_tensor("cu_seqlens", cu_seqlens, hidden.device, "[N + 1]")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(
                f"cu_seqlens: must be 1-D [N + 1] with N >= 1 (offsets 0, len0, len0+len1, ..., M), "
                f"got shape {tuple(cu_seqlens.shape)}"
            )
        same_device("cu_seqlens", cu_seqlens, hidden)
        return hidden, cu_seqlens
    if hidden.dim() == 2:
        raise ValueError("hidden: a 2-D tensor needs cu_seqlens (packed [M, H] input); padded input is [N, T, H]")
    if hidden.dim() != 3:
        raise ValueError(
            f"hidden: must be [N, T, H] (or packed [M, H] with cu_seqlens), got shape {tuple(hidden.shape)}"
        )
    n, t = hidden.shape[0], hidden.shape[1]
    if t == 0:
        raise ValueError("hidden: has T=0 positions; every sequence needs at least one token")
    if attention_mask is not None:
        require_tensor("attention_mask", attention_mask, "[N, T]")
        if tuple(attention_mask.shape) != (n, t):
            raise ValueError(
                f"attention_mask: shape {tuple(attention_mask.shape)} does not match hidden's [N, T] = {(n, t)}"
            )
        same_device("attention_mask", attention_mask, hidden)
    return hidden, cu_seqlens


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (non-reentrant checkpointing, offloading) are active; True when unknown."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, RuntimeError, TypeError):
        return True
