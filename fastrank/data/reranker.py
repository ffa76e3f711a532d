"""LLM reranker training data: FlagEmbedding's JSONL format, group sampling, pair layout and collator.

One JSON object per line (a file, or a folder of ``.jsonl`` files)::

    {"query": str, "pos": [str, ...], "neg": [str, ...],
     "pos_scores": [float, ...], "neg_scores": [float, ...],   # optional: teacher scores (raw logits)
     "prompt": str,                                             # optional: this line's trailing prompt
     "query_prompt": str, "passage_prompt": str}                # optional: this line's instructions

Each item is one query with ``train_group_size`` pairs: one positive drawn at random (always first), then
``G - 1`` negatives drawn without replacement, the negative list repeated first when it is too short.

A pair is laid out as FlagEmbedding's ``finetune_for_instruction`` recipe does (the seeds)::

    [BOS] tok(query_instruction + query) | tok(sep) tok(passage_instruction + passage)
          | tok(sep) tok(prompt) [tok(answer)]

each segment tokenised on its own. The length budget lends unused space between the two texts: the query
keeps at most ``query_max_len + passage_max_len // 4`` tokens, the passage at most ``passage_max_len +
query_max_len // 2``, and the passage side is then cut (``only_second``) so that the whole sequence fits in
``query_max_len + passage_max_len``. With ``answer="Yes"`` (the research layout) the answer's ids end the
sequence and ``labels`` are -100 everywhere except the answer token; the score is read one position before
it. With ``answer=None`` (the FlagEmbedding package's layout) nothing is appended, there are no labels and
the score is read at the last real token.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from fastrank.data.batching import collate, padding_options
from fastrank.data.embedder import read_retrieval_jsonl, sample_group
from fastrank.data.packing import common_prefix_length, pack
from fastrank.data.templates import FLAG_LLM_PROMPT, default_bos, keep_tokens, truncate_only_second
from fastrank.utils import positive_int

IGNORE_INDEX = -100


class RerankTrainDataset(torch.utils.data.Dataset):
    """Query groups for LLM reranker training (see the module docstring for the format and layout).

    Args:
        data: a JSONL file, a folder of them, or a list of either.
        tokenizer: the reranker's tokenizer.
        train_group_size: G, pairs per query (1 positive + G - 1 negatives).
        query_max_len / passage_max_len: the length budget (FlagEmbedding's defaults 32 / 128; its README
            trains with 512 / 512).
        query_instruction / passage_instruction: put before each query / passage through
            ``instruction_format`` (a line's ``query_prompt`` / ``passage_prompt`` replaces them).
        sep: the separator between query, passage and prompt.
        prompt: the trailing prompt (a line's ``prompt`` replaces it).
        answer: the answer text appended for the research layout with labels, or None for the package
            layout (no answer, no labels).
        knowledge_distillation: None uses the teacher scores when every line has them; True requires them
            (a line without raises); False ignores them.
        max_examples_per_dataset: keep at most this many lines of each file.
        seed: sampling is deterministic per (seed, epoch, index); ``set_epoch`` resamples.

    ``dataset[i]`` is ``{"input_ids": [G lists of ids], "labels": [G lists] or None, "teacher_scores": [G
    floats] or None}``.
    """

    def __init__(
        self,
        data,
        tokenizer,
        *,
        train_group_size: int = 8,
        query_max_len: int = 32,
        passage_max_len: int = 128,
        query_instruction: str = "A: ",
        passage_instruction: str = "B: ",
        instruction_format: str = "{}{}",
        sep: str = "\n",
        prompt: str = FLAG_LLM_PROMPT,
        answer: Optional[str] = "Yes",
        knowledge_distillation: Optional[bool] = None,
        max_examples_per_dataset: Optional[int] = None,
        seed: int = 42,
    ):
        positive_int("train_group_size", train_group_size)
        self.query_max_len = positive_int("query_max_len", query_max_len)
        self.passage_max_len = positive_int("passage_max_len", passage_max_len)
        if "{}" not in instruction_format:
            raise ValueError(
                f"instruction_format: needs two '{{}}' fields (instruction, text), got {instruction_format!r}"
            )
        try:
            instruction_format.format("", "")
        except (IndexError, KeyError, ValueError):
            raise ValueError(
                f"instruction_format: needs two '{{}}' fields (instruction, text), got {instruction_format!r}"
            ) from None
        if answer is not None and not answer:
            raise ValueError("answer: give the answer text (e.g. 'Yes') or None for the layout without one")
        self.records = read_retrieval_jsonl(data, max_examples_per_dataset, need_negatives=train_group_size > 1)
        self.tokenizer = tokenizer
        self.train_group_size = train_group_size
        self.query_instruction = query_instruction or ""
        self.passage_instruction = passage_instruction or ""
        self.instruction_format = instruction_format
        self.prompt = prompt
        self.answer = answer
        self.seed = seed
        self.epoch = 0
        with_scores = [r["pos_scores"] is not None for r in self.records]
        if knowledge_distillation:
            missing = [r for r, has in zip(self.records, with_scores) if not has]
            if missing:
                raise ValueError(
                    f"{missing[0]['_where']}: knowledge_distillation=True needs 'pos_scores' and "
                    "'neg_scores' on every line"
                )
        self.has_teacher = all(with_scores) if knowledge_distillation is None else bool(knowledge_distillation)
        self.side = getattr(tokenizer, "truncation_side", "right")
        self.bos = default_bos(tokenizer)
        self.sep_ids = self._ids(sep)
        self.answer_ids = self._ids(answer) if answer else []
        self._prompt_ids: Dict[str, List[int]] = {}

    def _ids(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, index: int):
        """(query, passages, teacher scores or None) of item ``index``: the positive first."""
        record = self.records[index]
        passages, scores = sample_group(record, self.train_group_size, (self.seed, self.epoch, index), self.has_teacher)
        return record["query"], passages, scores

    def encode_pairs(self, query: str, passages: Sequence[str], record: Optional[dict] = None):
        """Token ids (and labels, with an answer) of ``query`` against each passage, in the layout above."""
        record = record or {}
        fmt = self.instruction_format
        q_text = fmt.format(record.get("query_prompt") or self.query_instruction, query)
        p_texts = [fmt.format(record.get("passage_prompt") or self.passage_instruction, p) for p in passages]
        prompt = record.get("prompt") or self.prompt
        if prompt not in self._prompt_ids:
            self._prompt_ids[prompt] = self._ids(prompt)
        prompt_ids = self._prompt_ids[prompt]
        q_ids = keep_tokens(self._ids(q_text), self.query_max_len + self.passage_max_len // 4, self.side)
        budget = self.query_max_len + self.passage_max_len - len(prompt_ids) - len(self.answer_ids) - len(self.sep_ids)
        first = self.bos + q_ids
        tokenized = self.tokenizer(p_texts, add_special_tokens=False)["input_ids"]
        input_ids, labels = [], []
        for p_ids in tokenized:
            p_ids = keep_tokens(list(p_ids), self.passage_max_len + self.query_max_len // 2, self.side)
            second = truncate_only_second(first, self.sep_ids + p_ids, budget, self.side)
            ids = first + second + self.sep_ids + prompt_ids + self.answer_ids
            input_ids.append(ids)
            if self.answer_ids:
                labels.append([IGNORE_INDEX] * (len(ids) - 1) + [ids[-1]])
        return input_ids, (labels if self.answer_ids else None)

    def __getitem__(self, index: int) -> Dict[str, object]:
        query, passages, scores = self.sample(index)
        input_ids, labels = self.encode_pairs(query, passages, self.records[index])
        return {"input_ids": input_ids, "labels": labels, "teacher_scores": scores}


class RerankCollator:
    """Pads a list of ``RerankTrainDataset`` items into the model's ``pair`` batch.

    Returns ``{"pair": {"input_ids", "attention_mask", ["labels"], ["position_ids"]}, "teacher_scores":
    [B * G] fp32 or None}``: rows grouped by query (each query's G pairs contiguous, positive first), labels
    padded with -100, ``pad_to_multiple_of`` on the padded length, ``padding_side`` ``"left"`` or ``"right"``
    (position ids count from 0 at each row's first real token either way).

    ``packed=True`` gives the padding-free layout instead: ``input_ids`` ``[1, M]`` (every pair back to back),
    ``position_ids`` ``[1, M]`` restarting at 0 per pair, ``cu_seqlens`` ``[N + 1]`` int32, ``labels`` ``[1,
    M]``, and no attention mask, for attention backends that honour packed input (flash attention, or sdpa
    and eager in transformers 5 through ``position_ids`` with ``use_cache=False``, which the model passes).

    ``share_prefix=True`` gives fastrank's engine layout (``fastrank.data.packing.PackedBatch.to_features``):
    one stream of real tokens in which each query's group is its shared prefix (the longest run of ids all
    G pairs start with: BOS, the query and what follows it alike) once, then its G passages' remaining ids;
    each pair is scored at its last token (one before the answer with labels). The model runs it through
    fastrank's varlen attention (``LLMRerankerModel`` enables it); loss and gradients equal the padded batch's.
    """

    def __init__(
        self,
        tokenizer=None,
        *,
        pad_token_id: Optional[int] = None,
        padding_side: Optional[str] = None,
        pad_to_multiple_of: Optional[int] = 8,
        return_position_ids: bool = True,
        packed: bool = False,
        share_prefix: bool = False,
    ):
        self.pad_token_id, self.padding_side, self.pad_to_multiple_of = padding_options(
            tokenizer, pad_token_id, padding_side, pad_to_multiple_of, "left"
        )
        self.return_position_ids = return_position_ids
        self.packed = packed
        self.share_prefix = share_prefix
        if packed and share_prefix:
            raise ValueError("packed, share_prefix: choose one layout (share_prefix=True is packed already)")

    def __call__(self, items: List[dict]) -> Dict[str, object]:
        if not items:
            raise ValueError("items: the batch is empty")
        sizes = {len(item["input_ids"]) for item in items}
        if len(sizes) != 1:
            raise ValueError(f"items: every item needs the same group size, got {sorted(sizes)}")
        seqs = [ids for item in items for ids in item["input_ids"]]
        with_labels = [item.get("labels") is not None for item in items]
        if any(with_labels) and not all(with_labels):
            raise ValueError("items: some items carry labels and some do not")
        labels = [lab for item in items for lab in item["labels"]] if all(with_labels) else None
        teacher = None
        if all(item.get("teacher_scores") is not None for item in items):
            teacher = torch.tensor([s for item in items for s in item["teacher_scores"]], dtype=torch.float32)
        if self.share_prefix:
            pair = self._shared([item["input_ids"] for item in items], labels)
        else:
            pair = self._packed(seqs, labels) if self.packed else self._padded(seqs, labels)
        return {"pair": pair, "teacher_scores": teacher}

    def _shared(self, groups, labels):
        keep = 2 if labels is not None else 1  # with an answer, its token and the scored one stay per pair
        items, prefixes, prefix_of = [], [], []
        for group in groups:
            n = common_prefix_length(group, keep)
            if n:
                prefixes.append(list(group[0][:n]))
            for ids in group:
                items.append(list(ids[n:]))
                prefix_of.append(len(prefixes) - 1 if n else None)
        batch = pack(items, prefixes=prefixes, prefix_of=prefix_of)
        if labels is not None:
            for i, lab in enumerate(labels):
                if lab[-1] == IGNORE_INDEX or any(t != IGNORE_INDEX for t in lab[:-1]):
                    raise ValueError(
                        f"items: pair {i}'s labels do not mark its last token alone (the answer); the shared "
                        "layout scores one before the last token"
                    )
            batch.score_rows = batch.last_rows - 1
        return batch.to_features()

    def _padded(self, seqs, labels):
        batch = collate(seqs, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)
        out = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if labels is not None:  # the labels padded the same way, with the ignore index
            out["labels"] = collate(labels, IGNORE_INDEX, self.padding_side, self.pad_to_multiple_of).input_ids
        if self.return_position_ids:
            out["position_ids"] = batch.position_ids
        return out

    def _packed(self, seqs, labels):
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int32)
        cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        out = {
            "input_ids": torch.tensor([t for s in seqs for t in s], dtype=torch.long)[None, :],
            "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None, :],
            "cu_seqlens": cu,
        }
        if labels is not None:
            out["labels"] = torch.tensor([t for lab in labels for t in lab], dtype=torch.long)[None, :]
        return out
