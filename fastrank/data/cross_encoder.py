"""Cross-encoder training data: FlagEmbedding's encoder-only reranker recipe (``finetune.reranker.encoder_only``).

The JSONL format and the group sampling are the LLM reranker's (``fastrank.data.reranker``): one query, one
positive drawn at random (first), ``G - 1`` negatives. A pair is laid out as FlagEmbedding's
``AbsRerankerTrainDataset.create_one_example`` does::

    q = tok(query)[:query_max_len + passage_max_len // 4]        (no special tokens)
    p = tok(passage)[:passage_max_len + query_max_len // 2]
    pair = the tokenizer's pair of decode(q) and decode(p), cut only_second to query_max_len + passage_max_len

(the decode and re-tokenisation is FlagEmbedding's stand-in, on transformers 5, for ``prepare_for_model``),
with the tokenizer's special tokens (``[CLS] q [SEP] p [SEP]``, ``<s> q </s></s> p </s>``) and token types.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from fastrank.data.batching import collate, padding_options
from fastrank.data.packing import pack
from fastrank.data.reranker import RerankTrainDataset
from fastrank.data.templates import _segment_a, keep_tokens, pair_round_trip


class CrossEncoderTrainDataset(RerankTrainDataset):
    """Query groups for cross-encoder training (the module docstring gives the layout).

    Args:
        data, train_group_size, knowledge_distillation, max_examples_per_dataset, seed: as
            ``RerankTrainDataset``'s.
        query_max_len / passage_max_len: FlagEmbedding's budget (defaults 32 / 128).
        query_instruction / passage_instruction: None (FlagEmbedding's default) leaves the texts as they are;
            a string is put before each query / passage through ``instruction_format`` (and then a line's
            ``query_prompt`` / ``passage_prompt`` replaces it, as FlagEmbedding does).

    ``dataset[i]`` is ``{"input_ids": [G lists of ids], "segment_a": [G ints] or None, "teacher_scores": [G
    floats] or None}``; ``segment_a`` is each pair's number of type-0 ids when the tokenizer gives token types.
    """

    def __init__(
        self,
        data,
        tokenizer,
        *,
        train_group_size: int = 8,
        query_max_len: int = 32,
        passage_max_len: int = 128,
        query_instruction: Optional[str] = None,
        passage_instruction: Optional[str] = None,
        instruction_format: str = "{}{}",
        knowledge_distillation: Optional[bool] = None,
        max_examples_per_dataset: Optional[int] = None,
        seed: int = 42,
    ):
        super().__init__(
            data,
            tokenizer,
            train_group_size=train_group_size,
            query_max_len=query_max_len,
            passage_max_len=passage_max_len,
            query_instruction="",
            passage_instruction="",
            instruction_format=instruction_format,
            sep="",
            prompt="",
            answer=None,
            knowledge_distillation=knowledge_distillation,
            max_examples_per_dataset=max_examples_per_dataset,
            seed=seed,
        )
        self.query_instruction = query_instruction
        self.passage_instruction = passage_instruction

    def encode_pairs(self, query: str, passages: Sequence[str], record: Optional[dict] = None):
        """``(input_ids, segment_a)`` of ``query`` against each passage (``segment_a`` None without token types)."""
        record = record or {}
        fmt = self.instruction_format
        if self.query_instruction is not None:
            query = fmt.format(record.get("query_prompt") or self.query_instruction, query)
        if self.passage_instruction is not None:
            passages = [fmt.format(record.get("passage_prompt") or self.passage_instruction, p) for p in passages]
        q_ids = keep_tokens(self._ids(query), self.query_max_len + self.passage_max_len // 4, self.side)
        p_budget = self.passage_max_len + self.query_max_len // 2
        p_ids = [
            keep_tokens(list(ids), p_budget, self.side)
            for ids in self.tokenizer(list(passages), add_special_tokens=False)["input_ids"]
        ]
        encoded = pair_round_trip(
            self.tokenizer, [q_ids] * len(p_ids), p_ids, self.query_max_len + self.passage_max_len, "query_max_len"
        )
        input_ids = [list(ids) for ids in encoded["input_ids"]]
        segment_a = [_segment_a(encoded, i) for i in range(len(input_ids))]
        return input_ids, (None if all(a is None for a in segment_a) else segment_a)

    def __getitem__(self, index: int) -> Dict[str, object]:
        query, passages, scores = self.sample(index)
        input_ids, segment_a = self.encode_pairs(query, passages, self.records[index])
        return {"input_ids": input_ids, "segment_a": segment_a, "teacher_scores": scores}


def token_types(sequences: Sequence[Sequence[int]], segment_a: Sequence[Optional[int]]) -> List[List[int]]:
    """Token type ids of each sequence: ``segment_a`` zeros then ones (all zeros where it is None)."""
    return [[0] * len(s) if a is None else [0] * a + [1] * (len(s) - a) for s, a in zip(sequences, segment_a)]


class CrossEncoderCollator:
    """Pads ``CrossEncoderTrainDataset`` items into ``CrossEncoderModel``'s ``pair`` batch.

    Returns ``{"pair": {"input_ids", "attention_mask", ["token_type_ids"]}, "teacher_scores": [B * G] fp32 or
    None}``, each query's G pairs contiguous, positive first; padded on ``padding_side`` (default the
    tokenizer's, as FlagEmbedding's ``DataCollatorWithPadding``) to the longest row, rounded up to
    ``pad_to_multiple_of`` (FlagEmbedding's default: none). ``token_type_ids`` when the items carry types.

    ``packed=True`` gives fastrank's padding-free layout instead (``PackedBatch.to_features`` plus
    ``token_type_ids`` ``[1, M]``): every pair back to back, attention within each pair only (the model sets
    the position ids its family counts from).
    """

    def __init__(
        self,
        tokenizer=None,
        *,
        pad_token_id: Optional[int] = None,
        padding_side: Optional[str] = None,
        pad_to_multiple_of: Optional[int] = None,
        packed: bool = False,
    ):
        self.pad_token_id, self.padding_side, self.pad_to_multiple_of = padding_options(
            tokenizer, pad_token_id, padding_side, pad_to_multiple_of, "right"
        )
        self.packed = bool(packed)

    def __call__(self, items: List[dict]) -> Dict[str, object]:
        if not items:
            raise ValueError("items: the batch is empty")
        sizes = {len(item["input_ids"]) for item in items}
        if len(sizes) != 1:
            raise ValueError(f"items: every item needs the same group size, got {sorted(sizes)}")
        seqs = [ids for item in items for ids in item["input_ids"]]
        with_types = [item.get("segment_a") is not None for item in items]
        segment_a = None
        if any(with_types):
            segment_a = [a for item in items for a in (item.get("segment_a") or [None] * len(item["input_ids"]))]
        teacher = None
        if all(item.get("teacher_scores") is not None for item in items):
            teacher = torch.tensor([s for item in items for s in item["teacher_scores"]], dtype=torch.float32)
        pair = self._packed(seqs, segment_a) if self.packed else self._padded(seqs, segment_a)
        return {"pair": pair, "teacher_scores": teacher}

    def _padded(self, seqs, segment_a):
        batch = collate(seqs, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)
        out = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if segment_a is not None:  # padded with type 0, as the tokenizer pads them
            out["token_type_ids"] = collate(
                token_types(seqs, segment_a), 0, self.padding_side, self.pad_to_multiple_of
            ).input_ids
        return out

    def _packed(self, seqs, segment_a):
        out = pack(seqs).to_features()
        if segment_a is not None:
            out["token_type_ids"] = torch.tensor([t for row in token_types(seqs, segment_a) for t in row])[None]
        return out
