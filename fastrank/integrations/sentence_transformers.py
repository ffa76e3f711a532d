"""A drop-in for sentence-transformers' ``MultipleNegativesRankingLoss`` computed with fastrank's fused loss.

    from fastrank.integrations.sentence_transformers import FusedMultipleNegativesRankingLoss
    loss = FusedMultipleNegativesRankingLoss(model, scale=20.0)    # same meaning as MNRL's scale

Inputs are the same (anchor, positive, [negative_1, ..., negative_n]) columns. For each anchor the candidates
are every positive and negative in the batch (gathered from every process with ``gather_across_devices``),
its own positive is the target, and the similarities are ``cos_sim * scale`` (or ``dot_score * scale``): the
forward ``query_to_doc`` direction of MNRL, which is its default. The ``[B, B * (1 + n)]`` similarity matrix
is never built.
"""

from __future__ import annotations

import torch
from torch import nn

from fastrank.functional import contrastive_loss


class FusedMultipleNegativesRankingLoss(nn.Module):
    def __init__(self, model, scale: float = 20.0, similarity_fct=None, gather_across_devices: bool = False):
        from sentence_transformers import util

        super().__init__()
        similarity_fct = similarity_fct or util.cos_sim
        names = {util.cos_sim: "cos_sim", util.dot_score: "dot_score"}
        if similarity_fct not in names:
            raise ValueError(
                "similarity_fct: the fused loss computes cos_sim or dot_score similarities; "
                f"got {getattr(similarity_fct, '__name__', similarity_fct)}"
            )
        if not scale > 0:
            raise ValueError(f"scale: must be positive, got {scale}")
        self.model = model
        self.scale = float(scale)
        self.similarity_fct = similarity_fct
        self.normalize = names[similarity_fct] == "cos_sim"
        self.gather_across_devices = gather_across_devices

    def forward(self, sentence_features, labels=None):
        try:
            from sentence_transformers.base.losses.merged_forward import embed_columns

            embeddings = embed_columns(self.model, sentence_features)
        except ImportError:  # older sentence-transformers
            embeddings = [self.model(features)["sentence_embedding"] for features in sentence_features]
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings, labels=None):
        if len(embeddings) < 2:
            raise ValueError(f"sentence_features: expected an anchor column and at least one candidate column, got {len(embeddings)}")
        queries, docs = embeddings[0], list(embeddings[1:])
        batch = queries.shape[0]
        offset = 0
        if self.gather_across_devices and torch.distributed.is_available() and torch.distributed.is_initialized():
            import torch.distributed.nn.functional as dist_fn

            docs = [torch.cat(dist_fn.all_gather(d.contiguous()), dim=0) for d in docs]
            offset = torch.distributed.get_rank() * batch
        candidates = torch.cat(docs, dim=0)
        if self.normalize:
            queries = nn.functional.normalize(queries, dim=-1)
            candidates = nn.functional.normalize(candidates, dim=-1)
        targets = torch.arange(batch, device=queries.device) + offset
        return contrastive_loss(queries, candidates.to(queries.dtype), temperature=1.0 / self.scale, group_size=1,
                                targets=targets)

    def get_config_dict(self):
        return {"scale": self.scale, "similarity_fct": self.similarity_fct.__name__,
                "gather_across_devices": self.gather_across_devices}
