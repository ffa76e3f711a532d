"""Prompt templates, tokenisation with per-segment truncation, and batching."""

from fastrank.data.batching import Batch, collate, token_budget_batches
from fastrank.data.embedder import EmbedderCollator, EmbedderTrainDataset, read_retrieval_jsonl
from fastrank.data.reranker import RerankCollator, RerankTrainDataset
from fastrank.data.templates import (
    ChatPairTemplate,
    EncodedPair,
    FlagLLMTemplate,
    MxbaiV2Template,
    Qwen3RerankerTemplate,
    SegmentTemplate,
)

__all__ = [
    "Batch",
    "ChatPairTemplate",
    "EmbedderCollator",
    "EmbedderTrainDataset",
    "EncodedPair",
    "FlagLLMTemplate",
    "MxbaiV2Template",
    "Qwen3RerankerTemplate",
    "RerankCollator",
    "RerankTrainDataset",
    "SegmentTemplate",
    "collate",
    "read_retrieval_jsonl",
    "token_budget_batches",
]
