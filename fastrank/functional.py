"""fastrank's public op functions under torch-like names: re-exports of ``fastrank.ops``. Each picks the
Triton path or the PyTorch reference (``fastrank.utils.select_backend``)."""

from fastrank.ops import (
    ContrastiveLoss,
    ScoreHeadOutput,
    contrastive_loss,
    gated_activation,
    pool,
    rms_norm,
    rope,
    score_head,
    varlen_attention,
)

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
