"""Bad input to the public API gets a ValueError that names the argument, never a silent default, a wrong
answer or a raw TypeError/OverflowError/KeyError from deep inside; and a reranker's preset is read from its
checkpoint or required, never guessed."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_causal_lm, tiny_tokenizer
from tolerances import SAME_COMPUTATION, assert_close

import fastrank
from fastrank.data import SegmentTemplate
from fastrank.data.templates import ChatPairTemplate
from fastrank.presets import PRESET_FILE, detect_preset, preset_from_dict, preset_to_dict, save_preset


@pytest.fixture(scope="module")
def reranker():
    return fastrank.Reranker(tiny_causal_lm("qwen2"), tiny_tokenizer("qwen2"), "qwen3-reranker")


@pytest.fixture(scope="module")
def embedder():
    return fastrank.Embedder(fastrank.BiEncoder(tiny_causal_lm("qwen2"), tiny_tokenizer("qwen2")))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_length=0), "max_length: must be a positive int or None, got 0"),
        (dict(max_length=-5), "max_length: must be a positive int or None, got -5"),
        (dict(batch_size=0), "batch_size: must be a positive int, got 0"),
        (dict(max_tokens=True), "max_tokens: must be a positive int, got True"),
    ],
)
def test_reranker_score_refuses_non_positive_sizes(reranker, kwargs, message):
    with pytest.raises(ValueError, match=message):
        reranker.score([("q", "p")], **kwargs)


def test_reranker_rank_inputs(reranker):
    with pytest.raises(ValueError, match="documents: got one string; pass a list"):
        reranker.rank("q", "abc")
    with pytest.raises(ValueError, match="top_k: must be a positive int or None, got -1"):
        reranker.rank("q", ["a", "b"], top_k=-1)
    with pytest.raises(ValueError, match="pairs: expected a list of"):
        reranker.score("q")
    assert [r["index"] for r in reranker.rank("q", ["a", "b", "c"], top_k=2)] == [
        r["index"] for r in reranker.rank("q", ["a", "b", "c"])
    ][:2]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda e: e.encode(["a"], kind="doc"), "kind: must be 'query' or 'passage', got 'doc'"),
        (lambda e: e.encode(["a"], max_length=-5), "max_length: must be a positive int or None, got -5"),
        (lambda e: e.encode(["a"], max_length=0), "max_length: must be a positive int or None, got 0"),
        (lambda e: e.encode(None), "texts: expected a string or a list of strings, got NoneType"),
        (lambda e: e.encode(["a", 3]), r"texts\[1\]: expected a string, got int"),
        (lambda e: e.encode(["a"], batch_size=0), "batch_size: must be a positive int, got 0"),
    ],
)
def test_embedder_encode_inputs(embedder, call, message):
    with pytest.raises(ValueError, match=message):
        call(embedder)


def test_custom_template_fields_are_checked_when_built():
    with pytest.raises(
        ValueError, match=r"query_format: \{qury\} is not a field of this template; the fields are \{query\}"
    ):
        SegmentTemplate(query_format="Query: {qury}")
    with pytest.raises(ValueError, match="passage_format: 'Passage' has no {passage}"):
        SegmentTemplate(passage_format="Passage")
    with pytest.raises(ValueError, match="user: .* has no {passage}"):
        ChatPairTemplate(system=None, user="{query}")
    with pytest.raises(ValueError, match="query_max_fraction"):
        SegmentTemplate(query_max_fraction=1.5)
    assert SegmentTemplate(query_format="{{literal}} {query}").query_format  # escaped braces are text


def test_contrastive_loss_names_q_on_a_device_mismatch():
    q = torch.randn(2, 4)
    with pytest.raises(ValueError, match="p: is on meta but q is on cpu"):
        fastrank.contrastive_loss(q, torch.empty(4, 4, device="meta"), temperature=0.05)


@pytest.mark.parametrize(
    "name, preset",
    [
        ("Qwen/Qwen3-Reranker-0.6B", "qwen3-reranker"),
        ("mixedbread-ai/mxbai-rerank-base-v2", "mxbai-rerank-v2"),
        ("lightblue/lb-reranker-0.5B-v1.0", "lb-reranker"),
        ("BAAI/bge-reranker-v2-gemma", "bge-reranker-v2-gemma"),
    ],
)
def test_public_rerankers_are_recognised_by_name(name, preset, tmp_path):
    assert detect_preset(name).name == preset
    folder = tmp_path / name.split("/")[1]  # a local copy keeps its checkpoint's name
    folder.mkdir()
    assert detect_preset(str(folder)).name == preset
    inside = folder / "checkpoint-500"  # a folder is known by its own name, not by its parent's
    inside.mkdir()
    with pytest.raises(ValueError, match="preset: cannot tell which reranker"):
        detect_preset(str(inside))


def test_unknown_checkpoint_needs_a_preset(tmp_path):
    model = tiny_causal_lm("qwen2")
    model.save_pretrained(tmp_path / "my-model")
    tiny_tokenizer("qwen2").save_pretrained(tmp_path / "my-model")
    with pytest.raises(ValueError, match="preset: cannot tell which reranker .*my-model.* pass preset="):
        fastrank.Reranker.from_pretrained(str(tmp_path / "my-model"), device="cpu")
    with pytest.raises(ValueError, match="preset: cannot tell which reranker"):
        fastrank.Reranker.from_pretrained(model, tokenizer=tiny_tokenizer("qwen2"), device="cpu")
    ours = fastrank.Reranker.from_pretrained(str(tmp_path / "my-model"), "qwen3-reranker", device="cpu")
    assert ours.preset.name == "qwen3-reranker"


def test_a_saved_preset_travels_with_the_model(tmp_path):
    custom = fastrank.Preset(
        "judge",
        fastrank.yes_no("yes", "no"),
        SegmentTemplate(prefix="Judge.\n", query_format="Q: {query}", suffix="\nA:"),
        max_length=64,
    )
    assert preset_from_dict(json.loads(json.dumps(preset_to_dict(custom)))) == custom
    assert preset_to_dict("lb-reranker") == {"preset": "lb-reranker"}
    model, tokenizer = tiny_causal_lm("qwen2"), tiny_tokenizer("qwen2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    save_preset(custom, str(tmp_path))
    assert (tmp_path / PRESET_FILE).exists()
    loaded = fastrank.Reranker.from_pretrained(str(tmp_path), device="cpu")
    assert loaded.preset == custom
    pairs = [("what is a river?", "a stream of water"), ("q", "p")]
    assert_close(
        loaded.score(pairs),
        fastrank.Reranker(model, tokenizer, custom).score(pairs),
        SAME_COMPUTATION,
        what="reloaded with its preset",
    )


def test_model_folders_and_devices(tmp_path):
    with pytest.raises(ValueError, match=f"path_or_model: there is no folder {tmp_path}/missing"):
        fastrank.Reranker.from_pretrained(str(tmp_path / "missing"), "qwen3-reranker")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file; give the folder"):
        fastrank.Embedder.from_pretrained(str(tmp_path / "file.txt"))
    with pytest.raises(ValueError, match="device: 'gpu0' is not a device"):
        fastrank.Embedder.from_pretrained(tiny_causal_lm("qwen2"), tokenizer=tiny_tokenizer("qwen2"), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' asks for CUDA, but torch sees no CUDA device"):
            fastrank.Embedder.from_pretrained(tiny_causal_lm("qwen2"), tokenizer=tiny_tokenizer("qwen2"), device="cuda")


def test_training_options_are_checked_when_built(tmp_path):
    from fastrank.training import TrainingOptions, train_reranker

    with pytest.raises(ValueError, match="train_group_size: must be a positive int, got 0"):
        TrainingOptions(output=str(tmp_path), data=["x.jsonl"], train_group_size=0)
    with pytest.raises(ValueError, match="data: give at least one"):
        TrainingOptions(output=str(tmp_path), data=[])
    with pytest.raises(ValueError, match="warmup_ratio"):
        TrainingOptions(output=str(tmp_path), data="x.jsonl", warmup_ratio=1.5)
    assert TrainingOptions(output=str(tmp_path), data="x.jsonl").data == ["x.jsonl"]
    with pytest.raises(ValueError, match="layout: must be 'research' or 'package'"):
        train_reranker(str(tmp_path), TrainingOptions(output=str(tmp_path), data="x.jsonl"), layout="other")
