"""Device pools: one worker process per device, for one machine with several GPUs.

``Reranker.from_pretrained(path, devices=["cuda:0", "cuda:1"])`` and ``Embedder.from_pretrained(path,
devices=[...])`` give a ``RerankerPool`` / ``EmbedderPool``: the same class, the same methods and the same
numbers to the bit, with the forward passes spread over the devices.

How: this process keeps the tokenizer and a weightless copy of the model (meta device) and does what one
process does up to the forward pass: it tokenises, splits shared prefixes and plans the batches exactly as
``Reranker.score`` / ``Embedder.encode`` would. Each planned batch (its token ids and its order) goes to
whichever worker is free, which builds the same stream and runs it; the results come back by input index.
So the split is by tokens (each batch is a token budget), a faster device takes more batches, the devices
finish together, and every batch is computed as it would be in one process. The workers start once (each
loads the model) and serve every later call until ``close()``.
"""

from __future__ import annotations

import functools
from typing import List, Sequence

import torch

from fastrank.inference.embedder import Embedder
from fastrank.inference.layerwise import LayerwiseReranker
from fastrank.inference.reranker import Reranker
from fastrank.models.loading import resolve_device
from fastrank.workers import WorkerPool


def check_devices(devices, device=None) -> List[str]:
    """``devices`` as a list of device names, each checked (``resolve_device``'s errors); ``device`` (the one-device
    option of the same call) must not be given too."""
    if device is not None:
        raise ValueError("device, devices: give one (devices starts one worker per device)")
    if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence) or not devices:
        raise ValueError(
            f"devices: give a non-empty list of devices, e.g. ['cuda:0', 'cuda:1'] or ['cpu', 'cpu'], got {devices!r}"
        )
    names = []
    for i, device in enumerate(devices):
        try:
            resolved = resolve_device(device)
        except ValueError as e:
            raise ValueError(f"devices[{i}]: {str(e).removeprefix('device: ')}") from None
        if resolved.type == "meta":
            raise ValueError(f"devices[{i}]: 'meta' holds no weights and cannot run the model")
        names.append(str(resolved))
    return names


def _build_quietly(cls, *args, **kwargs):
    """A worker's factory: ``cls.from_pretrained`` without Hugging Face's loading bars (several workers' bars
    would interleave; the parent shows the job's own progress)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return cls.from_pretrained(*args, **kwargs)


def _source(path_or_model) -> str:
    if not isinstance(path_or_model, str):
        raise ValueError(
            "path_or_model: devices starts one worker process per device, each loading the model itself, so "
            f"give a path or hub name, not a {type(path_or_model).__name__}"
        )
    return path_or_model


class _Pooled:
    """What both pools add to the class they extend: the workers, where results land, and closing."""

    workers: WorkerPool

    @property
    def devices(self) -> List[str]:
        """The workers' devices, in the order given."""
        return self.workers.devices

    @property
    def startup_seconds(self) -> float:
        """Wall time from starting the workers to all of them holding the model."""
        return self.workers.startup_seconds

    @property
    def device(self) -> torch.device:
        """Where results land: the host (the workers' devices are ``devices``)."""
        return torch.device("cpu")

    @property
    def _plan_device(self) -> torch.device:
        # Batches are planned for the first worker's kind of device (window size, padded widths), as one
        # process on that device would plan them.
        return torch.device(self.workers.devices[0])

    @property
    def _results_device(self) -> torch.device:
        return torch.device("cpu")

    def _execute(self, batches, normalize):
        yield from self.workers.imap("_run_remote", batches, normalize)

    def close(self) -> None:
        """Stop the worker processes (also done when the pool is garbage-collected or the program exits)."""
        self.workers.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RerankerPool(_Pooled, Reranker):
    """A ``Reranker`` whose batches run in worker processes, one per device.

    Made by ``Reranker.from_pretrained(path, preset, devices=[...])``; ``score``, ``rank`` and
    ``compute_score`` work as ``Reranker``'s and give the same scores (the batches are planned here exactly
    as one process plans them). ``startup_seconds`` says what starting the workers cost.

        with fastrank.Reranker.from_pretrained("Qwen/Qwen3-Reranker-0.6B", devices=["cuda:0", "cuda:1"]) as r:
            scores = r.score(pairs)
    """

    def __init__(self, planner: Reranker, workers: WorkerPool):
        # The planner is a Reranker on the meta device: its tokenizer, preset and packing decision, no weights.
        super().__init__(
            planner.model, planner.tokenizer, planner.preset, packed=planner.packed, share_prefix=planner.share_prefix
        )
        self.workers = workers

    @classmethod
    def start(cls, path_or_model, preset, devices, *, device=None, tokenizer=None, **options) -> "RerankerPool":
        devices = check_devices(devices, device)
        source = _source(path_or_model)
        planner = Reranker.from_pretrained(source, preset, tokenizer=tokenizer, device="meta", **options)
        workers = WorkerPool(
            Reranker.from_pretrained, (source, planner.preset), {"tokenizer": tokenizer, **options}, devices
        )
        return cls(planner, workers)


