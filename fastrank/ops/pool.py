"""pool: CLS, mean, last-token and special-token pooling with fused L2 normalisation.

One room: the input checks, the plain-PyTorch reference (the CPU path and the test oracle), the autograd
Function shared by both paths and the public function. The Triton kernels and their launch code are in
``fastrank.kernels.pool``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastrank.common import (
    POOL_BAD_CU_SEQLENS,
    POOL_EMPTY,
    POOL_MODES,
    POOL_NO_SPECIAL,
    POOL_SHORT,
    PoolConfig,
    accumulate_dtype,
)
from fastrank.ops.base import (
    FLOAT_DTYPES,
    Implementation,
    check_layout,
    dtype_name,
    integer_tensor,
    normalize_token_ids,
    require_tensor,
    same_device,
)
from fastrank.utils import can_sync, checks_enabled, select_backend

NORM_EPS = 1e-12  # torch.nn.functional.normalize's floor on the norm


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def check_pool_inputs(hidden, attention_mask, mode, normalize, token_ids, input_ids, last_k, cu_seqlens):
    """Validate and normalise pool's arguments. Returns ``(config, hidden, attention_mask, input_ids,
    cu_seqlens)`` with packed ``[1, M, H]`` viewed as ``[M, H]`` and packed input_ids as ``[M]``."""
    require_tensor("hidden", hidden, "[N, T, H] or packed [M, H]")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden: must be float16, bfloat16 or float32, got {dtype_name(hidden.dtype)}")
    if mode not in POOL_MODES:
        raise ValueError(f"mode: {mode!r} is not a pooling mode; choose from {', '.join(POOL_MODES)}")
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize: must be True or False, got {normalize!r}")
    if mode != "special" and (token_ids is not None or last_k is not None):
        raise ValueError(f"token_ids/last_k: only mode='special' uses them (mode is {mode!r})")
    ids = ()
    if mode == "special":
        if (token_ids is None) == (last_k is None):
            raise ValueError(
                "token_ids: mode='special' pools either the positions of token_ids (with input_ids) or the last_k "
                "real tokens; give exactly one of token_ids and last_k"
            )
        if last_k is not None and (isinstance(last_k, bool) or not isinstance(last_k, int) or last_k < 1):
            raise ValueError(f"last_k: must be a positive int, got {last_k!r}")
        if token_ids is not None:
            ids = normalize_token_ids(token_ids, vocab=1 << 62)
            if input_ids is None:
                raise ValueError("input_ids: mode='special' with token_ids needs the input_ids to find them in")

    packed = cu_seqlens is not None
    hidden, cu_seqlens = check_layout(hidden, attention_mask, cu_seqlens)
    shape_ids = (hidden.shape[0],) if packed else tuple(hidden.shape[:2])
    if input_ids is not None:
        input_ids = integer_tensor("input_ids", input_ids, hidden.device, "[N, T] or packed [M]")
        if packed and input_ids.dim() == 2 and input_ids.shape[0] == 1:
            input_ids = input_ids[0]
        if tuple(input_ids.shape) != shape_ids:
            raise ValueError(f"input_ids: shape {tuple(input_ids.shape)} does not match hidden's {shape_ids}")
        same_device("input_ids", input_ids, hidden)
    config = PoolConfig(mode=mode, normalize=normalize, token_ids=ids, last_k=last_k)
    return config, hidden, attention_mask, input_ids, cu_seqlens


def raise_on_pool_status(status: torch.Tensor, config, cu_seqlens) -> None:
    """Read pool's per-sequence status back (one small copy) and raise on the first problem."""
    if status.numel() == 0:
        return
    codes = status.cpu()
    if int(codes.min()) >= 0:
        return

    def rows(code):
        found = (codes == code).nonzero().flatten().tolist()
        return found, f"{found[:8]}{'...' if len(found) > 8 else ''}"

    bad_cu, text = rows(POOL_BAD_CU_SEQLENS)
    if bad_cu:
        raise ValueError(
            f"cu_seqlens: is not a partition of the packed rows (it must start at 0, never decrease "
            f"and end at M); sequences {text} fall outside"
        )
    empty, text = rows(POOL_EMPTY)
    if empty:
        arg = "cu_seqlens" if cu_seqlens is not None else "attention_mask"
        raise ValueError(f"{arg}: sequence(s) {text} have no real token; every row needs at least one to pool")
    absent, text = rows(POOL_NO_SPECIAL)
    if absent:
        raise ValueError(
            f"token_ids: none of {list(config.token_ids)} occurs among the real tokens of sequence(s) {text}; "
            "add the special tokens to every input (and check truncation did not cut them)"
        )
    short, text = rows(POOL_SHORT)
    if short:
        raise ValueError(f"last_k: sequence(s) {text} have fewer than last_k={config.last_k} real tokens to pool")


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------
def pool_weights(shape, device, attention_mask, input_ids, cu_seqlens, config: PoolConfig, with_status: bool = True):
    """The rows each sequence pools, and its status, on the reference path, for hidden states of ``shape``.

    Returns ``(sel, status)``: ``sel`` is ``[N, T]`` (padded) or ``[N, M]`` (packed) bool, True on the rows
    the mode selects; ``status`` ``[N]`` int32 holds ``fastrank.common``'s pool codes (0 = fine), or is None
    when ``with_status=False`` (the backward, which needs the rows only).
    """
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        total, n = shape[0], cu.shape[0] - 1
        starts, ends = cu[:-1], cu[1:]
        seq = torch.arange(n, device=device)
        ok = (starts >= 0) & (ends >= starts) & (ends <= total)
        ok &= (seq != 0) | (cu[0] == 0)
        ok &= (seq != n - 1) | (cu[-1] == total)
        steps = torch.arange(total, device=device)
        real = (steps[None, :] >= starts[:, None]) & (steps[None, :] < ends[:, None]) & ok[:, None]
        tokens = input_ids.reshape(1, -1).expand(n, -1) if input_ids is not None else None
    else:
        n, t = shape[0], shape[1]
        ok = None
        steps = None  # made below for the modes that need positions (mean does not)
        real = (
            (attention_mask != 0) if attention_mask is not None else torch.ones(n, t, dtype=torch.bool, device=device)
        )
        tokens = input_ids
    if config.mode != "mean" and steps is None:
        steps = torch.arange(real.shape[1], device=device)
    if config.mode == "mean":
        sel = real
    elif config.mode == "cls":
        sel = real & (steps[None, :] == torch.where(real, steps, real.shape[1]).amin(1)[:, None])
    elif config.mode == "last" or config.last_k:
        last = torch.where(real, steps, -1).amax(1)[:, None]
        k = config.last_k or 1
        sel = real & (steps[None, :] > last - k) & (steps[None, :] <= last)
    else:
        sel = real & torch.isin(tokens, torch.tensor(config.token_ids, device=device))
    if not with_status:
        return sel, None
    count = sel.sum(1)
    status = torch.where(count == 0, POOL_EMPTY, 0)
    if config.mode == "special" and config.last_k:
        status = torch.where((count > 0) & (count < config.last_k), POOL_SHORT, status)
    elif config.mode == "special":
        status = torch.where((count == 0) & real.any(1), POOL_NO_SPECIAL, status)
    if ok is not None:
        status = torch.where(ok, status, POOL_BAD_CU_SEQLENS)
    return sel, status.to(torch.int32)


