"""FusedMultipleNegativesRankingLoss against sentence-transformers' own MultipleNegativesRankingLoss: the same
constructor, the same loss and embedding gradients for every supported (directions, partition_mode,
similarity_fct, hardness) combination, in one process and across two (gloo), and a ValueError naming the
argument for every value the fused loss refuses."""

from __future__ import annotations

import inspect
import os
import re

import pytest
import torch
from references import require
from tolerances import GRADS_SAME_FORWARD, LOSS_VS_REFERENCE, assert_close

st = require("sentence_transformers")  # a reference that fails to import fails this module, never skips it
from sentence_transformers import util  # noqa: E402

try:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
except ImportError:  # sentence-transformers before 6
    from sentence_transformers.losses import MultipleNegativesRankingLoss

from fastrank.integrations.sentence_transformers import FusedMultipleNegativesRankingLoss  # noqa: E402

pytestmark = pytest.mark.skipif(
    "directions" not in inspect.signature(MultipleNegativesRankingLoss).parameters,
    reason="this sentence-transformers' MultipleNegativesRankingLoss has no directions / partition_mode",
)

Q2D, D2Q = "query_to_doc", "doc_to_query"
SUPPORTED = [
    ((Q2D,), "joint"),
    ((Q2D,), "per_direction"),
    ((Q2D, D2Q), "joint"),
    ((Q2D, D2Q), "per_direction"),
    ((D2Q, Q2D), "joint"),
]
# (batch, negative columns): odd batches, with and without negatives
SHAPES = [(1, 0), (3, 0), (5, 1), (7, 3)]
SIMILARITIES = [(util.cos_sim, 20.0), (util.dot_score, 0.5)]


def make_columns(batch, negatives, dim=16, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=gen).to(device) for _ in range(2 + negatives)]


def loss_and_grads(loss_cls, columns, **kwargs):
    leaves = [c.clone().requires_grad_(True) for c in columns]
    loss = loss_cls(None, **kwargs).compute_loss_from_embeddings(leaves, None)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def assert_matches_mnrl(columns, **kwargs):
    want, want_g = loss_and_grads(MultipleNegativesRankingLoss, columns, **kwargs)
    got, got_g = loss_and_grads(FusedMultipleNegativesRankingLoss, columns, **kwargs)
    assert_close(got, want, LOSS_VS_REFERENCE, what=f"loss {kwargs}")
    for i, (g, w) in enumerate(zip(got_g, want_g)):
        assert g is not None, f"column {i}: no gradient"
        assert_close(g, w, GRADS_SAME_FORWARD, what=f"grad of column {i} {kwargs}")


@pytest.mark.parametrize("similarity_fct,scale", SIMILARITIES, ids=["cos", "dot"])
@pytest.mark.parametrize("batch,negatives", SHAPES, ids=[f"b{b}n{n}" for b, n in SHAPES])
@pytest.mark.parametrize("directions,partition_mode", SUPPORTED, ids=["-".join(d) + "-" + m for d, m in SUPPORTED])
def test_matches_mnrl(backend, device, directions, partition_mode, batch, negatives, similarity_fct, scale):
    columns = make_columns(batch, negatives, seed=batch * 10 + negatives, device=device)
    assert_matches_mnrl(
        columns, scale=scale, similarity_fct=similarity_fct, directions=directions, partition_mode=partition_mode
    )


@pytest.mark.parametrize(
    "hardness_mode,hardness_strength",
    [("hard_negatives", 0.0), ("all_negatives", 0.0), ("in_batch_negatives", 0), (None, 5.0)],
)
def test_hardness_without_effect_matches_mnrl(backend, device, hardness_mode, hardness_strength):
    """MNRL applies no hardness penalty unless both are set: those values are exact and accepted."""
    assert_matches_mnrl(
        make_columns(5, 1, seed=3, device=device),
        directions=(Q2D, D2Q),
        hardness_mode=hardness_mode,
        hardness_strength=hardness_strength,
    )


def test_gather_without_process_group_matches_mnrl(backend, device):
    """gather_across_devices in a single process: nothing to gather, as in MNRL."""
    assert_matches_mnrl(make_columns(3, 1, seed=4, device=device), gather_across_devices=True, directions=(Q2D, D2Q))


def test_constructor_signature_matches_mnrl():
    ours = inspect.signature(FusedMultipleNegativesRankingLoss).parameters
    theirs = inspect.signature(MultipleNegativesRankingLoss).parameters
    assert list(ours) == list(theirs)
    for name, param in theirs.items():
        assert ours[name].default == param.default, name


