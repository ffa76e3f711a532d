"""score_head: each sequence's scoring position through only the needed rows of the LM head.

One room: the input checks, the plain-PyTorch reference (the CPU path and the test oracle), the autograd
Function shared by both paths and the public function. The Triton kernels and their launch code are in
``fastrank.kernels.score_head``. The reference follows the kernels' memory contract: nothing of size
``[N, T, V]`` or ``[N, V]`` is ever allocated; the full-vocabulary log-sum-exp is reduced chunk by chunk.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fastrank.common import (
    ROW_BAD_CU_SEQLENS,
    ROW_EMPTY,
    ROW_OUTSIDE,
    ScoreHeadConfig,
    accumulate_dtype,
    cached_device_tensor,
    matmul_acc,
)
from fastrank.ops.base import (
    FLOAT_DTYPES,
    MAX_TOKEN_IDS,
    Implementation,
    check_layout,
    dtype_name,
    integer_tensor,
    normalize_token_ids,
    require_tensor,
    same_device,
)
from fastrank.utils import can_sync, checks_enabled, select_backend

# Rows of the vocabulary per chunk are chosen so a chunk of fp32 scores holds about 16 MiB, within these
# bounds: below 1024 the per-chunk GEMMs get too small to run well, above 16384 the chunk stops being a
# small fraction of a 150k-256k vocabulary.
_LSE_CHUNK_ELEMENTS = 1 << 22
_LSE_CHUNK_MIN = 1024
_LSE_CHUNK_MAX = 16384


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def normalize_combine(combine, k: int) -> Optional[tuple]:
    """A ``[C, K]`` combination matrix as a tuple of tuples of floats (a 1-D ``[K]`` is one row)."""
    if combine is None:
        return None
    mix = (
        combine.detach().cpu().double()
        if isinstance(combine, torch.Tensor)
        else torch.tensor(combine, dtype=torch.float64)
    )
    if mix.dim() == 1:
        mix = mix[None, :]
    if mix.dim() != 2 or mix.shape[1] != k:
        raise ValueError(
            f"combine: must be [C, K] with K={k} (one column per token id), got shape {tuple(mix.shape)}; "
            "e.g. [[1, -1]] for yes minus no"
        )
    if not 1 <= mix.shape[0] <= MAX_TOKEN_IDS:
        raise ValueError(f"combine: must have 1 to {MAX_TOKEN_IDS} rows, got {mix.shape[0]}")
    if not torch.isfinite(mix).all():
        raise ValueError("combine: holds a NaN or infinite coefficient")
    return tuple(tuple(float(v) for v in row) for row in mix.tolist())


def check_score_head_inputs(
    hidden, weight, token_ids, attention_mask, positions, cu_seqlens, bias, combine, return_lse
):
    """Validate and normalise score_head's arguments.

    Returns ``(config, hidden, attention_mask, positions, cu_seqlens)`` where hidden is ``[N, T, H]`` or,
    for packed input, ``[M, H]`` (a ``[1, M, H]`` batch is viewed as ``[M, H]``).
    """
    # (The checks that pass call no helper: on a CPU call of a few microseconds each call counts.)
    if not isinstance(hidden, torch.Tensor):
        require_tensor("hidden", hidden, "[N, T, H] or packed [M, H]")
    if not isinstance(weight, torch.Tensor):
        require_tensor("weight", weight, "[V, H]")
    dtype = hidden.dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden: must be float16, bfloat16 or float32, got {dtype_name(dtype)}")
    if weight.dim() != 2:
        raise ValueError(f"weight: must be the LM head's [V, H] matrix, got shape {tuple(weight.shape)}")
    if weight.dtype != dtype:
        raise ValueError(
            f"weight: dtype {dtype_name(weight.dtype)} differs from hidden's {dtype_name(dtype)}; "
            f"cast one of them, e.g. hidden.to({dtype_name(weight.dtype)!r}) or run the model in one dtype"
        )
    if weight.device != hidden.device:
        same_device("weight", weight, hidden)
    if return_lse is not True and return_lse is not False:
        raise ValueError(f"return_lse: must be True or False, got {return_lse!r}")

    packed = cu_seqlens is not None
    hidden, cu_seqlens = check_layout(hidden, attention_mask, cu_seqlens)
    n = cu_seqlens.shape[0] - 1 if packed else hidden.shape[0]

    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: has H={weight.shape[1]} columns but hidden has H={hidden.shape[-1]}; "
            "pass the LM head of the model that produced hidden"
        )

    if positions is not None:
        positions = integer_tensor("positions", positions, hidden.device, "[N]")
        if positions.dim() != 1 or positions.shape[0] != n:
            raise ValueError(f"positions: must be 1-D [N] with N={n}, got shape {tuple(positions.shape)}")
        same_device("positions", positions, hidden)

    if bias is not None:
        require_tensor("bias", bias, "[V]")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: must be [V] with V={weight.shape[0]}, got shape {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias: dtype {dtype_name(bias.dtype)} differs from weight's {dtype_name(weight.dtype)}")
        same_device("bias", bias, hidden)

    config = _config(token_ids, weight.shape[0], combine, return_lse, packed)
    return config, hidden, attention_mask, positions, cu_seqlens


def _config(token_ids, vocab: int, combine, return_lse: bool, packed: bool) -> ScoreHeadConfig:
    """The call's ``ScoreHeadConfig``, made once per (token ids, V, options) when the ids are an int or a
    list or tuple of ints and there is no ``combine``: the usual call, repeated every batch."""
    key = None
    if combine is None:
        kind = type(token_ids)
        if kind is int:
            key = ((token_ids,), vocab, return_lse, packed)
        elif kind is list or kind is tuple:
            if len(token_ids) == 1:
                if type(token_ids[0]) is int:
                    key = ((token_ids[0],), vocab, return_lse, packed)
            elif all(type(t) is int for t in token_ids):
                key = (tuple(token_ids), vocab, return_lse, packed)
        config = _CONFIG_CACHE.get(key)
        if config is not None:
            return config
    ids = normalize_token_ids(token_ids, vocab)
    config = ScoreHeadConfig(
        token_ids=ids, combine=normalize_combine(combine, len(ids)), return_lse=return_lse, packed=packed
    )
    if key is not None:
        if len(_CONFIG_CACHE) > 256:
            _CONFIG_CACHE.clear()
        _CONFIG_CACHE[key] = config
    return config


_CONFIG_CACHE: dict = {}


def raise_on_invalid_rows(rows: torch.Tensor, config: ScoreHeadConfig, attention_mask, positions, cu_seqlens) -> None:
    """Read the op's status codes back (one small device-to-host copy) and raise on the first problem."""
    if rows.numel() == 0:
        return
    codes = rows.cpu()  # one device-to-host copy; cheaper on the host than a min() kernel and a read
    if int(codes.min()) >= 0:
        return
    bad_cu = (codes == ROW_BAD_CU_SEQLENS).nonzero().flatten().tolist()
    if bad_cu:
        cu = cu_seqlens.cpu().tolist()
        raise ValueError(
            f"cu_seqlens: {cu[:12]}{'...' if len(cu) > 12 else ''} is not a partition of the packed rows "
            f"(it must start at 0, never decrease and end at M); sequences {bad_cu[:8]} fall outside"
        )
    empty = (codes == ROW_EMPTY).nonzero().flatten().tolist()
    if empty:
        arg = "cu_seqlens" if config.packed else "attention_mask"
        raise ValueError(
            f"{arg}: sequence(s) {empty[:8]}{'...' if len(empty) > 8 else ''} have no real token; "
            "every row needs at least one token to score (drop empty rows before the call)"
        )
    outside = (codes == ROW_OUTSIDE).nonzero().flatten().tolist()
    if outside:
        i = outside[0]
        where = (
            "its sequence"
            if config.packed
            else (
                "the row's real tokens (attention_mask is 0 there or it is past T)"
                if attention_mask is not None
                else "[0, T)"
            )
        )
        raise ValueError(
            f"positions: positions[{i}]={int(positions[i])} is outside {where}; "
            f"{len(outside)} sequence(s) affected, first {outside[:8]}"
        )


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------
def lse_chunk_size(n_rows: int, vocab: int) -> int:
    chunk = _LSE_CHUNK_ELEMENTS // max(n_rows, 1)
    chunk = max(_LSE_CHUNK_MIN, min(_LSE_CHUNK_MAX, chunk))
    return min(vocab, chunk)


