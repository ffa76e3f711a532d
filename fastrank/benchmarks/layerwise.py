"""Layer-wise reranking with early exit (bge-reranker-v2-minicpm-layerwise), from text to scores.

Model: ``fastrank.models.layerwise.LayerwiseMiniCPM`` with random weights (no download): MiniCPM-2B's shape on a
GPU (hidden 2304, 40 layers, 36 heads, vocab 122,753, heads from layer 8, as the released reranker), a tiny
one on a CPU; a byte-level BPE tokenizer built in code; the ``bge-reranker-v2-minicpm-layerwise`` preset's
layout. Every provider scores the same pairs at the same cutoff layer and returns one score per pair:

- ``full_depth``: the model run to its last layer as a plain layer-wise forward does (FlagEmbedding's loop:
  pairs sorted by length, fixed batches right-padded to a multiple of 8), every layer's normed hidden state
  kept (``output_hidden_states``), the cutoff layer's head applied at every position, the last real token's
  score picked;
- ``flagembedding_cutoff``: FlagEmbedding's own layer-wise forward at the cutoff: the same loop stopping at the
  cutoff layer, the normed state of the whole batch through the head, then pooled (FlagEmbedding itself no
  longer runs on transformers 5, so this is its computation on the same modules);
- ``fastrank``: ``fastrank.Reranker`` (a ``LayerwiseReranker``) with ``cutoff_layers=[cutoff]``: token-budget
  batches, the decoder run to the cutoff and no further, only each pair's last row normed and scored through
  ``score_head``.

The issue's target is ``fastrank`` against ``full_depth`` at cutoff 28 of 40 (>= 1.3x).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict

import torch

from fastrank.benchmarks.protocol import Benchmark, Provider
from fastrank.benchmarks.synthetic import build_tokenizer, synthetic_pairs
from fastrank.data.batching import collate, pad_token_id_of
from fastrank.inference.layerwise import PRESET, LayerwiseReranker
from fastrank.models.layerwise import LayerwiseMiniCPM
from fastrank.presets import get_preset

# MiniCPM-2B (openbmb/MiniCPM-2B-sft-bf16 config.json) with the layer-wise reranker's heads from layer 8.
MINICPM_2B = dict(
    architectures=["LayerWiseMiniCPMForCausalLM"],
    model_type="minicpm",
    vocab_size=122753,
    hidden_size=2304,
    intermediate_size=5760,
    num_hidden_layers=40,
    num_attention_heads=36,
    num_key_value_heads=36,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    scale_emb=12,
    dim_model_base=256,
    scale_depth=1.4,
    start_layer=8,
    head_multi=True,
    head_type="simple",
)
TINY = dict(
    MINICPM_2B,
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=320,
    num_hidden_layers=10,
    num_attention_heads=4,
    num_key_value_heads=4,
    start_layer=2,
)
SHAPES = {"minicpm-2b": MINICPM_2B, "tiny": TINY}


@dataclass(frozen=True)
class Case:
    pairs: int  # (query, passage) pairs scored per call
    max_length: int  # the preset's token budget per pair
    batch_size: int  # pairs per batch (fastrank's token budget per batch: batch_size * max_length)
    shape: str  # a key of SHAPES
    layers: int  # decoder layers of the model
    cutoff: int  # the layer scored
    dtype: str

    def label(self) -> str:
        return (
            f"{self.pairs} pairs max_length={self.max_length} batch={self.batch_size} {self.shape} "
            f"cutoff {self.cutoff}/{self.layers} {self.dtype}"
        )


def quick_cases(device: torch.device):
    if device.type == "cuda":
        return [
            Case(pairs=512, max_length=512, batch_size=32, shape="minicpm-2b", layers=40, cutoff=28, dtype="bfloat16")
        ]
    return [Case(pairs=32, max_length=128, batch_size=8, shape="tiny", layers=10, cutoff=7, dtype="float32")]


def full_cases(device: torch.device):
    if device.type == "cuda":
        return [
            Case(pairs=512, max_length=512, batch_size=32, shape="minicpm-2b", layers=40, cutoff=28, dtype="bfloat16"),
            Case(pairs=512, max_length=512, batch_size=32, shape="minicpm-2b", layers=40, cutoff=16, dtype="bfloat16"),
        ]
    return [Case(pairs=256, max_length=256, batch_size=16, shape="tiny", layers=10, cutoff=7, dtype="float32")]


_CACHE: Dict[tuple, tuple] = {}


def build_random(config: dict, dtype=torch.float32, device="cpu", seed: int = 0) -> LayerwiseMiniCPM:
    """A ``LayerwiseMiniCPM`` of ``config`` with random weights (normal 0.02; norms 1), in eval mode."""
    model = LayerwiseMiniCPM.empty(config, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.to(dtype).eval()


def _setup(case: Case, device: torch.device):
    key = (case.shape, case.layers, case.dtype, str(device))
    if key not in _CACHE:
        _CACHE.clear()
        tokenizer = build_tokenizer(bos_token="<s>", padding_side="right")
        config = dict(SHAPES[case.shape], num_hidden_layers=case.layers)
        config["vocab_size"] = max(config["vocab_size"], len(tokenizer))
        model = build_random(config, dtype=getattr(torch, case.dtype), device=device)
        _CACHE[key] = (model, tokenizer)
    return _CACHE[key]


def _flag_forward(model: LayerwiseMiniCPM, input_ids, attention_mask, cutoff: int, run_to: int, keep_all: bool):
    """FlagEmbedding's layer-wise forward on ``model``'s modules: ``run_to`` layers, the normed state of every
    layer (``keep_all``) or of the cutoff only, the cutoff's head at every position, the last real token."""
    from transformers.masking_utils import create_causal_mask

    backbone = model.model
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    hidden = backbone.embed_tokens(input_ids) * backbone.scale_emb
    mask = create_causal_mask(
        config=model.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=positions,
    )
    rope = backbone.rotary_emb(hidden, position_ids=positions)
    states = []
    for k in range(1, run_to + 1):
        hidden = backbone.layers[k - 1](hidden, rope, mask)
        if keep_all or k == cutoff:
            states.append((k, backbone.norm(hidden)))
    state = next(s for k, s in states if k == cutoff)
    logits = model.lm_head[cutoff - model.start_layer].linear_head(state).float()  # [B, T, 1]
    last = attention_mask.sum(dim=1) - 1
    return logits[torch.arange(input_ids.shape[0], device=input_ids.device), last, 0]


