"""FlagEmbedding's lightweight reranker (bge-reranker-v2.5-gemma2-lightweight: Gemma 2, passage compression,
per-layer heads) against golden fixtures.

Its scores were computed once on transformers 4.46.3 by tests/fixtures/lightweight_gemma2/make_golden.py
(FlagEmbedding 1.4.2) on a tiny random ``CostWiseGemmaForCausalLM`` saved next to them; fastrank loads that
checkpoint on transformers 5 and must give the same ids and scores (fp32) for every cutoff layer list,
compress layers and compress ratio recorded, running no layer beyond the deepest requested one.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from tolerances import SCORES_OTHER_BATCH, assert_close

import fastrank
from fastrank.inference.layerwise import LayerwiseReranker
from fastrank.presets import detect_preset

FOLDER = os.path.join(os.path.dirname(__file__), "fixtures", "lightweight_gemma2")
MINICPM = os.path.join(os.path.dirname(__file__), "fixtures", "layerwise_minicpm")
PRESET = "bge-reranker-v2.5-gemma2-lightweight"


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(FOLDER, "golden.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reranker():
    return fastrank.Reranker.from_pretrained(FOLDER, device="cpu")


def _score(reranker, pairs, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truncation warning of the max_length=24 entries
        return reranker.compute_score(pairs, **kwargs)


def test_loads_from_config_and_name(reranker):
    assert isinstance(reranker, LayerwiseReranker) and reranker.lightweight
    assert reranker.preset.name == PRESET
    assert (reranker.cutoff_layers, reranker.compress_layers, reranker.compress_ratio) == ([6], [8], 1)
    assert detect_preset(FOLDER).name == PRESET
    assert detect_preset("BAAI/bge-reranker-v2.5-gemma2-lightweight").name == PRESET


def test_ids_and_query_lengths_equal_flagembedding(golden, reranker):
    pairs = [tuple(p) for p in golden["pairs"]]
    template = reranker.preset.template
    for max_length, want in golden["ids"].items():
        assert [e.input_ids for e in reranker.tokenize(pairs, int(max_length))] == want, f"max_length={max_length}"
        heads = [len(template.shared_prefix(reranker.tokenizer, q, int(max_length))) for q, _ in pairs]
        assert heads == golden["query_lengths"][max_length]
        assert [reranker._prompt_length] * len(pairs) == golden["prompt_lengths"][max_length]


def test_scores_equal_flagembedding(golden, reranker, backend):
    """Every golden entry: cutoff layers None, [2, 4, 6], [4], [6], [4, 6]; compress layers [8], [2], [2, 4], [4];
    compress ratios 1, 2, 4, 8; normalize False and True; max_length 512 and 24."""
    for entry in golden["scores"]:
        got = _score(
            reranker,
            golden["pairs"],
            cutoff_layers=entry["cutoff_layers"],
            compress_layers=entry["compress_layers"],
            compress_ratio=entry["compress_ratio"],
            max_length=entry["max_length"],
            normalize=entry["normalize"],
            batch_size=3,
        )
        want = entry["scores"] if isinstance(entry["scores"][0], list) else [entry["scores"]]
        got = got if isinstance(got[0], list) else [got]
        what = ", ".join(f"{k}={entry[k]}" for k in ("cutoff_layers", "compress_layers", "compress_ratio", "normalize"))
        assert_close(got, want, SCORES_OTHER_BATCH, what=what)


def test_one_batch_equals_flagembedding_batches(golden, reranker):
    entry = next(e for e in golden["scores"] if e["compress_ratio"] == 4 and not e["normalize"])
    got = _score(
        reranker,
        golden["pairs"],
        cutoff_layers=entry["cutoff_layers"],
        compress_layers=entry["compress_layers"],
        compress_ratio=4,
        max_length=entry["max_length"],
    )
    assert_close(got, entry["scores"], SCORES_OTHER_BATCH)


def test_compression_shortens_the_sequence_and_exit_is_early(reranker):
    widths = {}
    calls = [0] * reranker.model.num_layers
    hooks = []
    for i, layer in enumerate(reranker.model.layers):

        def hook(module, args, kwargs, i=i):
            calls[i] += 1
            widths[i] = args[0].shape[1]

        hooks.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        pairs = [("what is panda?", "The giant panda is a bear species endemic to China, black and white.")]
        reranker.score(pairs, cutoff_layers=[4], compress_layers=[2], compress_ratio=4)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [1, 1, 1, 1, 0, 0]
    assert widths[2] < widths[1] == widths[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cutoff_layers=3), "cutoff_layers: layer 3 has no head; this model scores at layers \\[2, 4, 6\\]"),
        (dict(cutoff_layers=[2, 2]), "cutoff_layers: .*repeats a layer"),
        (dict(compress_ratio=3), "compress_ratio: 3; FlagEmbedding's model supports"),
        (dict(compress_layers=["x"]), "compress_layers: 'x' is not a layer number"),
    ],
)
def test_bad_options_are_clear_errors(reranker, kwargs, message):
    with pytest.raises(ValueError, match=message):
        reranker.score([("q", "p")], **kwargs)


def test_compression_options_need_the_lightweight_model():
    with pytest.raises(ValueError, match="only the lightweight"):
        fastrank.Reranker.from_pretrained(MINICPM, device="cpu", compress_ratio=2)
    layerwise = fastrank.Reranker.from_pretrained(MINICPM, device="cpu")
    with pytest.raises(ValueError, match="only the lightweight"):
        layerwise.score([("q", "p")], compress_ratio=2)


def test_left_padding_is_refused(reranker):
    ids = torch.tensor([[0, 2, 30, 31], [2, 30, 31, 32]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="right padding"):
        reranker.model(ids, mask, [1, 1], [1, 1], [2])


def test_cli_compress_options(golden, tmp_path):
    from fastrank.cli import main

    entry = next(e for e in golden["scores"] if e["cutoff_layers"] == [4] and e["max_length"] == 512)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"query": q, "document": p}) + "\n" for q, p in golden["pairs"]))
    flags = ["--input", str(src), "--output", str(dst), "--device", "cpu", "--no-progress"]
    flags += ["--cutoff-layers", "4", "--compress-layers", "2", "--compress-ratio", "2"]
    if entry["normalize"]:
        flags.append("--normalize")
    assert main(["rerank", "--model", FOLDER, *flags]) == 0
    got = [json.loads(line)["score"] for line in dst.read_text().splitlines()]
    assert_close(got, entry["scores"], SCORES_OTHER_BATCH)