def score_head_rows(
    hidden: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    positions: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
) -> torch.Tensor:
    """Index of each sequence's scoring row: ``[N]`` int64.

    Padded ``[N, T, H]``: an index into T. Without ``positions`` it is the last real token of the
    attention mask (any padding side, any holes), or ``T - 1`` with no mask. Packed ``[M, H]``: an index
    into M, ``cu_seqlens[n] + position``, the position defaulting to the sequence's last token.
    Invalid rows carry ``ROW_EMPTY``, ``ROW_OUTSIDE`` or ``ROW_BAD_CU_SEQLENS`` instead of an index.
    """
    device = hidden.device
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        total, n = hidden.shape[0], cu.shape[0] - 1
        starts, ends = cu[:-1], cu[1:]
        lengths = ends - starts
        seq = torch.arange(n, device=device)
        consistent = (starts >= 0) & (lengths >= 0) & (ends <= total)
        consistent &= (seq != 0) | (cu[0] == 0)
        consistent &= (seq != n - 1) | (cu[-1] == total)
        local = lengths - 1 if positions is None else positions.long()
        inside = (local >= 0) & (local < lengths)
        rows = torch.where(inside, starts + local, torch.full_like(starts, ROW_OUTSIDE))
        rows = torch.where(lengths > 0, rows, torch.full_like(rows, ROW_EMPTY))
        return torch.where(consistent, rows, torch.full_like(rows, ROW_BAD_CU_SEQLENS))

    n, t = hidden.shape[0], hidden.shape[1]
    if attention_mask is None:
        if positions is None:
            return torch.full((n,), t - 1, dtype=torch.long, device=device)
        p = positions.long()
        return torch.where((p >= 0) & (p < t), p, torch.full_like(p, ROW_OUTSIDE))

    real = attention_mask != 0
    steps = _arange(t, device)
    last = torch.where(real, steps, ROW_EMPTY).amax(dim=1)  # ROW_EMPTY (-1) exactly when a row has no token
    if positions is None:
        return last
    p = positions.long()
    inside = (p >= 0) & (p < t)
    on_real = real.gather(1, p.clamp(0, t - 1)[:, None])[:, 0]
    rows = torch.where(inside & on_real, p, torch.full_like(p, ROW_OUTSIDE))
    return torch.where(last >= 0, rows, torch.full_like(rows, ROW_EMPTY))


