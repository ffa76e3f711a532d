"""Running a Hugging Face backbone over a packed batch."""

from __future__ import annotations

import inspect

import torch

from fastrank.data.packing import PackedBatch
from fastrank.engine.attention import packed_call


def _accepts(module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def packed_forward(backbone, batch: PackedBatch, **kwargs) -> torch.Tensor:
    """The backbone's last hidden state ``[M, H]`` over a packed batch: one row of real tokens, the segment
    metadata as the forward kwarg ``fastrank_segments``, no cache and no attention mask. The model must have
    the engine enabled (``enable_packing``). ``kwargs`` go to the backbone (``token_type_ids`` ``[1, M]``).

    A backbone with CUDA graphs attached (``fastrank.engine.graphs.attach_graphs``) replays them for inference
    forwards on CUDA; the result is then a view of the graph's output, valid until the next forward."""
    runner = backbone.__dict__.get("_fastrank_graphs")
    if runner is not None and not kwargs:  # the runner runs eagerly what it cannot replay
        return runner(batch)
    return eager_packed_forward(backbone, batch, **kwargs)


def eager_packed_forward(backbone, batch: PackedBatch, **kwargs) -> torch.Tensor:
    """``packed_forward`` without CUDA graphs."""
    call = dict(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        use_cache=False,
        fastrank_segments=batch.segments,
        **kwargs,
    )
    if call.get("token_type_ids") is None and _accepts(backbone, "token_type_ids"):
        # BERT reads a length-capped buffer when none are given; segment A everywhere, as single texts have
        # (a cross-encoder passes its pairs' own [1, M] types).
        call["token_type_ids"] = torch.zeros_like(batch.input_ids)
    with packed_call():
        out = backbone(**call)
    return out.last_hidden_state[0]
