"""Cross-encoders: a sequence-classification encoder (BERT, XLM-R, ...) scores a (query, passage) pair with its
classification head on the pair's first token (``[CLS]`` / ``<s>``), as FlagEmbedding's ``FlagReranker`` and
sentence-transformers' ``CrossEncoder`` read it.

The backbone runs once per batch (packed through fastrank's engine where it supports the model: BERT and
XLM-R, bidirectional, no padding computed), then only the first token's hidden state of each pair goes through
the model's own head modules, called on those ``[N, H]`` rows: BERT's pooler (dense + tanh) and classifier,
XLM-R's / RoBERTa's ``classifier`` (dense + tanh + out_proj), ELECTRA's head. So any checkpoint's head weights
are used as they are, and no per-token head output is ever formed. Other encoder families run the model's own
forward (padded) and read its logits. The score is the logit of the one label; ``normalize`` is its sigmoid.

``CrossEncoderModel`` trains one: FlagEmbedding's encoder-only reranker recipe (each query's group of G pairs,
positive first, cross-entropy towards it, plus the distillation term with teacher scores).
"""

from __future__ import annotations

import inspect
import os
from typing import Dict, List, Optional, Union

import torch

from fastrank.data.packing import PackedBatch, is_packed_features, position_offset
from fastrank.engine import attention_dropout, enable_packing, packed_forward, packing_unsupported_reason
from fastrank.models.llm_reranker import LLMRerankerModel, RerankerOutput
from fastrank.models.reranker import enable_checkpointing, packed_position_ids, unwrap_model
from fastrank.presets import CROSS_ENCODER_MODEL_TYPES
from fastrank.utils import positive_int


def _bert_head(model, rows):
    # BertForSequenceClassification: pooler (dense + tanh on the first token) -> dropout -> classifier.
    return model.classifier(model.dropout(model.bert.pooler(rows[:, None, :])))


def _first_token_head(model, rows):
    # RoBERTa / XLM-R / CamemBERT / ELECTRA: ``classifier`` reads features[:, 0] itself.
    return model.classifier(rows[:, None, :])


# model_type -> the head applied to the first tokens' hidden states [N, H] (checked against the model's own
# forward in tests/test_cross_encoder.py). Other encoder types run the whole model.
HEADS = {
    "bert": _bert_head,
    "xlm-roberta": _first_token_head,
    "roberta": _first_token_head,
    "camembert": _first_token_head,
    "electra": _first_token_head,
}


def check_cross_encoder(model) -> None:
    """A clear error unless ``model`` is a one-label sequence-classification encoder."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    name = type(inner).__name__
    if config is None or not name.endswith("ForSequenceClassification"):
        raise ValueError(
            f"model: {name} is not a sequence-classification model; a cross-encoder is loaded with "
            "AutoModelForSequenceClassification (fastrank.Reranker.from_pretrained(path, 'cross-encoder') does)"
        )
    if getattr(config, "model_type", None) not in CROSS_ENCODER_MODEL_TYPES:
        raise ValueError(
            f"model: {name} (model type {getattr(config, 'model_type', None)!r}) is not a bidirectional encoder "
            f"fastrank scores as a cross-encoder (types: {', '.join(CROSS_ENCODER_MODEL_TYPES)}); a decoder's "
            "classification model reads its last token under its own prompt"
        )
    if int(getattr(config, "num_labels", 1)) != 1:
        raise ValueError(
            f"model: its classifier has num_labels={config.num_labels}; a cross-encoder reranker scores with one "
            "label (FlagReranker and CrossEncoder.predict read logits.view(-1))"
        )


def _accepts(module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def first_token_rows(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[N]`` column of each row's first real token, for either padding side."""
    return attention_mask.long().argmax(dim=1)


def right_aligned(input_ids, attention_mask, token_type_ids=None):
    """A padded batch with each row's real tokens moved to its start (right padding), whatever side it was
    padded on; the same tensors when every row already starts with a real token."""
    lead = (attention_mask == 0).long().cumprod(dim=1).sum(dim=1)  # leading pads per row
    if input_ids.shape[1] == 0 or not bool(lead.any()):
        return input_ids, attention_mask, token_type_ids
    width = input_ids.shape[1]
    index = (torch.arange(width, device=input_ids.device)[None, :] + lead[:, None]) % width
    moved = [None if t is None else t.gather(1, index) for t in (input_ids, attention_mask, token_type_ids)]
    return tuple(moved)


