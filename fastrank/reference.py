"""Plain-PyTorch implementations of fastrank's ops.

Each op here is both the CPU fallback (``FASTRANK_BACKEND=auto`` on CPU tensors, or ``torch`` anywhere)
and the oracle the Triton kernels are tested against. They follow the same memory contract as the
kernels: nothing of size ``[N, T, V]`` or ``[N, V]`` is ever allocated; the full-vocabulary
log-sum-exp is reduced chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fastrank.utils import cached_device_tensor

# Rows of the vocabulary per chunk are chosen so a chunk of fp32 scores holds about 16 MiB, within these
# bounds: below 1024 the per-chunk GEMMs get too small to run well, above 16384 the chunk stops being a
# small fraction of a 150k-256k vocabulary.
_LSE_CHUNK_ELEMENTS = 1 << 22
_LSE_CHUNK_MIN = 1024
_LSE_CHUNK_MAX = 16384

# Status codes written into the resolved row index of a sequence whose scoring position is invalid.
ROW_EMPTY = -1  # the sequence has no real token
ROW_OUTSIDE = -2  # the requested position is outside the sequence or on a padding token
ROW_BAD_CU_SEQLENS = -3  # cu_seqlens does not partition the packed rows (must start at 0, rise, end at M)


@dataclass(frozen=True)
class ScoreHeadConfig:
    """The static part of a score_head call (hashable, so kernels and caches can key on it)."""

    token_ids: tuple  # K vocabulary rows, validated to lie in [0, V)
    combine: Optional[tuple]  # [C][K] fp32 combination of the K logits, or None
    return_lse: bool
    packed: bool  # hidden is [M, H] with cu_seqlens rather than [N, T, H]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every half or single precision input; fp64 stays fp64 (used by gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_chunk_size(n_rows: int, vocab: int) -> int:
    chunk = _LSE_CHUNK_ELEMENTS // max(n_rows, 1)
    chunk = max(_LSE_CHUNK_MIN, min(_LSE_CHUNK_MAX, chunk))
    return min(vocab, chunk)


# ------------------------------------------------------------------------------------------------
# scoring positions
# ------------------------------------------------------------------------------------------------
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
    steps = torch.arange(t, device=device)
    last = torch.where(real, steps, ROW_EMPTY).amax(dim=1)  # ROW_EMPTY (-1) exactly when a row has no token
    if positions is None:
        return last
    p = positions.long()
    inside = (p >= 0) & (p < t)
    on_real = real.gather(1, p.clamp(0, t - 1)[:, None])[:, 0]
    rows = torch.where(inside & on_real, p, torch.full_like(p, ROW_OUTSIDE))
    return torch.where(last >= 0, rows, torch.full_like(rows, ROW_EMPTY))


def gather_rows(hidden: torch.Tensor, rows: torch.Tensor, packed: bool) -> torch.Tensor:
    """The hidden state at each scoring row, ``[N, H]`` in hidden's dtype.

    Invalid rows (negative status codes) read as NaN, so their scores are NaN rather than plausible
    numbers when the status check is turned off.
    """
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


# ------------------------------------------------------------------------------------------------
# matmuls with a wide accumulator
# ------------------------------------------------------------------------------------------------
_MM_OUT_DTYPE_OK: dict = {}


def matmul_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` with the product accumulated and returned in ``acc`` (fp32 or fp64).

    On CUDA, half-precision operands keep the tensor cores through ``torch.mm(..., out_dtype=float32)``
    where this torch has it; elsewhere the operands are upcast first, which is exact.
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


# ------------------------------------------------------------------------------------------------
# full-vocabulary log-sum-exp, chunked
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# score_head
# ------------------------------------------------------------------------------------------------
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
    logits = h.to(acc) @ weight.index_select(0, ids).to(acc).t()
    if bias is not None:
        logits = logits + bias.index_select(0, ids).to(acc)
    return logits


def score_head_forward_reference(hidden, weight, bias, attention_mask, positions, cu_seqlens, config,
                                 store_gathered=True):
    """Forward of the reference path. Returns ``(out [N, C or K], lse [N] or None, rows [N], h [N, H])``;
    the gathered rows ``h`` are needed for the logits anyway, so ``store_gathered`` changes nothing."""
    rows = score_head_rows(hidden, attention_mask, positions, cu_seqlens)
    h = gather_rows(hidden, rows, config.packed)
    logits = score_head_selected_logits(h, weight, bias, config.token_ids)
    mix = combine_matrix(config, logits.dtype, logits.device)
    out = logits if mix is None else logits @ mix.t()
    lse = lse_forward_chunked(h, weight, bias) if config.return_lse else None
    return out, lse, rows, h


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
# pool
# ------------------------------------------------------------------------------------------------
POOL_MODES = ("cls", "mean", "last", "special")


@dataclass(frozen=True)
class PoolConfig:
    """The static part of a pool call."""

    mode: str  # cls | mean | last | special
    normalize: bool
    token_ids: tuple = ()  # special: pool the positions holding these ids
    last_k: Optional[int] = None  # special: pool the last k real tokens instead

    @property
    def mode_code(self) -> int:
        if self.mode == "special":
            return 4 if self.last_k else 3
        return {"cls": 0, "mean": 1, "last": 2}[self.mode]


def pool_weights(hidden, attention_mask, input_ids, cu_seqlens, config: PoolConfig):
    """The rows each sequence pools, and its status, on the reference path.

    Returns ``(sel, status)``: ``sel`` is ``[N, T]`` (padded) or ``[N, M]`` (packed) bool, True on the rows
    the mode selects; ``status`` ``[N]`` int32 uses the codes of ``fastrank.kernels.pool`` (0 = fine).
    """
    device = hidden.device
    if cu_seqlens is not None:
        cu = cu_seqlens.long()
        total, n = hidden.shape[0], cu.shape[0] - 1
        starts, ends = cu[:-1], cu[1:]
        seq = torch.arange(n, device=device)
        ok = (starts >= 0) & (ends >= starts) & (ends <= total)
        ok &= (seq != 0) | (cu[0] == 0)
        ok &= (seq != n - 1) | (cu[-1] == total)
        steps = torch.arange(total, device=device)
        real = (steps[None, :] >= starts[:, None]) & (steps[None, :] < ends[:, None]) & ok[:, None]
        tokens = input_ids.reshape(1, -1).expand(n, -1) if input_ids is not None else None
    else:
        n, t = hidden.shape[0], hidden.shape[1]
        ok = None
        steps = torch.arange(t, device=device)
        real = (attention_mask != 0) if attention_mask is not None else torch.ones(n, t, dtype=torch.bool, device=device)
        tokens = input_ids
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
    count = sel.sum(1)
    status = torch.where(count == 0, -1, 0)
    if config.mode == "special" and config.last_k:
        status = torch.where((count > 0) & (count < config.last_k), -3, status)
    elif config.mode == "special":
        status = torch.where((count == 0) & real.any(1), -2, status)
    if ok is not None:
        status = torch.where(ok, status, -4)
    return sel, status.to(torch.int32)


def pool_reference(hidden, attention_mask, input_ids, cu_seqlens, config: PoolConfig):
    """Pooling in plain torch (differentiable by autograd). Returns ``(out fp32 [N, H], status [N])``."""
    sel, status = pool_weights(hidden, attention_mask, input_ids, cu_seqlens, config)
    acc = accumulate_dtype(hidden.dtype)
    # Only the selected rows are gathered, so whatever padding holds (even NaN) never reaches the result,
    # as in the kernel, which does not read it at all.
    seq, pos = sel.nonzero(as_tuple=True)
    rows = hidden[pos] if cu_seqlens is not None else hidden[seq, pos]
    summed = torch.zeros(sel.shape[0], hidden.shape[-1], dtype=acc, device=hidden.device).index_add(0, seq, rows.to(acc))
    out = summed / sel.sum(1, keepdim=True).to(acc)  # an invalid sequence divides 0 by 0: NaN, visible
    if config.normalize:
        out = torch.nn.functional.normalize(out, dim=-1)
    return out, status


# ------------------------------------------------------------------------------------------------
# contrastive loss
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContrastiveConfig:
    temperature: float
    group_size: int
    in_batch: bool
    return_lse: bool


def _contrastive_chunk_rows(p_rows: int) -> int:
    # about 4 Mi fp32 scores per chunk: [rows, P] never grows with the batch
    return max(1, min(1024, (1 << 22) // max(p_rows, 1)))


def _contrastive_scores(q_chunk, p_acc, config):
    return (q_chunk.to(p_acc.dtype) @ p_acc.t()).div_(config.temperature)


def _group_masks(targets, group_size, n_cols, device):
    """``[rows, n_cols]`` bool: True on the columns of each row's own group (the one holding its target)."""
    group_lo = (targets // group_size) * group_size
    cols = torch.arange(n_cols, device=device)
    return (cols[None, :] >= group_lo[:, None]) & (cols[None, :] < group_lo[:, None] + group_size)


def contrastive_forward_reference(q, p, targets, teacher, config: ContrastiveConfig):
    """Per-row statistics ``[B, 4]`` (as the kernel's), computed ``_contrastive_chunk_rows`` rows at a time."""
    acc = accumulate_dtype(q.dtype)
    p_acc = p.to(acc)
    b = q.shape[0]
    stats = torch.zeros((b, 4), dtype=acc, device=q.device)
    step = _contrastive_chunk_rows(p.shape[0])
    for r0 in range(0, b, step):
        rows = slice(r0, min(b, r0 + step))
        s = _contrastive_scores(q[rows], p_acc, config)
        # [rows, P] group masks only where a mode reads them: in-batch CE without a teacher never does
        if not config.in_batch or teacher is not None:
            in_group = _group_masks(targets[rows], config.group_size, p.shape[0], q.device)
        cand = s if config.in_batch else s.masked_fill(~in_group, float("-inf"))
        stats[rows, 0] = torch.logsumexp(cand, dim=1)
        stats[rows, 1] = s.gather(1, targets[rows, None])[:, 0]
        if teacher is not None:
            stats[rows, 2] = torch.logsumexp(s.masked_fill(~in_group, float("-inf")), dim=1)
            group = s[in_group].view(-1, config.group_size)
            stats[rows, 3] = (group * teacher[rows].to(acc)).sum(1)
    return stats


def contrastive_backward_reference(q, p, targets, teacher, stats, row_grad, config: ContrastiveConfig,
                                   need_q: bool, need_p: bool):
    """``(dq, dp)``: the kernel's coefficients ``c`` rebuilt chunk by chunk, then ``c p / tau`` and ``c^T q / tau``."""
    acc = accumulate_dtype(q.dtype)
    p_acc = p.to(acc)
    q_acc = q.to(acc)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device) if need_q else None
    dp = torch.zeros(p.shape, dtype=acc, device=p.device) if need_p else None
    step = _contrastive_chunk_rows(p.shape[0])
    for r0 in range(0, q.shape[0], step):
        rows = slice(r0, min(q.shape[0], r0 + step))
        s = _contrastive_scores(q[rows], p_acc, config)
        if not config.in_batch or teacher is not None:
            in_group = _group_masks(targets[rows], config.group_size, p.shape[0], q.device)
        kd = None
        if teacher is not None:  # before s becomes c in place below
            kd = torch.exp(s - stats[rows, 2:3]).masked_fill_(~in_group, 0.0)
            kd[in_group] -= teacher[rows].to(acc).reshape(-1)
        # c is built in s's storage: each [rows, P] temporary is a full pass over memory on the CPU
        c = s.sub_(stats[rows, 0:1]).exp_()
        if not config.in_batch:
            c.masked_fill_(~in_group, 0.0)
        c[torch.arange(c.shape[0], device=c.device), targets[rows]] -= 1.0
        if kd is not None:
            c += kd
        c *= row_grad[rows, None].to(acc) / config.temperature
        if need_q:
            dq[rows] = c @ p_acc
        if need_p:
            dp.addmm_(c.t(), q_acc[rows])
    return (dq.to(q.dtype) if need_q else None), (dp.to(p.dtype) if need_p else None)
