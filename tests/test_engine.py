"""The packed, shared-prefix engine: HF models run packed through transformers' attention interface give the
scores of their own padded forward, every preset shares what its layout allows, and what the engine cannot
run exactly runs padded with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from references import require
from tiny_models import tiny_causal_lm, tiny_tokenizer
from tolerances import (
    BF16_LOGITS,
    GRADS_VS_REFERENCE,
    LOSS_VS_REFERENCE,
    SCORES_OTHER_BATCH,
    SCORES_SAME_FORWARD,
    assert_close,
)

import fastrank
from fastrank.benchmarks.synthetic import synthetic_pairs
from fastrank.data import packing
from fastrank.data.packing import pack, plan_packed_batches
from fastrank.data.templates import shared_prefix_lengths
from fastrank.engine import ATTENTION_NAME, disable_packing, enable_packing, packing_enabled

QUERIES = ["what is the river made of", "who wrote the album", "why"]


def _pairs(n_docs=4, seed=0):
    docs = synthetic_pairs(len(QUERIES) * n_docs, seed=seed, passage_words=(1, 40))
    return [(QUERIES[i % len(QUERIES)], p) for i, (_, p) in enumerate(docs)]


def _model(arch):
    return tiny_causal_lm(arch, attn_implementation="eager" if arch == "gemma2" else "sdpa")


PRESETS = ["bge-reranker-v2-gemma", "qwen3-reranker", "mxbai-rerank-v2", "lb-reranker"]


@pytest.mark.attention_kernel
@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_engine_through_the_attention_kernel(backend, device, arch):
    """The whole path on the varlen kernel (interpreted on CPU with the triton backend): GQA, shared
    prefixes, and Gemma 2's attention soft-capping and scaling."""
    model = _model(arch).to(device)
    tokenizer = tiny_tokenizer("qwen2" if arch == "qwen2" else "llama")
    pairs = [(QUERIES[i % 2], p) for i, (_, p) in enumerate(synthetic_pairs(4, seed=1, passage_words=(1, 8)))]
    padded = fastrank.Reranker(model, tokenizer, "bge-reranker-v2-gemma", packed=False).score(pairs)
    shared = fastrank.Reranker(model, tokenizer, "bge-reranker-v2-gemma").score(pairs)
    assert_close(shared, padded, SCORES_OTHER_BATCH, what=f"{arch} kernel vs padded")


# digit_ev (lb-reranker) needs the full softmax, which Gemma 2's final-logit soft-capping rules out (heads tests it).
ARCH_PRESETS = [
    (arch, preset)
    for arch in ("qwen2", "llama", "mistral", "gemma", "qwen3", "gemma2")
    for preset in PRESETS
    if not (arch == "gemma2" and preset == "lb-reranker")
]


@pytest.mark.parametrize("arch, preset", ARCH_PRESETS)
def test_packed_shared_scores_equal_padded(device, arch, preset):
    model = _model(arch).to(device)
    tokenizer = tiny_tokenizer("llama" if arch in ("llama", "mistral", "gemma", "gemma2") else "qwen2")
    pairs = _pairs()
    padded = fastrank.Reranker(model, tokenizer, preset, packed=False).score(pairs)
    assert not packing_enabled(model)
    reranker = fastrank.Reranker(model, tokenizer, preset)
    assert reranker.packed and packing_enabled(model)
    shared = reranker.score(pairs)
    assert_close(shared, padded, SCORES_OTHER_BATCH, what=f"{arch} {preset} shared vs padded")
    unshared = fastrank.Reranker(model, tokenizer, preset, share_prefix=False).score(pairs)
    assert_close(unshared, padded, SCORES_OTHER_BATCH, what=f"{arch} {preset} packed vs padded")
    small = reranker.score(pairs, batch_size=3, max_tokens=200)  # prefixes split over batches
    assert_close(small, padded, SCORES_OTHER_BATCH, what=f"{arch} {preset} small batches")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_shares_its_query_prefix(preset):
    """Each preset's prefix is the template head and the query: the same for the pairs of one query, a true
    prefix of every pair's ids, and for FlagEmbedding's layout (prompt after the passage) only the query part."""
    reranker = fastrank.Reranker(tiny_causal_lm("llama"), tiny_tokenizer("llama"), preset, packed=False)
    pairs = _pairs()
    encoded = reranker.tokenize(pairs)
    lengths = shared_prefix_lengths(reranker.preset.template, reranker.tokenizer, pairs, encoded, 512)
    assert all(n is not None for n in lengths), lengths
    for (q, _), e, n in zip(pairs, encoded, lengths):
        same_query = [e2.input_ids[:n] for (q2, _), e2 in zip(pairs, encoded) if q2 == q]
        assert all(s == e.input_ids[:n] for s in same_query)
        assert n < len(e.input_ids)
    if preset == "bge-reranker-v2-gemma":
        tok = reranker.tokenizer
        q = pairs[0][0]
        want = [tok.bos_token_id] + tok("A: " + q, add_special_tokens=False)["input_ids"]
        want += tok("\n", add_special_tokens=False)["input_ids"]
        assert encoded[0].input_ids[: lengths[0]] == want


