"""Scoring conventions of causal-LM rerankers and the presets that bundle them with a prompt layout.

A convention says which vocabulary rows a reranker reads at the scoring position and how they become
one score per pair:

| convention   | score                                                     | normalize=True             |
| ------------ | --------------------------------------------------------- | -------------------------- |
| ``yes_logit`` | raw logit of one token ("Yes")                            | sigmoid                    |
| ``yes_no``    | ``l_yes - l_no`` as one fp32 row                          | sigmoid (= P(yes | yes,no)) |
| ``token_diff``| ``l_a - l_b`` for two given tokens                        | sigmoid                    |
| ``digit_ev``  | ``sum_d d * p(d)``, p the full-vocabulary softmax         | renormalised over the digits, rescaled to [0, 1] |

Token strings are looked up with the model's own tokenizer and must each be one token.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

import fastrank.functional as F

CONVENTIONS = ("yes_logit", "yes_no", "token_diff", "digit_ev")


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
        expected = {"yes_logit": 1, "yes_no": 2, "token_diff": 2}.get(self.kind)
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


# ------------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """A reranker's convention, prompt layout and length budget, under one name.

    ``template`` is a ``fastrank.data.templates`` template (anything with ``encode(tokenizer, query,
    passage, max_length)``); ``max_length`` is the default token budget passed to it.
    """

    name: str
    convention: Convention
    template: object
    max_length: int = 512
    description: str = ""
    defaults: Dict[str, object] = field(default_factory=dict)


_PRESETS: Dict[str, Preset] = {}


def register_preset(preset: Preset, *, overwrite: bool = False) -> Preset:
    """Make ``preset`` available by name to ``Reranker.from_pretrained``, ``patch`` and the CLI."""
    if not isinstance(preset, Preset):
        raise ValueError(f"preset: expected a fastrank.Preset, got {type(preset).__name__}")
    if preset.name in _PRESETS and not overwrite:
        raise ValueError(f"preset: {preset.name!r} already exists; pass overwrite=True to replace it")
    _PRESETS[preset.name] = preset
    return preset


def presets() -> Dict[str, str]:
    """Names of the registered presets and what each one reproduces."""
    _register_builtins()
    return {name: p.description for name, p in _PRESETS.items()}


def get_preset(preset) -> Preset:
    """A ``Preset`` from a name or a ``Preset`` instance."""
    _register_builtins()
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, str) and preset in _PRESETS:
        return _PRESETS[preset]
    raise ValueError(f"preset: {preset!r} is not a preset; choose from {', '.join(_PRESETS)} or pass a fastrank.Preset")


_BUILTINS_DONE = False


def _register_builtins():
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    from fastrank.data import templates as T

    for preset in (
        Preset(
            "bge-reranker-v2-gemma",
            yes_logit("Yes"),
            T.FlagLLMTemplate(),
            max_length=512,
            description="FlagEmbedding's LLM reranker (BAAI/bge-reranker-v2-gemma): BOS + 'A: '+query, '\\n', "
            "'B: '+passage, '\\n', prompt, per-segment tokenisation; raw 'Yes' logit",
        ),
        Preset(
            "lb-reranker",
            digit_ev(),
            T.ChatPairTemplate(
                system=T.LB_RERANKER_SYSTEM, user="<<<Query>>>\n{query}\n\n<<<Context>>>\n{passage}"
            ),
            max_length=8192,
            description="lightblue/lb-reranker-0.5B-v1.0: Qwen chat template, 1-7 rating, expected value of "
            "the digit under the full softmax (not renormalised)",
        ),
        Preset(
            "qwen3-reranker",
            yes_no("yes", "no"),
            T.Qwen3RerankerTemplate(),
            max_length=8192,
            description="Qwen/Qwen3-Reranker: system/user/assistant template ending in an empty think "
            "block; 'yes' minus 'no' (sigmoid = P(yes))",
        ),
        Preset(
            "mxbai-rerank-v2",
            token_diff("1", "0"),
            T.MxbaiV2Template(),
            max_length=8192,
            description="mixedbread-ai/mxbai-rerank-base/large-v2: Qwen chat prefix, query/document/task "
            "prompt; '1' minus '0'",
        ),
    ):
        _PRESETS.setdefault(preset.name, preset)


# ------------------------------------------------------------------------------------------------
# which preset a checkpoint needs
# ------------------------------------------------------------------------------------------------
PRESET_FILE = "fastrank_reranker.json"

# Public checkpoints recognised by name (a hub name, or a local folder named after its checkpoint).
_NAME_PATTERNS = (
    (re.compile(r"qwen3[-_]?reranker", re.IGNORECASE), "qwen3-reranker"),
    (re.compile(r"mxbai[-_]rerank[-_].*v2", re.IGNORECASE), "mxbai-rerank-v2"),
    (re.compile(r"lb[-_]reranker", re.IGNORECASE), "lb-reranker"),
    (re.compile(r"bge[-_]reranker[-_]v2[-_]gemma", re.IGNORECASE), "bge-reranker-v2-gemma"),
)


def preset_to_dict(preset: Preset) -> dict:
    """A JSON-able description of ``preset``: its name alone for a registered built-in, else the convention,
    the template (its class and fields) and the length budget."""
    preset = get_preset(preset)
    if _PRESETS.get(preset.name) is preset:
        return {"preset": preset.name}
    from fastrank.data import templates

    template = preset.template
    kind = type(template).__name__
    if templates.TEMPLATES.get(kind) is not type(template):
        raise ValueError(f"preset: its template {kind} is not one of fastrank.data.templates' and cannot be saved")
    fields = {f.name: getattr(template, f.name) for f in dataclasses.fields(template) if not f.name.startswith("_")}
    conv = preset.convention
    return {
        "name": preset.name,
        "convention": {"kind": conv.kind, "tokens": list(conv.tokens), "values": list(conv.values),
                       "renormalize": conv.renormalize},
        "template": {"type": kind, **fields},
        "max_length": preset.max_length,
        "description": preset.description,
    }


def preset_from_dict(data: dict, where: str = "preset") -> Preset:
    """The preset ``preset_to_dict`` described."""
    from fastrank.data import templates

    if "preset" in data:
        return get_preset(data["preset"])
    try:
        conv = data["convention"]
        spec = dict(data["template"])
        template_cls = templates.TEMPLATES[spec.pop("type")]
        return Preset(
            data["name"],
            Convention(conv["kind"], tuple(conv["tokens"]), tuple(conv.get("values", ())), conv.get("renormalize", False)),
            template_cls(**spec),
            max_length=int(data["max_length"]),
            description=data.get("description", ""),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: not a fastrank preset description ({type(e).__name__}: {e})") from None


def save_preset(preset, folder: str) -> str:
    """Write ``preset`` next to a model in ``folder`` (``fastrank_reranker.json``), so that
    ``Reranker.from_pretrained(folder)`` scores with it without being told."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PRESET_FILE)
    with open(path, "w") as f:
        json.dump(preset_to_dict(preset), f, indent=2)
    return path


def detect_preset(source: Optional[str]) -> Preset:
    """The preset of the checkpoint at ``source`` (a local folder or a hub name).

    A folder that fastrank wrote holds its preset (``fastrank_reranker.json``); a public reranker is recognised
    by its name (Qwen3-Reranker, mxbai-rerank-*-v2, lb-reranker, bge-reranker-v2-gemma). Anything else raises,
    since scoring with another reranker's layout gives wrong scores without any other sign.
    """
    if source and os.path.isdir(source):
        path = os.path.join(source, PRESET_FILE)
        if os.path.exists(path):
            with open(path) as f:
                return preset_from_dict(json.load(f), where=path)
    name = os.path.basename(os.path.normpath(source)) if source and os.path.isdir(source) else (source or "")
    for candidate in (name, source or ""):
        for pattern, preset in _NAME_PATTERNS:
            if pattern.search(candidate):
                return get_preset(preset)
    _register_builtins()
    raise ValueError(
        f"preset: cannot tell which reranker {source or 'this model'} is (no {PRESET_FILE} in its folder, and its "
        f"name matches no known checkpoint); pass preset= one of {', '.join(_PRESETS)} (CLI: --preset), or a "
        "fastrank.Preset"
    )
