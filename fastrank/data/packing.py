"""Packed batches: a flat stream of real tokens cut into segments, each query's shared prefix in it once.

A batch is one row ``[1, M]`` of token ids. Its segments are prefixes (a preset's template head and a
query) and items (a document's part of a pair, or a whole sequence). An item that names a prefix attends
to the prefix's keys and values and then to its own tokens, and its position ids continue after the
prefix's length, so it sees exactly what the whole, unshared sequence would see. Batches are cut by a
budget of real tokens, each prefix counted once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fastrank.utils import positive_int


@dataclass
class Segments:
    """The segment metadata the attention function reads (the forward kwarg ``fastrank_segments``)."""

    cu_seqlens: torch.Tensor  # [S + 1] int32 offsets of the segments in the stream
    prefix: Optional[torch.Tensor]  # [S] int32: the segment each one attends to first, -1 for none; None: no prefixes
    max_seqlen: int  # the longest segment
    max_context: int  # the most tokens any query sees (its prefix's and its own)


@dataclass
class PackedBatch:
    """One packed forward: the stream, its segments, and where each item's tokens are."""

    input_ids: torch.Tensor  # [1, M]
    position_ids: torch.Tensor  # [1, M]
    segments: Segments
    last_rows: torch.Tensor  # [N] the stream row of each item's last token (items in the caller's order)
    item_cu_seqlens: Optional[torch.Tensor]  # [N + 1] when the items are the whole stream in order (no prefixes)
    indices: List[int]  # the caller's index of each item
    num_tokens: int  # M: real tokens computed, prefixes once
    score_rows: Optional[torch.Tensor] = None  # [N] rows to score when not the last ones (labels' answer - 1)

    def rows(self) -> torch.Tensor:
        """The stream row each item is scored at."""
        return self.last_rows if self.score_rows is None else self.score_rows

    def to_features(self) -> dict:
        """A plain dict (tensors and ints), which the HF Trainer moves to the device as it is."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("segments", "indices")}
        out.update({f"segments_{f.name}": getattr(self.segments, f.name) for f in fields(Segments)})
        return out

    @classmethod
    def from_features(cls, features: dict) -> "PackedBatch":
        """The batch ``to_features`` wrote (after the Trainer moved its tensors)."""
        segments = Segments(**{f.name: features[f"segments_{f.name}"] for f in fields(Segments)})
        kept = {f.name: features.get(f.name) for f in fields(cls) if f.name not in ("segments", "indices")}
        return cls(segments=segments, indices=[], **kept)


def is_packed_features(features) -> bool:
    """Whether a collated batch is a ``PackedBatch.to_features`` dict."""
    return isinstance(features, dict) and "segments_cu_seqlens" in features


def _to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    if device is None:
        return tensor
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def pack(
    items: Sequence[Sequence[int]],
    *,
    prefixes: Sequence[Sequence[int]] = (),
    prefix_of: Optional[Sequence[Optional[int]]] = None,
    indices: Optional[Sequence[int]] = None,
    position_offset: int = 0,
    device=None,
) -> PackedBatch:
    """Build one packed batch.

    Args:
        items: token ids of each item: the part after its prefix when it has one, else the whole sequence.
            Every item needs at least one token (its last token is where it is scored or pooled).
        prefixes: token ids of the shared prefixes (each placed in the stream once).
        prefix_of: for each item, the index into ``prefixes`` of its prefix, or None.
        indices: the caller's index of each item (default 0..N-1), returned as ``PackedBatch.indices``.
        position_offset: added to every position id (XLM-R counts positions from ``pad_token_id + 1``).
        device: where the tensors go (pinned, non-blocking copies on CUDA).
    """
    n = len(items)
    if n == 0:
        raise ValueError("items: is empty; a packed batch needs at least one item")
    if prefix_of is None:
        prefix_of = [None] * n
    if len(prefix_of) != n:
        raise ValueError(f"prefix_of: has {len(prefix_of)} entries for {n} items")
    for i, item in enumerate(items):
        if len(item) == 0:
            raise ValueError(f"items[{i}]: is empty; every item needs at least one token")
    for j, p in enumerate(prefixes):
        if len(p) == 0:
            raise ValueError(f"prefixes[{j}]: is empty; give None as the item's prefix instead")

    # Stream order: each used prefix followed by its items, then the unshared items.
    groups: Dict[int, List[int]] = {}
    alone: List[int] = []
    for i, p in enumerate(prefix_of):
        if p is None:
            alone.append(i)
        else:
            if not 0 <= p < len(prefixes):
                raise ValueError(f"prefix_of[{i}]: {p} is not an index into the {len(prefixes)} prefixes")
            groups.setdefault(p, []).append(i)

    tokens: List[int] = []
    lengths: List[int] = []
    bases: List[int] = []  # position id of each segment's first token, before position_offset
    seg_prefix: List[int] = []
    item_segment = [0] * n
    for p, members in groups.items():
        p_seg = len(lengths)
        tokens.extend(prefixes[p])
        lengths.append(len(prefixes[p]))
        bases.append(0)
        seg_prefix.append(-1)
        for i in members:
            item_segment[i] = len(lengths)
            tokens.extend(items[i])
            lengths.append(len(items[i]))
            bases.append(len(prefixes[p]))
            seg_prefix.append(p_seg)
    for i in alone:
        item_segment[i] = len(lengths)
        tokens.extend(items[i])
        lengths.append(len(items[i]))
        bases.append(0)
        seg_prefix.append(-1)

    lengths_t = torch.tensor(lengths, dtype=torch.long)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
    torch.cumsum(lengths_t, 0, out=cu[1:])
    starts = cu[:-1].repeat_interleave(lengths_t)
    positions = torch.arange(len(tokens)) - starts + torch.tensor(bases).repeat_interleave(lengths_t) + position_offset
    last_rows = cu[1:][torch.tensor(item_segment)] - 1
    shared = bool(groups)
    context = [b + n for b, n in zip(bases, lengths)]
    in_order = not shared and alone == list(range(n))
    segments = Segments(
        cu_seqlens=_to_device(cu.to(torch.int32), device),
        prefix=_to_device(torch.tensor(seg_prefix, dtype=torch.int32), device) if shared else None,
        max_seqlen=max(lengths),
        max_context=max(context),
    )
    return PackedBatch(
        input_ids=_to_device(torch.tensor(tokens, dtype=torch.long)[None], device),
        position_ids=_to_device(positions[None], device),
        segments=segments,
        last_rows=_to_device(last_rows, device),
        item_cu_seqlens=segments.cu_seqlens if in_order else None,
        indices=list(indices) if indices is not None else list(range(n)),
        num_tokens=len(tokens),
    )


def plan_packed_batches(
    lengths: Sequence[int],
    prefix_keys: Sequence[Optional[object]],
    prefix_lengths: Dict[object, int],
    max_tokens: int,
    max_items: int,
) -> List[List[int]]:
    """Item indices cut into batches of at most ``max_items`` items and ``max_tokens`` real tokens, a prefix
    counted once per batch it appears in. Items that share a prefix stay together (a group larger than
    the budget continues in the next batch, which computes its prefix again); within that, longer groups
    first. An item (with its prefix) longer than the budget gets a batch of its own."""
    positive_int("max_tokens", max_tokens)
    positive_int("max_items", max_items)
    groups: Dict[object, List[int]] = {}
    order: List[object] = []
    for i, key in enumerate(prefix_keys):
        k = ("item", i) if key is None else ("prefix", key)
        if k not in groups:
            groups[k] = []
            order.append(k)
        groups[k].append(i)

    def group_tokens(k):
        head = prefix_lengths[k[1]] if k[0] == "prefix" else 0
        return head + sum(lengths[i] for i in groups[k])

    order.sort(key=lambda k: -group_tokens(k))
    batches: List[List[int]] = []
    current: List[int] = []
    used = 0
    for k in order:
        head = prefix_lengths[k[1]] if k[0] == "prefix" else 0
        in_batch = False  # whether this group's prefix is already in the current batch
        for i in sorted(groups[k], key=lambda i: -lengths[i]):
            cost = lengths[i] + (0 if in_batch else head)
            if current and (used + cost > max_tokens or len(current) + 1 > max_items):
                batches.append(current)
                current, used, in_batch = [], 0, False
                cost = lengths[i] + head
            current.append(i)
            used += cost
            in_batch = True
    if current:
        batches.append(current)
    return batches


def position_offset(model) -> int:
    """Where a model's position ids start: 0, or ``pad_token_id + 1`` for the RoBERTa family."""
    config = getattr(model, "config", None)  # a PEFT wrapper forwards it
    if getattr(config, "model_type", None) in ("roberta", "xlm-roberta", "camembert"):
        return int(config.pad_token_id) + 1
    return 0