def test_a_pair_whose_ids_differ_from_the_split_is_not_shared():
    """Truncation that reaches into the query (here a budget shorter than the query) leaves the pair
    unshared, and it still scores as the padded path does."""
    model = tiny_causal_lm("qwen2")
    tokenizer = tiny_tokenizer("qwen2")
    long_query = " ".join(["river"] * 60)
    pairs = [(long_query, "a short passage"), (long_query, "another one"), ("short", "text here")]
    reranker = fastrank.Reranker(model, tokenizer, "qwen3-reranker")
    encoded = reranker.tokenize(pairs, max_length=110)
    lengths = shared_prefix_lengths(reranker.preset.template, tokenizer, pairs, encoded, 110)
    assert lengths[0] is None and lengths[1] is None and lengths[2] is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = reranker.score(pairs, max_length=110)
        want = fastrank.Reranker(model, tokenizer, "qwen3-reranker", packed=False).score(pairs, max_length=110)
    assert_close(got, want, SCORES_OTHER_BATCH, what="truncated pairs")


def test_prefix_is_computed_once_per_batch(monkeypatch):
    model = tiny_causal_lm("qwen2")
    reranker = fastrank.Reranker(model, tiny_tokenizer("qwen2"), "qwen3-reranker")
    seen = []
    real = packing.pack

    def spy(*args, **kwargs):
        batch = real(*args, **kwargs)
        seen.append(batch)
        return batch

    monkeypatch.setattr(packing, "pack", spy)
    pairs = _pairs(n_docs=5)
    reranker.score(pairs)
    (batch,) = seen
    whole = sum(len(e.input_ids) for e in reranker.tokenize(pairs))
    assert batch.segments.prefix is not None
    assert int((batch.segments.prefix < 0).sum()) == len(QUERIES)  # one prefix segment per query
    assert batch.num_tokens < 0.8 * whole


def test_model_keeps_its_padded_forward():
    """Switching the instance to the "fastrank" backend leaves every other call of the model as it was."""
    model = tiny_causal_lm("qwen2")
    ids = torch.randint(5, 900, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    before = model(input_ids=ids, attention_mask=mask).logits
    assert enable_packing(model)
    assert model.config._attn_implementation == ATTENTION_NAME
    after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    other = tiny_causal_lm("qwen2")
    assert other.config._attn_implementation == "sdpa"  # per instance, never per class
    disable_packing(model)
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_model_runs_padded_with_a_warning():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=1031)).eval()
    with pytest.warns(UserWarning, match="running padded, not packed: model type 'gpt2'"):
        assert not enable_packing(model)
    assert not packing_enabled(model)


def test_sliding_window_shorter_than_a_pair_runs_padded():
    model = _model("gemma2")
    model.config.sliding_window = 16
    tokenizer = tiny_tokenizer("llama")
    pairs = _pairs(n_docs=2)
    want = fastrank.Reranker(model, tokenizer, "qwen3-reranker", packed=False).score(pairs)
    reranker = fastrank.Reranker(model, tokenizer, "qwen3-reranker")
    with pytest.warns(UserWarning, match="sliding window"):
        got = reranker.score(pairs)
    assert_close(got, want, SCORES_SAME_FORWARD, what="sliding-window fallback")


def test_plan_counts_prefixes_once_and_respects_budgets():
    lengths = [5, 7, 3, 9, 4]
    keys = ["a", "a", None, "b", "a"]
    heads = {"a": 10, "b": 6}
    batches = plan_packed_batches(lengths, keys, heads, max_tokens=30, max_items=3)
    assert sorted(i for b in batches for i in b) == list(range(5))
    for b in batches:
        assert len(b) <= 3
        used = sum(lengths[i] for i in b) + sum(heads[k] for k in {keys[i] for i in b} if k is not None)
        assert used <= 30 or len(b) == 1
    one = plan_packed_batches([50], [None], {}, max_tokens=10, max_items=4)
    assert one == [[0]]


