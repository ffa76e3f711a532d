"""fastrank: fused Triton kernels for LLM rerankers and embedders.

Ops:        score_head, ScoreHeadOutput, pool, contrastive_loss, ContrastiveLoss
Rerankers:  Reranker, patch, unpatch, presets, get_preset, register_preset, Preset,
            Convention, yes_logit, yes_no, token_diff, digit_ev, classifier
Embedders:  Embedder, BiEncoder, LlaraEncoder, EmbedderTrainDataset, EmbedderCollator
Training:   LLMRerankerModel, RerankTrainDataset, RerankCollator,
            CrossEncoderModel, CrossEncoderTrainDataset, CrossEncoderCollator (cross-encoders)
Trainers:   fastrank.integrations.trainer.EmbedderTrainer, fastrank.integrations.trainer.RerankerTrainer,
            fastrank.integrations.sentence_transformers.FusedMultipleNegativesRankingLoss
"""

from fastrank.data.cross_encoder import CrossEncoderCollator, CrossEncoderTrainDataset
from fastrank.data.embedder import EmbedderCollator, EmbedderTrainDataset
from fastrank.data.reranker import RerankCollator, RerankTrainDataset
from fastrank.functional import ContrastiveLoss, ScoreHeadOutput, contrastive_loss, pool, score_head
from fastrank.heads import Convention, classifier, digit_ev, token_diff, yes_logit, yes_no
from fastrank.inference import Embedder, Reranker
from fastrank.models import BiEncoder, CrossEncoderModel, LlaraEncoder, LLMRerankerModel, patch, unpatch
from fastrank.presets import Preset, get_preset, presets, register_preset

__version__ = "0.3.0"

__all__ = [
    "BiEncoder",
    "ContrastiveLoss",
    "Convention",
    "CrossEncoderCollator",
    "CrossEncoderModel",
    "CrossEncoderTrainDataset",
    "Embedder",
    "EmbedderCollator",
    "EmbedderTrainDataset",
    "LLMRerankerModel",
    "LlaraEncoder",
    "Preset",
    "RerankCollator",
    "RerankTrainDataset",
    "Reranker",
    "ScoreHeadOutput",
    "__version__",
    "classifier",
    "contrastive_loss",
    "digit_ev",
    "get_preset",
    "patch",
    "pool",
    "presets",
    "register_preset",
    "score_head",
    "token_diff",
    "unpatch",
    "yes_logit",
    "yes_no",
]