def shared_groups(
    sequences: Sequence[Sequence[int]], prefix_lengths: Sequence[Optional[int]]
) -> Tuple[List[List[int]], List[Optional[Tuple[int, ...]]], Dict[Tuple[int, ...], int]]:
    """Split each sequence at its shareable prefix length (None: not shared). Returns the items (the part
    after the prefix, or the whole sequence), each item's prefix key (the prefix's ids as a tuple) and the
    length of each prefix."""
    items: List[List[int]] = []
    keys: List[Optional[Tuple[int, ...]]] = []
    lengths: Dict[Tuple[int, ...], int] = {}
    for seq, n in zip(sequences, prefix_lengths):
        if n:
            key = tuple(seq[:n])
            items.append(list(seq[n:]))
            keys.append(key)
            lengths[key] = n
        else:
            items.append(list(seq))
            keys.append(None)
    return items, keys, lengths


def stream_tokens(sequences: Sequence[Sequence[int]], prefix_lengths: Optional[Sequence[Optional[int]]]) -> int:
    """The tokens a packed stream of ``sequences`` holds when each shares its first ``prefix_lengths[i]`` ids
    (None: nothing) with the others of the same prefix: every distinct prefix once, plus the rest of every
    sequence; every token when ``prefix_lengths`` is None."""
    if prefix_lengths is None:
        return sum(len(s) for s in sequences)
    items, _, heads = shared_groups(sequences, prefix_lengths)
    return sum(len(x) for x in items) + sum(heads.values())


def common_prefix_length(sequences: Sequence[Sequence[int]], keep: int = 1) -> int:
    """How many leading ids all ``sequences`` share, leaving at least ``keep`` ids of each after it."""
    if len(sequences) < 2:
        return 0
    limit = min(len(s) for s in sequences) - keep
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences[1:]):
        n += 1
    return max(n, 0)


def pack_planned(items, keys, indices, position_offset: int = 0, device=None) -> PackedBatch:
    """``pack`` for one planned batch: the selected items with their prefixes (by key) in the stream once."""
    prefix_index: Dict[Tuple[int, ...], int] = {}
    prefix_of: List[Optional[int]] = []
    for i in indices:
        key = keys[i]
        if key is None:
            prefix_of.append(None)
        else:
            prefix_of.append(prefix_index.setdefault(key, len(prefix_index)))
    prefixes = [list(k) for k in prefix_index]
    return pack(
        [items[i] for i in indices],
        prefixes=prefixes,
        prefix_of=prefix_of,
        indices=indices,
        position_offset=position_offset,
        device=device,
    )
