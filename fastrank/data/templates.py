"""Prompt layouts of LLM rerankers: how a (query, passage) pair becomes token ids, and how it is cut.

Every template has ``tokenize(tokenizer, pairs, max_length) -> list[TokenizedPair]``. Truncation only ever
shortens the query or the passage text; the template's own text (instructions, separators, the prompt,
the chat suffix that the score is read after) is always kept whole. Each built-in template reproduces
its reference implementation's ids exactly, quirks included; see each class.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from fastrank.utils import positive_int

FLAG_LLM_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by "
    "providing a prediction of either 'Yes' or 'No'."
)
# The default prompt of FlagEmbedding's lightweight reranker (bge-reranker-v2.5-gemma2-lightweight).
FLAG_LIGHTWEIGHT_PROMPT = "Predict whether passage B contains an answer to query A."
LB_RERANKER_SYSTEM = (
    "Given a query and a piece of text, output a score of 1-7 based on how related the query is to the text. "
    "1 means least related and 7 is most related."
)
QWEN3_RERANKER_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN3_RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_RERANKER_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
MXBAI_V2_PREFIX = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
)
MXBAI_V2_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
MXBAI_V2_TASK = (
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)


@dataclass
class TokenizedPair:
    """Token ids of one pair and whether its query or passage was shortened to fit. ``segment_a``: for a
    cross-encoder whose tokenizer gives token type ids, how many leading ids are segment A (type 0; the rest
    are type 1); None when the model reads no token types."""

    input_ids: List[int]
    truncated: bool = False
    segment_a: Optional[int] = None


def _check_pairs(pairs) -> List[Tuple[str, str]]:
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"pairs[{i}]: expected a (query, passage) pair, got {type(pair).__name__}")
        q, p = pair
        if not isinstance(q, str) or not isinstance(p, str):
            raise ValueError(
                f"pairs[{i}]: query and passage must be strings, got ({type(q).__name__}, {type(p).__name__})"
            )
        out.append((q, p))
    return out


def _check_max_length(max_length) -> int:
    return positive_int("max_length", max_length)


def _encode_inputs(tokenizer, pairs, max_length):
    """Checked pairs and max_length, and the side the tokenizer truncates from."""
    return _check_pairs(pairs), _check_max_length(max_length), getattr(tokenizer, "truncation_side", "right")


def _check_format(name: str, text, required: Tuple[str, ...], allowed: Tuple[str, ...]) -> None:
    """A format string of a custom template, checked when the template is built rather than at its first pair:
    every ``{field}`` must be one of ``allowed`` and each of ``required`` must be there."""
    if not isinstance(text, str):
        raise ValueError(f"{name}: must be a string, got {type(text).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ValueError(
            f"{name}: {text!r} is not a valid format string ({e}); write a literal brace as '{{{{' or '}}}}'"
        ) from None
    known = ", ".join("{" + a + "}" for a in allowed)
    for f in fields:
        if f not in allowed:
            raise ValueError(f"{name}: {{{f}}} is not a field of this template; the fields are {known}")
    for r in required:
        if r not in fields:
            raise ValueError(f"{name}: {text!r} has no {{{r}}}; the text would never reach the model")


def _tokenize(tokenizer, texts: Sequence[str]) -> List[List[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def keep_tokens(ids: List[int], n: int, side: str) -> List[int]:
    """The first n ids (right truncation) or the last n (left truncation), as the tokenizer would cut."""
    n = max(0, n)
    if len(ids) <= n:
        return list(ids)
    return list(ids[len(ids) - n :]) if side == "left" else list(ids[:n])


def truncate_only_second(first: List[int], second: List[int], max_length: int, side: str) -> List[int]:
    """Transformers' ``truncation='only_second'`` on id lists, including its refusal to cut when the second
    sequence would have to disappear entirely (then nothing is cut)."""
    to_remove = len(first) + len(second) - max_length
    if to_remove <= 0 or len(second) <= to_remove:
        return list(second)
    return keep_tokens(second, len(second) - to_remove, side)


def default_bos(tokenizer) -> List[int]:
    """``[BOS]`` when the tokenizer has a BOS token that differs from its pad token (FlagEmbedding's rule), else
    ``[]``."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and bos != tokenizer.pad_token_id else []


class _ConstantIds:
    """Token ids of a template's constant strings, per tokenizer (tokenised once)."""

    def __init__(self):
        self._cache: Dict[int, Tuple[object, Dict[str, List[int]]]] = {}

    def __call__(self, tokenizer, text: str) -> List[int]:
        owner, table = self._cache.get(id(tokenizer), (None, None))
        if owner is not tokenizer:
            table = {}
            self._cache[id(tokenizer)] = (tokenizer, table)
        if text not in table:
            table[text] = list(_tokenize(tokenizer, [text])[0])
        return table[text]


@dataclass
class FlagLLMTemplate:
    """FlagEmbedding's LLM reranker layout (``FlagLLMReranker.compute_score``, package 1.3+).

    ``[BOS] + tok(query_instruction + q)[:query_max_length] + tok(sep) + tok(passage_instruction + p)[:max_length]``,
    the second part cut ``only_second`` to ``max_length + len(sep) + len(prompt)``, then ``tok(sep) +
    tok(prompt)`` appended: each segment tokenised on its own, never the joined string. BOS is added when
    the tokenizer has one that differs from its pad token (always with ``always_bos=True``, as FlagEmbedding's
    layer-wise and lightweight rerankers do). ``query_max_length`` defaults to
    ``max_length * 3 // 4``. As in the package, the final length can exceed ``max_length`` by up to
    ``2 * (len(sep) + len(prompt))`` tokens.
    """

    prompt: str = FLAG_LLM_PROMPT
    query_instruction: str = "A: "
    passage_instruction: str = "B: "
    sep: str = "\n"
    query_max_length: Optional[int] = None
    always_bos: bool = False
    _const: _ConstantIds = field(default_factory=_ConstantIds, repr=False, compare=False)

    def _bos(self, tokenizer) -> List[int]:
        if not self.always_bos:
            return default_bos(tokenizer)
        if tokenizer.bos_token_id is None:
            raise ValueError("tokenizer: has no BOS token, which this layout always starts with")
        return [tokenizer.bos_token_id]

    def tokenize(self, tokenizer, pairs, max_length: int) -> List[TokenizedPair]:
        pairs, max_length, side = _encode_inputs(tokenizer, pairs, max_length)
        queries = _tokenize(tokenizer, [self.query_instruction + q for q, _ in pairs])
        passages = _tokenize(tokenizer, [self.passage_instruction + p for _, p in pairs])
        sep = self._const(tokenizer, self.sep)
        prompt = self._const(tokenizer, self.prompt)
        bos = self._bos(tokenizer)
        encode_max = max_length + len(sep) + len(prompt)
        out = []
        for q_ids, p_ids in zip(queries, passages):
            q_cut = self._query_cut(q_ids, max_length, side)
            p_cut = keep_tokens(p_ids, max_length, side)
            first = bos + q_cut
            second = truncate_only_second(first, sep + p_cut, encode_max, side)
            truncated = len(q_cut) < len(q_ids) or len(p_cut) < len(p_ids) or len(second) < len(sep) + len(p_cut)
            out.append(TokenizedPair(first + second + sep + prompt, truncated))
        return out

    def shared_prefix(self, tokenizer, query: str, max_length: int) -> List[int]:
        """``[BOS] + tok(query_instruction + q)[:query_max_length] + tok(sep)``: what every pair of ``query``
        starts with (unless truncation cuts into the separator)."""
        side = getattr(tokenizer, "truncation_side", "right")
        q_cut = self._query_cut(_tokenize(tokenizer, [self.query_instruction + query])[0], max_length, side)
        return self._bos(tokenizer) + q_cut + self._const(tokenizer, self.sep)

    def _query_cut(self, q_ids: List[int], max_length: int, side: str) -> List[int]:
        return keep_tokens(q_ids, self.query_max_length or max_length * 3 // 4, side)


@dataclass
class MxbaiV2Template:
    """mixedbread-ai's mxbai-rerank-v2 layout (``MxbaiRerankV2.prepare_inputs``).

    ``prefix + [tok(instruction line + sep) +] tok("query: " + q)[:3/4 max_length]``, then ``sep +
    tok("document: " + d)`` cut to what the model's length leaves and then ``only_second`` to
    ``max_length``, then ``sep + task prompt + suffix``; each segment tokenised on its own.
    """

    instruction: Optional[str] = None
    _const: _ConstantIds = field(default_factory=_ConstantIds, repr=False, compare=False)

    def tokenize(self, tokenizer, pairs, max_length: int) -> List[TokenizedPair]:
        pairs, max_length, side = _encode_inputs(tokenizer, pairs, max_length)
        prefix, suffix, sep, task, predefined, model_max, max_length = self._frame(tokenizer, max_length)
        queries = _tokenize(tokenizer, [self._query_text(q) for q, _ in pairs])
        docs = _tokenize(tokenizer, ["document: " + p for _, p in pairs])
        out = []
        for q_ids, d_ids in zip(queries, docs):
            q_cut = keep_tokens(q_ids, max_length * 3 // 4, side)
            d_cut = keep_tokens(d_ids, min(model_max - len(q_cut) - predefined, max_length), side)
            second = truncate_only_second(q_cut, sep + d_cut, max_length, side)
            truncated = len(q_cut) < len(q_ids) or len(d_cut) < len(d_ids) or len(second) < len(sep) + len(d_cut)
            out.append(TokenizedPair(prefix + q_cut + second + sep + task + suffix, truncated))
        return out

    def shared_prefix(self, tokenizer, query: str, max_length: int) -> List[int]:
        """``prefix + [instruction] + tok("query: " + q)[:3/4 max_length] + tok(sep)``."""
        side = getattr(tokenizer, "truncation_side", "right")
        prefix, _, sep, _, _, _, max_length = self._frame(tokenizer, max_length)
        q_ids = _tokenize(tokenizer, [self._query_text(query)])[0]
        return prefix + keep_tokens(q_ids, max_length * 3 // 4, side) + sep

    def _frame(self, tokenizer, max_length: int):
        """The template's constant ids and the length budget: ``(prefix, suffix, sep, task, predefined, model_max,
        max_length)``, ``max_length`` lowered so the whole fits the tokenizer's ``model_max_length``."""
        prefix, suffix = self._const(tokenizer, MXBAI_V2_PREFIX), self._const(tokenizer, MXBAI_V2_SUFFIX)
        sep, task = self._const(tokenizer, "\n"), self._const(tokenizer, MXBAI_V2_TASK)
        predefined = len(prefix) + len(task) + len(suffix) + len(sep)
        model_max = int(min(getattr(tokenizer, "model_max_length", 1 << 30), 1 << 30))
        if max_length + predefined > model_max:
            max_length = model_max - predefined
        return prefix, suffix, sep, task, predefined, model_max, max_length

    def _query_text(self, query: str) -> str:
        lead = f"instruction: {self.instruction}\n" if self.instruction else ""
        return lead + "query: " + query


@dataclass
class Qwen3RerankerTemplate:
    """Qwen3-Reranker's layout (the model card's Transformers code).

    ``tok(prefix) + tok("<Instruct>: {i}\\n<Query>: {q}\\n<Document>: {d}")[:max_length - len(prefix) -
    len(suffix)] + tok(suffix)``, the suffix ending in the empty think block the score is read after.
    """

    instruction: str = QWEN3_RERANKER_INSTRUCTION
    _const: _ConstantIds = field(default_factory=_ConstantIds, repr=False, compare=False)

    def tokenize(self, tokenizer, pairs, max_length: int) -> List[TokenizedPair]:
        pairs, max_length, side = _encode_inputs(tokenizer, pairs, max_length)
        prefix = self._const(tokenizer, QWEN3_RERANKER_PREFIX)
        suffix = self._const(tokenizer, QWEN3_RERANKER_SUFFIX)
        budget = max_length - len(prefix) - len(suffix)
        if budget < 1:
            raise ValueError(
                f"max_length: {max_length} leaves no room for the query and document after the "
                f"{len(prefix) + len(suffix)}-token Qwen3-Reranker template"
            )
        bodies = _tokenize(
            tokenizer, [f"<Instruct>: {self.instruction}\n<Query>: {q}\n<Document>: {p}" for q, p in pairs]
        )
        return [TokenizedPair(prefix + keep_tokens(b, budget, side) + suffix, len(b) > budget) for b in bodies]

    def shared_prefix(self, tokenizer, query: str, max_length: int) -> List[int]:
        """``tok(prefix) + tok("<Instruct>: {i}\\n<Query>: {q}\\n")``. The body is tokenised whole, so a pair
        shares this only where the tokenizer cuts the body there too (checked per pair)."""
        head = _tokenize(tokenizer, [f"<Instruct>: {self.instruction}\n<Query>: {query}\n"])[0]
        return self._const(tokenizer, QWEN3_RERANKER_PREFIX) + list(head)


@dataclass
class ChatPairTemplate:
    """A pair rendered through the tokenizer's own chat template (lb-reranker's way, as vLLM's
    ``LLM.chat`` renders it): a system message, a user message made from ``user`` with ``{query}`` and
    ``{passage}``, and the generation prompt. The rendered string is tokenised whole, so the ids equal
    the reference's. When a pair exceeds ``max_length`` its passage is cut at a token boundary (then its
    query, if the passage is gone) and the message re-rendered, so the chat suffix always stays.
    """

    system: Optional[str]
    user: str

    def __post_init__(self):
        _check_format("user", self.user, ("query", "passage"), ("query", "passage"))
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"system: must be a string or None, got {type(self.system).__name__}")

    def render(self, tokenizer, query: str, passage: str) -> str:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "tokenizer: this preset renders a chat template, but the tokenizer has none; load the "
                "tokenizer of the model the preset is for (or set tokenizer.chat_template)"
            )
        messages = ([{"role": "system", "content": self.system}] if self.system is not None else []) + [
            {"role": "user", "content": self.user.format(query=query, passage=passage)}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def tokenize(self, tokenizer, pairs, max_length: int) -> List[TokenizedPair]:
        pairs = _check_pairs(pairs)
        max_length = _check_max_length(max_length)
        ids = _tokenize(tokenizer, [self.render(tokenizer, q, p) for q, p in pairs])
        out = []
        for (q, p), pair_ids in zip(pairs, ids):
            if len(pair_ids) <= max_length:
                out.append(TokenizedPair(list(pair_ids), False))
            else:
                out.append(TokenizedPair(self._fit(tokenizer, q, p, max_length), True))
        return out

    def shared_prefix(self, tokenizer, query: str, max_length: int) -> List[int]:
        """The rendered conversation up to where the passage goes, without the whitespace right before it,
        tokenised, less its last token. The rendered string is tokenised whole, so the text at the cut can
        merge with the passage's first characters: a byte-level BPE's last pre-token before the passage takes
        the newlines the passage starts with (``>>>\\n`` + ``\\n\\n\\n`` is ``>>>`` + ``\\n\\n\\n\\n`` in Qwen's
        tokenizer); dropping the whitespace and one more token keeps the cut clear of that. Every pair is still
        checked against its own ids."""
        marker = "\x00fastrank-passage\x00"
        text = self.render(tokenizer, query, marker)
        cut = text.find(marker)
        head = text[:cut].rstrip()
        if cut <= 0 or not head:
            return []
        return list(_tokenize(tokenizer, [head])[0][:-1])

    def _fit(self, tokenizer, query: str, passage: str, max_length: int) -> List[int]:
        side = getattr(tokenizer, "truncation_side", "right")
        texts = {"passage": passage, "query": query}
        for part in ("passage", "query"):
            extra = 0
            while True:
                ids = _tokenize(tokenizer, [self.render(tokenizer, texts["query"], texts["passage"])])[0]
                over = len(ids) - max_length
                if over <= 0:
                    return list(ids)
                part_ids = _tokenize(tokenizer, [texts[part]])[0]
                if not part_ids:
                    break
                # Re-encoding a decoded cut can merge differently at the edge: the loop re-checks the
                # length, and cuts one token more each time a round trip fails to shrink the text.
                cut = tokenizer.decode(keep_tokens(part_ids, len(part_ids) - over - extra, side))
                extra = extra + 1 if cut == texts[part] else 0
                texts[part] = cut
        raise ValueError(
            f"max_length: {max_length} is shorter than the chat template itself ({len(ids)} tokens with an "
            "empty query and passage)"
        )


@dataclass
class SegmentTemplate:
    """A general per-segment layout for custom presets:

    ``[BOS] + tok(prefix) + tok(query_format)[:q] + tok(separator) + tok(passage_format)[:rest] + tok(suffix)``

    where the query may take up to ``query_max_fraction`` of the tokens left after the template's own and
    the passage takes what remains, so the total never exceeds ``max_length``. ``add_bos``: ``"auto"``
    adds the tokenizer's BOS when it has one that differs from its pad token.
    """

    prefix: str = ""
    query_format: str = "{query}"
    separator: str = "\n"
    passage_format: str = "{passage}"
    suffix: str = ""
    query_max_fraction: float = 0.75
    add_bos: object = "auto"
    _const: _ConstantIds = field(default_factory=_ConstantIds, repr=False, compare=False)

    def __post_init__(self):
        _check_format("query_format", self.query_format, ("query",), ("query",))
        _check_format("passage_format", self.passage_format, ("passage",), ("passage",))
        for name in ("prefix", "separator", "suffix"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: must be a string, got {type(getattr(self, name)).__name__}")
        if not 0 < self.query_max_fraction < 1:
            raise ValueError(f"query_max_fraction: must be between 0 and 1, got {self.query_max_fraction!r}")

    def tokenize(self, tokenizer, pairs, max_length: int) -> List[TokenizedPair]:
        pairs, max_length, side = _encode_inputs(tokenizer, pairs, max_length)
        lead, sep, tail, budget = self._frame(tokenizer, max_length)
        if budget < 2:
            raise ValueError(f"max_length: {max_length} leaves no room for the query and passage after the template")
        queries = _tokenize(tokenizer, [self.query_format.format(query=q) for q, _ in pairs])
        passages = _tokenize(tokenizer, [self.passage_format.format(passage=p) for _, p in pairs])
        out = []
        for q_ids, p_ids in zip(queries, passages):
            q_cut = self._query_cut(q_ids, budget, side)
            p_cut = keep_tokens(p_ids, budget - len(q_cut), side)
            truncated = len(q_cut) < len(q_ids) or len(p_cut) < len(p_ids)
            out.append(TokenizedPair(lead + q_cut + sep + p_cut + tail, truncated))
        return out

    def shared_prefix(self, tokenizer, query: str, max_length: int) -> List[int]:
        """``[BOS] + tok(prefix) + tok(query_format)[:q] + tok(separator)``."""
        side = getattr(tokenizer, "truncation_side", "right")
        lead, sep, _, budget = self._frame(tokenizer, max_length)
        q_ids = _tokenize(tokenizer, [self.query_format.format(query=query)])[0]
        return lead + self._query_cut(q_ids, budget, side) + sep

    def _frame(self, tokenizer, max_length: int):
        """``(lead, sep, tail, budget)``: the ids before the query (BOS per ``add_bos``, the prefix), the
        separator's, the suffix's, and the tokens left for the query and the passage."""
        if self.add_bos == "auto":
            bos = default_bos(tokenizer)
        else:
            bos = [tokenizer.bos_token_id] if self.add_bos else []
        lead = bos + (self._const(tokenizer, self.prefix) if self.prefix else [])
        sep = self._const(tokenizer, self.separator) if self.separator else []
        tail = self._const(tokenizer, self.suffix) if self.suffix else []
        return lead, sep, tail, max_length - len(lead) - len(sep) - len(tail)

    def _query_cut(self, q_ids: List[int], budget: int, side: str) -> List[int]:
        return keep_tokens(q_ids, max(1, int(budget * self.query_max_fraction)), side)


CROSS_ENCODER_TRUNCATION = ("flag", "longest_first")


@dataclass
class CrossEncoderTemplate:
    """A (query, passage) pair as a cross-encoder (sequence-classification model) reads it: the tokenizer's own
    pair layout (``[CLS] q [SEP] p [SEP]`` for BERT, ``<s> q </s></s> p </s>`` for XLM-R) and its token type
    ids (``TokenizedPair.segment_a``). Bidirectional attention: the query's tokens see the passage's, so no
    pair shares a prefix with another (this template has no ``shared_prefix``).

    ``truncation="flag"`` is FlagEmbedding's ``FlagReranker.compute_score`` (1.4, on transformers 5):
    ``tok(query_instruction + q)`` cut to ``query_max_length`` (default ``max_length * 3 // 4``) and
    ``tok(passage_instruction + p)`` cut to ``max_length``, both without special tokens; then each cut is
    decoded back to text and the two texts tokenised as a pair, ``truncation="only_second"`` to ``max_length``
    (FlagEmbedding's stand-in for the ``prepare_for_model`` that transformers 5 removed). The round trip gives
    back the same ids except where a text holds a character the tokenizer maps to its unknown token (decoded,
    it is the text ``<unk>``, which re-tokenises as the special token) or a cut falls inside a word the kept
    part still reaches; those pairs go through the round trip, the others are assembled from their ids.
    ``truncation="longest_first"`` is sentence-transformers' ``CrossEncoder.predict``: the pair tokenised
    whole with ``truncation="longest_first"`` to ``max_length``. The two rules give the same ids when nothing
    is cut and no character is unknown.
    """

    truncation: str = "flag"
    query_max_length: Optional[int] = None
    query_instruction: str = ""
    passage_instruction: str = ""

    def __post_init__(self):
        if self.truncation not in CROSS_ENCODER_TRUNCATION:
            raise ValueError(
                f"truncation: must be one of {', '.join(CROSS_ENCODER_TRUNCATION)} (FlagReranker's or "
                f"sentence-transformers' rule), got {self.truncation!r}"
            )
        positive_int("query_max_length", self.query_max_length, none_ok=True)
        for name in ("query_instruction", "passage_instruction"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: must be a string, got {type(getattr(self, name)).__name__}")

    def tokenize(self, tokenizer, pairs, max_length: int) -> List[TokenizedPair]:
        pairs, max_length, side = _encode_inputs(tokenizer, pairs, max_length)
        if not pairs:
            return []
        specials = tokenizer.num_special_tokens_to_add(pair=True)
        if max_length <= specials:
            raise ValueError(
                f"max_length: {max_length} leaves no room for the query and passage after the tokenizer's "
                f"{specials} special tokens of a pair"
            )
        queries = [self.query_instruction + q for q, _ in pairs]
        passages = [self.passage_instruction + p for _, p in pairs]
        backend = _rust_backend(tokenizer)
        if self.truncation == "longest_first":
            if backend is None:
                return self._longest_first_slow(tokenizer, queries, passages, max_length)
            with _configured(tokenizer, "longest_first", max_length):
                encodings = backend.encode_batch(list(zip(queries, passages)))
            return [TokenizedPair(e.ids, bool(e.overflowing), _types_split(e.type_ids)) for e in encodings]
        qmax = self.query_max_length or max_length * 3 // 4
        if backend is None:
            q_ids, p_ids = _tokenize(tokenizer, queries), _tokenize(tokenizer, passages)
            return self._round_trip(tokenizer, q_ids, p_ids, qmax, max_length, side, specials)
        unique: Dict[str, int] = {}
        q_of = [unique.setdefault(q, len(unique)) for q in queries]
        with _configured(tokenizer, None, None):
            q_enc = backend.encode_batch(list(unique), add_special_tokens=False)
            p_enc = backend.encode_batch(passages, add_special_tokens=False)
        q_ids = [e.ids for e in q_enc]
        q_plain = [len(ids) <= qmax and not _has_unk(tokenizer, ids) for ids in q_ids]
        out: List[Optional[TokenizedPair]] = [None] * len(pairs)
        slow = []
        with _configured(tokenizer, "only_second", max_length):
            for i, (qi, p) in enumerate(zip(q_of, p_enc)):
                p_ids = p.ids
                plain = q_plain[qi] and not _has_unk(
                    tokenizer, p_ids[:max_length] if side == "right" else p_ids[-max_length:]
                )
                if plain and len(p_ids) > max_length:
                    plain = _cut_word_dropped(p.word_ids, max_length, max_length - specials - len(q_ids[qi]), side)
                if not plain:
                    slow.append(i)
                    continue
                try:
                    e = backend.post_process(q_enc[qi], p, add_special_tokens=True)
                except Exception as err:  # the tokenizers library raises a bare Exception for an impossible cut
                    raise _no_room(max_length, err) from None
                cut = len(p_ids) > max_length or bool(e.overflowing)
                out[i] = TokenizedPair(e.ids, cut, _types_split(e.type_ids))
        if slow:
            done = self._round_trip(
                tokenizer,
                [q_ids[q_of[i]] for i in slow],
                [p_enc[i].ids for i in slow],
                qmax,
                max_length,
                side,
                specials,
            )
            for i, pair in zip(slow, done):
                out[i] = pair
        return out

    @staticmethod
    def _round_trip(tokenizer, q_ids, p_ids, qmax, max_length, side, specials) -> List[TokenizedPair]:
        """FlagReranker's exact steps: cut, decode, tokenise the pair of texts ``only_second``."""
        q_cut = [keep_tokens(ids, qmax, side) for ids in q_ids]
        p_cut = [keep_tokens(ids, max_length, side) for ids in p_ids]
        encoded = pair_round_trip(tokenizer, q_cut, p_cut, max_length, "query_max_length")
        out = []
        for i, ids in enumerate(encoded["input_ids"]):
            cut = len(q_cut[i]) < len(q_ids[i]) or len(p_cut[i]) < len(p_ids[i])
            cut = cut or len(ids) < specials + len(q_cut[i]) + len(p_cut[i])
            out.append(TokenizedPair(list(ids), cut, _segment_a(encoded, i)))
        return out

    @staticmethod
    def _longest_first_slow(tokenizer, queries, passages, max_length) -> List[TokenizedPair]:
        encoded = tokenizer(queries, passages)
        over = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) > max_length]
        short = (
            tokenizer(
                [queries[i] for i in over],
                [passages[i] for i in over],
                truncation="longest_first",
                max_length=max_length,
            )
            if over
            else None
        )
        cut = {i: j for j, i in enumerate(over)}
        out = []
        for i, ids in enumerate(encoded["input_ids"]):
            if i in cut:
                out.append(TokenizedPair(list(short["input_ids"][cut[i]]), True, _segment_a(short, cut[i])))
            else:
                out.append(TokenizedPair(list(ids), False, _segment_a(encoded, i)))
        return out


def _rust_backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (its own calls go straight to it), or
    None for a tokenizer without one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch") or not hasattr(backend, "post_process"):
        return None
    return backend


class _configured:
    """The tokenizer's Rust backend set as transformers sets it for a call without padding and with the given
    truncation (``strategy`` None: none; the direction is the tokenizer's ``truncation_side``; special tokens
    in the text are special unless ``split_special_tokens``), and restored afterwards."""

    def __init__(self, tokenizer, strategy: Optional[str], max_length: Optional[int]):
        self.tokenizer, self.strategy, self.max_length = tokenizer, strategy, max_length

    def __enter__(self):
        backend = self.tokenizer.backend_tokenizer
        self.saved = (backend.truncation, backend.padding, backend.encode_special_tokens)
        backend.no_padding()
        if self.strategy is None:
            backend.no_truncation()
        else:
            side = getattr(self.tokenizer, "truncation_side", "right")
            backend.enable_truncation(self.max_length, stride=0, strategy=self.strategy, direction=side)
        backend.encode_special_tokens = bool(getattr(self.tokenizer, "split_special_tokens", False))
        return backend

    def __exit__(self, *exc):
        backend = self.tokenizer.backend_tokenizer
        truncation, padding, split = self.saved
        if truncation is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(**truncation)
        if padding is None:
            backend.no_padding()
        else:
            backend.enable_padding(**padding)
        backend.encode_special_tokens = split


def _has_unk(tokenizer, ids) -> bool:
    unk = tokenizer.unk_token_id
    return unk is not None and unk in ids


def _cut_word_dropped(word_ids, max_length: int, kept: int, side: str) -> bool:
    """Whether the word that a cut to ``max_length`` tokens splits (or ends on) lies wholly outside the ``kept``
    tokens the pair truncation keeps of them, so that re-tokenising it cannot change the pair's ids."""
    if kept <= 0:
        return False
    if side == "left":
        first = len(word_ids) - max_length  # the first kept token of the cut
        word = word_ids[first]
        end = first
        while end < len(word_ids) and word is not None and word_ids[end] == word:
            end += 1
        return end - first <= max_length - kept
    last = max_length - 1
    word = word_ids[last]
    start = last
    while start > 0 and word is not None and word_ids[start - 1] == word:
        start -= 1
    return start >= kept


def _no_room(max_length: int, err) -> ValueError:
    return ValueError(
        f"max_length: a query leaves no room for its passage within max_length={max_length} ({err}); lower "
        "query_max_length"
    )


def _types_split(type_ids) -> Optional[int]:
    """``segment_a`` from one pair's token type ids (None when all are 0); the types must be zeros then ones."""
    if 1 not in type_ids:
        return None
    a = type_ids.index(1)
    if any(t != 1 for t in type_ids[a:]) or any(t != 0 for t in type_ids[:a]):
        raise ValueError(
            f"tokenizer: its token type ids of a pair are {list(type_ids)}, not zeros then ones; fastrank's "
            "cross-encoder reads two segments"
        )
    return a


def pair_round_trip(tokenizer, first: Sequence[Sequence[int]], second: Sequence[Sequence[int]], max_length: int, knob):
    """FlagEmbedding's ``prepare_for_model_compat(tokenizer, first, second, truncation="only_second",
    max_length=max_length)`` on transformers 5, for many pairs at once: each id list decoded back to text (special
    tokens kept, no clean-up) and the two texts tokenised as a pair, with the tokenizer's special tokens and
    token types, only the second cut. ``knob`` names the setting to lower when the first alone is too long."""
    decode = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    try:
        return tokenizer(
            tokenizer.batch_decode([list(x) for x in first], **decode),
            tokenizer.batch_decode([list(x) for x in second], **decode),
            truncation="only_second",
            max_length=max_length,
        )
    except Exception as e:  # the tokenizers library raises a bare Exception for an impossible cut
        raise ValueError(
            f"max_length: a query leaves no room for its passage within max_length={max_length} ({e}); lower {knob}"
        ) from None


def _segment_a(encoded, i: int) -> Optional[int]:
    """``segment_a`` of pair ``i`` of a transformers ``BatchEncoding`` (None without token type ids)."""
    types = encoded.get("token_type_ids") if hasattr(encoded, "get") else None
    return None if types is None else _types_split(list(types[i]))


def shared_prefix_lengths(template, tokenizer, pairs, encoded: Sequence[TokenizedPair], max_length: int):
    """For each pair, how many of its leading ids it shares with every other pair of its query, or None.

    The template's ``shared_prefix`` gives the ids that depend on the query alone; a pair shares them only
    when its own ids start with exactly those and go on past them, which rules out a tokenizer merge across
    the cut and truncation that reached into the query. A template without ``shared_prefix`` shares nothing.
    """
    split = getattr(template, "shared_prefix", None)
    if split is None:
        return [None] * len(encoded)
    cache: Dict[str, List[int]] = {}
    out: List[Optional[int]] = []
    for (query, _), pair in zip(pairs, encoded):
        if query not in cache:
            cache[query] = list(split(tokenizer, query, max_length))
        head = cache[query]
        ids = pair.input_ids
        n = len(head)
        out.append(n if 0 < n < len(ids) and ids[:n] == head else None)
    return out


# Every template class by name, for presets saved to and loaded from a model folder.
TEMPLATES = {
    cls.__name__: cls
    for cls in (
        FlagLLMTemplate,
        MxbaiV2Template,
        Qwen3RerankerTemplate,
        ChatPairTemplate,
        SegmentTemplate,
        CrossEncoderTemplate,
    )
}
