"""Presets: a reranker's scoring convention, prompt layout and length budget under one name; the registry
of built-in and user presets; and which preset a checkpoint needs (saved in its folder, or recognised by
its name)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Optional

from fastrank.data import templates
from fastrank.heads import Convention, classifier, digit_ev, layerwise, token_diff, yes_logit, yes_no


@dataclass(frozen=True)
class Preset:
    """A reranker's convention, prompt layout and length budget, under one name.

    ``template`` is a ``fastrank.data.templates`` template (anything with ``tokenize(tokenizer, pairs,
    max_length)``); ``max_length`` is the default token budget passed to it.
    """

    name: str
    convention: Convention
    template: object
    max_length: int = 512
    description: str = ""


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
    return {name: p.description for name, p in _PRESETS.items()}


def get_preset(preset) -> Preset:
    """A ``Preset`` from a name or a ``Preset`` instance."""
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, str) and preset in _PRESETS:
        return _PRESETS[preset]
    raise ValueError(f"preset: {preset!r} is not a preset; choose from {', '.join(_PRESETS)} or pass a fastrank.Preset")


BUILTIN_PRESETS = (
    Preset(
        "bge-reranker-v2-gemma",
        yes_logit("Yes"),
        templates.FlagLLMTemplate(),
        max_length=512,
        description="FlagEmbedding's LLM reranker (BAAI/bge-reranker-v2-gemma): BOS + 'A: '+query, '\\n', "
        "'B: '+passage, '\\n', prompt, per-segment tokenisation; raw 'Yes' logit",
    ),
    Preset(
        "lb-reranker",
        digit_ev(),
        templates.ChatPairTemplate(
            system=templates.LB_RERANKER_SYSTEM, user="<<<Query>>>\n{query}\n\n<<<Context>>>\n{passage}"
        ),
        max_length=8192,
        description="lightblue/lb-reranker-0.5B-v1.0: Qwen chat template, 1-7 rating, expected value of "
        "the digit under the full softmax (not renormalised)",
    ),
    Preset(
        "qwen3-reranker",
        yes_no("yes", "no"),
        templates.Qwen3RerankerTemplate(),
        max_length=8192,
        description="Qwen/Qwen3-Reranker: system/user/assistant template ending in an empty think "
        "block; 'yes' minus 'no' (sigmoid = P(yes))",
    ),
    Preset(
        "mxbai-rerank-v2",
        token_diff("1", "0"),
        templates.MxbaiV2Template(),
        max_length=8192,
        description="mixedbread-ai/mxbai-rerank-base/large-v2: Qwen chat prefix, query/document/task "
        "prompt; '1' minus '0'",
    ),
    Preset(
        "cross-encoder",
        classifier(),
        templates.CrossEncoderTemplate(),
        max_length=512,
        description="cross-encoders (sequence-classification models: BAAI/bge-reranker-base/large/v2-m3, "
        "ms-marco-MiniLM) as FlagEmbedding's FlagReranker scores them: the tokenizer's pair layout, the query "
        "cut to 3/4 of max_length, then the passage; the classifier's logit on the first token",
    ),
    Preset(
        "cross-encoder-st",
        classifier(),
        templates.CrossEncoderTemplate(truncation="longest_first"),
        max_length=512,
        description="cross-encoders as sentence-transformers' CrossEncoder.predict scores them: as "
        "'cross-encoder', but over-long pairs cut longest-first (CrossEncoder's default is the sigmoid: "
        "normalize=True)",
    ),
    Preset(
        "bge-reranker-v2-minicpm-layerwise",
        layerwise(),
        templates.FlagLLMTemplate(always_bos=True),
        max_length=512,
        description="FlagEmbedding's layer-wise reranker (BAAI/bge-reranker-v2-minicpm-layerwise): the "
        "bge-reranker-v2-gemma layout with BOS always first; the score of each cutoff layer from its own head, "
        "the decoder run only to the deepest (cutoff_layers=, default the last layer)",
    ),
    Preset(
        "bge-reranker-v2.5-gemma2-lightweight",
        layerwise(),
        templates.FlagLLMTemplate(prompt=templates.FLAG_LIGHTWEIGHT_PROMPT, always_bos=True),
        max_length=512,
        description="FlagEmbedding's lightweight reranker (BAAI/bge-reranker-v2.5-gemma2-lightweight): the layer-wise "
        "layout with its own prompt; Gemma 2 with the passage tokens mean-pooled in groups of compress_ratio at "
        "compress_layers, the score of each cutoff layer from a head, the decoder run only to the deepest",
    ),
)
for _builtin in BUILTIN_PRESETS:
    register_preset(_builtin)


# ------------------------------------------------------------------------------------------------
# which preset a checkpoint needs
# ------------------------------------------------------------------------------------------------
PRESET_FILE = "fastrank_reranker.json"
LAYERWISE_ARCHITECTURE = "LayerWiseMiniCPMForCausalLM"  # FlagEmbedding's layer-wise MiniCPM reranker
LIGHTWEIGHT_ARCHITECTURE = "CostWiseGemmaForCausalLM"  # FlagEmbedding's lightweight Gemma 2 reranker

# Public checkpoints recognised by name (a hub name, or a local folder named after its checkpoint).
_NAME_PATTERNS = (
    (re.compile(r"qwen3[-_]?reranker", re.IGNORECASE), "qwen3-reranker"),
    (re.compile(r"mxbai[-_]rerank[-_].*v2", re.IGNORECASE), "mxbai-rerank-v2"),
    (re.compile(r"lb[-_]reranker", re.IGNORECASE), "lb-reranker"),
    (re.compile(r"bge[-_]reranker[-_]v2[-_]gemma", re.IGNORECASE), "bge-reranker-v2-gemma"),
    (re.compile(r"bge[-_]reranker[-_]v2[-_]minicpm[-_]layerwise", re.IGNORECASE), "bge-reranker-v2-minicpm-layerwise"),
    (
        re.compile(r"bge[-_]reranker[-_]v2\.5[-_]gemma2[-_]lightweight", re.IGNORECASE),
        "bge-reranker-v2.5-gemma2-lightweight",
    ),
    (re.compile(r"bge[-_]reranker[-_](base|large|v2[-_]m3)", re.IGNORECASE), "cross-encoder"),
    (re.compile(r"^cross-encoder/", re.IGNORECASE), "cross-encoder-st"),
)

# Sequence-classification models of these (bidirectional encoder) types are cross-encoders; a decoder's
# classification model (e.g. a Qwen3-Reranker converted to Qwen3ForSequenceClassification) reads its last token
# under its own prompt, which no preset here reproduces.
CROSS_ENCODER_MODEL_TYPES = (
    "bert",
    "xlm-roberta",
    "roberta",
    "camembert",
    "distilbert",
    "electra",
    "deberta",
    "deberta-v2",
    "mpnet",
    "albert",
    "modernbert",
)


def is_cross_encoder_config(config: dict) -> bool:
    """Whether a model's ``config.json`` (as a dict) is a cross-encoder: a sequence-classification architecture
    of a bidirectional encoder type."""
    archs = config.get("architectures") or []
    return config.get("model_type") in CROSS_ENCODER_MODEL_TYPES and any(
        str(a).endswith("ForSequenceClassification") for a in archs
    )


def preset_to_dict(preset: Preset) -> dict:
    """A JSON-able description of ``preset``: its name alone for a registered built-in, else the convention,
    the template (its class and fields) and the length budget."""
    preset = get_preset(preset)
    if _PRESETS.get(preset.name) is preset:
        return {"preset": preset.name}
    template = preset.template
    kind = type(template).__name__
    if templates.TEMPLATES.get(kind) is not type(template):
        raise ValueError(f"preset: its template {kind} is not one of fastrank.data.templates' and cannot be saved")
    fields = {f.name: getattr(template, f.name) for f in dataclasses.fields(template) if not f.name.startswith("_")}
    conv = preset.convention
    return {
        "name": preset.name,
        "convention": {
            "kind": conv.kind,
            "tokens": list(conv.tokens),
            "values": list(conv.values),
            "renormalize": conv.renormalize,
        },
        "template": {"type": kind, **fields},
        "max_length": preset.max_length,
        "description": preset.description,
    }


def preset_from_dict(data: dict, where: str = "preset") -> Preset:
    """The preset ``preset_to_dict`` described."""
    if "preset" in data:
        return get_preset(data["preset"])
    try:
        conv = data["convention"]
        spec = dict(data["template"])
        template_cls = templates.TEMPLATES[spec.pop("type")]
        return Preset(
            data["name"],
            Convention(
                conv["kind"], tuple(conv["tokens"]), tuple(conv.get("values", ())), conv.get("renormalize", False)
            ),
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

    A folder that fastrank wrote holds its preset (``fastrank_reranker.json``); a folder whose ``config.json``
    is an encoder's ``*ForSequenceClassification`` (BERT, XLM-R, ...) is a cross-encoder (``"cross-encoder"``),
    one whose architecture is ``LayerWiseMiniCPMForCausalLM`` (``CostWiseGemmaForCausalLM``) the layer-wise
    (lightweight) reranker; a public reranker is recognised by its name (Qwen3-Reranker, mxbai-rerank-*-v2,
    lb-reranker, bge-reranker-v2-gemma, bge-reranker-v2-minicpm-layerwise, bge-reranker-v2.5-gemma2-lightweight,
    bge-reranker-base/large/v2-m3, cross-encoder/*). Anything else raises,
    since scoring with another reranker's layout gives wrong scores without any other sign.
    """
    if source and os.path.isdir(source):
        path = os.path.join(source, PRESET_FILE)
        if os.path.exists(path):
            with open(path) as f:
                return preset_from_dict(json.load(f), where=path)
        config = os.path.join(source, "config.json")
        if os.path.exists(config):
            try:
                with open(config) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                data = {}
            if isinstance(data, dict) and is_cross_encoder_config(data):
                return get_preset("cross-encoder")
            if isinstance(data, dict) and LAYERWISE_ARCHITECTURE in (data.get("architectures") or []):
                return get_preset("bge-reranker-v2-minicpm-layerwise")
            if isinstance(data, dict) and LIGHTWEIGHT_ARCHITECTURE in (data.get("architectures") or []):
                return get_preset("bge-reranker-v2.5-gemma2-lightweight")
    # A local folder is known by its own name only: a parent directory's name says nothing about the checkpoint.
    name = os.path.basename(os.path.normpath(source)) if source and os.path.isdir(source) else (source or "")
    for pattern, preset in _NAME_PATTERNS:
        if pattern.search(name):
            return get_preset(preset)
    raise ValueError(
        f"preset: cannot tell which reranker {source or 'this model'} is (no {PRESET_FILE} in its folder, and its "
        f"name matches no known checkpoint); pass preset= one of {', '.join(_PRESETS)} (CLI: --preset), or a "
        "fastrank.Preset"
    )