class EmbedderPool(_Pooled, Embedder):
    """An ``Embedder`` whose batches run in worker processes, one per device.

    Made by ``Embedder.from_pretrained(path, devices=[...])``; ``encode``, ``encode_queries``,
    ``encode_corpus`` and ``similarity`` work as ``Embedder``'s and give the same embeddings
    (``convert_to="torch"`` gives a CPU tensor).

        with fastrank.Embedder.from_pretrained("BAAI/bge-base-en-v1.5", devices=["cuda:0", "cuda:1"]) as e:
            vectors = e.encode(texts)
    """

    def __init__(self, planner: Embedder, workers: WorkerPool):
        super().__init__(planner.encoder, packed=planner.packed)
        self.workers = workers

    @classmethod
    def start(cls, path_or_model, devices, *, device=None, **options) -> "EmbedderPool":
        devices = check_devices(devices, device)
        source = _source(path_or_model)
        planner = Embedder.from_pretrained(source, device="meta", **options)
        workers = WorkerPool(functools.partial(_build_quietly, Embedder), (source,), options, devices)
        return cls(planner, workers)


class LayerwiseRerankerPool(_Pooled, LayerwiseReranker):
    """A ``LayerwiseReranker`` whose batches run in worker processes, one per device.

    Made by ``Reranker.from_pretrained(path, devices=[...], cutoff_layers=[...])`` for a layer-wise or lightweight
    checkpoint; ``score`` (one list per layer for several), ``rank`` and ``compute_score`` work as
    ``LayerwiseReranker``'s and give the same scores.
    """

    def __init__(self, planner: LayerwiseReranker, workers: WorkerPool):
        super().__init__(
            planner.model,
            planner.tokenizer,
            planner.preset,
            cutoff_layers=planner.cutoff_layers,
            compress_layers=planner.compress_layers if planner.lightweight else None,
            compress_ratio=planner.compress_ratio if planner.lightweight else None,
        )
        self.workers = workers

    @classmethod
    def start(
        cls, path_or_model, preset, devices, *, device=None, tokenizer=None, **options
    ) -> "LayerwiseRerankerPool":
        devices = check_devices(devices, device)
        source = _source(path_or_model)
        planner = LayerwiseReranker.from_pretrained(source, preset, tokenizer=tokenizer, device="meta", **options)
        workers = WorkerPool(
            functools.partial(_build_quietly, LayerwiseReranker),
            (source, planner.preset),
            {"tokenizer": tokenizer, **options},
            devices,
        )
        return cls(planner, workers)

    def _execute_layers(self, batches, layers, normalize, compression):
        yield from self.workers.imap("_run_layers_remote", batches, layers, normalize, compression)