def test_pack_layout():
    batch = pack([[7, 8], [9], [4, 5, 6]], prefixes=[[1, 2, 3]], prefix_of=[0, None, 0])
    assert batch.input_ids.tolist() == [[1, 2, 3, 7, 8, 4, 5, 6, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0]]
    assert batch.segments.cu_seqlens.tolist() == [0, 3, 5, 8, 9]
    assert batch.segments.prefix.tolist() == [-1, 0, 0, -1]
    assert batch.last_rows.tolist() == [4, 8, 7]
    assert batch.segments.max_seqlen == 3 and batch.segments.max_context == 6
    with pytest.raises(ValueError, match=r"items\[1\]: is empty"):
        pack([[1], []])
    with pytest.raises(ValueError, match=r"prefix_of\[0\]"):
        pack([[1]], prefixes=[[2]], prefix_of=[3])


# ------------------------------------------------------------------------------------------------
# embedders and training
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_packed_embedder_equals_padded(backend, device, arch):
    from test_embedder import _tiny_bert

    encoder = fastrank.BiEncoder(_tiny_bert(device, arch), tiny_tokenizer("qwen2", "right"), pooling="mean")
    texts = [p for _, p in _pairs(n_docs=3)]
    want = fastrank.Embedder(encoder, packed=False).encode(texts, convert_to="torch")
    embedder = fastrank.Embedder(encoder)
    assert embedder.packed
    got = embedder.encode(texts, convert_to="torch", batch_size=4)
    assert_close(got, want, SCORES_OTHER_BATCH, what=f"{arch} packed embeddings")


def test_packed_llara_equals_padded(backend, device):
    encoder = fastrank.LlaraEncoder(tiny_causal_lm("llama").to(device), tiny_tokenizer("llama", "right"))
    texts = [p for _, p in _pairs(n_docs=2)]
    want = fastrank.Embedder(encoder, packed=False).encode(texts, kind="query", convert_to="torch")
    got = fastrank.Embedder(encoder).encode(texts, kind="query", convert_to="torch")
    assert_close(got, want, SCORES_OTHER_BATCH, what="LLARA packed embeddings")


def _reranker_batch(tmp_path, tok, labels: bool):
    from test_reranker_training import _rows, _write_jsonl

    _write_jsonl(tmp_path / "train.jsonl", _rows(3, negs=4, scores=False))
    data = fastrank.RerankTrainDataset(
        str(tmp_path / "train.jsonl"),
        tok,
        train_group_size=4,
        query_max_len=16,
        passage_max_len=24,
        answer="Yes" if labels else None,
    )
    return [data[0], data[1], data[2]]


@pytest.mark.parametrize("labels", [True, False], ids=["research", "package"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_training_equals_padded(backend, device, tmp_path, labels, checkpointing):
    """One query prefix per group, G passages after it: scores, loss and every parameter's gradient equal the
    padded batch's, with and without gradient checkpointing."""
    from test_reranker_training import _grads

    tok = tiny_tokenizer("llama", "left")
    items = _reranker_batch(tmp_path, tok, labels)
    padded = {k: v.to(device) for k, v in fastrank.RerankCollator(tok)(items)["pair"].items()}
    shared = fastrank.RerankCollator(tok, share_prefix=True)(items)["pair"]
    whole = int(padded["attention_mask"].sum())
    assert shared["num_tokens"] < whole  # each query's prefix once
    shared = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in shared.items()}
    lm = tiny_causal_lm("llama").to(device)
    twin = tiny_causal_lm("llama").to(device)
    twin.load_state_dict(lm.state_dict())
    a = fastrank.LLMRerankerModel(lm, tok, train_group_size=4).train()
    b = fastrank.LLMRerankerModel(twin, tok, train_group_size=4).train()
    if checkpointing:
        b.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out_a, out_b = a(pair=padded), b(pair=shared)
    assert packing_enabled(twin)
    assert_close(out_b.scores, out_a.scores, SCORES_OTHER_BATCH, what="scores")
    assert_close(out_b.loss, out_a.loss, LOSS_VS_REFERENCE, what="loss")
    out_a.loss.backward()
    out_b.loss.backward()
    want, got = _grads(lm), _grads(twin)
    assert want.keys() == got.keys()
    for name in want:
        assert_close(got[name], want[name], GRADS_VS_REFERENCE, what=name)


def test_shared_prefix_training_with_lora(device, tmp_path):
    peft = require("peft")
    from test_reranker_training import _grads

    tok = tiny_tokenizer("qwen2", "left")
    items = _reranker_batch(tmp_path, tok, labels=True)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    losses, grads = [], []
    for share in (False, True):
        torch.manual_seed(0)
        lm = peft.get_peft_model(tiny_causal_lm("qwen2").to(device), config)
        model = fastrank.LLMRerankerModel(lm, tok, train_group_size=4).train()
        pair = fastrank.RerankCollator(tok, share_prefix=share)(items)["pair"]
        pair = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in pair.items()}
        loss = model(pair=pair).loss
        loss.backward()
        losses.append(loss)
        grads.append(_grads(lm))
    assert_close(losses[1], losses[0], LOSS_VS_REFERENCE, what="LoRA loss")
    assert grads[0] and all("lora_" in n for n in grads[0])
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], GRADS_VS_REFERENCE, what=name)


