"""fastrank's ops, one room each: ``score_head``, ``pool`` and ``contrastive_loss`` (see each module)."""

from fastrank.ops.contrastive import ContrastiveLoss, contrastive_loss
from fastrank.ops.pool import pool
from fastrank.ops.score_head import ScoreHeadOutput, score_head

__all__ = ["ContrastiveLoss", "ScoreHeadOutput", "contrastive_loss", "pool", "score_head"]
