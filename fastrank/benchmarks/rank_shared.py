"""Ranking with shared query prefixes: ``Reranker.rank`` once per query, each query with its own documents.

Model: Qwen2.5-0.5B's shape built from its config with random weights (no download), with a byte-level
BPE tokenizer built in code; the qwen3-reranker preset's layout (system prompt, instruction and query, then
the document and the think-block suffix) and its "yes" minus "no" score. Data: ``queries`` synthetic
queries, each with ``docs`` documents of ``min_words`` to ``max_words`` words (deterministic). Every
provider is called once per query with that query's documents (the ``rank`` workload: one query, its
candidate list), batches of at most ``batch_size`` pairs, and returns each query's scores in document
order; their scores agree (tests/test_bench_runner.py checks it in fp32):

- ``hf_logits_to_keep``: plain transformers: the preset's token ids, the query's pairs sorted by length,
  fixed batches, left padding, ``model(..., logits_to_keep=1)`` and "yes" minus "no" at the last token;
- ``fastrank_padded``: ``Reranker(..., packed=False).rank``: length-sorted, padded token-budget batches;
- ``fastrank_packed``: ``Reranker(..., share_prefix=False).rank``: packed batches of real tokens, no pad,
  each pair with its own copy of the prefix;
- ``fastrank``: ``Reranker(...).rank`` (packed, the default): the query's prefix (template head and query)
  in each batch once, its documents attending to it.

The plain-transformers and padded providers run the model with its own sdpa attention, the packed ones
with fastrank's engine switched on (``harness.attention_switched``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

import fastrank
from fastrank.benchmarks.harness import attention_switched
from fastrank.benchmarks.protocol import Benchmark, Provider
from fastrank.benchmarks.synthetic import build_causal_lm, build_tokenizer, qwen25_config, synthetic_rankings
from fastrank.data.batching import collate, pad_token_id_of

PRESET = "qwen3-reranker"


@dataclass(frozen=True)
class Case:
    queries: int  # Q: rank calls per run
    docs: int  # D: documents per query
    min_words: int  # document length, words (uniform between the two)
    max_words: int
    batch_size: int  # pairs per forward pass, every provider
    layers: int  # of Qwen2.5-0.5B's 24
    dtype: str

    def label(self) -> str:
        return (
            f"{self.queries} queries x {self.docs} docs of {self.min_words}-{self.max_words} words "
            f"batch={self.batch_size} layers={self.layers} {self.dtype}"
        )


def quick_cases(device: torch.device):
    if device.type == "cuda":
        return [Case(queries=8, docs=100, min_words=20, max_words=200, batch_size=64, layers=24, dtype="bfloat16")]
    # CPU: the whole vocabulary (only the last position's logits: cheap) with 2 of the 24 layers, and few,
    # short documents: seconds per provider.
    return [Case(queries=4, docs=16, min_words=20, max_words=80, batch_size=16, layers=2, dtype="float32")]


def full_cases(device: torch.device):
    if device.type == "cuda":
        return [Case(queries=32, docs=100, min_words=20, max_words=200, batch_size=64, layers=24, dtype="bfloat16")]
    return [Case(queries=8, docs=100, min_words=20, max_words=200, batch_size=64, layers=2, dtype="float32")]


_CACHE: Dict[tuple, tuple] = {}


def _setup(case: Case, device: torch.device):
    key = (case.layers, case.dtype, str(device))
    if key not in _CACHE:
        _CACHE.clear()
        tokenizer = build_tokenizer(padding_side="left")
        config = qwen25_config(
            num_layers=case.layers, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
        )
        _CACHE[key] = (build_causal_lm(config, dtype=getattr(torch, case.dtype), device=device), tokenizer)
    return _CACHE[key]


def hf_scores(model, tokenizer, query: str, docs: List[str], batch_size: int) -> List[float]:
    """One query's scores on plain transformers: the preset's ids, sorted by length, fixed left-padded batches,
    ``logits_to_keep=1``, the "yes" logit minus the "no" logit at the last token."""
    preset = fastrank.get_preset(PRESET)
    yes, no = preset.convention.token_ids(tokenizer)
    encoded = [e.input_ids for e in preset.template.tokenize(tokenizer, [(query, d) for d in docs], preset.max_length)]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    scores = torch.empty(len(encoded))
    pad = pad_token_id_of(tokenizer)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([encoded[i] for i in idx], pad, "left", device=device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1).logits
            last = logits[:, -1].float()
            scores[torch.tensor(idx)] = (last[:, yes] - last[:, no]).cpu()
    return scores.tolist()


def _ranked_scores(reranker, query: str, docs: List[str], batch_size: int) -> List[float]:
    """``reranker.rank(query, docs)``'s scores, back in document order."""
    scores = [0.0] * len(docs)
    for hit in reranker.rank(query, docs, batch_size=batch_size, show_progress=False):
        scores[hit["index"]] = hit["relevance_score"]
    return scores


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    model, tokenizer = _setup(case, device)
    rankings = synthetic_rankings(case.queries, case.docs, (case.min_words, case.max_words), seed=0)

    def run(score):
        return lambda: [score(query, docs) for query, docs in rankings]

    fns: Dict[str, Provider] = {
        "hf_logits_to_keep": attention_switched(
            model, run(lambda q, d: hf_scores(model, tokenizer, q, d, case.batch_size)), packed=False, fused=False
        )
    }
    for name, packed, shared in (
        ("fastrank_padded", False, False),
        ("fastrank_packed", True, False),
        ("fastrank", True, True),
    ):
        reranker = fastrank.Reranker(model, tokenizer, PRESET, packed=packed, share_prefix=shared)
        if reranker.packed != packed:
            raise RuntimeError(f"{name}: fastrank's engine does not run {type(model).__name__} packed")
        fns[name] = attention_switched(
            model, run(lambda q, d, r=reranker: _ranked_scores(r, q, d, case.batch_size)), packed=packed, fused=True
        )
    return fns


BENCHMARK = Benchmark(
    name="rank_shared",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=("hf_logits_to_keep", "fastrank_padded", "fastrank_packed", "fastrank"),
    table_label=lambda case: (
        f"Q={case['queries']} D={case['docs']} {case['min_words']}-{case['max_words']}w b={case['batch_size']} "
        f"{case['layers']}l {case['dtype']}"
    ),
    items_per_call=lambda case: case.queries * case.docs,
    unit="pairs",
    end_to_end={"cuda": dict(warmup=1, repeats=5), "cpu": dict(warmup=0, repeats=1)},
)
