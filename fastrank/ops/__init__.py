"""fastrank's ops, one room each: ``score_head``, ``pool``, ``contrastive_loss``, ``varlen_attention`` and the
decoder's fused elementwise ops ``rms_norm``, ``rope`` and ``gated_activation`` (see each module)."""

from fastrank.ops.contrastive import ContrastiveLoss, contrastive_loss
from fastrank.ops.gated_activation import gated_activation
from fastrank.ops.pool import pool
from fastrank.ops.rms_norm import rms_norm
from fastrank.ops.rope import rope
from fastrank.ops.score_head import ScoreHeadOutput, score_head
from fastrank.ops.varlen_attention import varlen_attention

__all__ = [
    "ContrastiveLoss",
    "ScoreHeadOutput",
    "contrastive_loss",
    "gated_activation",
    "pool",
    "rms_norm",
    "rope",
    "score_head",
    "varlen_attention",
]