def test_packed_embedder_training_equals_padded(backend, device):
    from test_embedder import _tiny_bert
    from test_reranker_training import _grads

    tok = tiny_tokenizer("qwen2", "right")
    pairs = _pairs(n_docs=2)
    items = [
        {"query": q, "passages": [p, pairs[(i + 1) % len(pairs)][1]], "teacher_scores": None}
        for i, (q, p) in enumerate(pairs[:4])
    ]
    losses, grads = [], []
    for packed in (False, True):
        bert = _tiny_bert(device)
        for module in bert.modules():  # dropout draws differ between layouts; the packed op has none
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        encoder = fastrank.BiEncoder(bert, tok, pooling="mean", temperature=0.05).train()
        if packed:
            assert enable_packing(bert)
        batch = fastrank.EmbedderCollator(encoder, 16, 24, packed=packed)(items)
        to = lambda f: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in f.items()}  # noqa: E731
        out = encoder(query=to(batch["query"]), passage=to(batch["passage"]))
        out.loss.backward()
        losses.append(out.loss)
        grads.append(_grads(bert))
    assert_close(losses[1], losses[0], LOSS_VS_REFERENCE, what="embedder loss")
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], GRADS_VS_REFERENCE, what=name)


def test_packed_forward_under_torch_compile():
    """The backbone compiled (dynamo capture; the eager backend needs no C++ compiler) still runs packed and
    scores as the padded path does."""
    model = tiny_causal_lm("qwen2")
    tokenizer = tiny_tokenizer("qwen2")
    pairs = _pairs(n_docs=2)
    want = fastrank.Reranker(model, tokenizer, "qwen3-reranker", packed=False).score(pairs)
    reranker = fastrank.Reranker(model, tokenizer, "qwen3-reranker")
    model.model.forward = torch.compile(model.model.forward, backend="eager")
    assert_close(reranker.score(pairs), want, SCORES_OTHER_BATCH, what="compiled backbone")


@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_packed_shared_scores_equal_padded_bf16(device, arch):
    """A bf16 model: packed and shared scores against the padded path's, within the bf16 logits tolerance the
    scoring tests use (both keep fp32 scores; the hidden states differ by bf16 roundings of other orders)."""
    model = tiny_causal_lm(arch, dtype=torch.bfloat16).to(device)
    tokenizer = tiny_tokenizer(arch)
    pairs = _pairs()
    want = fastrank.Reranker(model, tokenizer, "qwen3-reranker", packed=False).score(pairs)
    got = fastrank.Reranker(model, tokenizer, "qwen3-reranker").score(pairs)
    assert_close(got, want, BF16_LOGITS, what=f"{arch} bf16 shared vs padded")


def test_packed_training_under_autocast(tmp_path):
    """The Trainer's bf16 over fp32 weights is autocast, where RoPE leaves q and k in fp32 and v in bf16: the
    packed forward casts them as torch's sdpa does, and its loss and gradients follow the padded forward's."""
    from test_reranker_training import _grads

    tok = tiny_tokenizer("qwen2", "left")
    items = _reranker_batch(tmp_path, tok, labels=True)
    losses, grads = [], []
    for share in (False, True):
        lm = tiny_causal_lm("qwen2")
        model = fastrank.LLMRerankerModel(lm, tok, train_group_size=4).train()
        pair = fastrank.RerankCollator(tok, share_prefix=share)(items)["pair"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(pair=pair).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(_grads(lm))
    # bf16 keeps 8 bits (u = 2**-8): two layers of bf16 matmuls, differently batched, move an O(1) loss and
    # O(1) gradients by a few units of u
    assert_close(losses[1], losses[0], atol=0.03, rtol=0.03, what="loss under autocast")
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], atol=0.05, rtol=0.05, what=name)
