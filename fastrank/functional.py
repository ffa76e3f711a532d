"""fastrank's public functions. Each picks the Triton path or the PyTorch reference (see ``select_backend``)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fastrank.autograd import ContrastiveFunction, PoolFunction, ScoreHeadFunction
from fastrank.checks import (
    check_contrastive_inputs,
    check_pool_inputs,
    check_score_head_inputs,
    raise_on_invalid_rows,
    raise_on_pool_status,
)
from fastrank.reference import pool_reference
from fastrank.utils import can_sync, checks_enabled, select_backend


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
    out, lse, rows = ScoreHeadFunction.apply(
        hidden, weight, bias, attention_mask, positions, cu_seqlens, config, backend
    )
    if checks_enabled() and can_sync(hidden):
        raise_on_invalid_rows(rows, config, attention_mask, positions, cu_seqlens)
    return ScoreHeadOutput(out, lse) if return_lse else out


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
    if select_backend(hidden) == "triton":
        out, status = PoolFunction.apply(hidden, attention_mask, input_ids, cu_seqlens, config)
    else:
        out, status = pool_reference(hidden, attention_mask, input_ids, cu_seqlens, config)
    if checks_enabled() and can_sync(hidden):
        raise_on_pool_status(status, config, cu_seqlens)
    return out


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
        return contrastive_loss(q, p, temperature=self.temperature, group_size=self.group_size,
                                in_batch=self.in_batch, targets=targets, teacher_scores=teacher_scores)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, group_size={self.group_size}, in_batch={self.in_batch}"
