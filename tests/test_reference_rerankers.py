"""Presets against the real reference implementations, on tiny models and tokenizers built in code.

- bge-reranker-v2-gemma against ``FlagEmbedding.FlagLLMReranker.compute_score`` (the pip package): scores
  with and without normalize, short pairs and pairs longer than max_length, and the exact token ids it feeds
  its model.
- mxbai-rerank-v2 against ``mxbai_rerank.MxbaiRerankV2.predict`` (the pip package).
- qwen3-reranker against the Qwen3-Reranker model card's Transformers code.
- lb-reranker against its card: the chat template, then the expected digit under the full softmax.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from references import require
from tiny_models import tiny_causal_lm, tiny_tokenizer
from tolerances import PROBABILITIES, SCORES_OTHER_BATCH, SCORES_SAME_FORWARD, assert_close

import fastrank
from fastrank.benchmarks.synthetic import synthetic_pairs

SHORT = synthetic_pairs(6, seed=1, passage_words=(3, 20))
# Queries past 3/4 of max_length and passages past max_length: every truncation rule fires.
LONG = synthetic_pairs(4, seed=2, query_words=(60, 90), passage_words=(150, 300))
MAX_LENGTH = 64


_SAVED = {}


def _saved(arch, tmp_path_factory):
    """A tiny causal LM and its tokenizer saved to disk, as the reference packages load them."""
    if arch not in _SAVED:
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        model = tiny_causal_lm(arch)
        tiny_tokenizer(arch).save_pretrained(path)
        model.save_pretrained(path)
        # Both sides use the tokenizer as loaded back from disk (for a Qwen2 folder, transformers rebuilds
        # it as a Qwen2Tokenizer with Qwen's own pre-tokenizer).
        from transformers import AutoTokenizer

        _SAVED[arch] = (arch, str(path), model, AutoTokenizer.from_pretrained(path))
    return _SAVED[arch]


@pytest.fixture(scope="module", params=["qwen2", "llama", "gemma", "mistral"])
def saved_model(request, tmp_path_factory):
    return _saved(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory):
    """The Qwen-family presets (mxbai-v2, Qwen3-Reranker, lb-reranker) are Qwen models."""
    return _saved("qwen2", tmp_path_factory)


def _real_ids(input_ids, attention_mask):
    return sorted(tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids, attention_mask))


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("pairs", [SHORT, LONG], ids=["short", "long"])
def test_flagembedding_llm_reranker(saved_model, pairs, normalize):
    FlagEmbedding = require("FlagEmbedding")
    arch, path, model, tokenizer = saved_model
    reference = FlagEmbedding.FlagLLMReranker(path, use_fp16=False, devices=["cpu"], batch_size=4)
    fed = []
    hook = reference.model.register_forward_pre_hook(
        lambda mod, args, kwargs: fed.extend(_real_ids(kwargs["input_ids"], kwargs["attention_mask"])),
        with_kwargs=True,
    )
    want = reference.compute_score([list(p) for p in pairs], max_length=MAX_LENGTH, normalize=normalize)
    hook.remove()

    ours = fastrank.Reranker(model, tokenizer, "bge-reranker-v2-gemma")
    got = ours.score(pairs, max_length=MAX_LENGTH, normalize=normalize, batch_size=3)
    assert_close(got, want, SCORES_OTHER_BATCH, what=f"{arch} scores")
    # FlagEmbedding's own call, as written for it: a list of [query, passage] lists, or one pair.
    same = ours.compute_score([list(p) for p in pairs], max_length=MAX_LENGTH, normalize=normalize)
    assert_close(same, want, SCORES_OTHER_BATCH, what=f"{arch} compute_score")
    # FlagEmbedding 1.4.2 answers one pair with a one-element list (its unwrapping is commented out); so do we.
    one = reference.compute_score(list(pairs[0]), max_length=MAX_LENGTH, normalize=normalize)
    mine = ours.compute_score(list(pairs[0]), max_length=MAX_LENGTH, normalize=normalize)
    assert isinstance(mine, list) and len(mine) == len(np.ravel(one)) == 1
    assert_close(mine, np.ravel(one), SCORES_SAME_FORWARD, what=f"{arch} compute_score of one pair")
    # The exact ids FlagEmbedding fed its model (its size probe runs the longest batch once more).
    encoded = sorted(tuple(e.input_ids) for e in ours.tokenize(pairs, MAX_LENGTH))
    assert sorted(set(fed)) == sorted(set(encoded))
    if pairs is LONG:
        assert all(e.truncated for e in ours.tokenize(pairs, MAX_LENGTH))
        if tokenizer.bos_token_id is not None:
            assert all(ids[0] == tokenizer.bos_token_id for ids in encoded)


def _prepare_for_model_shim(tokenizer):
    """transformers 5 removed ``tokenizer.prepare_for_model``, which mxbai-rerank 0.1.6 calls; restore it on
    the instance with FlagEmbedding's re-implementation of the legacy behaviour."""
    from FlagEmbedding.utils.tokenizer_compat import _truncate_second_sequence

    def prepare_for_model(
        first_ids, second_ids=None, *, truncation=None, max_length=None, add_special_tokens=True, **_
    ):
        assert not add_special_tokens, "mxbai-rerank calls it with add_special_tokens=False"
        second = _truncate_second_sequence(tokenizer, first_ids, second_ids or [], max_length, truncation)
        return {"input_ids": list(first_ids) + list(second)}

    if not hasattr(type(tokenizer), "prepare_for_model"):
        tokenizer.prepare_for_model = prepare_for_model


