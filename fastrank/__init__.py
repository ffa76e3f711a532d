"""fastrank: fused Triton kernels for LLM rerankers and embedders.

Public API:
    score_head(hidden, weight, token_ids, *, attention_mask, positions, cu_seqlens, bias, combine, return_lse)
    ScoreHeadOutput
"""

from fastrank.functional import ScoreHeadOutput, score_head

__version__ = "0.1.0"

__all__ = ["ScoreHeadOutput", "score_head", "__version__"]
