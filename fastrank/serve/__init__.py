"""``fastrank serve``: an HTTP server with the Cohere, Jina, TEI and OpenAI rerank and embedding APIs, batching
across requests. Needs the ``serve`` extra: ``pip install 'fastrank-llm[serve]'`` (FastAPI and uvicorn)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

API_KEY_ENV = "FASTRANK_API_KEY"


def build_app(reranker=None, embedder=None, **kwargs):
    """The FastAPI app serving a ``fastrank.Reranker`` and/or a ``fastrank.Embedder`` (see ``app.build_app``)."""
    from fastrank.serve.app import build_app as _build_app

    return _build_app(reranker, embedder, **kwargs)


def serve(
    reranker=None,
    embedder=None,
    *,
    preset: Optional[str] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device=None,
    devices: Optional[Sequence[str]] = None,
    dtype="auto",
    cutoff_layers: Optional[int] = None,
    compress_layers: Optional[Sequence[int]] = None,
    compress_ratio: Optional[int] = None,
    api_key: Optional[str] = None,
    log_level: str = "info",
    **kwargs,
) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's graceful shutdown: stop accepting, finish the requests in flight).

    ``reranker`` and ``embedder`` are paths or hub names (loaded on ``device`` in ``dtype``; ``preset`` for the
    reranker) or loaded ``Reranker`` / ``Embedder`` objects. ``devices`` (e.g. ``["cuda:0", "cuda:1"]``) loads
    each path in a device pool instead: one worker process per device, the merged batches shared out among
    them. ``cutoff_layers`` (one layer), ``compress_layers`` and ``compress_ratio`` configure a layer-wise or
    lightweight reranker (``fastrank.inference.layerwise``). ``api_key`` defaults to the ``FASTRANK_API_KEY``
    environment variable. Other keywords go to ``build_app`` (batching and per-request limits). Pools are
    closed when the server stops."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError("fastrank serve needs uvicorn and fastapi: pip install 'fastrank-llm[serve]'") from None
    from fastrank.inference import Embedder, Reranker

    if reranker is None and embedder is None:
        raise ValueError("give a reranker, an embedder or both to serve")
    layerwise = {
        name: value
        for name, value in (
            ("cutoff_layers", cutoff_layers),
            ("compress_layers", compress_layers),
            ("compress_ratio", compress_ratio),
        )
        if value is not None
    }
    if isinstance(cutoff_layers, (list, tuple)) and len(cutoff_layers) != 1:
        raise ValueError(f"cutoff_layers: the APIs give one score per document; give one layer, not {cutoff_layers}")
    if layerwise and not isinstance(reranker, str):
        raise ValueError("cutoff_layers, compress_layers, compress_ratio: only for a reranker given by path")
    loaded = []
    try:
        if isinstance(reranker, str):
            kwargs.setdefault("reranker_name", reranker)
            reranker = Reranker.from_pretrained(
                reranker, preset, dtype=dtype, device=device, devices=devices, **layerwise
            )
            loaded.append(reranker)
        if isinstance(embedder, str):
            kwargs.setdefault("embedder_name", embedder)
            embedder = Embedder.from_pretrained(embedder, dtype=dtype, device=device, devices=devices)
            loaded.append(embedder)
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV) or None
        app = build_app(reranker, embedder, api_key=api_key, **kwargs)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        for model in loaded:  # device pools: stop their worker processes
            close = getattr(model, "close", None)
            if callable(close):
                close()


__all__ = ["API_KEY_ENV", "build_app", "serve"]
