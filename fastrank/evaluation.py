"""Ranking metrics for held-out evaluation: recall@k, MRR@10 and NDCG@10 (binary relevance)."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np


def ranking_metrics(ranked: Sequence[Sequence[int]], relevant: Sequence[set], ks=(1, 10)) -> Dict[str, float]:
    """Mean metrics over queries. ``ranked[i]`` is query i's candidate ids, best first; ``relevant[i]`` the set
    of ids that are relevant to it."""
    if len(ranked) != len(relevant) or not ranked:
        raise ValueError("ranked / relevant: need one ranking and one relevant set per query, at least one query")
    out = {f"recall@{k}": 0.0 for k in ks}
    out["mrr@10"] = 0.0
    out["ndcg@10"] = 0.0
    for order, rel in zip(ranked, relevant):
        if not rel:
            raise ValueError("relevant: every query needs at least one relevant candidate")
        order = list(order)
        for k in ks:
            out[f"recall@{k}"] += len(rel.intersection(order[:k])) / len(rel)
        for rank, cid in enumerate(order[:10], start=1):
            if cid in rel:
                out["mrr@10"] += 1.0 / rank
                break
        dcg = sum(1.0 / math.log2(rank + 1) for rank, cid in enumerate(order[:10], start=1) if cid in rel)
        ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(rel), 10) + 1))
        out["ndcg@10"] += dcg / ideal
    return {name: value / len(ranked) for name, value in out.items()}


def retrieval_metrics(embedder, rows: List[dict], ks=(1, 10), batch_size: int = 64) -> Dict[str, float]:
    """Dense retrieval over the corpus of every ``pos`` and ``neg`` passage in ``rows`` (FlagEmbedding's
    training JSONL records); each query's relevant passages are its ``pos``."""
    corpus: List[str] = []
    index = {}
    for row in rows:
        for text in list(row["pos"]) + list(row.get("neg", [])):
            if text not in index:
                index[text] = len(corpus)
                corpus.append(text)
    q = embedder.encode_queries([row["query"] for row in rows], batch_size=batch_size, show_progress=False)
    c = embedder.encode_corpus(corpus, batch_size=batch_size, show_progress=False)
    order = np.argsort(-(q @ c.T), axis=1)
    return ranking_metrics(order.tolist(), [{index[t] for t in row["pos"]} for row in rows], ks)


def reranking_metrics(reranker, rows: List[dict], batch_size: int = 64) -> Dict[str, float]:
    """Reranking of each query's own candidates (its ``pos`` and ``neg``) with a ``fastrank.Reranker``."""
    pairs, spans = [], []
    for row in rows:
        candidates = list(row["pos"]) + list(row.get("neg", []))
        spans.append((len(pairs), len(candidates), len(row["pos"])))
        pairs.extend((row["query"], c) for c in candidates)
    scores = reranker.score(pairs, batch_size=batch_size, show_progress=False)
    ranked, relevant = [], []
    for start, n, n_pos in spans:
        s = scores[start : start + n]
        ranked.append(sorted(range(n), key=lambda i: -s[i]))
        relevant.append(set(range(n_pos)))
    return ranking_metrics(ranked, relevant)
