"""Prompt templates, tokenisation with per-segment truncation, and batching."""

from fastrank.data.batching import Batch, collate, token_budget_batches
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
    "EncodedPair",
    "FlagLLMTemplate",
    "MxbaiV2Template",
    "Qwen3RerankerTemplate",
    "SegmentTemplate",
    "collate",
    "token_budget_batches",
]
