"""A drop-in for sentence-transformers' ``MultipleNegativesRankingLoss`` computed with fastrank's fused loss.

    from fastrank.integrations.sentence_transformers import FusedMultipleNegativesRankingLoss
    loss = FusedMultipleNegativesRankingLoss(model, scale=20.0)    # same meaning as MNRL's scale

The constructor takes MNRL's arguments with MNRL's names and defaults: ``scale=20.0``,
``similarity_fct=cos_sim``, ``gather_across_devices=False``, ``directions=("query_to_doc",)``,
``partition_mode="joint"``, ``hardness_mode=None``, ``hardness_strength=0.0``. Inputs are the same
(anchor, positive, [negative_1, ..., negative_n]) columns. The ``[B, B * (1 + n)]`` similarity matrix is
never built: every term is one ``fastrank.functional.contrastive_loss`` call, and loss and gradients equal
MNRL's.

Supported (equal to MNRL):

- ``directions=("query_to_doc",)``: each anchor against every positive and negative in the batch, its own
  positive as the target; ``partition_mode`` makes no difference with one direction.
- ``directions=("query_to_doc", "doc_to_query")`` (any order), ``partition_mode="per_direction"``: the
  symmetric loss, the mean of the anchor -> documents loss and the positive -> anchors loss (two fused
  calls).
- the same directions with ``partition_mode="joint"``: one softmax per anchor over its similarities to the
  documents and its positive's similarities to the anchors. One fused call on ``[anchor, positive]`` rows
  against ``[document, 0]`` and ``[0, anchor]`` candidates (twice the width, never the score matrix).
- ``similarity_fct`` ``util.cos_sim`` or ``util.dot_score``; ``gather_across_devices`` (documents, and
  anchors for ``doc_to_query``, gathered from every process with gradient flowing back to their owners).
- ``hardness_mode`` with ``hardness_strength=0.0`` (no effect, as in MNRL, which warns) and
  ``hardness_strength`` with ``hardness_mode=None`` (ignored, as in MNRL).

Refused with a ``ValueError`` naming the argument (use
``sentence_transformers.losses.MultipleNegativesRankingLoss`` for these):

- ``"query_to_query"`` and ``"doc_to_doc"`` in ``directions``: MNRL removes each row's own anchor (own
  documents) from those candidates with a ``-inf`` mask, which the fused loss (every row against every
  candidate) cannot express without a mask as large as the score matrix.
- ``hardness_mode`` with ``hardness_strength > 0``: the penalty ``strength * stop_grad(sim)`` is added to
  a per-row subset of the logits and takes no part in the gradient, which the fused loss cannot express.
- any other ``similarity_fct`` (the fused loss computes cosine or dot-product similarities).

Arguments MNRL itself rejects (no direction, an unknown direction, no ``"query_to_doc"``, an unknown
``partition_mode`` or ``hardness_mode``, ``"per_direction"`` with ``"query_to_query"``/``"doc_to_doc"``,
a negative ``hardness_strength``, ``scale <= 0``) raise a ``ValueError`` here too.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fastrank.functional import contrastive_loss

try:
    from sentence_transformers.util import cos_sim
except ImportError:  # the class needs sentence-transformers; importing this module does not
    cos_sim = None

logger = logging.getLogger(__name__)

VALID_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
SUPPORTED_DIRECTIONS = ("query_to_doc", "doc_to_query")
VALID_HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
USE_MNRL = "use sentence_transformers.losses.MultipleNegativesRankingLoss"

_CITATION_CPC = """
@misc{oord2019representationlearningcontrastivepredictive,
      title={Representation Learning with Contrastive Predictive Coding},
      author={Aaron van den Oord and Yazhe Li and Oriol Vinyals},
      year={2019},
      eprint={1807.03748},
      archivePrefix={arXiv},
      primaryClass={cs.LG},
      url={https://arxiv.org/abs/1807.03748},
}
"""
_CITATION_JINA2 = """
@misc{günther2024jinaembeddings28192token,
      title={Jina Embeddings 2: 8192-Token General-Purpose Text Embeddings for Long Documents},
      author={Michael Günther and Jackmin Ong and Isabelle Mohr and Alaeddine Abdessalem and Tanguy Abel and Mohammad Kalim Akram and Susana Guzman and Georgios Mastrapas and Saba Sturua and Bo Wang and Maximilian Werk and Nan Wang and Han Xiao},
      year={2024},
      eprint={2310.19923},
      archivePrefix={arXiv},
      primaryClass={cs.CL},
      url={https://arxiv.org/abs/2310.19923},
}
"""


def _check_directions(directions, partition_mode):
    if isinstance(directions, str):
        raise ValueError(
            f"directions: expected a tuple of direction names, got the string {directions!r}; write ({directions!r},)"
        )
    directions = tuple(directions)
    if not directions:
        raise ValueError("directions: at least one direction must be given, e.g. ('query_to_doc',)")
    unknown = [d for d in directions if d not in VALID_DIRECTIONS]
    if unknown:
        raise ValueError(f"directions: unknown direction(s) {unknown}; valid: {list(VALID_DIRECTIONS)}")
    if "query_to_doc" not in directions:
        raise ValueError(
            f"directions: {directions} lacks 'query_to_doc', which holds the positive pair and is "
            "required (as in MultipleNegativesRankingLoss)"
        )
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"partition_mode: must be 'joint' or 'per_direction', got {partition_mode!r}")
    same_type = [d for d in directions if d in ("query_to_query", "doc_to_doc")]
    if same_type and partition_mode == "per_direction":
        raise ValueError(
            f"partition_mode: 'per_direction' with directions {same_type} is ill-defined (those candidates never "
            "include the positive) and MultipleNegativesRankingLoss refuses it too; use partition_mode='joint' "
            f"with {USE_MNRL}"
        )
    if same_type:
        raise ValueError(
            f"directions: {same_type} in {directions} is not supported by FusedMultipleNegativesRankingLoss: "
            "these terms remove each row's own anchor/documents from its candidates (a -inf mask), which the "
            "fused loss cannot express without a mask as large as the score matrix; use "
            f"directions={SUPPORTED_DIRECTIONS} or a subset holding 'query_to_doc', or {USE_MNRL} for "
            f"{same_type}"
        )
    return directions


def _check_hardness(hardness_mode, hardness_strength):
    if hardness_mode not in VALID_HARDNESS_MODES:
        raise ValueError(f"hardness_mode: must be one of {list(VALID_HARDNESS_MODES)}, got {hardness_mode!r}")
    try:
        strength = float(hardness_strength)
    except (TypeError, ValueError):
        strength = float("nan")
    if not strength >= 0.0:
        raise ValueError(f"hardness_strength: must be a non-negative number, got {hardness_strength!r}")
    if hardness_mode is not None and strength > 0.0:
        raise ValueError(
            f"hardness_mode: {hardness_mode!r} with hardness_strength={hardness_strength} is not supported by "
            "FusedMultipleNegativesRankingLoss: the penalty hardness_strength * stop_grad(similarity) is added to "
            "a per-row subset of the logits and takes no part in the gradient, which the fused loss cannot "
            f"express; set hardness_mode=None (or hardness_strength=0.0), or {USE_MNRL} for hardness weighting"
        )
    if hardness_mode is not None:
        logger.warning(
            "hardness_mode=%r is set but hardness_strength=0.0, so hardness weighting has no effect. Set "
            "hardness_strength to a positive value (with sentence-transformers' MultipleNegativesRankingLoss) "
            "to enable hardness weighting.",
            hardness_mode,
        )


def _gather(tensor):
    """``tensor`` from every process, concatenated, gradient flowing back to each owner (SUM over ranks)."""
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(tensor.contiguous()), dim=0)


class FusedMultipleNegativesRankingLoss(nn.Module):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` on fastrank's fused contrastive loss.

    For each anchor, the candidates are every positive and negative of the batch (of every process with
    ``gather_across_devices``); the similarities ``similarity_fct(anchor, candidate) * scale`` go through a
    softmax cross-entropy towards the anchor's own positive, without the ``[B, B * (1 + n)]`` matrix ever
    existing. The module docstring lists the ``directions`` / ``partition_mode`` combinations computed and
    the values refused.

    Inputs: ``(anchor, positive)`` or ``(anchor, positive, negative_1, ..., negative_n)`` columns, as MNRL.

    Example::

        from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
        model = SentenceTransformer("all-MiniLM-L6-v2")
        loss = FusedMultipleNegativesRankingLoss(model, scale=20.0)
        SentenceTransformerTrainer(model=model, train_dataset=dataset, loss=loss).train()
    """

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct=cos_sim,
        gather_across_devices: bool = False,
        directions=("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode=None,
        hardness_strength: float = 0.0,
    ):
        """Arguments as sentence-transformers' ``MultipleNegativesRankingLoss``, with its defaults
        (``similarity_fct=None`` also means ``cos_sim``); see the module docstring for the supported values."""
        from sentence_transformers import util

        super().__init__()
        similarity_fct = similarity_fct or util.cos_sim
        names = {util.cos_sim: "cos_sim", util.dot_score: "dot_score"}
        if similarity_fct not in names:
            raise ValueError(
                "similarity_fct: the fused loss computes cos_sim or dot_score similarities; "
                f"got {getattr(similarity_fct, '__name__', similarity_fct)}; {USE_MNRL} for other functions"
            )
        if not scale > 0:
            raise ValueError(f"scale: must be positive, got {scale!r}")
        self.model = model
        self.scale = float(scale)
        self.similarity_fct = similarity_fct
        self.normalize = names[similarity_fct] == "cos_sim"
        self.gather_across_devices = gather_across_devices
        self.directions = _check_directions(directions, partition_mode)
        self.partition_mode = partition_mode
        _check_hardness(hardness_mode, hardness_strength)
        self.hardness_mode = hardness_mode
        self.hardness_strength = hardness_strength

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def forward(self, sentence_features, labels=None):
        try:
            from sentence_transformers.base.losses.merged_forward import embed_columns

            embeddings = embed_columns(self.model, sentence_features)
        except ImportError:  # older sentence-transformers
            embeddings = [self.model(features)["sentence_embedding"] for features in sentence_features]
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings, labels=None):
        if len(embeddings) < 2:
            raise ValueError(
                f"sentence_features: expected an anchor column and at least one candidate column, got {len(embeddings)}"
            )
        queries = embeddings[0]
        docs = [d.to(queries.dtype) for d in embeddings[1:]]
        if self.normalize:  # cos_sim: a row-wise normalisation, the same before or after gathering
            queries = nn.functional.normalize(queries, dim=-1)
            docs = [nn.functional.normalize(d, dim=-1) for d in docs]
        batch = queries.shape[0]
        positives = docs[0]  # this process's positives: the rows of the doc_to_query term
        symmetric = "doc_to_query" in self.directions
        all_queries = queries
        offset = 0
        if self.gather_across_devices and torch.distributed.is_available() and torch.distributed.is_initialized():
            docs = [_gather(d) for d in docs]
            if symmetric:
                all_queries = _gather(queries)
            offset = torch.distributed.get_rank() * batch
        all_docs = torch.cat(docs, dim=0)
        # row i's positive pair is column offset + i of both candidate sets: its positive among the documents
        # (positives first), its anchor among the anchors
        targets = torch.arange(batch, device=queries.device) + offset

        def fused(rows, candidates):
            return contrastive_loss(rows, candidates, temperature=self.temperature, group_size=1, targets=targets)

        if not symmetric:
            return fused(queries, all_docs)
        if self.partition_mode == "per_direction":
            # MNRL averages the two log-partition functions: the mean of the two cross-entropies
            return 0.5 * (fused(queries, all_docs) + fused(positives, all_queries))
        # joint: [q_i, d_i] . [doc_j, 0] = q_i . doc_j and [q_i, d_i] . [0, q_k] = d_i . q_k, one softmax per row
        rows = torch.cat([queries, positives], dim=1)
        candidates = torch.cat(
            [
                torch.cat([all_docs, torch.zeros_like(all_docs)], dim=1),
                torch.cat([torch.zeros_like(all_queries), all_queries], dim=1),
            ],
            dim=0,
        )
        return fused(rows, candidates)

    def get_config_dict(self):
        return {
            "scale": self.scale,
            "similarity_fct": self.similarity_fct.__name__,
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
        }

    @property
    def citation(self) -> str:
        # MNRL's choice; its third citation (GTE) belongs to the four-direction joint loss, refused here
        if set(self.directions) == {"query_to_doc", "doc_to_query"} and self.partition_mode == "per_direction":
            return _CITATION_JINA2
        return _CITATION_CPC