def _destinations(sel: torch.Tensor, packed: bool) -> torch.Tensor:
    """For every row of the hidden states viewed as ``[N * T, H]`` (padded) or ``[M, H]`` (packed): the
    sequence that pools it, or ``N`` (a row past the sequences) where none does. Packed sequences that
    pass the checks never overlap, so at most one sequence selects a row."""
    n = sel.shape[0]
    seq = torch.arange(n, device=sel.device)[:, None]
    dest = torch.where(sel, seq, n)
    return dest.amin(0) if packed else dest.view(-1)


def _flat_rows(hidden: torch.Tensor, packed: bool):
    """hidden as ``[rows, H]`` without a copy, or None where its strides do not allow that view."""
    if packed:
        return hidden
    n, t = hidden.shape[0], hidden.shape[1]
    if hidden.stride(0) != t * hidden.stride(1):
        return None
    return hidden.view(n * t, hidden.shape[2])


def pool_forward_reference(hidden, attention_mask, input_ids, cu_seqlens, config: PoolConfig, needs_grad: bool):
    """The reference of ``fastrank.kernels.pool.pool_forward``, with its outputs: ``(out [N, H], count [N],
    status [N], pooled or None, norm or None)`` in the accumulate dtype (fp32; fp64 for fp64 input)."""
    sel, status = pool_weights(hidden.shape, hidden.device, attention_mask, input_ids, cu_seqlens, config)
    acc = accumulate_dtype(hidden.dtype)
    packed = cu_seqlens is not None
    n, width = sel.shape[0], hidden.shape[-1]
    # Only the selected rows are added, in sequence order, so whatever padding holds (even NaN) never reaches
    # the result, as in the kernel, which does not read it at all.
    flat = _flat_rows(hidden, packed)
    if config.mode == "mean" and hidden.dtype == acc and flat is not None:
        # Most rows are pooled: one index_add over all of them, each into its sequence's sum or, for a row
        # no sequence pools, into a scratch row N (read, never used). No copy of the selected rows.
        summed = torch.zeros(n + 1, width, dtype=acc, device=hidden.device)
        summed = summed.index_add_(0, _destinations(sel, packed), flat)[:n]
    else:
        # Few rows (cls, last, special), or half-precision rows that are widened first: gather them.
        seq, pos = sel.nonzero(as_tuple=True)
        if flat is None:
            rows = hidden[seq, pos]
        else:
            rows = flat.index_select(0, pos if packed else seq * hidden.shape[1] + pos)
        summed = torch.zeros(n, width, dtype=acc, device=hidden.device).index_add_(0, seq, rows.to(acc))
    count = sel.sum(1).to(acc)
    pooled = summed / count[:, None]  # an invalid sequence divides 0 by 0: NaN, visible
    if not config.normalize:
        return pooled, count, status, None, None
    norm = torch.linalg.vector_norm(pooled, dim=-1)
    out = pooled / norm.clamp_min(NORM_EPS)[:, None]  # torch.nn.functional.normalize
    return out, count, status, (pooled if needs_grad else None), norm


