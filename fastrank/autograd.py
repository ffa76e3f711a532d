"""The autograd Functions of fastrank's ops, shared by the Triton and the reference implementations.

Each Function takes the implementation as an argument (``"triton"`` or ``"torch"``) so that both paths
have one autograd contract: the same inputs, outputs, saved tensors and gradient rules.
"""

from __future__ import annotations

import torch

from fastrank.reference import score_head_backward_reference, score_head_forward_reference


def _score_head_impl(backend: str):
    if backend == "triton":
        from fastrank.kernels.score_head import score_head_backward, score_head_forward

        return score_head_forward, score_head_backward
    return score_head_forward_reference, score_head_backward_reference


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
        forward, backward = _score_head_impl(backend)
        # Forward runs with grad mode off; needs_input_grad says whether a backward can follow.
        out, lse, rows, gathered = forward(
            hidden, weight, bias, attention_mask, positions, cu_seqlens, config,
            store_gathered=any(ctx.needs_input_grad[:3]),
        )
        if lse is None:
            lse = out.new_empty(0)
        ctx.config = config
        ctx.backward_impl = backward
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


class PoolFunction(torch.autograd.Function):
    """pool's autograd on the Triton path (the reference path is differentiable by torch itself).

    Inputs: hidden, attention_mask, input_ids, cu_seqlens (each or None), a ``PoolConfig``. Outputs: the
    pooled (and normalised) ``[N, H]`` fp32 and the per-sequence status (non-differentiable). Saves only
    ``[N, H]`` tensors and the counts: never the hidden states.
    """

    @staticmethod
    def forward(ctx, hidden, attention_mask, input_ids, cu_seqlens, config):
        from fastrank.kernels.pool import pool_forward

        out, count, status, pooled, norm = pool_forward(
            hidden, attention_mask, input_ids, cu_seqlens, config, needs_grad=ctx.needs_input_grad[0]
        )
        ctx.config = config
        ctx.hidden_meta = (hidden.shape, hidden.dtype, hidden.device)
        ctx.save_for_backward(out, pooled, norm, count, attention_mask, input_ids, cu_seqlens)
        ctx.mark_non_differentiable(status)
        return out, status

    @staticmethod
    def backward(ctx, grad_out, _grad_status):
        from fastrank.kernels.pool import pool_backward

        out, pooled, norm, count, attention_mask, input_ids, cu_seqlens = ctx.saved_tensors
        grad = pool_backward(
            grad_out, ctx.hidden_meta, out, pooled, norm, count, attention_mask, input_ids, cu_seqlens, ctx.config
        )
        return grad, None, None, None, None


def _contrastive_impl(backend: str):
    if backend == "triton":
        from fastrank.kernels.contrastive import contrastive_backward, contrastive_forward

        def forward(q, p, targets, teacher, config):
            return contrastive_forward(q, p, targets, teacher, config.temperature, config.group_size, config.in_batch)

        def backward(q, p, targets, teacher, stats, row_grad, config, need_q, need_p):
            return contrastive_backward(q, p, targets, teacher, stats, row_grad, config.temperature,
                                        config.group_size, config.in_batch, need_q, need_p)

        return forward, backward
    from fastrank.reference import contrastive_backward_reference, contrastive_forward_reference

    return contrastive_forward_reference, contrastive_backward_reference


class ContrastiveFunction(torch.autograd.Function):
    """contrastive_loss's autograd, shared by both paths.

    Inputs: q ``[B, D]``, p ``[P, D]``, targets ``[B]`` int64, teacher ``[B, G]`` fp32 probabilities (or
    None), a ``ContrastiveConfig`` and the backend name. Outputs: the scalar loss (fp32) and the per-row
    log-sum-exp ``[B]`` (non-differentiable). Saves q, p and four fp32 numbers per row: never ``[B, P]``.
    """

    @staticmethod
    def forward(ctx, q, p, targets, teacher, config, backend):
        forward, backward = _contrastive_impl(backend)
        stats = forward(q, p, targets, teacher, config)
        per_row = stats[:, 0] - stats[:, 1]
        if teacher is not None:
            per_row = per_row + stats[:, 2] - stats[:, 3]  # -sum_g t_g log softmax_group(s)_g, as sum_g t_g = 1
        loss = per_row.float().mean()
        lse = stats[:, 0].float()
        ctx.config = config
        ctx.backward_impl = backward
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
        dq, dp = ctx.backward_impl(q, p, targets, teacher, stats, row_grad, ctx.config,
                                   ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dq, dp, None, None, None, None
