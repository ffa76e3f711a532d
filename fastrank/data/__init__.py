"""Prompt templates, tokenisation with per-segment truncation, and batching."""

from fastrank.data.batching import Batch, collate, pad_token_id_of, token_budget_batches
from fastrank.data.cross_encoder import CrossEncoderCollator, CrossEncoderTrainDataset
from fastrank.data.embedder import EmbedderCollator, EmbedderTrainDataset, read_retrieval_jsonl
from fastrank.data.reranker import RerankCollator, RerankTrainDataset
from fastrank.data.templates import (
    ChatPairTemplate,
    CrossEncoderTemplate,
    FlagLLMTemplate,
    MxbaiV2Template,
    Qwen3RerankerTemplate,
    SegmentTemplate,
    TokenizedPair,
)

__all__ = [
    "Batch",
    "ChatPairTemplate",
    "CrossEncoderCollator",
    "CrossEncoderTemplate",
    "CrossEncoderTrainDataset",
    "EmbedderCollator",
    "EmbedderTrainDataset",
    "TokenizedPair",
    "FlagLLMTemplate",
    "MxbaiV2Template",
    "Qwen3RerankerTemplate",
    "RerankCollator",
    "RerankTrainDataset",
    "SegmentTemplate",
    "collate",
    "pad_token_id_of",
    "read_retrieval_jsonl",
    "token_budget_batches",
]