def _long_tensor(values, device: torch.device) -> torch.Tensor:
    """``values`` (a list or tensor) as an int64 tensor on ``device`` (a pinned, non-blocking copy on CUDA)."""
    tensor = torch.as_tensor(values, dtype=torch.long)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class CrossEncoderScorer(torch.nn.Module):
    """Scores pairs with a sequence-classification encoder: ``[N]`` fp32 logits of its one label (sigmoid when
    ``normalize``), computed from the first token of each pair only.

    ``forward(input_ids, attention_mask, ...)`` takes a padded batch (either side; positions count from each
    row's first real token, so left padding gives what right padding gives); ``packed_scores(batch)`` a
    packed one (``fastrank.data.packing.pack``, no prefixes; the engine enabled on the model). Token type ids
    come as ``token_type_ids`` or as ``segment_a`` (each pair's number of type-0 ids).
    """

    def __init__(self, model):
        super().__init__()
        check_cross_encoder(model)
        self.model = model
        inner = unwrap_model(model)
        self.model_type = inner.config.model_type
        self.head = HEADS.get(self.model_type)
        self.offset = position_offset(inner)

    @property
    def backbone(self):
        """The encoder under the head (``model.bert``, ``model.roberta``, ...). Looked up, not stored: a second
        reference would register it twice in ``state_dict``."""
        inner = unwrap_model(self.model)
        return getattr(inner, inner.base_model_prefix)

    def head_scores(self, rows: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``[N]`` fp32 scores from the first tokens' hidden states ``rows`` ``[N, H]`` through the model's head."""
        logits = self.head(unwrap_model(self.model), rows)
        score = logits[:, 0].float()
        return torch.sigmoid(score) if normalize else score

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        token_type_ids=None,
        segment_a=None,
        normalize: bool = False,
        **_,
    ) -> torch.Tensor:
        """Scores ``[N]`` (fp32) of a padded batch. ``position_ids`` (0 at each row's first real token, as
        ``fastrank.data.batching.collate`` makes them) default to that."""
        if input_ids is None or attention_mask is None:
            raise ValueError("input_ids, attention_mask: a cross-encoder's padded batch needs both")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if token_type_ids is None and segment_a is not None:
            seg = _long_tensor(segment_a, input_ids.device)
            token_type_ids = ((position_ids >= seg[:, None]) & attention_mask.bool()).long()
        if self.head is None:
            # An encoder whose head fastrank does not call itself: the model's own forward, which reads column 0
            # and counts positions from it, so the batch goes right-padded.
            input_ids, attention_mask, token_type_ids = right_aligned(input_ids, attention_mask, token_type_ids)
            kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
            if token_type_ids is not None and _accepts(unwrap_model(self.model), "token_type_ids"):
                kwargs["token_type_ids"] = token_type_ids
            logits = self.model(**kwargs).logits
            score = logits[:, 0].float()
            return torch.sigmoid(score) if normalize else score
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids + self.offset)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**kwargs).last_hidden_state
        rows = hidden[torch.arange(hidden.shape[0], device=hidden.device), first_token_rows(attention_mask)]
        return self.head_scores(rows, normalize)

    def packed_scores(
        self, batch: PackedBatch, normalize: bool = False, segment_a=None, token_type_ids=None
    ) -> torch.Tensor:
        """Scores ``[N]`` (fp32) of a packed batch of whole pairs, in order (no shared prefixes: the query's
        tokens attend to the passage's). Token types as ``token_type_ids`` ``[1, M]`` or ``segment_a``."""
        if self.head is None:
            raise ValueError(
                f"model: fastrank runs {self.model_type} cross-encoders padded (their head is the model's own "
                "forward); score padded batches"
            )
        cu = batch.item_cu_seqlens
        if cu is None:
            raise ValueError(
                "batch: a cross-encoder's packed batch holds whole pairs in order, without shared prefixes "
                "(bidirectional attention: every token of a pair sees the whole pair)"
            )
        cu = cu.long()
        starts = cu[:-1]
        if token_type_ids is None and segment_a is not None:
            total = batch.input_ids.shape[1]  # output_size: no device sync to size the repeats
            lengths = cu[1:] - starts
            position = torch.arange(total, device=cu.device) - starts.repeat_interleave(lengths, output_size=total)
            seg = _long_tensor(segment_a, cu.device).repeat_interleave(lengths, output_size=total)
            token_type_ids = (position >= seg).long()[None]
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = packed_forward(self.backbone, batch, **kwargs)
        return self.head_scores(hidden.index_select(0, starts), normalize)


class CrossEncoderModel(torch.nn.Module):
    """A cross-encoder trained as FlagEmbedding's encoder-only reranker (``finetune.reranker.encoder_only.base``):
    each query's group of ``train_group_size`` pairs (positive first, contiguous) scored by the classifier's
    logit and trained with mean cross-entropy towards the positive, plus ``-mean(sum(softmax(teacher) *
    log_softmax(scores)))`` over each group when teacher scores are given.

    Args:
        model: an ``AutoModelForSequenceClassification`` encoder with one label (PEFT-wrapped works).
        tokenizer: its tokenizer (saved with the model).
        train_group_size: G, pairs per query.

    ``forward(pair=batch["pair"], teacher_scores=batch["teacher_scores"])`` returns ``loss`` (in training mode)
    and ``scores`` ``[N]`` fp32. ``pair`` is a padded batch (``input_ids``, ``attention_mask``,
    ``token_type_ids``) or a packed one (``CrossEncoderCollator(packed=True)``: fastrank's engine, enabled on the
    model here; attention dropout must be 0 for it in training).
    """

    def __init__(self, model, tokenizer=None, train_group_size: int = 8):
        super().__init__()
        positive_int("train_group_size", train_group_size)
        self.model = model
        self.tokenizer = tokenizer
        self.train_group_size = train_group_size
        inner = unwrap_model(model)
        if getattr(inner.config, "pad_token_id", None) is None and getattr(tokenizer, "pad_token_id", None) is not None:
            inner.config.pad_token_id = tokenizer.pad_token_id
        self.config = inner.config
        self.scorer = CrossEncoderScorer(model)

    def encode(self, features: Optional[Dict[str, torch.Tensor]]) -> Optional[torch.Tensor]:
        """Scores ``[N]`` fp32 of a ``pair`` batch."""
        if features is None:
            return None
        if is_packed_features(features):
            reason = packing_unsupported_reason(self.model)
            if reason is None and self.training and attention_dropout(self.model):
                reason = f"attention dropout {attention_dropout(self.model)} in training"
            if reason is not None or not enable_packing(self.model, warn=False):
                raise ValueError(
                    f"pair: a packed batch needs a model fastrank's engine runs ({reason}); collate with "
                    "CrossEncoderCollator(packed=False)"
                )
            batch = PackedBatch.from_features(features)
            if batch.item_cu_seqlens is not None:  # whole pairs: positions from 0 (+ the family's offset) in each
                batch.position_ids = packed_position_ids(batch.item_cu_seqlens, batch.input_ids) + self.scorer.offset
            return self.scorer.packed_scores(batch, token_type_ids=features.get("token_type_ids"))
        return self.scorer(
            input_ids=features["input_ids"],
            attention_mask=features["attention_mask"],
            position_ids=features.get("position_ids"),
            token_type_ids=features.get("token_type_ids"),
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
        loss = self.compute_loss(scores, teacher_scores) if self.training else None
        return RerankerOutput(loss=loss, scores=scores)

    # The same grouped loss as the LLM reranker's (FlagEmbedding's AbsRerankerModel.forward for both).
    compute_loss = LLMRerankerModel.compute_loss

    def activation_checkpointing_enable(self, **kwargs):
        enable_checkpointing(self.model, **kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable

    def enable_input_require_grads(self):
        unwrap_model(self.model).enable_input_require_grads()

    def save(self, path: str, state_dict: Optional[dict] = None) -> None:
        """Write the model and tokenizer; the folder loads with ``fastrank.Reranker.from_pretrained(path)``
        (recognised as a cross-encoder), FlagReranker and sentence-transformers' CrossEncoder."""
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path, state_dict=state_dict)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path)

    save_pretrained = save
