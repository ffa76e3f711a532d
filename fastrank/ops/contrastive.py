"""contrastive_loss: in-batch softmax cross-entropy of ``q @ p.T / temperature`` (with optional distillation)
that never holds the ``[B, P]`` score matrix.

One room: the input checks, the plain-PyTorch reference (the CPU path and the test oracle, walking row
chunks), the autograd Function shared by both paths, the public function and its module. The Triton kernels
and their launch code are in ``fastrank.kernels.contrastive``.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastrank.common import ContrastiveConfig, accumulate_dtype
from fastrank.ops.base import (
    FLOAT_DTYPES,
    Implementation,
    dtype_name,
    integer_tensor,
    require_tensor,
    same_device,
    saved_tensor_hooks_active,
)
from fastrank.utils import select_backend


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def check_contrastive_inputs(q, p, temperature, group_size, in_batch, targets, teacher_scores, return_lse):
    """Validate contrastive_loss's arguments. Returns ``(config, targets int64 [B], teacher fp32 probs or None)``."""
    require_tensor("q", q, "[B, D]")
    require_tensor("p", p, "[P, D]")
    for name, t in (("q", q), ("p", p)):
        if t.dim() != 2:
            raise ValueError(
                f"{name}: must be 2-D ({'[B, D]' if name == 'q' else '[P, D]'}), got shape {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: must be float16, bfloat16 or float32, got {dtype_name(t.dtype)}")
    if p.dtype != q.dtype:
        raise ValueError(f"p: dtype {dtype_name(p.dtype)} differs from q's {dtype_name(q.dtype)}; cast one of them")
    same_device("p", p, q, "q")
    b, d = q.shape
    n = p.shape[0]
    if p.shape[1] != d:
        raise ValueError(f"p: has D={p.shape[1]} but q has D={d}; both must come from the same encoder")
    if b == 0:
        raise ValueError("q: the batch is empty (B=0)")
    if n == 0:
        raise ValueError("p: there are no passages (P=0)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature: must be a positive number, got {temperature!r}")
    if not isinstance(in_batch, bool) or not isinstance(return_lse, bool):
        raise ValueError("in_batch / return_lse: must be True or False")
    if group_size is None:
        if n % b:
            raise ValueError(
                f"group_size: P={n} passages are not a multiple of B={b} queries; pass group_size (and targets)"
            )
        group_size = n // b
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: must be a positive int, got {group_size!r}")
    if n % group_size:
        raise ValueError(f"p: P={n} passages are not divisible by group_size={group_size}")
    if targets is None:
        if b * group_size > n:
            raise ValueError(
                f"targets: the default targets i*G need P >= B*G = {b * group_size}, but P={n}; pass targets"
            )
        targets = torch.arange(b, device=q.device, dtype=torch.long) * group_size
    else:
        targets = integer_tensor("targets", targets, q.device, "[B]")
        if targets.dim() != 1 or targets.shape[0] != b:
            raise ValueError(f"targets: must be 1-D [B] with B={b}, got shape {tuple(targets.shape)}")
        same_device("targets", targets, q, "q")
        targets = targets.long().contiguous()
        lo, hi = (int(v) for v in torch.stack([targets.min(), targets.max()]).tolist())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise ValueError(f"targets: {bad} is out of range for P={n} passages (each target indexes a row of p)")
    teacher = None
    if teacher_scores is not None:
        if isinstance(teacher_scores, (list, tuple)):
            teacher_scores = torch.tensor(teacher_scores, dtype=torch.float32, device=q.device)
        require_tensor("teacher_scores", teacher_scores, "[B, G]")
        if teacher_scores.numel() == b * group_size and teacher_scores.dim() == 1:
            teacher_scores = teacher_scores.view(b, group_size)
        if tuple(teacher_scores.shape) != (b, group_size):
            raise ValueError(
                f"teacher_scores: must be [B, G] = {(b, group_size)} (one score per passage of each query's group), "
                f"got shape {tuple(teacher_scores.shape)}"
            )
        same_device("teacher_scores", teacher_scores, q, "q")
        # FlagEmbedding's distillation target: softmax of the raw teacher scores, no temperature.
        teacher = torch.softmax(teacher_scores.detach().float(), dim=-1).contiguous()
    config = ContrastiveConfig(
        temperature=float(temperature), group_size=group_size, in_batch=in_batch, return_lse=return_lse
    )
    return config, targets, teacher


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------
def _contrastive_chunk_rows(p_rows: int) -> int:
    # about 4 Mi fp32 scores per chunk: [rows, P] never grows with the batch
    return max(1, min(1024, (1 << 22) // max(p_rows, 1)))


def _own_group_chunk_rows(group_size: int, dim: int) -> int:
    # about 4 Mi entries of gathered passages [rows, G, D] per chunk
    return max(1, (1 << 22) // max(group_size * dim, 1))


def _group_columns(targets: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[rows, G]``: the columns of each row's own group (the G passages from ``(target // G) * G``, which
    lie inside ``[0, P)`` because P is a multiple of G and the target is below P)."""
    offsets = torch.arange(group_size, device=targets.device)
    return (targets // group_size * group_size)[:, None] + offsets


def _row_logsumexp(s: torch.Tensor, rows: int = 32) -> torch.Tensor:
    """``torch.logsumexp(s, 1)`` taken ``rows`` rows at a time (the same numbers: each row is its own reduction),
    so its temporary ``exp(s - max)`` is a cache-sized slice rather than a second ``[rows, P]`` tensor."""
    if s.shape[0] <= rows:
        return torch.logsumexp(s, dim=1)
    return torch.cat([torch.logsumexp(part, dim=1) for part in s.split(rows)])


def _walk_outputs(q, p, acc, stats, need_q: bool, need_p: bool):
    """What a reference walk fills: ``stats`` (zeros ``[B, 4]`` for the forward, or the given ones), ``dq``
    ``[B, D]`` (every row written) and ``dp`` ``[P, D]`` (accumulated into), in ``acc``; None where not asked."""
    b, d, n = q.shape[0], q.shape[1], p.shape[0]
    if stats is None:
        stats = torch.zeros((b, 4), dtype=acc, device=q.device)
    dq = torch.empty((b, d), dtype=acc, device=q.device) if need_q else None
    dp = torch.zeros((n, d), dtype=acc, device=p.device) if need_p else None
    return stats, dq, dp


def _contrastive_walk(q, p, targets, teacher, config: ContrastiveConfig, stats, row_grad, need_q: bool, need_p: bool):
    """The reference, one chunk of query rows at a time, in one ``[rows, P]`` buffer reused by every chunk.

    ``stats`` None: the forward; it returns the per-row statistics ``[B, 4]`` and, where ``need_q`` /
    ``need_p``, the gradients for the per-row upstream gradients ``row_grad`` from the same pass (the softmax
    is at hand: no second score GEMM). ``stats`` given: the backward from them, recomputing the scores.
    Returns ``(stats, dq, dp)`` with the gradients in the accumulate dtype (None where not asked for).
    """
    acc = accumulate_dtype(q.dtype)
    p_acc = p.to(acc)
    b, n, g = q.shape[0], p.shape[0], config.group_size
    forward = stats is None
    stats, dq, dp = _walk_outputs(q, p, acc, stats, need_q, need_p)
    step = _contrastive_chunk_rows(n)
    buffer = torch.empty((min(step, b), n), dtype=acc, device=q.device)
    for r0 in range(0, b, step):
        r1 = min(b, r0 + step)
        q_rows = q[r0:r1].to(acc)
        tgt = targets[r0:r1]
        s = buffer[: r1 - r0]
        torch.mm(q_rows, p_acc.t(), out=s)
        s.div_(config.temperature)
        if teacher is not None:
            cols = _group_columns(tgt, g)
            s_group = s.gather(1, cols)  # [rows, G]: the distillation term needs no [rows, P] mask
        if forward:
            stats[r0:r1, 0] = _row_logsumexp(s)
            stats[r0:r1, 1] = s.gather(1, tgt[:, None])[:, 0]
            if teacher is not None:
                stats[r0:r1, 2] = torch.logsumexp(s_group, dim=1)
                stats[r0:r1, 3] = (s_group * teacher[r0:r1].to(acc)).sum(1)
            if not (need_q or need_p):
                continue
        # the softmax exp(s - lse), as torch's cross-entropy backward forms it, in s's storage
        c = s.sub_(stats[r0:r1, 0:1]).exp_()
        # c becomes d loss_i / d s_ij in place: softmax - onehot(target) (+ group softmax - teacher)
        c.scatter_add_(1, tgt[:, None], c.new_full((r1 - r0, 1), -1.0))
        if teacher is not None:
            kd = torch.exp(s_group - stats[r0:r1, 2:3]) - teacher[r0:r1].to(acc)
            c.scatter_add_(1, cols, kd)
        c *= row_grad[r0:r1, None].to(acc) / config.temperature
        if need_q:
            torch.mm(c, p_acc, out=dq[r0:r1])
        if need_p:
            dp.addmm_(c.t(), q_rows)
    return stats, dq, dp


def _contrastive_walk_own_group(
    q, p, targets, teacher, config: ContrastiveConfig, stats, row_grad, need_q: bool, need_p: bool
):
    """``_contrastive_walk`` for ``in_batch=False``: each row's candidates are its own group, so only the
    ``[rows, G]`` scores of the group are computed (the group's passages gathered, ``[rows, G, D]``), never
    ``[rows, P]``."""
    acc = accumulate_dtype(q.dtype)
    b, d, g = q.shape[0], q.shape[1], config.group_size
    forward = stats is None
    stats, dq, dp = _walk_outputs(q, p, acc, stats, need_q, need_p)
    step = _own_group_chunk_rows(g, d)
    for r0 in range(0, b, step):
        r1 = min(b, r0 + step)
        q_rows = q[r0:r1].to(acc)
        tgt = targets[r0:r1]
        cols = _group_columns(tgt, g).reshape(-1)
        p_group = p.index_select(0, cols).to(acc).view(r1 - r0, g, d)
        s = torch.bmm(p_group, q_rows[:, :, None])[:, :, 0].div_(config.temperature)  # [rows, G]
        local = (tgt % g)[:, None]  # the target's column within the group
        if forward:
            lse = torch.logsumexp(s, dim=1)
            stats[r0:r1, 0] = lse
            stats[r0:r1, 1] = s.gather(1, local)[:, 0]
            if teacher is not None:
                stats[r0:r1, 2] = lse  # the candidates are the group
                stats[r0:r1, 3] = (s * teacher[r0:r1].to(acc)).sum(1)
            if not (need_q or need_p):
                continue
        c = torch.exp(s - stats[r0:r1, 0:1])
        c.scatter_add_(1, local, c.new_full((r1 - r0, 1), -1.0))
        if teacher is not None:
            c += torch.exp(s - stats[r0:r1, 2:3]) - teacher[r0:r1].to(acc)
        c *= row_grad[r0:r1, None].to(acc) / config.temperature
        if need_q:
            dq[r0:r1] = torch.bmm(c[:, None, :], p_group)[:, 0]
        if need_p:
            dp.index_add_(0, cols, (c[:, :, None] * q_rows[:, None, :]).view(-1, d))
    return stats, dq, dp


def _walk(config: ContrastiveConfig):
    return _contrastive_walk if config.in_batch else _contrastive_walk_own_group


def contrastive_forward_reference(q, p, targets, teacher, config: ContrastiveConfig):
    """Per-row statistics ``[B, 4]`` (as the kernel's), computed ``_contrastive_chunk_rows`` rows at a time."""
    return _walk(config)(q, p, targets, teacher, config, None, None, False, False)[0]


def contrastive_forward_backward_reference(q, p, targets, teacher, config: ContrastiveConfig, need_q, need_p):
    """The forward's statistics and the gradients for the mean loss (upstream gradient 1), from one pass:
    ``(stats, dq, dp)``, the gradients in the accumulate dtype (None where not needed)."""
    b = q.shape[0]
    row_grad = torch.full((b,), 1.0 / b, dtype=torch.float32, device=q.device)
    return _walk(config)(q, p, targets, teacher, config, None, row_grad, need_q, need_p)


def contrastive_backward_reference(
    q, p, targets, teacher, stats, row_grad, config: ContrastiveConfig, need_q: bool, need_p: bool
):
    """``(dq, dp)``: the kernel's coefficients ``c`` rebuilt chunk by chunk, then ``c p / tau`` and ``c^T q / tau``."""
    _, dq, dp = _walk(config)(q, p, targets, teacher, config, stats, row_grad, need_q, need_p)
    return (dq.to(q.dtype) if need_q else None), (dp.to(p.dtype) if need_p else None)


# ------------------------------------------------------------------------------------------------
# autograd and the public function
# ------------------------------------------------------------------------------------------------
def _implementation(backend: str) -> Implementation:
    if backend == "triton":
        from fastrank.kernels import contrastive as kernel

        return Implementation(kernel.contrastive_forward, kernel.contrastive_backward)
    return Implementation(contrastive_forward_reference, contrastive_backward_reference)


def _loss_of_stats(stats: torch.Tensor, teacher):
    """The mean loss (fp32 scalar) and the per-row log-sum-exp (fp32 ``[B]``) of the per-row statistics."""
    per_row = stats[:, 0] - stats[:, 1]
    if teacher is not None:
        per_row = per_row + stats[:, 2] - stats[:, 3]  # -sum_g t_g log softmax_group(s)_g, as sum_g t_g = 1
    return per_row.float().mean(), stats[:, 0].float()


class ContrastiveFunction(torch.autograd.Function):
    """contrastive_loss's autograd, shared by both paths.

    Inputs: q ``[B, D]``, p ``[P, D]``, targets ``[B]`` int64, teacher ``[B, G]`` fp32 probabilities (or
    None), a ``ContrastiveConfig`` and the backend name. Outputs: the scalar loss (fp32) and the per-row
    log-sum-exp ``[B]`` (non-differentiable). Saves q, p and four fp32 numbers per row: never ``[B, P]``. On the
    torch path the forward also computes the gradients of the mean loss (``contrastive_forward_backward_reference``:
    the softmax is at hand, no second score GEMM), held until backward scales them by the upstream gradient;
    ``contrastive_loss`` calls it only where a gradient can follow (``needs_input_grad`` does not see
    ``torch.no_grad()``).
    """

    @staticmethod
    def forward(ctx, q, p, targets, teacher, config, backend):
        impl = _implementation(backend)
        need_q, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.unit_grads = None
        if backend == "torch" and (need_q or need_p) and not saved_tensor_hooks_active():
            # The reference computes the gradients of the mean loss along with the forward, from the softmax it
            # has at hand, and backward scales them by the upstream gradient: one score GEMM fewer. They are
            # held on ctx, not saved, so they are released once used (a second backward recomputes); under
            # saved-tensor hooks (checkpointing, offloading) nothing is kept beyond the saved tensors.
            stats, dq, dp = contrastive_forward_backward_reference(q, p, targets, teacher, config, need_q, need_p)
            ctx.unit_grads = (dq, dp)
        else:
            stats = impl.forward(q, p, targets, teacher, config)
        loss, lse = _loss_of_stats(stats, teacher)
        ctx.config = config
        ctx.backward_impl = impl.backward
        ctx.save_for_backward(q, p, targets, teacher, stats)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        q, p, targets, teacher, stats = ctx.saved_tensors
        unit_grads, ctx.unit_grads = ctx.unit_grads, None
        if grad_loss is None:
            return None, None, None, None, None, None
        if unit_grads is not None:
            dq, dp = (None if x is None else x.mul_(grad_loss.to(x.dtype)) for x in unit_grads)
            return (
                (dq.to(q.dtype) if dq is not None else None),
                (dp.to(p.dtype) if dp is not None else None),
                None,
                None,
                None,
                None,
            )
        # d mean / d row = 1 / B; the upstream scalar gradient stays on the device (no host read).
        row_grad = (grad_loss.float() / q.shape[0]).expand(q.shape[0]).contiguous()
        dq, dp = ctx.backward_impl(
            q, p, targets, teacher, stats, row_grad, ctx.config, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return dq, dp, None, None, None, None


def contrastive_loss(
    q: torch.Tensor,
    p: torch.Tensor,
    *,
    temperature: float,
    group_size: Optional[int] = None,
    in_batch: bool = True,
    targets: Optional[torch.Tensor] = None,
    teacher_scores=None,
    return_lse: bool = False,
):
    """Softmax cross-entropy of ``q @ p.T / temperature`` against each query's positive, without ever
    holding the ``[B, P]`` score matrix (or its gradient).

    Args:
        q: query embeddings ``[B, D]`` (fp16, bf16 or fp32; normalise them first for cosine similarity).
        p: passage embeddings ``[P, D]``, same dtype: each query's group of ``group_size`` passages, one
            positive then its negatives, contiguous (``P = B * G``), or a larger set such as passages
            gathered across devices (then give ``targets``).
        temperature: the divisor of the similarities (> 0), e.g. 0.02 for normalised BGE embeddings;
            ``1 / scale`` of sentence-transformers' MultipleNegativesRankingLoss.
        group_size: passages per query (``G``); default ``P // B``.
        in_batch: score each query against all ``P`` passages (in-batch negatives); ``False`` scores it
            against its own group only.
        targets: ``[B]`` column of each query's positive; default ``i * G``. A query's own group is the
            ``G`` columns from ``(target // G) * G``.
        teacher_scores: ``[B, G]`` raw teacher scores of each query's group: adds FlagEmbedding's
            distillation term ``-mean_i sum_g softmax(teacher)_ig * log_softmax(own-group scores)_ig``.
        return_lse: also return the per-row log-sum-exp over the candidates ``[B]`` (fp32, not
            differentiable).

    Returns:
        the fp32 scalar loss (mean over queries), or ``(loss, lse)``. Differentiable in ``q`` and ``p``.

    Raises:
        ValueError: naming the argument: P not divisible by G, targets out of range, temperature <= 0,
            mismatched D, dtype or device, bad teacher_scores shape.
    """
    config, targets, teacher = check_contrastive_inputs(
        q, p, temperature, group_size, in_batch, targets, teacher_scores, return_lse
    )
    backend = select_backend(q)
    if backend == "torch" and not (torch.is_grad_enabled() and (q.requires_grad or p.requires_grad)):
        # No gradient can follow: the forward alone (the Function would compute the gradients along with it).
        loss, lse = _loss_of_stats(contrastive_forward_reference(q, p, targets, teacher, config), teacher)
    else:
        loss, lse = ContrastiveFunction.apply(q, p, targets, teacher, config, backend)
    return (loss, lse) if return_lse else loss


class ContrastiveLoss(torch.nn.Module):
    """``contrastive_loss`` as a module: ``ContrastiveLoss(temperature, group_size=None, in_batch=True)``,
    called as ``loss(q, p, targets=None, teacher_scores=None)``."""

    def __init__(self, temperature: float = 0.02, group_size: Optional[int] = None, in_batch: bool = True):
        super().__init__()
        self.temperature = temperature
        self.group_size = group_size
        self.in_batch = in_batch

    def forward(self, q, p, targets=None, teacher_scores=None):
        return contrastive_loss(
            q,
            p,
            temperature=self.temperature,
            group_size=self.group_size,
            in_batch=self.in_batch,
            targets=targets,
            teacher_scores=teacher_scores,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, group_size={self.group_size}, in_batch={self.in_batch}"
