"""Wrappers around Hugging Face backbones: rerankers, and the drop-in patch."""

from fastrank.models.patch import is_patched, patch, unpatch
from fastrank.models.reranker import CausalLMScorer, backbone_of, lm_head_of, unwrap_model

__all__ = ["CausalLMScorer", "backbone_of", "is_patched", "lm_head_of", "patch", "unpatch", "unwrap_model"]
