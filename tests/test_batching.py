"""Length-sorted, token-budget batching (fastrank/data/batching.py) and the inference loop over it."""

import random

import pytest
import torch

from fastrank.data.batching import collate, token_budget_batches
from fastrank.inference import run_batches, sort_window


class _Bar:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k


def _lengths(n, seed=0):
    rng = random.Random(seed)
    return [rng.randint(1, 61) for _ in range(n)]


@pytest.mark.parametrize("multiple", [1, 8])
def test_token_budget_batches_cover_every_index_within_budget(multiple):
    lengths = _lengths(300) + [200]  # one sequence over the token budget gets a batch of its own
    batches = token_budget_batches(lengths, batch_size=16, max_tokens=256, pad_to_multiple_of=multiple)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
    for b in batches:
        width = -(-max(lengths[i] for i in b) // multiple) * multiple
        assert len(b) <= 16
        assert len(b) == 1 or width * len(b) <= 256
    assert [len(b) for b in batches if 200 in [lengths[i] for i in b]] == [1]


def test_token_budget_batches_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        token_budget_batches([3, 4], batch_size=0, max_tokens=10)
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_batches([3, 4], batch_size=2, max_tokens=0)


def test_collate_rounds_width_and_counts_positions_from_the_first_real_token():
    batch = collate([[5, 6, 7], [8]], pad_id=0, padding_side="left", pad_to_multiple_of=4)
    assert batch.input_ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert batch.attention_mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert batch.position_ids.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]
    right = collate([[5, 6, 7], [8]], pad_id=0, padding_side="right", pad_to_multiple_of=1)
    assert right.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]


def test_run_batches_on_cpu_pads_to_the_longest_row_only_and_restores_input_order():
    sequences = [[7] * n for n in _lengths(50, seed=1)]
    widths = []

    def compute(batch):
        widths.append((batch.input_ids.shape[1], max(len(sequences[i]) for i in batch.indices)))
        return batch.attention_mask.sum(1).float()  # each row's own length

    out = torch.full((3 + len(sequences),), -1.0)
    bar = _Bar()
    run_batches(sequences, 3, out, 8, 10_000, 0, "left", bar, compute)
    assert all(w == longest for w, longest in widths)  # no rounding up to a multiple of 8 on a CPU
    assert out[3:].tolist() == [float(len(s)) for s in sequences]
    assert out[:3].tolist() == [-1.0] * 3 and bar.n == len(sequences)


def test_run_batches_rejects_empty_sequences():
    with pytest.raises(ValueError, match=r"sequences: 1 are empty \(first at index 12\)"):
        run_batches([[1, 2], []], 11, torch.empty(13), 8, 100, 0, "left", _Bar(), lambda b: None)


def test_sort_window_by_device():
    assert sort_window(64, torch.device("cuda")) == 1024
    assert sort_window(64, torch.device("cpu")) == 4096
    assert sort_window(512, torch.device("cpu")) == 16 * 512
