"""Embedder training data: FlagEmbedding's JSONL format, group sampling, and the collator.

One JSON object per line::

    {"query": str, "pos": [str, ...], "neg": [str, ...],
     "pos_scores": [float, ...], "neg_scores": [float, ...],   # optional: teacher scores, aligned with pos / neg
     "prompt": str}                                             # optional: this line's query instruction

Each item is one query with a group of ``train_group_size`` passages: one positive drawn at random, then
``G - 1`` negatives drawn without replacement (the negative list is repeated first when it is too short),
positive first, as FlagEmbedding samples them.
"""

from __future__ import annotations

import json
import math
import os
import random
from typing import Dict, List, Optional, Sequence, Union

import torch

from fastrank.data.batching import collate, pad_token_id_of
from fastrank.data.packing import pack, position_offset
from fastrank.utils import positive_int


def _jsonl_files(data: Union[str, Sequence[str]]) -> List[str]:
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    files = []
    for path in paths:
        path = str(path)
        if os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".jsonl", ".json")))
            if not found:
                raise ValueError(f"data: the folder {path} holds no .jsonl or .json file")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"data: {path} does not exist")
    return files


def _check_scores(record, key, texts_key, where):
    scores = record.get(key)
    if scores is None:
        return None
    if not isinstance(scores, list) or len(scores) != len(record[texts_key]):
        raise ValueError(
            f"{where}: '{key}' must be a list of {len(record[texts_key])} numbers, aligned with '{texts_key}'"
        )
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores):
        raise ValueError(f"{where}: '{key}' must hold numbers")
    return [float(v) for v in scores]


def read_retrieval_jsonl(
    data, max_examples_per_dataset: Optional[int] = None, need_negatives: bool = True
) -> List[dict]:
    """Validated records of every JSONL file in ``data``; a malformed line raises a ValueError naming its
    file and line number. ``max_examples_per_dataset`` keeps the first N lines of each file."""
    records = []
    for path in _jsonl_files(data):
        kept = 0
        with open(path) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{where}: expected a JSON object")
                if not isinstance(record.get("query"), str):
                    raise ValueError(f"{where}: 'query' must be a string")
                pos = record.get("pos")
                if not isinstance(pos, list) or not pos or not all(isinstance(x, str) for x in pos):
                    raise ValueError(f"{where}: 'pos' must be a non-empty list of strings")
                neg = record.get("neg", [])
                if not isinstance(neg, list) or not all(isinstance(x, str) for x in neg):
                    raise ValueError(f"{where}: 'neg' must be a list of strings")
                if need_negatives and not neg:
                    raise ValueError(f"{where}: 'neg' is empty; a group needs negatives (or train_group_size=1)")
                for key in ("prompt", "query_prompt", "passage_prompt"):
                    if record.get(key) is not None and not isinstance(record[key], str):
                        raise ValueError(f"{where}: '{key}' must be a string")
                record = dict(record, neg=neg, _where=where)
                record["pos_scores"] = _check_scores(record, "pos_scores", "pos", where)
                record["neg_scores"] = _check_scores(record, "neg_scores", "neg", where)
                if (record["pos_scores"] is None) != (record["neg_scores"] is None):
                    raise ValueError(f"{where}: give both 'pos_scores' and 'neg_scores', or neither")
                records.append(record)
                kept += 1
                if max_examples_per_dataset and kept >= max_examples_per_dataset:
                    break
    if not records:
        raise ValueError(f"data: {data} holds no examples")
    return records