@pytest.mark.parametrize("pairs", [SHORT, LONG], ids=["short", "long"])
def test_mxbai_rerank_v2(qwen_model, pairs):
    mxbai = require("mxbai_rerank")
    require("FlagEmbedding")
    arch, path, model, tokenizer = qwen_model
    reference = mxbai.MxbaiRerankV2(path, device="cpu", torch_dtype=torch.float32, max_length=MAX_LENGTH)
    _prepare_for_model_shim(reference.tokenizer)
    want = reference.predict([q for q, _ in pairs], [p for _, p in pairs])
    ours = fastrank.Reranker(model, tokenizer, "mxbai-rerank-v2")
    got = ours.score(pairs, max_length=MAX_LENGTH)
    assert_close(got, want, SCORES_OTHER_BATCH, what="mxbai-rerank-v2 scores")


def test_qwen3_reranker_model_card_code(qwen_model):
    """The Qwen3-Reranker card's code: fixed prefix/suffix ids around the formatted body, truncated body,
    left padding, log-softmax over [no, yes] at the last position."""
    arch, path, model, tokenizer = qwen_model
    max_length = 96
    prefix = (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
        'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    )
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    prefix_tokens = tokenizer.encode(prefix, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(suffix, add_special_tokens=False)
    task = "Given a web search query, retrieve relevant passages that answer the query"
    texts = [f"<Instruct>: {task}\n<Query>: {q}\n<Document>: {d}" for q, d in SHORT + LONG]
    inputs = tokenizer(
        texts,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix_tokens) - len(suffix_tokens),
        add_special_tokens=False,
    )
    for i, ele in enumerate(inputs["input_ids"]):
        inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
    tokenizer.padding_side = "left"
    batch = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    with torch.no_grad():
        logits = model(**batch).logits[:, -1, :]
    want = torch.nn.functional.log_softmax(torch.stack([logits[:, no], logits[:, yes]], dim=1), dim=1)[:, 1].exp()

    got = fastrank.Reranker(model, tokenizer, "qwen3-reranker").score(
        SHORT + LONG, max_length=max_length, normalize=True
    )
    assert_close(got, want, SCORES_OTHER_BATCH, what="qwen3-reranker scores")


def test_lb_reranker_card(qwen_model):
    """lb-reranker's card: chat template with its system message, then sum_d d * p(d) over the full softmax."""
    arch, path, model, tokenizer = qwen_model
    system = (
        "Given a query and a piece of text, output a score of 1-7 based on how related the query is to the text. "
        "1 means least related and 7 is most related."
    )
    want = []
    for q, t in SHORT:
        chat = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"<<<Query>>>\n{q}\n\n<<<Context>>>\n{t}"},
        ]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
            "input_ids"
        ]
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0, -1].double(), -1)
        want.append(sum(d * probs[tokenizer.convert_tokens_to_ids(str(d))] for d in range(1, 8)))
    got = fastrank.Reranker(model, tokenizer, "lb-reranker").score(SHORT)
    assert_close(got, want, PROBABILITIES, what="lb-reranker scores")


def test_chat_template_truncation_keeps_the_suffix(qwen_model):
    arch, path, model, tokenizer = qwen_model
    preset = fastrank.get_preset("lb-reranker")
    encoded = preset.template.tokenize(tokenizer, LONG, 120)
    suffix = tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for e in encoded:
        assert e.truncated and len(e.input_ids) <= 120
        assert e.input_ids[-len(suffix) :] == suffix
    with pytest.raises(ValueError, match="^max_length: 10 is shorter than the chat template"):
        preset.template.tokenize(tokenizer, SHORT[:1], 10)
