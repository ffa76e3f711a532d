"""Length-sorted, token-budget batching (fastrank/data/batching.py) and the inference loop over it."""

import random
import types

import pytest
import torch

from fastrank.data.batching import collate, token_budget_batches
from fastrank.inference.batches import plan_batches, run_planned, sort_window


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


def test_planned_padded_batches_on_cpu_pad_to_the_longest_row_only_and_cover_every_input():
    sequences = [[7] * n for n in _lengths(50, seed=1)]
    cpu = torch.device("cpu")
    batches = plan_batches(sequences, 3, 8, 10_000, cpu)
    assert sorted(i for b in batches for i in b.indices) == list(range(3, 3 + len(sequences)))
    for b in batches:
        assert not b.packed and b.sequences == [sequences[i - 3] for i in b.indices]
        padded = run_planned(b, None, cpu, None, lambda x: x, 0, "left")
        # no rounding up to a multiple of 8 on a CPU; each row is its own sequence
        assert padded.input_ids.shape[1] == max(len(s) for s in b.sequences)
        assert padded.attention_mask.sum(1).tolist() == [len(s) for s in b.sequences]


def test_planned_packed_batches_keep_shared_prefixes_and_rebuild_the_same_stream():
    head = [1, 2, 3, 4]
    sequences = [head + [9] * n for n in (3, 5, 2)] + [[5, 6, 7]]
    batches = plan_batches(sequences, 0, 8, 1_000, torch.device("cpu"), [4, 4, 4, None])
    assert len(batches) == 1 and batches[0].packed
    (batch,) = batches
    assert batch.tokens == 4 + 3 + 5 + 2 + 3  # the prefix counted once
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="qwen2", sliding_window=None))
    stream = run_planned(batch, model, torch.device("cpu"), lambda p: p.input_ids, None, 0, "left")
    assert stream.shape[-1] == batch.tokens


def test_plan_batches_rejects_empty_sequences():
    with pytest.raises(ValueError, match=r"sequences: 1 are empty \(first at index 12\)"):
        plan_batches([[1, 2], []], 11, 8, 100, torch.device("cpu"))


def test_sort_window_by_device():
    assert sort_window(64, torch.device("cuda")) == 1024
    assert sort_window(64, torch.device("cpu")) == 4096
    assert sort_window(512, torch.device("cpu")) == 16 * 512


def test_on_a_cpu_batches_with_little_padding_and_no_shared_prefix_run_padded():
    from fastrank.inference.batches import CPU_PACKING_MIN_WASTE

    even = [[3] * 40, [3] * 38, [3] * 39]  # 1.7% of a padded batch would be padding
    uneven = [[3] * 40, [3] * 5, [3] * 9]  # 55%
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # planning reads only the device type
    assert CPU_PACKING_MIN_WASTE == 0.15
    assert not plan_batches(even, 0, 8, 1_000, cpu, [None] * 3)[0].packed
    assert plan_batches(uneven, 0, 8, 1_000, cpu, [None] * 3)[0].packed
    assert plan_batches(even, 0, 8, 1_000, cuda, [None] * 3)[0].packed  # the packed kernels win at any padding
    shared = [[1, 2, 3] + s for s in even]
    assert plan_batches(shared, 0, 8, 1_000, cpu, [3] * 3)[0].packed  # a shared prefix is computed once
    # 12.5% padding, but padded (80 tokens) the batch would exceed the budget its 70 real tokens fit
    assert plan_batches([[3] * 40, [3] * 30], 0, 8, 75, cpu, [None] * 2)[0].packed