def pool_backward_reference(
    grad_out, hidden_meta, out, pooled, norm, count, attention_mask, input_ids, cu_seqlens, config: PoolConfig
):
    """The reference of ``fastrank.kernels.pool.pool_backward``: the gradient with respect to the hidden
    states (``hidden_meta`` = their shape, dtype, device), ``grad / count`` on every pooled row, 0 elsewhere."""
    shape, dtype, device = hidden_meta
    grad = grad_out.to(out.dtype)
    if config.normalize:
        # d(x / |x|) = (g - y (y . g)) / |x|, with torch's clamp of |x| at 1e-12.
        grad = (grad - out * (out * grad).sum(1, keepdim=True)) / norm.clamp_min(NORM_EPS)[:, None]
    sel, _ = pool_weights(shape, device, attention_mask, input_ids, cu_seqlens, config, with_status=False)
    per_row = grad / count[:, None]
    # Each row of the result is its sequence's row of `table`, or the zero row N: written once, no zero fill
    # then scatter.
    table = torch.cat([per_row.to(dtype), per_row.new_zeros((1, per_row.shape[1]), dtype=dtype)])
    return table.index_select(0, _destinations(sel, cu_seqlens is not None)).view(shape)


def _padded_mean_on_cpu(hidden, attention_mask, cu_seqlens, config: PoolConfig):
    """Padded fp32 mean pooling on CPU in few ops (the pooled ``[N, H]``, or None): each sequence's 0/1 row
    weights times its rows, one batched matmul (multithreaded, one read of the hidden states), differentiated by
    torch's autograd in training (one batched outer product, where the Function's backward runs a dozen small
    ops for this small work). 0 x NaN is NaN, so a non-finite sum may come from padding: then None, and the
    exact Function path runs (it never reads padding); a finite sum proves every weighted row finite, where
    0 x x = 0. Also None for another mode, dtype or layout, or off CPU. The value checks are made here, on the
    counts."""
    if cu_seqlens is not None or config.mode != "mean" or hidden.dtype != torch.float32:
        return None
    if hidden.device.type != "cpu" or not can_sync(hidden):  # the finiteness test reads the sum back
        return None
    sel, _ = pool_weights(hidden.shape, hidden.device, attention_mask, None, None, config, with_status=False)
    weights = sel.to(hidden.dtype)[:, None, :]
    summed = torch.bmm(weights, hidden).squeeze(1)
    if not math.isfinite(summed.sum().item()):  # a NaN or inf anywhere (an overflowing sum too: exact path)
        return None
    count = weights.sum(2)
    if checks_enabled() and bool((count == 0).any()):  # the statuses only on the way to the error
        _, status = pool_weights(hidden.shape, hidden.device, attention_mask, None, None, config)
        raise_on_pool_status(status, config, None)
    pooled = summed / count
    if config.normalize:
        pooled = pooled / torch.linalg.vector_norm(pooled, dim=-1).clamp_min(NORM_EPS)[:, None]
    return pooled