def sample_group(record: dict, train_group_size: int, key, with_scores: bool):
    """(passages, teacher scores or None) of one record's group: one positive drawn at random, then
    ``train_group_size - 1`` negatives without replacement (the negative list repeated first when it is too
    short), positive first. The draw is a pure function of ``key`` (a tuple of ints), so an item is the
    same in every worker and process for a given (seed, epoch, index)."""
    rng = random.Random(hash(key))
    p = rng.randrange(len(record["pos"]))
    passages = [record["pos"][p]]
    scores = [record["pos_scores"][p]] if with_scores else None
    if train_group_size > 1:
        neg_index = list(range(len(record["neg"])))
        need = train_group_size - 1
        if len(neg_index) < need:
            neg_index = neg_index * math.ceil(need / len(neg_index))
        for n in rng.sample(neg_index, need):
            passages.append(record["neg"][n])
            if scores is not None:
                scores.append(record["neg_scores"][n])
    return passages, scores


class EmbedderTrainDataset(torch.utils.data.Dataset):
    """Query / passage-group items for contrastive embedder training (see the module docstring).

    Args:
        data: a JSONL file, a folder of them, or a list of either.
        train_group_size: G, passages per query (1 positive + G - 1 negatives).
        query_instruction / passage_instruction: prepended to every query / passage (a line's ``prompt``
            replaces the query instruction).
        max_examples_per_dataset: keep at most this many lines of each file.
        seed: sampling is deterministic per (seed, epoch, index); call ``set_epoch`` to resample.
    """

    def __init__(
        self,
        data,
        *,
        train_group_size: int = 8,
        query_instruction: Optional[str] = None,
        passage_instruction: Optional[str] = None,
        max_examples_per_dataset: Optional[int] = None,
        seed: int = 42,
    ):
        positive_int("train_group_size", train_group_size)
        self.records = read_retrieval_jsonl(data, max_examples_per_dataset, need_negatives=train_group_size > 1)
        self.train_group_size = train_group_size
        self.query_instruction = query_instruction or ""
        self.passage_instruction = passage_instruction or ""
        self.seed = seed
        self.epoch = 0
        self.has_teacher = all(r["pos_scores"] is not None for r in self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, object]:
        record = self.records[index]
        chosen, scores = sample_group(record, self.train_group_size, (self.seed, self.epoch, index), self.has_teacher)
        instruction = record.get("prompt") if record.get("prompt") is not None else self.query_instruction
        return {
            "query": instruction + record["query"],
            "passages": [self.passage_instruction + t for t in chosen],
            "teacher_scores": scores,
        }


class EmbedderCollator:
    """Tokenises a list of dataset items with the encoder's own rule (its special tokens, or LLARA's
    prompt) and pads them: ``{"query": {...}, "passage": {...}, "teacher_scores": [B, G] or None}``.
    ``packed=True`` gives each side as one packed stream of real tokens (``PackedBatch.to_features``) for
    fastrank's engine instead of padded rows."""

    def __init__(
        self,
        encoder,
        query_max_len: Optional[int] = None,
        passage_max_len: Optional[int] = None,
        pad_to_multiple_of: int = 8,
        packed: bool = False,
    ):
        self.encoder = encoder
        self.packed = bool(packed)
        self.query_max_len = query_max_len
        self.passage_max_len = passage_max_len
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = pad_token_id_of(encoder.tokenizer)
        self.side = getattr(encoder.tokenizer, "padding_side", "right")
        self.position_offset = position_offset(getattr(encoder, "model", None))

    def _features(self, texts, kind, max_length):
        ids = self.encoder.tokenize(texts, kind, max_length)
        if self.packed:
            return pack(ids, position_offset=self.position_offset).to_features()
        batch = collate(ids, self.pad_id, self.side, self.pad_to_multiple_of)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}

    def __call__(self, items: List[dict]) -> Dict[str, object]:
        queries = [item["query"] for item in items]
        passages = [t for item in items for t in item["passages"]]
        teacher = None
        if all(item.get("teacher_scores") is not None for item in items):
            teacher = torch.tensor([item["teacher_scores"] for item in items], dtype=torch.float32)
        return {
            "query": self._features(queries, "query", self.query_max_len),
            "passage": self._features(passages, "passage", self.passage_max_len),
            "teacher_scores": teacher,
        }