def _arange(n: int, device: torch.device) -> torch.Tensor:
    """``torch.arange(n)`` on ``device``, made once per size for CPU tensors (a CPU call of this op is a few
    microseconds of work, so each small op counts); elsewhere, and while torch.compile traces, made afresh."""
    if device.type != "cpu" or _compiling():
        return torch.arange(n, device=device)
    steps = _ARANGE_CACHE.get(n)
    if steps is None:
        if len(_ARANGE_CACHE) > 64:
            _ARANGE_CACHE.clear()
        with torch.inference_mode(False):  # a normal tensor, usable outside inference mode too
            steps = _ARANGE_CACHE[n] = torch.arange(n)
    return steps


_ARANGE_CACHE: dict = {}


_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def gather_rows(hidden: torch.Tensor, rows: torch.Tensor, packed: bool) -> torch.Tensor:
    """The hidden state at each scoring row, ``[N, H]`` in hidden's dtype.

    Invalid rows (negative status codes) read as NaN, so their scores are NaN rather than plausible
    numbers when the status check is turned off. On the CPU, where reading the smallest code back costs
    no sync, rows that are all valid are gathered directly.
    """
    if rows.device.type == "cpu" and not _compiling() and (rows.numel() == 0 or int(rows.min()) >= 0):
        if packed:
            return hidden.index_select(0, rows)
        return hidden[_arange(hidden.shape[0], hidden.device), rows]
    safe = rows.clamp_min(0)
    if packed:
        h = hidden[safe]
    else:
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), safe]
    return h.masked_fill((rows < 0)[:, None], float("nan"))


def scatter_rows(shape, dtype, rows: torch.Tensor, values: torch.Tensor, packed: bool) -> torch.Tensor:
    """A zero tensor of ``shape`` holding ``values`` at the scoring rows (the adjoint of ``gather_rows``)."""
    grad = torch.zeros(shape, dtype=dtype, device=values.device)
    safe = rows.clamp_min(0)
    if packed:
        grad[safe] = values.to(dtype)
    else:
        grad[torch.arange(shape[0], device=values.device), safe] = values.to(dtype)
    return grad


