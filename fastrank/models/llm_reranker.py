"""Training an LLM reranker on the "Yes" logit (the seeds' ``BiEncoderModel``), without full logits.

The backbone runs for its last hidden state only; ``fastrank.score_head`` projects the hidden state at each
pair's scoring position onto the LM head's "Yes" row alone (fp32), so neither the forward nor the backward
ever holds ``[N, T, V]`` logits (at Qwen2.5-0.5B's 151,936-row vocabulary and N*T = 16k tokens those are
4.6 GiB in bf16, plus their gradient). Scores are grouped ``[B, G]`` per query, positive first, and trained
with cross-entropy towards index 0, plus FlagEmbedding's distillation term when teacher scores are given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch

from fastrank.data.packing import PackedBatch, is_packed_features
from fastrank.engine import enable_packing, packing_unsupported_reason
from fastrank.heads import yes_logit
from fastrank.models.reranker import CausalLMScorer, enable_checkpointing, unwrap_model
from fastrank.utils import positive_int


@dataclass
class RerankerOutput:
    """What ``forward(pair=...)`` returns (FlagEmbedding's ``RerankerOutput``)."""

    loss: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None


class LLMRerankerModel(torch.nn.Module):
    """A causal LM trained as a reranker on the logit of its answer token.

    Args:
        model: an ``AutoModelForCausalLM`` (a PEFT-wrapped one trains its adapters).
        tokenizer: its tokenizer (finds the answer token's id, and is saved with the model).
        train_group_size: G, pairs per query in a training batch (1 positive first + G - 1 negatives).
        answer: the answer token whose logit is the score (``"Yes"``); it must be one token of the tokenizer,
            as for every scoring convention (``fastrank.heads.single_token_id``).

    ``forward(pair=batch["pair"], teacher_scores=batch["teacher_scores"])`` returns ``loss`` (in training
    mode) and ``scores`` ``[N]`` fp32. ``encode(features)`` returns the scores alone. The scoring position of a
    row is one before its answer token when ``labels`` are given (the research layout: the answer is part of
    the input), else its last real token (the package layout), for either padding side, or per packed pair
    with ``cu_seqlens``, or packed with each query's prefix once (``RerankCollator(share_prefix=True)``:
    fastrank's engine, which this model then enables on its backbone).
    """

    def __init__(self, model, tokenizer, train_group_size: int = 8, *, answer: str = "Yes"):
        super().__init__()
        positive_int("train_group_size", train_group_size)
        self.model = model
        self.tokenizer = tokenizer
        self.train_group_size = train_group_size
        self.answer = answer
        convention = yes_logit(answer)
        (self.yes_loc,) = convention.token_ids(tokenizer)  # one token, or a ValueError naming it
        inner = unwrap_model(model)
        if getattr(inner.config, "pad_token_id", None) is None and getattr(tokenizer, "pad_token_id", None) is not None:
            inner.config.pad_token_id = tokenizer.pad_token_id
        self.config = inner.config
        self.scorer = CausalLMScorer(model, convention, [self.yes_loc])

    # -- scoring ---------------------------------------------------------------------------------------
    def encode(self, features: Optional[Dict[str, torch.Tensor]]) -> Optional[torch.Tensor]:
        """Scores ``[N]`` fp32 of a ``pair`` batch (``input_ids``, ``attention_mask`` or ``cu_seqlens``,
        optional ``position_ids`` and ``labels``)."""
        if features is None:
            return None
        if is_packed_features(features):
            if not enable_packing(self.model, warn=False):
                raise ValueError(
                    f"pair: a shared-prefix packed batch needs a model fastrank's engine runs "
                    f"({packing_unsupported_reason(self.model)}); collate with RerankCollator(share_prefix=False)"
                )
            return self.scorer.packed_scores(PackedBatch.from_features(features))
        input_ids = features["input_ids"]
        mask = features.get("attention_mask")
        cu_seqlens = features.get("cu_seqlens")
        labels = features.get("labels")
        positions = None
        if labels is not None:
            positions = answer_positions(labels, cu_seqlens)
        return self.scorer(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=features.get("position_ids"),
            cu_seqlens=cu_seqlens,
            positions=positions,
        )

    def forward(
        self,
        pair: Union[Dict[str, torch.Tensor], List[Dict[str, torch.Tensor]], None] = None,
        teacher_scores: Optional[torch.Tensor] = None,
    ) -> RerankerOutput:
        if isinstance(pair, (list, tuple)):
            scores = torch.cat([self.encode(p) for p in pair])
        else:
            scores = self.encode(pair)
        loss = None
        if self.training:
            loss = self.compute_loss(scores, teacher_scores)
        return RerankerOutput(loss=loss, scores=scores)

    def compute_loss(self, scores: torch.Tensor, teacher_scores: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean cross-entropy of each query's group ``[B, G]`` towards its positive (index 0), plus
        ``-mean(sum(softmax(teacher) * log_softmax(scores)))`` over the group with teacher scores."""
        g = self.train_group_size
        if scores.numel() % g:
            raise ValueError(f"pair: {scores.numel()} pairs do not form groups of train_group_size={g}")
        grouped = scores.view(-1, g)
        target = torch.zeros(grouped.shape[0], dtype=torch.long, device=grouped.device)
        loss = torch.nn.functional.cross_entropy(grouped, target)
        if teacher_scores is not None:
            teacher = torch.as_tensor(teacher_scores, dtype=torch.float32, device=grouped.device)
            if teacher.numel() != scores.numel():
                raise ValueError(
                    f"teacher_scores: expected {scores.numel()} scores (one per pair), got {teacher.numel()}"
                )
            weights = torch.softmax(teacher.reshape(-1, g).detach(), dim=-1)
            loss = loss - (torch.log_softmax(grouped, dim=-1) * weights).sum(-1).mean()
        return loss

    # -- what the HF Trainer and PEFT call --------------------------------------------------------------
    def activation_checkpointing_enable(self, **kwargs):
        """Checkpointing in the backbone (the HF Trainer calls this for ``activation_checkpointing=True``)."""
        enable_checkpointing(self.model, **kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable  # the name before transformers 5.23

    def enable_input_require_grads(self):
        unwrap_model(self.model).enable_input_require_grads()

    def save(self, path: str, state_dict: Optional[dict] = None) -> None:
        """Write the model (a PEFT model writes its adapter) and the tokenizer to ``path``; the folder loads
        with ``fastrank.Reranker.from_pretrained`` (merged or full weights) or PEFT. ``state_dict`` (keyed as
        ``self.model.state_dict()``) gives the weights to write when the parameters hold only this process's
        shard (FSDP)."""
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path, state_dict=state_dict)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)

    save_pretrained = save


def answer_positions(labels: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scoring positions from research-layout labels: one before each row's answer token.

    Padded ``[N, T]`` labels: the column of the (single) non-ignored label, minus one, as FlagEmbedding
    finds it with ``argmax(labels) - 1``. Packed ``[1, M]`` labels with ``cu_seqlens``: the offset of each
    pair's labelled token from the pair's start, minus one. No host sync: a row without a label (or with
    the label on its first token) gives a position that ``score_head``'s checks reject.
    """
    if cu_seqlens is None:
        labels = labels.long()
        return (labels != -100).long().argmax(dim=1) - 1
    flat = labels.reshape(-1)
    cu = cu_seqlens.long().to(flat.device)
    n = cu.numel() - 1
    seq_of = torch.repeat_interleave(torch.arange(n, device=flat.device), cu[1:] - cu[:-1])
    steps = torch.arange(flat.numel(), device=flat.device) - cu[:-1][seq_of]
    labelled = torch.where(flat != -100, steps, torch.full_like(steps, -1))
    last = torch.full((n,), -1, dtype=torch.long, device=flat.device).scatter_reduce(0, seq_of, labelled, "amax")
    return last - 1
