"""Layer-wise early exit (FlagEmbedding's bge-reranker-v2-minicpm-layerwise) against golden fixtures.

FlagEmbedding's layer-wise model runs on transformers 4.x only, so its scores were computed once by
tests/fixtures/layerwise_minicpm/make_golden.py (transformers 4.46.3, FlagEmbedding 1.4.2) on a tiny random
MiniCPM saved next to them; here fastrank loads that checkpoint on transformers 5 and must give the same ids and
scores (fp32), running no decoder layer beyond the deepest requested one.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from tolerances import SAME_COMPUTATION, SCORES_OTHER_BATCH, assert_close

import fastrank
from fastrank.cli import main
from fastrank.inference.layerwise import LayerwiseReranker
from fastrank.models.layerwise import LayerwiseMiniCPM
from fastrank.presets import detect_preset, get_preset

FOLDER = os.path.join(os.path.dirname(__file__), "fixtures", "layerwise_minicpm")
PRESET = "bge-reranker-v2-minicpm-layerwise"


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(FOLDER, "golden.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reranker():
    return fastrank.Reranker.from_pretrained(FOLDER, device="cpu")


def _layer_columns(entry):
    """Golden scores as one list per layer (the package returns a flat list for one layer)."""
    scores = entry["scores"]
    return scores if isinstance(scores[0], list) else [scores]


def _score(reranker, pairs, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warning of the max_length=24 entries
        return reranker.compute_score(pairs, **kwargs)


def test_loads_as_layerwise_from_config_and_name(reranker):
    assert isinstance(reranker, LayerwiseReranker)
    assert reranker.preset.name == PRESET
    assert reranker.cutoff_layers == [6]  # FlagEmbedding's default: the last layer
    assert detect_preset(FOLDER).name == PRESET
    assert detect_preset("BAAI/bge-reranker-v2-minicpm-layerwise").name == PRESET


def test_ids_equal_flagembedding(golden, reranker):
    pairs = [tuple(p) for p in golden["pairs"]]
    for max_length, want in golden["ids"].items():
        got = reranker.tokenize(pairs, int(max_length))
        assert [e.input_ids for e in got] == want, f"max_length={max_length}"
    truncated = [e.truncated for e in reranker.tokenize(pairs, 24)]
    assert truncated == [False, False, True, False, True, True, False]


def test_bos_always_first_even_when_it_is_the_pad_token(reranker):
    tok = reranker.tokenizer
    template = get_preset(PRESET).template
    gemma = get_preset("bge-reranker-v2-gemma").template
    saved = tok.pad_token
    try:
        tok.pad_token = tok.bos_token
        assert template.tokenize(tok, [("q", "p")], 64)[0].input_ids[0] == tok.bos_token_id
        assert gemma.tokenize(tok, [("q", "p")], 64)[0].input_ids[0] != tok.bos_token_id
    finally:
        tok.pad_token = saved


def test_scores_equal_flagembedding(golden, reranker, backend):
    """Every golden entry: cutoff layers None, [2], [4], [6], [2, 4, 6], [3, 5]; normalize False and True;
    max_length 512 and 24 (which truncates three pairs); FlagEmbedding ran batches of 3, right-padded."""
    for entry in golden["scores"]:
        got = _score(
            reranker,
            golden["pairs"],
            cutoff_layers=entry["cutoff_layers"],
            max_length=entry["max_length"],
            normalize=entry["normalize"],
            batch_size=3,
        )
        what = f"cutoff_layers={entry['cutoff_layers']} normalize={entry['normalize']} max_length={entry['max_length']}"
        got = got if isinstance(got[0], list) else [got]
        assert_close(got, _layer_columns(entry), SCORES_OTHER_BATCH, what=what)


def test_batch_layout_does_not_change_scores(golden, reranker):
    entry = next(e for e in golden["scores"] if e["cutoff_layers"] == [2, 4, 6] and not e["normalize"])
    pairs = golden["pairs"]
    one_batch = _score(reranker, pairs, cutoff_layers=[2, 4, 6], max_length=entry["max_length"])
    tight = _score(reranker, pairs, cutoff_layers=[2, 4, 6], max_length=entry["max_length"], max_tokens=90)
    alone = [_score(reranker, [p], cutoff_layers=[2, 4, 6], max_length=entry["max_length"]) for p in pairs]
    alone = [[row[j][0] for row in alone] for j in range(3)]
    for got in (one_batch, tight, alone):
        assert_close(got, entry["scores"], SCORES_OTHER_BATCH)
    assert_close(one_batch, tight, SAME_COMPUTATION)


def test_left_padding_equals_right_padding(golden, reranker):
    model = reranker.model
    ids = golden["ids"]["512"]
    width = max(map(len, ids))
    out = {}
    for side in ("left", "right"):
        x = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, row in enumerate(ids):
            cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            x[i, cols] = torch.tensor(row)
            mask[i, cols] = 1
        with torch.no_grad():
            out[side] = model(x, mask, [2, 4, 6])
    want = next(e for e in golden["scores"] if e["cutoff_layers"] == [2, 4, 6] and not e["normalize"])["scores"]
    assert_close(out["right"].T, want, SCORES_OTHER_BATCH)
    assert_close(out["left"], out["right"], SCORES_OTHER_BATCH)


def test_layers_come_back_in_the_order_asked(golden, reranker):
    """FlagEmbedding pairs an unsorted list's hidden states with the wrong heads; fastrank keeps each list with
    its layer."""
    ascending = _score(reranker, golden["pairs"], cutoff_layers=[2, 4, 6])
    mixed = _score(reranker, golden["pairs"], cutoff_layers=[6, 2, 4])
    assert_close(mixed, [ascending[2], ascending[0], ascending[1]], SAME_COMPUTATION)
    single = _score(reranker, golden["pairs"], cutoff_layers=4)
    assert_close(single, ascending[1], SAME_COMPUTATION)


@pytest.mark.parametrize("cutoff, deepest", [([2], 2), ([2, 4], 4), ([3, 5], 5), (None, 6)])
def test_early_exit_runs_no_layer_beyond_the_deepest(reranker, cutoff, deepest):
    calls = [0] * reranker.model.num_layers
    hooks = [
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(reranker.model.layers)
    ]
    try:
        reranker.score([("what is panda?", "a bear"), ("q", "a longer passage here")], cutoff_layers=cutoff)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [1] * deepest + [0] * (reranker.model.num_layers - deepest)


@pytest.mark.parametrize(
    "cutoff, message",
    [
        (0, "outside the model's layers 1..6"),
        (7, "outside the model's layers 1..6"),
        ([2, 40], "layer 40 is outside"),
        (1, "layer 1 has no head .*start at layer 2"),
        ([], "empty"),
        ([2, 2], "repeats a layer"),
        ([2.0], "not an int"),
        ("4", "not an int"),
    ],
)
def test_bad_cutoff_layers_are_clear_errors(reranker, cutoff, message):
    with pytest.raises(ValueError, match=f"cutoff_layers: .*{message}"):
        reranker.score([("q", "p")], cutoff_layers=cutoff)
    with pytest.raises(ValueError, match="cutoff_layers: "):
        fastrank.Reranker.from_pretrained(FOLDER, device="cpu", cutoff_layers=cutoff)


def test_rank_and_single_pair(golden, reranker):
    entry = next(e for e in golden["scores"] if e["cutoff_layers"] == [4] and e["max_length"] == 512)
    q, docs = golden["pairs"][0][0], [golden["pairs"][0][1], golden["pairs"][1][1]]
    ranked = reranker.rank(q, docs, cutoff_layers=[4], normalize=entry["normalize"])
    assert {r["index"]: r["relevance_score"] for r in ranked} == pytest.approx(
        {0: entry["scores"][0], 1: entry["scores"][1]}, abs=1e-5
    )
    assert len(reranker.compute_score(golden["pairs"][0], cutoff_layers=4)) == 1
    with pytest.raises(ValueError, match="rank orders by one score"):
        reranker.rank(q, docs, cutoff_layers=[2, 4])


def test_loaded_with_cutoff_layers(golden):
    r = fastrank.Reranker.from_pretrained(FOLDER, preset=PRESET, device="cpu", cutoff_layers=[3, 5])
    entry = next(e for e in golden["scores"] if e["cutoff_layers"] == [3, 5] and e["max_length"] == 512)
    got = r.score([tuple(p) for p in golden["pairs"]], normalize=entry["normalize"])
    assert_close(got, entry["scores"], SCORES_OTHER_BATCH)


def test_cli_cutoff_layers(golden, tmp_path):
    entry = next(e for e in golden["scores"] if e["cutoff_layers"] == [4] and e["max_length"] == 512)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"query": q, "document": p}) + "\n" for q, p in golden["pairs"]))
    flags = ["--input", str(src), "--output", str(dst), "--device", "cpu", "--no-progress"]
    if entry["normalize"]:
        flags.append("--normalize")
    assert main(["rerank", "--model", FOLDER, "--cutoff-layers", "4", *flags]) == 0
    got = [json.loads(line)["score"] for line in dst.read_text().splitlines()]
    assert_close(got, entry["scores"], SCORES_OTHER_BATCH)


def test_bfloat16_runs_close(golden, reranker):
    r = LayerwiseReranker(LayerwiseMiniCPM.from_pretrained(FOLDER, dtype="bfloat16"), reranker.tokenizer)
    want = _score(reranker, golden["pairs"], cutoff_layers=[2, 6])
    got = _score(r, golden["pairs"], cutoff_layers=[2, 6])
    assert_close(got, want, atol=0.05, rtol=0.02, what="bf16 against fp32 (six bf16 layers; measured 0.043 at |s| ~ 5)")


def test_not_a_layerwise_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(ValueError, match="not FlagEmbedding's LayerWiseMiniCPMForCausalLM"):
        LayerwiseMiniCPM.from_pretrained(str(tmp_path))


def test_benchmark_providers_score_alike():
    """``fastrank bench --op layerwise``: early exit, FlagEmbedding's forward at the cutoff and the full-depth run
    give the same scores (a tiny MiniCPM of 4 layers, cutoff 3)."""
    from fastrank.benchmarks.layerwise import Case, providers

    case = Case(pairs=6, max_length=48, batch_size=4, shape="tiny", layers=4, cutoff=3, dtype="float32")
    got = {name: fn() for name, fn in providers(case, torch.device("cpu")).items()}
    assert set(got) == {"full_depth", "flagembedding_cutoff", "fastrank"}
    for name in ("full_depth", "flagembedding_cutoff"):
        assert_close(got["fastrank"], got[name], SCORES_OTHER_BATCH, what=name)