def _flag_scores(model, tokenizer, pairs, case: Case, full_depth: bool):
    template = get_preset(PRESET).template
    encoded = [e.input_ids for e in template.tokenize(tokenizer, pairs, case.max_length)]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    scores = torch.empty(len(encoded))
    pad = pad_token_id_of(tokenizer)
    device = model.device
    with torch.inference_mode():
        for start in range(0, len(order), case.batch_size):
            idx = order[start : start + case.batch_size]
            batch = collate([encoded[i] for i in idx], pad, "right", 8, device=device)
            run_to = model.num_layers if full_depth else case.cutoff
            got = _flag_forward(model, batch.input_ids, batch.attention_mask, case.cutoff, run_to, full_depth)
            scores[torch.tensor(idx)] = got.cpu()
    return scores.tolist()


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    model, tokenizer = _setup(case, device)
    pairs = synthetic_pairs(case.pairs, seed=0)
    reranker = LayerwiseReranker(model, tokenizer, cutoff_layers=[case.cutoff])

    def ours():
        with warnings.catch_warnings():  # the truncation notice; every provider truncates the same pairs
            warnings.simplefilter("ignore", UserWarning)
            return reranker.score(
                pairs,
                batch_size=case.batch_size,
                max_length=case.max_length,
                max_tokens=case.batch_size * case.max_length,
                show_progress=False,
            )

    return {
        "full_depth": lambda: _flag_scores(model, tokenizer, pairs, case, full_depth=True),
        "flagembedding_cutoff": lambda: _flag_scores(model, tokenizer, pairs, case, full_depth=False),
        "fastrank": ours,
    }


BENCHMARK = Benchmark(
    name="layerwise",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=("full_depth", "flagembedding_cutoff", "fastrank"),
    table_label=lambda case: (
        f"{case['pairs']} pairs L<={case['max_length']} b={case['batch_size']} {case['shape']} "
        f"cut {case['cutoff']}/{case['layers']} {case['dtype']}"
    ),
    items_per_call=lambda case: case.pairs,
    unit="pairs",
    end_to_end={"cuda": dict(warmup=1, repeats=5), "cpu": dict(warmup=0, repeats=1)},
)
