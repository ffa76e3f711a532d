"""Packed inference forwards replayed as CUDA graphs, one graph per shape bucket.

A packed batch's shapes change with every batch (M tokens, S segments, the longest segment), and a CUDA graph
replays fixed shapes. So a batch is first padded up to a bucket (``bucket_batch``): M up to a token bucket
(past 2048 tokens, padding under 1/8 of the real tokens), S and the longest segment up
to powers of two. The padding tokens form segments of their own (no prefix, attending only to themselves), and
the unused segment slots are empty, so no real token sees a padding token and every real row's hidden state
is what the unpadded batch gives (tests/test_graphs.py checks this on CPU for both attention paths).

``CudaGraphRunner`` captures the backbone's packed forward for a bucket on its first use (two warm-up runs on
a side stream first: Triton compiles and autotunes there, not inside the capture) and replays it afterwards:
the host then launches one graph per batch instead of some 20 kernels per layer, which takes the host's
launch time off the critical path. What it costs:

- memory: all graphs share one memory pool, which holds the activations of the largest bucket captured so
  far (graphs replay one at a time, so they can share it), plus each graph's static inputs and its
  ``[M_bucket, H]`` output; at most ``max_graphs`` graphs are kept (default 16), and a batch whose bucket is
  not captured when that many exist runs eagerly;
- time: a capture costs about three forwards of that bucket, once.
Graphs are used only for inference (``torch.is_grad_enabled()`` false) on CUDA; a capture that fails (a model
whose forward synchronises with the host, say) is reported once as a warning and that model runs eagerly.
The returned hidden states are a view of the graph's static output, valid until the next batch of the same
bucket: read what you need (scoring rows, pooling) before the next forward, which fastrank's callers do.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Dict, Optional, Tuple

import torch

from fastrank.common import next_power_of_2
from fastrank.data.packing import PackedBatch, Segments
from fastrank.utils import env_switch

MIN_TOKEN_BUCKET = 256
DEFAULT_MAX_GRAPHS = 16


def graphs_requested() -> bool:
    """Whether fastrank replays CUDA graphs for inference (``FASTRANK_CUDA_GRAPHS``, default on)."""
    return env_switch("FASTRANK_CUDA_GRAPHS")


def token_bucket(num_tokens: int) -> int:
    """The smallest bucket holding ``num_tokens``: multiples of 256 up to 4096, then steps of 1/16 of the next
    power of two, so past 2048 tokens the padding stays under 1/8 of the real tokens (16 buckets up to 4096,
    8 per doubling after)."""
    if num_tokens <= 0:
        raise ValueError(f"num_tokens: must be positive, got {num_tokens}")
    step = max(MIN_TOKEN_BUCKET, next_power_of_2(num_tokens) // 16)
    return int(math.ceil(num_tokens / step) * step)


def bucket_key(batch: PackedBatch) -> Tuple[int, int, int, bool]:
    """``(tokens, segments, longest segment, has prefixes)`` of the bucket ``batch`` is padded to."""
    m = batch.num_tokens
    s = batch.segments.cu_seqlens.shape[0] - 1
    m_bucket = token_bucket(m)
    longest = max(16, next_power_of_2(batch.segments.max_seqlen))
    filler = math.ceil((m_bucket - m) / longest)
    s_bucket = max(8, next_power_of_2(s + filler))
    return m_bucket, s_bucket, longest, batch.segments.prefix is not None


def bucket_batch(batch: PackedBatch, key: Optional[Tuple[int, int, int, bool]] = None) -> PackedBatch:
    """``batch`` padded to its bucket (or to ``key``): padding tokens (id 0, position 0) in segments of
    at most the bucket's longest length with no prefix, then empty segments up to the bucket's count. The
    real tokens keep their rows, so ``last_rows``, ``score_rows`` and ``item_cu_seqlens`` stay valid."""
    key = key or bucket_key(batch)
    m_bucket, s_bucket, longest, has_prefix = key
    m = batch.num_tokens
    seg = batch.segments
    s = seg.cu_seqlens.shape[0] - 1
    pad = m_bucket - m
    filler = [longest] * (pad // longest) + ([pad % longest] if pad % longest else [])
    if m > m_bucket or seg.max_seqlen > longest or s + len(filler) > s_bucket or has_prefix != (seg.prefix is not None):
        raise ValueError(f"batch: does not fit bucket {key} (tokens {m}, segments {s}, longest {seg.max_seqlen})")
    device = batch.input_ids.device
    ends = [m + sum(filler[: i + 1]) for i in range(len(filler))] + [m_bucket] * (s_bucket - s - len(filler))
    cu = torch.cat([seg.cu_seqlens, torch.tensor(ends, dtype=seg.cu_seqlens.dtype, device=device)])
    prefix = None
    if has_prefix:
        prefix = torch.cat([seg.prefix, torch.full((s_bucket - s,), -1, dtype=seg.prefix.dtype, device=device)])
    input_ids = batch.input_ids
    position_ids = batch.position_ids
    if pad:
        input_ids = torch.cat([input_ids, input_ids.new_zeros((1, pad))], dim=1)
        # Position 0 for every padding token: valid for learned and rotary position embeddings alike, and
        # padding attends only to padding, so its positions change no real row.
        position_ids = torch.cat([position_ids, position_ids.new_zeros((1, pad))], dim=1)
    segments = Segments(cu_seqlens=cu, prefix=prefix, max_seqlen=longest, max_context=seg.max_context)
    return dataclasses.replace(
        batch, input_ids=input_ids, position_ids=position_ids, segments=segments, num_tokens=m_bucket
    )


@dataclasses.dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    batch: PackedBatch  # the static inputs the graph reads
    hidden: torch.Tensor  # the static output [M_bucket, H] it writes


class CudaGraphRunner:
    """Replays ``backbone``'s packed inference forward as CUDA graphs, one per bucket (see the module docstring).

    Call it as ``runner(batch)`` for the last hidden state ``[M, H]`` of a packed batch; batches that are not
    on CUDA, that need gradients, or whose bucket cannot be captured run ``packed_forward`` eagerly.
    """

    def __init__(self, backbone, max_graphs: int = DEFAULT_MAX_GRAPHS):
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 0:
            raise ValueError(f"max_graphs: must be a non-negative int, got {max_graphs!r}")
        self.backbone = backbone
        self.max_graphs = max_graphs
        self.graphs: Dict[Tuple[int, int, int, bool], _Graph] = {}
        self.pool = None
        self.failed: Optional[str] = None
        self.replays = 0

    def usable(self, batch: PackedBatch) -> bool:
        return (
            self.failed is None
            and batch.input_ids.is_cuda
            and not torch.is_grad_enabled()
            and torch.cuda.is_available()
            and not torch.cuda.is_current_stream_capturing()
        )

    def __call__(self, batch: PackedBatch) -> torch.Tensor:
        from fastrank.engine.forward import eager_packed_forward as packed_forward

        if not self.usable(batch):
            return packed_forward(self.backbone, batch)
        key = bucket_key(batch)
        entry = self.graphs.get(key)
        if entry is None and len(self.graphs) >= self.max_graphs:
            return packed_forward(self.backbone, batch)
        padded = bucket_batch(batch, key)
        if entry is None:
            entry = self._capture(key, padded)
            if entry is None:
                return packed_forward(self.backbone, batch)
        # The static tensors were made under inference mode (as fastrank's callers run): write them there too.
        with torch.inference_mode():
            self._load(entry.batch, padded)
            entry.graph.replay()
        self.replays += 1
        return entry.hidden[: batch.num_tokens]

    @staticmethod
    def _load(static: PackedBatch, batch: PackedBatch) -> None:
        static.input_ids.copy_(batch.input_ids, non_blocking=True)
        static.position_ids.copy_(batch.position_ids, non_blocking=True)
        static.segments.cu_seqlens.copy_(batch.segments.cu_seqlens, non_blocking=True)
        if static.segments.prefix is not None:
            static.segments.prefix.copy_(batch.segments.prefix, non_blocking=True)

    def _capture(self, key, batch: PackedBatch) -> Optional[_Graph]:
        try:
            return self._capture_into(key, batch)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run this model eagerly
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(
                f"fastrank: CUDA graph capture failed, running eagerly from now on ({self.failed}); "
                "set FASTRANK_CUDA_GRAPHS=0 to skip the attempt",
                stacklevel=3,
            )
            return None

    @torch.inference_mode()
    def _capture_into(self, key, batch: PackedBatch) -> _Graph:
        from fastrank.engine.forward import eager_packed_forward as packed_forward

        # The graph's own copies of the inputs, made under inference mode like everything it reads and writes.
        static = dataclasses.replace(
            batch,
            input_ids=batch.input_ids.clone(),
            position_ids=batch.position_ids.clone(),
            segments=dataclasses.replace(
                batch.segments,
                cu_seqlens=batch.segments.cu_seqlens.clone(),
                prefix=None if batch.segments.prefix is None else batch.segments.prefix.clone(),
            ),
        )
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # Triton compiles and autotunes here, outside the capture
                packed_forward(self.backbone, static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = packed_forward(self.backbone, static)
        entry = _Graph(graph=graph, batch=static, hidden=hidden)
        self.graphs[key] = entry
        return entry


def attach_graphs(backbone, max_graphs: int = DEFAULT_MAX_GRAPHS) -> Optional[CudaGraphRunner]:
    """Give ``backbone`` a ``CudaGraphRunner`` that ``fastrank.engine.packed_forward`` uses for its inference
    forwards (idempotent; None when ``FASTRANK_CUDA_GRAPHS=0``). Stored on the instance, outside its modules,
    so ``state_dict`` and ``save_pretrained`` do not see it."""
    if not graphs_requested():
        return None
    runner = backbone.__dict__.get("_fastrank_graphs")
    if runner is None:
        runner = CudaGraphRunner(backbone, max_graphs=max_graphs)
        backbone.__dict__["_fastrank_graphs"] = runner
    return runner


def detach_graphs(backbone) -> None:
    """Drop ``backbone``'s graphs (and the memory their pool holds once nothing else refers to it)."""
    backbone.__dict__.pop("_fastrank_graphs", None)