@pytest.mark.parametrize("directions,partition_mode", SUPPORTED, ids=["-".join(d) + "-" + m for d, m in SUPPORTED])
@pytest.mark.parametrize("similarity_fct", [util.cos_sim, util.dot_score], ids=["cos", "dot"])
def test_config_and_citation_match_mnrl(directions, partition_mode, similarity_fct):
    kwargs = dict(
        scale=10.0,
        similarity_fct=similarity_fct,
        directions=directions,
        partition_mode=partition_mode,
        hardness_mode="hard_negatives",
        hardness_strength=0.0,
    )
    ours, theirs = FusedMultipleNegativesRankingLoss(None, **kwargs), MultipleNegativesRankingLoss(None, **kwargs)
    assert ours.get_config_dict() == theirs.get_config_dict()
    assert ours.temperature == pytest.approx(theirs.temperature)

    def eprint(citation):
        return re.search(r"eprint=\{([^}]*)\}", citation).group(1)

    assert eprint(ours.citation) == eprint(theirs.citation)


# (kwargs, the argument the message must name, further text it must hold, does MNRL accept the value?)
REFUSED = [
    (dict(directions=(Q2D, "query_to_query")), "directions", ["query_to_query", "MultipleNegativesRankingLoss"], True),
    (dict(directions=(Q2D, "doc_to_doc")), "directions", ["doc_to_doc", "MultipleNegativesRankingLoss"], True),
    (dict(directions=(Q2D, "query_to_query", D2Q, "doc_to_doc")), "directions", ["query_to_query", "doc_to_doc"], True),
    (
        dict(hardness_mode="in_batch_negatives", hardness_strength=9.0),
        "hardness_mode",
        ["in_batch_negatives", "9.0", "MultipleNegativesRankingLoss"],
        True,
    ),
    (
        dict(hardness_mode="hard_negatives", hardness_strength=5.0),
        "hardness_mode",
        ["hard_negatives", "5.0", "MultipleNegativesRankingLoss"],
        True,
    ),
    (
        dict(hardness_mode="all_negatives", hardness_strength=1),
        "hardness_mode",
        ["all_negatives", "hardness_strength=1", "MultipleNegativesRankingLoss"],
        True,
    ),
    (
        dict(similarity_fct=util.manhattan_sim),
        "similarity_fct",
        ["manhattan_sim", "MultipleNegativesRankingLoss"],
        True,
    ),
    # values MNRL rejects as well
    (
        dict(directions=(Q2D, "query_to_query"), partition_mode="per_direction"),
        "partition_mode",
        ["per_direction", "query_to_query", "joint"],
        False,
    ),
    (dict(directions=()), "directions", [], False),
    (dict(directions=(D2Q,)), "directions", ["query_to_doc"], False),
    (dict(directions=(Q2D, "doc_to_everything")), "directions", ["doc_to_everything"], False),
    (dict(directions="query_to_doc"), "directions", ["'query_to_doc'"], False),
    (dict(partition_mode="separate"), "partition_mode", ["separate"], False),
    (dict(hardness_mode="easy_negatives"), "hardness_mode", ["easy_negatives"], False),
    (dict(hardness_strength=-1.0), "hardness_strength", ["-1.0"], False),
    (dict(scale=0.0), "scale", ["0.0"], False),
]


@pytest.mark.parametrize("kwargs,argument,mentions,mnrl_accepts", REFUSED, ids=[str(k) for k, *_ in REFUSED])
def test_refused_values_name_the_argument(kwargs, argument, mentions, mnrl_accepts):
    with pytest.raises(ValueError) as info:
        FusedMultipleNegativesRankingLoss(None, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{argument}:"), message
    for text in mentions:
        assert text in message, (text, message)
    if mnrl_accepts:  # refused by the fused loss only: MNRL is the way to get it
        MultipleNegativesRankingLoss(None, **kwargs)
    else:
        with pytest.raises(ValueError):
            MultipleNegativesRankingLoss(None, **kwargs)


def _gather_worker(rank, world, init_file, batch, negatives):
    os.environ["FASTRANK_BACKEND"] = "torch"
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        full = make_columns(batch * world, negatives, seed=11)
        local = [c[rank * batch : (rank + 1) * batch] for c in full]
        for directions, partition_mode in SUPPORTED[1:4]:
            for similarity_fct in (util.cos_sim, util.dot_score):
                assert_matches_mnrl(
                    local,
                    gather_across_devices=True,
                    directions=directions,
                    partition_mode=partition_mode,
                    similarity_fct=similarity_fct,
                )
    finally:
        torch.distributed.destroy_process_group()


def test_gather_across_devices_matches_mnrl(tmp_path):
    """Two gloo processes, each with its own slice of the batch: the same per-process loss and gradients
    (through the gathered documents and, for doc_to_query, anchors) as MNRL's in the same processes."""
    torch.multiprocessing.spawn(_gather_worker, args=(2, str(tmp_path / "init"), 3, 1), nprocs=2)
