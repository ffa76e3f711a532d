"""Wrappers around Hugging Face backbones: rerankers, embedders, and the drop-in patch."""

from fastrank.models.cross_encoder import CrossEncoderModel, CrossEncoderScorer
from fastrank.models.embedder import BiEncoder, EncoderOutput, LlaraEncoder
from fastrank.models.layerwise import LayerwiseMiniCPM
from fastrank.models.llm_reranker import LLMRerankerModel, RerankerOutput
from fastrank.models.patch import is_patched, patch, unpatch
from fastrank.models.reranker import CausalLMScorer, backbone_of, lm_head_of, unwrap_model

__all__ = [
    "BiEncoder",
    "CausalLMScorer",
    "CrossEncoderModel",
    "CrossEncoderScorer",
    "EncoderOutput",
    "LayerwiseMiniCPM",
    "LLMRerankerModel",
    "LlaraEncoder",
    "RerankerOutput",
    "backbone_of",
    "is_patched",
    "lm_head_of",
    "patch",
    "unpatch",
    "unwrap_model",
]