# ------------------------------------------------------------------------------------------------
# autograd and the public function
# ------------------------------------------------------------------------------------------------
def _implementation(backend: str) -> Implementation:
    if backend == "triton":
        from fastrank.kernels import pool as kernel

        return Implementation(kernel.pool_forward, kernel.pool_backward)
    return Implementation(pool_forward_reference, pool_backward_reference)


class PoolFunction(torch.autograd.Function):
    """pool's autograd, shared by both paths.

    Inputs: hidden, attention_mask, input_ids, cu_seqlens (each but hidden may be None), a ``PoolConfig`` and
    the backend name. Outputs: the pooled (and normalised) ``[N, H]`` in the accumulate dtype and the
    per-sequence status (non-differentiable). Saves only ``[N, H]`` tensors and the counts: never the hidden
    states.
    """

    @staticmethod
    def forward(ctx, hidden, attention_mask, input_ids, cu_seqlens, config, backend):
        impl = _implementation(backend)
        out, count, status, pooled, norm = impl.forward(
            hidden, attention_mask, input_ids, cu_seqlens, config, needs_grad=ctx.needs_input_grad[0]
        )
        ctx.config = config
        ctx.backward_impl = impl.backward
        ctx.hidden_meta = (hidden.shape, hidden.dtype, hidden.device)
        ctx.save_for_backward(out, pooled, norm, count, attention_mask, input_ids, cu_seqlens)
        ctx.mark_non_differentiable(status)
        return out, status

    @staticmethod
    def backward(ctx, grad_out, _grad_status):
        out, pooled, norm, count, attention_mask, input_ids, cu_seqlens = ctx.saved_tensors
        grad = ctx.backward_impl(
            grad_out, ctx.hidden_meta, out, pooled, norm, count, attention_mask, input_ids, cu_seqlens, ctx.config
        )
        return grad, None, None, None, None, None


def pool(
    hidden: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    mode: str = "mean",
    normalize: bool = False,
    token_ids=None,
    input_ids: Optional[torch.Tensor] = None,
    last_k: Optional[int] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pool each sequence's hidden states into one vector, optionally L2-normalised, accumulated in fp32.

    Args:
        hidden: ``[N, T, H]`` padded (either padding side), or packed ``[M, H]`` (also ``[1, M, H]``) with
            ``cu_seqlens``; float16, bfloat16 or float32.
        attention_mask: ``[N, T]``, nonzero = real token (padded input; without it every token is real).
        mode: ``"cls"`` (first real token), ``"mean"`` (mean over real tokens), ``"last"`` (last real
            token) or ``"special"`` (mean over the positions holding one of ``token_ids`` in
            ``input_ids``, or over the last ``last_k`` real tokens, as LLARA averages ``<s1>..<s8>``).
        normalize: divide by the L2 norm (``torch.nn.functional.normalize`` semantics, eps 1e-12).
        token_ids: for ``"special"``: the vocabulary ids whose positions are pooled (1 to 16 ids).
        input_ids: for ``"special"`` with ``token_ids``: ``[N, T]`` (or packed ``[M]``) token ids.
        last_k: for ``"special"``: pool the last k real tokens instead of looking ids up.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences.

    Returns:
        fp32 ``[N, H]``. Differentiable with respect to ``hidden``; only the pooled positions receive
        gradient.

    Raises:
        ValueError: naming the argument, for a row with no real token, a special token absent from a
            row, ``last_k`` larger than a row, an inconsistent ``cu_seqlens``, or a shape, dtype or device
            problem. As with score_head, value checks read a few bytes back once per call
            (``FASTRANK_CHECKS=0`` skips them; an invalid row is then NaN).
    """
    config, hidden, attention_mask, input_ids, cu_seqlens = check_pool_inputs(
        hidden, attention_mask, mode, normalize, token_ids, input_ids, last_k, cu_seqlens
    )
    backend = select_backend(hidden)
    plain = _padded_mean_on_cpu(hidden, attention_mask, cu_seqlens, config) if backend == "torch" else None
    if plain is not None:
        return plain
    out, status = PoolFunction.apply(hidden, attention_mask, input_ids, cu_seqlens, config, backend)
    if checks_enabled() and can_sync(hidden):
        raise_on_pool_status(status, config, cu_seqlens)
    return out
