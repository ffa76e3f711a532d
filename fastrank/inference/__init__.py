"""High-level inference: ``Reranker`` scores and ranks (query, passage) pairs, ``Embedder`` encodes texts,
and their device pools (``devices=[...]``) run either over several devices.

Modules: ``batches`` (planning and running batches), ``reranker``, ``layerwise`` (the layer-wise reranker with
early exit), ``embedder``, ``pool``.
"""

from fastrank.inference.batches import DEFAULT_BATCH_SIZE, DEFAULT_MAX_TOKENS, PlannedBatch, sort_window
from fastrank.inference.embedder import Embedder
from fastrank.inference.layerwise import LayerwiseReranker
from fastrank.inference.pool import EmbedderPool, LayerwiseRerankerPool, RerankerPool
from fastrank.inference.reranker import Reranker, best_first, document_texts

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_TOKENS",
    "Embedder",
    "EmbedderPool",
    "LayerwiseReranker",
    "LayerwiseRerankerPool",
    "PlannedBatch",
    "Reranker",
    "RerankerPool",
    "best_first",
    "document_texts",
    "sort_window",
]
