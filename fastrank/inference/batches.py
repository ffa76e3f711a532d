"""Planning and running the batches of ``Reranker.score`` and ``Embedder.encode``.

Inference is cut in two steps so that one process can plan and another run: ``plan_batches`` turns a window
of token-id sequences into ``PlannedBatch``es (which sequences go together, in which order, with which
shared prefixes), and ``run_planned`` builds one batch's tensors on a device and computes it. A planned batch
carries its own token ids, so running it anywhere builds exactly the stream that running it here would, and a
device pool gives the same numbers as one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from fastrank.data.batching import collate, token_budget_batches
from fastrank.data.packing import pack_planned, plan_packed_batches, position_offset, shared_groups, stream_tokens
from fastrank.engine import sliding_window, warn_once
from fastrank.utils import positive_int, value_checks

DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_TOKENS = 32768  # tokens per batch (padded, or real when packed): 64 pairs of 512, or 4 of 8192


def sort_window(batch_size: int, device: torch.device) -> int:
    """How many inputs are tokenised, sorted by length and batched together.

    On CUDA the loop never waits for the device, so the next window is tokenised while the device runs
    this one; small windows keep that overlap from the start (on an H100, 1024 beat 256 by packing
    better). A CPU runs each batch as it is launched, so there is nothing to overlap and a larger window
    only packs better: on the encode benchmark's texts, padding is 12.6% of the tokens with windows of
    1024 and 3.7% with windows of 4096.
    """
    return max(16 * batch_size, 1024 if device.type == "cuda" else 4096)


def pad_multiple(device: torch.device) -> int:
    """Padded widths are rounded up to a multiple of 8 on CUDA, which keeps matmul and attention tiles
    aligned; on a CPU those columns are plain extra work (17% of MiniLM's encode time on texts of ~54
    tokens), so none there."""
    return 8 if device.type == "cuda" else 1


@dataclass
class PlannedBatch:
    """One forward pass's inputs, in the order they run.

    ``indices``: where each sequence came from in the caller's list. ``sequences``: their token ids.
    ``prefix_lengths``: for a packed batch, each sequence's shareable prefix length (None: not shared);
    None for a padded batch. ``segment_a``: for a cross-encoder that reads token types, each sequence's
    number of type-0 ids (the rest are type 1); None otherwise.
    """

    indices: List[int]
    sequences: List[List[int]]
    prefix_lengths: Optional[List[Optional[int]]] = None
    segment_a: Optional[List[int]] = None

    @property
    def packed(self) -> bool:
        return self.prefix_lengths is not None

    @property
    def tokens(self) -> int:
        """Real tokens in the stream (a shared prefix counted once)."""
        return stream_tokens(self.sequences, self.prefix_lengths)


def _check_nonempty(lengths, offset: int) -> None:
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise ValueError(f"sequences: {len(empty)} are empty (first at index {offset + empty[0]})")


def plan_batches(
    sequences: Sequence[Sequence[int]],
    offset: int,
    batch_size: int,
    max_tokens: int,
    device: torch.device,
    prefix_lengths: Optional[Sequence[Optional[int]]] = None,
    segment_a: Optional[Sequence[int]] = None,
) -> List[PlannedBatch]:
    """Cut ``sequences`` (inputs ``offset`` to ``offset + len(sequences)`` of the caller's list) into batches
    of at most ``batch_size`` sequences and ``max_tokens`` tokens.

    Packed when ``prefix_lengths`` is given (one per sequence, None where nothing is shared): real tokens
    counted, a shared prefix once per batch, the sequences of one prefix kept together; on a CPU a batch that
    shares no prefix and would waste less than ``CPU_PACKING_MIN_WASTE`` of its tokens to padding (and fits
    the budget padded) runs padded, which measures no slower there. Padded otherwise:
    length-sorted, the budget counted in padded tokens (widths rounded as ``pad_multiple(device)`` says).
    ``segment_a`` (one per sequence: its type-0 ids) travels with the sequences into their batches.
    """
    positive_int("batch_size", batch_size)
    positive_int("max_tokens", max_tokens)
    sequences = [list(s) for s in sequences]
    if segment_a is not None:
        segment_a = [int(a) for a in segment_a]
        if len(segment_a) != len(sequences):
            raise ValueError(f"segment_a: has {len(segment_a)} entries for {len(sequences)} sequences")

    def types(idx):
        return None if segment_a is None else [segment_a[i] for i in idx]

    if prefix_lengths is None:
        lengths = [len(s) for s in sequences]
        _check_nonempty(lengths, offset)
        return [
            PlannedBatch([offset + i for i in idx], [sequences[i] for i in idx], segment_a=types(idx))
            for idx in token_budget_batches(lengths, batch_size, max_tokens, pad_multiple(device))
        ]
    prefix_lengths = list(prefix_lengths)
    items, keys, head_lengths = shared_groups(sequences, prefix_lengths)
    _check_nonempty([len(x) for x in items], offset)
    batches = []
    for idx in plan_packed_batches([len(x) for x in items], keys, head_lengths, max_tokens, batch_size):
        heads = [prefix_lengths[i] for i in idx]
        seqs = [sequences[i] for i in idx]
        if _padded_is_cheaper(seqs, heads, max_tokens, device):
            heads = None
        batches.append(PlannedBatch([offset + i for i in idx], seqs, heads, types(idx)))
    return batches


# On a CPU the packed batch's attention is the reference path's gathers and scatters around sdpa, which cost
# about a tenth of a BERT layer stack; packing saves the padded share of every other op. Measured on the
# cross-encoder benchmark (MiniLM-shaped BERT, pairs cut at 256 tokens, 8-16% padding per batch): packed and
# padded take the same time there, so a batch that shares no prefix and would waste less than this much to
# padding runs padded on a CPU. On CUDA the packed kernels win at any padding.
CPU_PACKING_MIN_WASTE = 0.15


def _padded_is_cheaper(sequences, prefix_lengths, max_tokens: int, device: torch.device) -> bool:
    if device.type != "cpu" or any(prefix_lengths):
        return False
    width = max(len(s) for s in sequences)
    padded = width * len(sequences)
    return padded <= max_tokens and 1 - sum(len(s) for s in sequences) / padded < CPU_PACKING_MIN_WASTE


def run_planned(
    batch: PlannedBatch,
    model,
    device: torch.device,
    compute: Callable,
    padded_compute: Callable,
    pad_id: int,
    padding_side: str,
) -> torch.Tensor:
    """One row of results per sequence of ``batch``, in its order: ``compute(packed_batch)`` for a packed
    batch, ``padded_compute(padded_batch)`` for a padded one. A packed batch whose longest context exceeds
    the model's sliding window (which the packed engine does not implement) runs padded, with a one-time
    warning. The batch is built here, so score_head's and pool's value checks are off (no empty rows)."""
    multiple = pad_multiple(device)
    with value_checks(False):
        if not batch.packed:
            return padded_compute(collate(batch.sequences, pad_id, padding_side, multiple, device=device))
        items, keys, _ = shared_groups(batch.sequences, batch.prefix_lengths)
        packed = pack_planned(items, keys, list(range(len(items))), position_offset(model), device)
        window = sliding_window(model)
        if window is not None and packed.segments.max_context > window:
            warn_once(
                "sliding-window",
                f"fastrank: a batch has sequences longer than the model's sliding window ({window} tokens), "
                "which the packed engine does not implement; those batches run padded",
            )
            return padded_compute(collate(batch.sequences, pad_id, "left", multiple, device=device))
        return compute(packed)


def write_rows(out: torch.Tensor, indices, values) -> None:
    """``out[indices] = values``; on CUDA the row indices go up through pinned memory (no host sync)."""
    rows = torch.tensor(indices)
    if out.device.type == "cuda":
        rows = rows.pin_memory().to(out.device, non_blocking=True)
    out[rows] = torch.as_tensor(values).to(out.device, non_blocking=True).float()