def lse_forward_chunked(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``logsumexp_v(h @ weight.T + bias)`` per row, ``[N]`` in the accumulate dtype.

    Only ``[N, chunk]`` scores exist at a time (see ``lse_chunk_size``).
    """
    acc = accumulate_dtype(h.dtype)
    n, vocab = h.shape[0], weight.shape[0]
    chunk = lse_chunk_size(n, vocab)
    lse = torch.full((n,), float("-inf"), dtype=acc, device=h.device)
    for v0 in range(0, vocab, chunk):
        scores = matmul_acc(h, weight[v0 : v0 + chunk].t(), acc)
        if bias is not None:
            scores = scores + bias[v0 : v0 + chunk].to(acc)
        lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=1))
    return lse


def lse_backward_chunked(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    token_ids: tuple,
    grad_rows: Optional[torch.Tensor],
    need_weight: bool,
    need_bias: bool,
):
    """Gradients of ``sum(grad_lse * lse) + sum(grad_rows * (h @ weight[token_ids].T))``.

    Returns ``(grad_h [N, H] acc, grad_weight [V, H] weight.dtype or None, grad_bias [V] or None)``.
    The softmax ``P = exp(h W_c^T + b_c - lse) * grad_lse`` is rebuilt one vocabulary chunk at a time;
    the K selected rows' own gradient (``grad_rows.T @ h``) is folded into the chunk that holds them
    before it is rounded to the weight dtype, so those rows are rounded once.
    """
    acc = accumulate_dtype(h.dtype)
    n, vocab = h.shape[0], weight.shape[0]
    chunk = lse_chunk_size(n, vocab)
    grad_h = torch.zeros(h.shape, dtype=acc, device=h.device)
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty(vocab, dtype=bias.dtype, device=bias.device) if need_bias else None
    # In half precision the probabilities enter the backward GEMMs in the input dtype (as Liger's fused
    # linear cross-entropy does): relative error 2^-8 per term, accumulated in fp32.
    p_dtype = h.dtype if h.dtype in (torch.float16, torch.bfloat16) and h.is_cuda else acc
    for v0 in range(0, vocab, chunk):
        v1 = min(vocab, v0 + chunk)
        w_chunk = weight[v0:v1]
        scores = matmul_acc(h, w_chunk.t(), acc)
        if bias is not None:
            scores = scores + bias[v0:v1].to(acc)
        prob = torch.exp(scores - lse[:, None]) * grad_lse[:, None]
        grad_h += matmul_acc(prob.to(p_dtype), w_chunk, acc)
        if need_weight or need_bias:
            # Fold the selected rows' gradient into this chunk: grad_rows[:, k] lands on column ids[k] - v0.
            if grad_rows is not None:
                in_chunk = [(k, t - v0) for k, t in enumerate(token_ids) if v0 <= t < v1]
                if in_chunk:
                    ks = torch.tensor([k for k, _ in in_chunk], dtype=torch.long, device=h.device)
                    cols = torch.tensor([c for _, c in in_chunk], dtype=torch.long, device=h.device)
                    prob = prob.to(acc).index_add(1, cols, grad_rows.index_select(1, ks).to(acc))
            if need_weight:
                grad_weight[v0:v1] = matmul_acc(prob.t().to(p_dtype), h, acc).to(weight.dtype)
            if need_bias:
                grad_bias[v0:v1] = prob.to(acc).sum(0).to(bias.dtype)
    return grad_h, grad_weight, grad_bias


def combine_matrix(config: ScoreHeadConfig, acc: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    if config.combine is None:
        return None
    return torch.tensor(config.combine, dtype=acc, device=device)


def score_head_selected_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], token_ids: tuple
) -> torch.Tensor:
    """``h @ weight[token_ids].T + bias[token_ids]`` in the accumulate dtype: ``[N, K]``."""
    acc = accumulate_dtype(h.dtype)
    ids = cached_device_tensor(token_ids, torch.long, h.device)
    rows = weight.index_select(0, ids)
    if h.dtype != acc:  # (a no-op .to() still costs a dispatch, and these calls are small)
        h, rows = h.to(acc), rows.to(acc)
    logits = torch.nn.functional.linear(h, rows)  # h @ rows.T
    if bias is not None:
        logits = logits + bias.index_select(0, ids).to(acc)
    return logits


def _head_of_rows(h: torch.Tensor, weight, bias, config: ScoreHeadConfig):
    """``(out [N, C or K], lse [N] or None)`` of the gathered scoring rows ``h``."""
    logits = score_head_selected_logits(h, weight, bias, config.token_ids)
    out = logits if config.combine is None else logits @ combine_matrix(config, logits.dtype, logits.device).t()
    lse = lse_forward_chunked(h, weight, bias) if config.return_lse else None
    return out, lse


def score_head_forward_reference(
    hidden, weight, bias, attention_mask, positions, cu_seqlens, config, store_gathered=True
):
    """Forward of the reference path. Returns ``(out [N, C or K], lse [N] or None, rows [N], h [N, H])``;
    the gathered rows ``h`` are needed for the logits anyway, so ``store_gathered`` changes nothing."""
    rows = score_head_rows(hidden, attention_mask, positions, cu_seqlens)
    h = gather_rows(hidden, rows, config.packed)
    out, lse = _head_of_rows(h, weight, bias, config)
    return out, lse, rows, h


def _flat_steps(n: int, t: int) -> torch.Tensor:
    """``arange(n * t).view(n, t)`` on the CPU, made once per shape: the flat row of each (sequence, step)."""
    steps = _FLAT_STEPS_CACHE.get((n, t))
    if steps is None:
        if len(_FLAT_STEPS_CACHE) > 64:
            _FLAT_STEPS_CACHE.clear()
        with torch.inference_mode(False):
            steps = _FLAT_STEPS_CACHE[(n, t)] = torch.arange(n * t).view(n, t)
    return steps


_FLAT_STEPS_CACHE: dict = {}
with torch.inference_mode(False):
    _EMPTY_CODE = torch.tensor(ROW_EMPTY)  # (CPU, int64: what torch.where pairs with the int64 steps)


def score_head_inference_reference(hidden, weight, bias, attention_mask, config: ScoreHeadConfig):
    """The reference forward of a call no gradient follows, for padded CPU input scored at each row's last
    real token (no ``positions``): ``(out, lse or None)``, the numbers of ``score_head_forward_reference``
    with fewer small ops (the scoring rows found as flat indices into ``[N * T, H]`` and gathered with one
    ``index_select``). Returns None, so that the general path runs and reports, when a row has no real
    token, or where the fast form does not apply (hidden not viewable as ``[N * T, H]``, torch.compile)."""
    n, t, width = hidden.shape
    if n == 0 or not hidden.is_cpu or _compiling():
        return None
    if not hidden.is_contiguous() and hidden.stride(0) != t * hidden.stride(1):
        return None
    steps = _FLAT_STEPS_CACHE.get((n, t))
    if steps is None:
        steps = _flat_steps(n, t)
    if attention_mask is None:
        flat = steps[:, t - 1]
    else:
        # .bool() is `!= 0` (a no-op on a bool mask); the fill value is a cached tensor, not a Python scalar
        # that each call would wrap into one.
        flat = torch.where(attention_mask.bool(), steps, _EMPTY_CODE).amax(dim=1)
    try:
        # A row without a real token has flat index ROW_EMPTY (-1), which index_select refuses: that is the
        # value check, at no cost for valid input.
        h = hidden.view(n * t, width).index_select(0, flat)
    except (IndexError, RuntimeError):
        return None
    if config.combine is None and not config.return_lse and bias is None and hidden.dtype == torch.float32:
        # score_head_selected_logits, inlined for the plainest call: consecutive ids (one id, the digits) are a
        # slice of the weight, a view; others are gathered.
        rows = _CPU_ROWS.get(config.token_ids)
        if rows is None:
            if len(_CPU_ROWS) > 256:
                _CPU_ROWS.clear()
            ids = config.token_ids
            if ids == tuple(range(ids[0], ids[0] + len(ids))):
                rows = slice(ids[0], ids[0] + len(ids))
            else:
                rows = cached_device_tensor(ids, torch.long, hidden.device)
            _CPU_ROWS[ids] = rows
        w = weight[rows] if type(rows) is slice else weight.index_select(0, rows)
        return torch.nn.functional.linear(h, w), None
    return _head_of_rows(h, weight, bias, config)


_CPU_ROWS: dict = {}  # token ids -> the slice of the weight holding them, or their CPU index tensor


def score_head_backward_reference(grad_out, grad_lse, hidden_meta, h, weight, bias, lse, rows, config, needs):
    """Backward of the reference path.

    ``grad_out`` ``[N, C or K]`` (or None), ``grad_lse`` ``[N]`` (or None when the log-sum-exp is not
    part of the loss), ``hidden_meta`` = (shape, dtype) of the hidden input, ``needs`` = which of
    (hidden, weight, bias) want a gradient. Returns the three gradients (None where not needed).
    """
    acc = accumulate_dtype(h.dtype)
    n, k = h.shape[0], len(config.token_ids)
    if grad_out is None:
        grad_k = torch.zeros(n, k, dtype=acc, device=h.device)
    else:
        mix = combine_matrix(config, acc, h.device)
        grad_k = grad_out.to(acc) if mix is None else grad_out.to(acc) @ mix  # [N, K]
    ids = cached_device_tensor(config.token_ids, torch.long, h.device)
    need_h, need_w, need_b = needs

    if grad_lse is not None:
        grad_h, grad_weight, grad_bias = lse_backward_chunked(
            h, weight, bias, lse, grad_lse.to(acc), config.token_ids, grad_k, need_w, need_b
        )
        grad_h = grad_h + grad_k @ weight.index_select(0, ids).to(acc)
    else:
        grad_h = grad_k @ weight.index_select(0, ids).to(acc) if need_h else None
        grad_weight = grad_bias = None
        if need_w:
            grad_weight = torch.zeros_like(weight)
            grad_weight.index_add_(0, ids, (grad_k.t() @ h.to(acc)).to(weight.dtype))
        if need_b:
            grad_bias = torch.zeros_like(bias)
            grad_bias.index_add_(0, ids, grad_k.sum(0).to(bias.dtype))

    shape, dtype = hidden_meta
    grad_hidden = scatter_rows(shape, dtype, rows, grad_h, config.packed) if need_h else None
    return grad_hidden, grad_weight, grad_bias


# ------------------------------------------------------------------------------------------------
# autograd and the public function
# ------------------------------------------------------------------------------------------------
def _implementation(backend: str) -> Implementation:
    if backend == "triton":
        from fastrank.kernels import score_head as kernel

        return Implementation(kernel.score_head_forward, kernel.score_head_backward)
    return Implementation(score_head_forward_reference, score_head_backward_reference)


class ScoreHeadFunction(torch.autograd.Function):
    """score_head's autograd.

    Inputs: hidden, weight, bias (or None), attention_mask, positions, cu_seqlens (each or None), a
    ``ScoreHeadConfig`` and the backend name. Outputs: ``out`` fp32 ``[N, C or K]``, ``lse`` fp32 ``[N]``
    (empty unless ``config.return_lse``) and the resolved ``rows`` ``[N]`` int64 (non-differentiable,
    negative status codes for invalid rows). Saves only the gathered ``[N, H]`` scoring rows, the rows and
    the lse: never the ``[N, T, H]`` hidden states.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, attention_mask, positions, cu_seqlens, config, backend):
        impl = _implementation(backend)
        # Forward runs with grad mode off; needs_input_grad says whether a backward can follow.
        out, lse, rows, gathered = impl.forward(
            hidden,
            weight,
            bias,
            attention_mask,
            positions,
            cu_seqlens,
            config,
            store_gathered=any(ctx.needs_input_grad[:3]),
        )
        if lse is None:
            lse = out.new_empty(0)
        ctx.config = config
        ctx.backward_impl = impl.backward
        ctx.hidden_meta = (hidden.shape, hidden.dtype)
        ctx.save_for_backward(gathered, weight, bias, lse, rows)
        ctx.mark_non_differentiable(rows)
        # Unused outputs arrive as None rather than as zero tensors, so an lse that is not part of the
        # loss costs no full-vocabulary backward.
        ctx.set_materialize_grads(False)
        return out, lse, rows

    @staticmethod
    def backward(ctx, grad_out, grad_lse, _grad_rows):
        gathered, weight, bias, lse, rows = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if not ctx.config.return_lse:
            grad_lse = None
        grads = ctx.backward_impl(
            grad_out, grad_lse, ctx.hidden_meta, gathered, weight, bias, lse, rows, ctx.config, needs
        )
        return grads[0], grads[1], grads[2], None, None, None, None, None


