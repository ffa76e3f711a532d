"""Reranker: scores in input order, independent of batching and padding side, rank(), presets, errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_causal_lm, tiny_tokenizer
from tolerances import SAME_COMPUTATION, SCORES_OTHER_BATCH, assert_close

import fastrank
from fastrank.benchmarks.synthetic import synthetic_pairs
from fastrank.data.templates import SegmentTemplate

PAIRS = synthetic_pairs(11, seed=3, passage_words=(2, 60))


def _one_by_one(model, tokenizer, preset, pairs):
    """The reference for batching: each pair alone through the HF model's full logits."""
    reranker = fastrank.Reranker(model, tokenizer, preset)
    conv = reranker.preset.convention
    ids = conv.token_ids(tokenizer)
    out = []
    for encoded in reranker.tokenize(pairs):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([encoded.input_ids], device=model.device)).logits[0, -1].double()
        if conv.kind == "yes_logit":
            out.append(logits[ids[0]])
        elif conv.kind in ("yes_no", "token_diff"):
            out.append(logits[ids[0]] - logits[ids[1]])
        else:
            out.append((torch.softmax(logits, -1)[list(ids)] * torch.arange(1, 8, device=logits.device)).sum())
    return torch.stack(out)


@pytest.mark.parametrize("preset", ["bge-reranker-v2-gemma", "qwen3-reranker", "mxbai-rerank-v2", "lb-reranker"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_scores_independent_of_batching_and_padding(backend, device, preset, side):
    model = tiny_causal_lm("qwen2").to(device)
    tokenizer = tiny_tokenizer("qwen2", padding_side=side)
    reranker = fastrank.Reranker(model, tokenizer, preset)
    want = _one_by_one(model, tokenizer, preset, PAIRS)
    for batch_size, max_tokens in [(64, 32768), (3, 32768), (64, 256), (1, 32768)]:
        got = reranker.score(PAIRS, batch_size=batch_size, max_tokens=max_tokens)
        assert_close(got, want, SCORES_OTHER_BATCH, what=f"{preset} bs={batch_size} budget={max_tokens}")


def test_rank_shape_and_order(device):
    model = tiny_causal_lm("qwen2").to(device)
    reranker = fastrank.Reranker(model, tiny_tokenizer("qwen2"), "qwen3-reranker")
    docs = ["river water", {"text": "music album"}, "city history", "protein science"]
    ranked = reranker.rank("what river?", docs)
    scores = reranker.score(
        [
            ("what river?", "river water"),
            ("what river?", "music album"),
            ("what river?", "city history"),
            ("what river?", "protein science"),
        ]
    )
    assert [r["index"] for r in ranked] == sorted(range(4), key=lambda i: -scores[i])
    assert set(ranked[0]) == {"index", "relevance_score", "document"}
    assert ranked[[r["index"] for r in ranked].index(1)]["document"] == {"text": "music album"}
    top = reranker.rank("what river?", docs, top_k=2, normalize=True)
    assert len(top) == 2 and all(0 <= r["relevance_score"] <= 1 for r in top)
    assert [r["index"] for r in top] == [r["index"] for r in ranked[:2]]


def test_input_errors(device):
    reranker = fastrank.Reranker(tiny_causal_lm("qwen2").to(device), tiny_tokenizer("qwen2"), "qwen3-reranker")
    with pytest.raises(ValueError, match="^documents: must be a non-empty list"):
        reranker.rank("q", [])
    with pytest.raises(ValueError, match="^top_k"):
        reranker.rank("q", ["a"], top_k=0)
    with pytest.raises(ValueError, match=r"^documents\[1\]"):
        reranker.rank("q", ["a", 3])
    with pytest.raises(ValueError, match=r"^pairs\[1\]"):
        reranker.score([("q", "a"), ("q",)])
    with pytest.raises(ValueError, match="^preset: 'nope' is not a preset"):
        fastrank.Reranker(tiny_causal_lm("qwen2"), tiny_tokenizer("qwen2"), "nope")
    assert reranker.score([]) == []
    assert len(reranker.score(("one query", "one passage"))) == 1


def test_truncation_is_reported(device):
    reranker = fastrank.Reranker(tiny_causal_lm("qwen2").to(device), tiny_tokenizer("qwen2"), "bge-reranker-v2-gemma")
    long_pair = [("a question", "river water " * 400)]
    with pytest.warns(UserWarning, match="1 of 1 pairs exceeded max_length=64"):
        reranker.score(long_pair, max_length=64)


def test_custom_preset(device):
    preset = fastrank.Preset(
        "my-yes-no",
        fastrank.yes_no("Yes", "No"),
        SegmentTemplate(
            prefix="Query and passage:\n",
            query_format="Q: {query}",
            passage_format="P: {passage}",
            suffix="\nRelevant?",
        ),
        max_length=48,
        description="test preset",
    )
    fastrank.register_preset(preset, overwrite=True)
    assert "my-yes-no" in fastrank.presets()
    with pytest.raises(ValueError, match="already exists"):
        fastrank.register_preset(preset)
    model = tiny_causal_lm("llama").to(device)
    tokenizer = tiny_tokenizer("llama")
    reranker = fastrank.Reranker(model, tokenizer, "my-yes-no")
    encoded = reranker.tokenize(PAIRS)
    suffix = tokenizer("\nRelevant?", add_special_tokens=False)["input_ids"]
    for e in encoded:
        assert len(e.input_ids) <= 48 and e.input_ids[0] == tokenizer.bos_token_id
        assert e.input_ids[-len(suffix) :] == suffix
    assert_close(
        reranker.score(PAIRS), _one_by_one(model, tokenizer, preset, PAIRS), SCORES_OTHER_BATCH, what="custom preset"
    )


def test_from_pretrained_folder(tmp_path):
    model = tiny_causal_lm("qwen2")
    model.save_pretrained(tmp_path)
    tiny_tokenizer("qwen2").save_pretrained(tmp_path)
    reranker = fastrank.Reranker.from_pretrained(str(tmp_path), "qwen3-reranker", dtype="float32", device="cpu")
    again = fastrank.Reranker(model, reranker.tokenizer, "qwen3-reranker")
    assert_close(reranker.score(PAIRS[:3]), again.score(PAIRS[:3]), SAME_COMPUTATION, what="reloaded vs in memory")
    with pytest.raises(ValueError, match="^dtype"):
        fastrank.Reranker.from_pretrained(str(tmp_path), "qwen3-reranker", dtype="float33")


def test_no_full_vocabulary_logits(device, monkeypatch):
    """The LM head's forward is never called: only score_head touches its weight."""
    model = tiny_causal_lm("llama").to(device)
    reranker = fastrank.Reranker(model, tiny_tokenizer("llama"), "bge-reranker-v2-gemma")

    def forbidden(*args, **kwargs):
        raise AssertionError("lm_head.forward was called")

    monkeypatch.setattr(model.lm_head, "forward", forbidden)
    assert len(reranker.score(PAIRS[:4])) == 4
