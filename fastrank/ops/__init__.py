"""fastrank's ops, one room each: ``score_head``, ``pool``, ``contrastive_loss`` and ``varlen_attention`` (see each
module)."""

from fastrank.ops.contrastive import ContrastiveLoss, contrastive_loss
from fastrank.ops.pool import pool
from fastrank.ops.score_head import ScoreHeadOutput, score_head
from fastrank.ops.varlen_attention import varlen_attention

__all__ = ["ContrastiveLoss", "ScoreHeadOutput", "contrastive_loss", "pool", "score_head", "varlen_attention"]