class ScoreHeadOutput(NamedTuple):
    """``score_head(..., return_lse=True)``: the selected logits and the full-vocabulary log-sum-exp."""

    logits: torch.Tensor  # [N, K] (or [N, C] with combine), fp32
    lse: torch.Tensor  # [N], fp32: log sum_v exp(h . W_v + b_v)


def score_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    positions=None,
    cu_seqlens: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    combine=None,
    return_lse: bool = False,
):
    """Logits of a few vocabulary rows at each sequence's scoring position, without full-vocabulary logits.

    Computes ``hidden[n, pos_n] @ weight[token_ids].T (+ bias[token_ids])`` in fp32 for every sequence n,
    which equals ``lm_head(hidden)[n, pos_n, token_ids]`` without projecting the other V - K rows or the
    other positions.

    Args:
        hidden: the backbone's last hidden state (after its final norm). Padded ``[N, T, H]`` with
            either padding side, or packed ``[M, H]`` (also ``[1, M, H]``) together with ``cu_seqlens``.
            float16, bfloat16 or float32 (float64 on the torch backend).
        weight: the LM head ``[V, H]``, same dtype and device as ``hidden``; tied or untied.
        token_ids: the K vocabulary ids to score (1 <= K <= 16): an int, a list of ints or a 1-D integer
            tensor (a CUDA tensor costs one host sync; pass a list in hot loops).
        attention_mask: ``[N, T]`` (bool, int or float; nonzero = real token). The scoring position of
            row n is its last real token, wherever the padding is.
        positions: ``[N]`` integer scoring positions, overriding the default: indices into T for padded
            input (they must land on real tokens when a mask is given), offsets from each sequence's start
            for packed input. Without a mask or positions, padded rows score at ``T - 1``.
        cu_seqlens: ``[N + 1]`` integer offsets of the packed sequences (0, len0, len0 + len1, ..., M).
        bias: the LM head's bias ``[V]``, if it has one.
        combine: optional ``[C, K]`` matrix (or a ``[K]`` row) applied to the K logits in fp32, e.g.
            ``[[1, -1]]`` for yes minus no. The output then has C columns.
        return_lse: also return the full-vocabulary log-sum-exp ``[N]`` (fp32), reduced tile by tile so
            ``[N, V]`` is never held, making ``exp(logits - lse[:, None])`` the exact softmax probability
            of each token. It takes part in backward (full-vocabulary weight gradient, in chunks) only
            when the loss uses it.

    Returns:
        fp32 ``[N, K]`` logits (``[N, C]`` with ``combine``), or ``ScoreHeadOutput(logits, lse)`` when
        ``return_lse``. Differentiable with respect to ``hidden`` (only the scoring rows receive
        gradient), ``weight`` (only the K rows, plus the whole vocabulary through ``lse``) and ``bias``.

    Raises:
        ValueError: naming the argument, for a row with no real token, a position outside its
            sequence, K = 0, a token id outside [0, V), an inconsistent ``cu_seqlens``, or a dtype,
            shape or device mismatch. The checks on values (empty rows, positions, ``cu_seqlens``) read
            a few bytes back from the device, one sync per call; ``FASTRANK_CHECKS=0`` turns that off,
            and it is skipped while a CUDA graph is captured or torch.compile traces. Without the check
            an invalid row scores NaN.
    """
    config, hidden, attention_mask, positions, cu_seqlens = check_score_head_inputs(
        hidden, weight, token_ids, attention_mask, positions, cu_seqlens, bias, combine, return_lse
    )
    backend = select_backend(hidden)
    if backend == "triton" and hidden.dtype == torch.float64:
        raise ValueError("hidden: float64 runs on the torch backend only; set FASTRANK_BACKEND=torch")
    if backend == "torch" and not (
        torch.is_grad_enabled()
        and (hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    ):
        # No gradient can follow: the reference forward alone, without the autograd Function's overhead
        # (the same numbers; on the CPU that overhead is a large part of a small call).
        fast = None
        if positions is None and not config.packed:
            fast = score_head_inference_reference(hidden, weight, bias, attention_mask, config)
        if fast is not None:  # every row was found valid on the way
            out, lse = fast
            return ScoreHeadOutput(out, lse) if return_lse else out
        out, lse, rows, _ = score_head_forward_reference(
            hidden, weight, bias, attention_mask, positions, cu_seqlens, config, store_gathered=False
        )
        if lse is None:
            lse = out.new_empty(0)
    else:
        out, lse, rows = ScoreHeadFunction.apply(
            hidden, weight, bias, attention_mask, positions, cu_seqlens, config, backend
        )
    if checks_enabled() and can_sync(hidden):
        raise_on_invalid_rows(rows, config, attention_mask, positions, cu_seqlens)
    return ScoreHeadOutput(out, lse) if return_lse else out
