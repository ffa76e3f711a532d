"""Scoring conventions of causal-LM rerankers (the presets that bundle them with a prompt layout are in
``fastrank.presets``).

A convention says which vocabulary rows a reranker reads at the scoring position and how they become
one score per pair:

| convention   | score                                                     | normalize=True             |
| ------------ | --------------------------------------------------------- | -------------------------- |
| ``yes_logit`` | raw logit of one token ("Yes")                            | sigmoid                    |
| ``yes_no``    | ``l_yes - l_no`` as one fp32 row                          | sigmoid (= P(yes | yes,no)) |
| ``token_diff``| ``l_a - l_b`` for two given tokens                        | sigmoid                    |
| ``digit_ev``  | ``sum_d d * p(d)``, p the full-vocabulary softmax         | renormalised, rescaled to [0, 1] |
| ``classifier``| a cross-encoder's classification logit (no vocabulary)    | sigmoid                    |
| ``layerwise`` | a layer-wise reranker's per-layer head (no vocabulary)    | sigmoid                    |

Token strings are looked up with the model's own tokenizer and must each be one token. ``classifier`` is the
convention of sequence-classification models (FlagReranker, sentence-transformers' CrossEncoder), scored by
``fastrank.models.cross_encoder`` rather than through an LM head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

import fastrank.functional as F

CONVENTIONS = ("yes_logit", "yes_no", "token_diff", "digit_ev", "classifier", "layerwise")


@dataclass(frozen=True)
class Convention:
    """Which tokens a reranker reads and how their logits become a score. Build with the helpers below."""

    kind: str
    tokens: Tuple[str, ...]
    values: Tuple[float, ...] = ()  # digit_ev: the value of each token
    renormalize: bool = False  # digit_ev: renormalise the probabilities over the digits

    def __post_init__(self):
        if self.kind not in CONVENTIONS:
            raise ValueError(f"kind: {self.kind!r} is not a convention; choose from {', '.join(CONVENTIONS)}")
        expected = {"yes_logit": 1, "yes_no": 2, "token_diff": 2, "classifier": 0, "layerwise": 0}.get(self.kind)
        if expected is not None and len(self.tokens) != expected:
            raise ValueError(f"tokens: {self.kind} reads {expected} token(s), got {list(self.tokens)}")
        if self.kind == "digit_ev" and (len(self.values) != len(self.tokens) or not self.tokens):
            raise ValueError("values: digit_ev needs one value per token")

    @property
    def needs_lse(self) -> bool:
        return self.kind == "digit_ev"

    def token_ids(self, tokenizer) -> Tuple[int, ...]:
        return tuple(single_token_id(tokenizer, t) for t in self.tokens)


def yes_logit(token: str = "Yes") -> Convention:
    """The raw logit of ``token`` (FlagEmbedding's LLM rerankers read "Yes")."""
    return Convention("yes_logit", (token,))


def yes_no(yes: str = "yes", no: str = "no") -> Convention:
    """``l_yes - l_no`` computed as one fp32 row (Qwen3-Reranker); sigmoid gives P(yes)."""
    return Convention("yes_no", (yes, no))


def token_diff(a: str, b: str) -> Convention:
    """``l_a - l_b`` for two given tokens (mxbai-rerank-v2 uses "1" minus "0")."""
    return Convention("token_diff", (a, b))


def digit_ev(digits=("1", "2", "3", "4", "5", "6", "7"), values=None, renormalize: bool = False) -> Convention:
    """Expected value of the digits under the full-vocabulary softmax (lb-reranker's card score).

    Not renormalised by default, as the card computes it: probability mass outside the digits counts as
    zero. ``renormalize=True`` divides by the digits' total probability.
    """
    digits = tuple(digits)
    values = tuple(float(v) for v in (values if values is not None else range(1, len(digits) + 1)))
    return Convention("digit_ev", digits, values, renormalize)


def classifier() -> Convention:
    """A sequence-classification model's own logit (one label), read at the first token through the model's
    classification head: FlagReranker's and sentence-transformers' CrossEncoder score; sigmoid to normalise."""
    return Convention("classifier", ())


def layerwise() -> Convention:
    """A layer-wise reranker's score (FlagEmbedding's bge-reranker-v2-minicpm-layerwise): at each requested layer,
    that layer's own 1-output head on the normed hidden state of the last real token
    (``fastrank.models.layerwise``); sigmoid to normalise."""
    return Convention("layerwise", ())


def single_token_id(tokenizer, text: str) -> int:
    """The id of ``text`` as one token of ``tokenizer``; a clear error when it is not one token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokens: {text!r} is {len(ids)} tokens {ids} in the tokenizer {name!r}, not one; this convention "
            "needs answer tokens the model emits as single tokens (check the spelling and case)"
        )
    return int(ids[0])


def convention_scores(
    convention: Convention,
    token_ids: Tuple[int, ...],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    positions=None,
    cu_seqlens=None,
    normalize: bool = False,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Scores ``[N]`` (fp32) of ``convention`` at each sequence's scoring position, through score_head.

    ``softcap`` applies a model's final-logit soft-capping (Gemma 2: ``cap * tanh(l / cap)``) to the
    selected logits before they are combined; it cannot be combined with a full-vocabulary softmax.
    """
    kw = dict(bias=bias, attention_mask=attention_mask, positions=positions, cu_seqlens=cu_seqlens)
    kind = convention.kind
    if kind == "classifier":
        raise ValueError(
            "convention: 'classifier' is a sequence-classification model's own head, not LM-head rows; score it "
            "with fastrank.models.cross_encoder.CrossEncoderScorer (fastrank.Reranker does)"
        )
    if kind == "layerwise":
        raise ValueError(
            "convention: 'layerwise' reads each layer's own head, not LM-head rows; score it with "
            "fastrank.models.layerwise.LayerwiseMiniCPM (fastrank.Reranker does)"
        )
    if kind == "digit_ev":
        if softcap:
            raise ValueError(
                "convention: digit_ev needs the full-vocabulary softmax, which fastrank does not compute under "
                "final-logit soft-capping (this model's config sets final_logit_softcapping)"
            )
        res = F.score_head(hidden, weight, token_ids, return_lse=True, **kw)
        probs = torch.exp(res.logits - res.lse[:, None])
        values = torch.tensor(convention.values, dtype=probs.dtype, device=probs.device)
        if convention.renormalize or normalize:
            probs = probs / probs.sum(dim=1, keepdim=True)
        score = probs @ values
        if normalize:
            lo, hi = min(convention.values), max(convention.values)
            score = (score - lo) / (hi - lo)
        return score

    if kind == "yes_logit":
        logits = F.score_head(hidden, weight, token_ids, **kw)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        score = logits[:, 0]
    elif softcap:
        logits = F.score_head(hidden, weight, token_ids, **kw)
        logits = softcap * torch.tanh(logits / softcap)
        score = logits[:, 0] - logits[:, 1]
    else:
        # One fp32 row: the difference is formed from fp32 accumulators, never from rounded logits.
        score = F.score_head(hidden, weight, token_ids, combine=[1.0, -1.0], **kw)[:, 0]
    return torch.sigmoid(score) if normalize else score
