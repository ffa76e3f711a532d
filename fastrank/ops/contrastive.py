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
from fastrank.ops.base import FLOAT_DTYPES, Implementation, dtype_name, integer_tensor, require_tensor, same_device
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


def contrastive_backward_reference(
    q, p, targets, teacher, stats, row_grad, config: ContrastiveConfig, need_q: bool, need_p: bool
):
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


# ------------------------------------------------------------------------------------------------
# autograd and the public function
# ------------------------------------------------------------------------------------------------
def _implementation(backend: str) -> Implementation:
    if backend == "triton":
        from fastrank.kernels import contrastive as kernel

        return Implementation(kernel.contrastive_forward, kernel.contrastive_backward)
    return Implementation(contrastive_forward_reference, contrastive_backward_reference)


class ContrastiveFunction(torch.autograd.Function):
    """contrastive_loss's autograd, shared by both paths.

    Inputs: q ``[B, D]``, p ``[P, D]``, targets ``[B]`` int64, teacher ``[B, G]`` fp32 probabilities (or
    None), a ``ContrastiveConfig`` and the backend name. Outputs: the scalar loss (fp32) and the per-row
    log-sum-exp ``[B]`` (non-differentiable). Saves q, p and four fp32 numbers per row: never ``[B, P]``.
    """

    @staticmethod
    def forward(ctx, q, p, targets, teacher, config, backend):
        impl = _implementation(backend)
        stats = impl.forward(q, p, targets, teacher, config)
        per_row = stats[:, 0] - stats[:, 1]
        if teacher is not None:
            per_row = per_row + stats[:, 2] - stats[:, 3]  # -sum_g t_g log softmax_group(s)_g, as sum_g t_g = 1
        loss = per_row.float().mean()
        lse = stats[:, 0].float()
        ctx.config = config
        ctx.backward_impl = impl.backward
        ctx.save_for_backward(q, p, targets, teacher, stats)
        ctx.mark_non_differentiable(lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        q, p, targets, teacher, stats = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None
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
