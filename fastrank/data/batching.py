"""Length-sorted, token-budget batches and their padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from fastrank.utils import positive_int


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L], 1 = real token
    position_ids: torch.Tensor  # [B, L], 0-based within each sequence whatever the padding side
    indices: List[int]  # where each row came from in the caller's list


def _round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple if multiple > 1 else n


def token_budget_batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int, pad_to_multiple_of: int = 8
) -> List[List[int]]:
    """Indices grouped into batches, longest sequences first.

    A batch holds at most ``batch_size`` sequences and at most ``max_tokens`` padded tokens (rows times
    the padded length of its longest row), so short sequences travel in large batches and long ones in
    small batches. A single sequence longer than the budget gets a batch of its own.
    """
    positive_int("batch_size", batch_size)
    positive_int("max_tokens", max_tokens)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, width = [], [], 0
    for i in order:
        new_width = max(width, _round_up(lengths[i], pad_to_multiple_of))
        if current and (len(current) + 1 > batch_size or new_width * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, new_width = [], _round_up(lengths[i], pad_to_multiple_of)
        current.append(i)
        width = new_width
    if current:
        batches.append(current)
    return batches


def collate(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: str = "left",
    pad_to_multiple_of: int = 8,
    device=None,
    indices=None,
) -> Batch:
    """Pad token-id lists into one batch. Position ids count from 0 at each sequence's first real token,
    so left and right padding give the model the same positions."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: must be 'left' or 'right', got {padding_side!r}")
    width = _round_up(max((len(s) for s in sequences), default=0), pad_to_multiple_of)
    n = len(sequences)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        length = len(seq)
        cols = slice(width - length, width) if padding_side == "left" else slice(0, length)
        ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    batch = Batch(ids, mask, positions, list(indices) if indices is not None else list(range(n)))
    if device is not None:
        device = torch.device(device)
        # Pinned host memory makes the copies truly asynchronous: the host can build the next batch while
        # the device runs this one.
        pin = device.type == "cuda"
        for name in ("input_ids", "attention_mask", "position_ids"):
            tensor = getattr(batch, name)
            setattr(batch, name, (tensor.pin_memory() if pin else tensor).to(device, non_blocking=pin))
    return batch


def pad_token_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its unk, else its eos (FlagEmbedding's fallback order)."""
    for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("tokenizer: has no pad, unk or eos token to pad batches with; set tokenizer.pad_token")


def padding_options(tokenizer, pad_token_id, padding_side, pad_to_multiple_of, default_side: str):
    """A collator's padding, checked: ``(pad id, side, multiple)``. The pad id is ``pad_token_id`` or the
    tokenizer's (``pad_token_id_of``); the side is ``padding_side``, else the tokenizer's, else ``default_side``;
    the multiple is ``pad_to_multiple_of`` or 1."""
    if pad_token_id is None:
        if tokenizer is None:
            raise ValueError("tokenizer: give the tokenizer (or pad_token_id) to pad with")
        pad_token_id = pad_token_id_of(tokenizer)
    side = padding_side or getattr(tokenizer, "padding_side", None) or default_side
    if side not in ("left", "right"):
        raise ValueError(f"padding_side: must be 'left' or 'right', got {side!r}")
    positive_int("pad_to_multiple_of", pad_to_multiple_of, none_ok=True)
    return int(pad_token_id), side, pad_to_multiple_of or 1
