"""The HTTP app: Cohere, Jina, TEI and OpenAI request and response shapes over one reranker and/or one embedder."""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import hmac
import logging
import math
import time
import uuid
from typing import Dict, List, Literal, Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field, StrictStr

from fastrank.inference import best_first
from fastrank.serve.batcher import Batcher, Overloaded, TooLarge

log = logging.getLogger("fastrank.serve")

# Paths that answer without the API key: liveness, and the API's own description.
OPEN_PATHS = ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc")

DEFAULT_LIMITS = dict(
    max_documents=1000,  # documents per rerank request
    max_texts=2048,  # texts per embedding request
    max_text_chars=100_000,  # characters of one query, document or text
    max_request_tokens=131072,  # tokens of one request (after the preset's or the embedder's truncation)
)


# ---------------------------------------------------------------------------------------------------- the models


class TextDocument(BaseModel):
    text: StrictStr


class RerankV1Request(BaseModel):
    """Cohere's v1 rerank request (``documents`` are strings or ``{"text": ...}`` objects)."""

    model: Optional[str] = Field(None, description="echoed back; the server scores with the model it serves")
    query: StrictStr = Field(..., min_length=1)
    documents: List[Union[StrictStr, TextDocument]] = Field(..., min_length=1)
    top_n: Optional[int] = Field(None, ge=1, description="keep the n best documents (default: all)")
    return_documents: bool = False


class JinaRerankRequest(RerankV1Request):
    """Jina's rerank request: Cohere v1's fields; ``return_documents`` defaults to true as in Jina's API."""

    return_documents: bool = True


class RerankV2Request(BaseModel):
    """Cohere's v2 rerank request."""

    model: Optional[str] = Field(None, description="echoed back; the server scores with the model it serves")
    query: StrictStr = Field(..., min_length=1)
    documents: List[StrictStr] = Field(..., min_length=1)
    top_n: Optional[int] = Field(None, ge=1)
    max_tokens_per_doc: Optional[int] = Field(None, ge=1, description="each document cut to this many tokens")


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: Optional[TextDocument] = None


class ApiVersion(BaseModel):
    version: str


class BilledUnits(BaseModel):
    search_units: int
    input_tokens: int


class Tokens(BaseModel):
    input_tokens: int
    output_tokens: int = 0


class Meta(BaseModel):
    api_version: ApiVersion
    billed_units: BilledUnits
    tokens: Tokens


class RerankResponse(BaseModel):
    id: str
    results: List[RerankResult]
    meta: Meta


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class JinaRerankResponse(RerankResponse):
    model: Optional[str] = None
    usage: Usage


class TEIRerankRequest(BaseModel):
    """TEI's rerank request. Over-long pairs are cut by the preset's rule (the passage's end) unless ``truncate`` is
    false, which makes them a 413; ``truncation_direction`` "Left" is refused when a pair needs cutting."""

    query: StrictStr = Field(..., min_length=1)
    texts: List[StrictStr] = Field(..., min_length=1)
    raw_scores: bool = False
    return_text: bool = False
    truncate: Optional[bool] = None
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"


class TEIRank(BaseModel):
    index: int
    score: float
    text: Optional[str] = None


class TEIEmbedRequest(BaseModel):
    """TEI's embed request. Texts longer than the embedder's max_length are cut at the end unless ``truncate`` is
    false, which makes them a 413; ``truncation_direction`` "Left" is refused when a text needs cutting."""

    inputs: Union[StrictStr, List[StrictStr]]
    normalize: bool = True
    truncate: Optional[bool] = None
    truncation_direction: Literal["Left", "Right", "left", "right"] = "Right"


class OpenAIEmbeddingRequest(BaseModel):
    """OpenAI's embeddings request (strings only: token-id inputs are refused)."""

    input: Union[StrictStr, List[StrictStr]]
    model: Optional[str] = Field(None, description="echoed back; the server embeds with the model it serves")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1, description="keep the first n dimensions, re-normalised")
    user: Optional[str] = None


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[List[float], str]


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: List[OpenAIEmbedding]
    model: str
    usage: Usage


class ErrorResponse(BaseModel):
    error: str
    field: Optional[str] = None
    limit: Optional[str] = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: Optional[str] = None, limit: Optional[str] = None, **headers):
        super().__init__(message)
        self.status, self.message, self.field, self.limit, self.headers = status, message, field, limit, headers


# ---------------------------------------------------------------------------------------------------- metrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class _Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float):
        self.count += 1
        self.sum += value
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str, labels: str):
        sep = "," if labels else ""
        for b, c in zip(self.buckets, self.counts):
            yield f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}'
        yield f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}'
        yield f"{name}_sum{{{labels}}} {self.sum}"
        yield f"{name}_count{{{labels}}} {self.count}"


class Metrics:
    """Counters and histograms, written out in the Prometheus text format (no client library)."""

    def __init__(self):
        self.requests = collections.Counter()  # (endpoint, status)
        self.items = collections.Counter()  # endpoint -> pairs or texts
        self.tokens = collections.Counter()  # endpoint -> tokens
        self.latency: Dict[str, _Histogram] = collections.defaultdict(lambda: _Histogram(LATENCY_BUCKETS))
        self.batch_size: Dict[str, _Histogram] = collections.defaultdict(lambda: _Histogram(BATCH_BUCKETS))
        self.batch_latency: Dict[str, _Histogram] = collections.defaultdict(lambda: _Histogram(LATENCY_BUCKETS))

    def render(self, batchers: Dict[str, Batcher]) -> str:
        out = []

        def head(name, kind, text):
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        head("fastrank_requests_total", "counter", "HTTP requests by endpoint and status")
        for (endpoint, status), n in sorted(self.requests.items()):
            out.append(f'fastrank_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        head("fastrank_items_total", "counter", "pairs scored or texts embedded, by endpoint")
        for endpoint, n in sorted(self.items.items()):
            out.append(f'fastrank_items_total{{endpoint="{endpoint}"}} {n}')
        head("fastrank_tokens_total", "counter", "tokens computed, by endpoint")
        for endpoint, n in sorted(self.tokens.items()):
            out.append(f'fastrank_tokens_total{{endpoint="{endpoint}"}} {n}')
        head("fastrank_queue_tokens", "gauge", "tokens waiting or running, by model")
        for model, b in sorted(batchers.items()):
            out.append(f'fastrank_queue_tokens{{model="{model}"}} {b.queued_tokens}')
        head("fastrank_queue_requests", "gauge", "requests waiting or running, by model")
        for model, b in sorted(batchers.items()):
            out.append(f'fastrank_queue_requests{{model="{model}"}} {b.queued_requests}')
        head("fastrank_request_latency_seconds", "histogram", "request latency by endpoint")
        for endpoint, h in sorted(self.latency.items()):
            out.extend(h.lines("fastrank_request_latency_seconds", f'endpoint="{endpoint}"'))
        head("fastrank_batch_size", "histogram", "items per model call, by model")
        for model, h in sorted(self.batch_size.items()):
            out.extend(h.lines("fastrank_batch_size", f'model="{model}"'))
        head("fastrank_batch_latency_seconds", "histogram", "seconds per model call, by model")
        for model, h in sorted(self.batch_latency.items()):
            out.extend(h.lines("fastrank_batch_latency_seconds", f'model="{model}"'))
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------- errors


def _field(loc) -> str:
    """``("body", "documents", 0, "str")`` -> ``documents[0]`` (the union member tags dropped)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "TextDocument", "list[str]") or "[" in str(part) or "-" in str(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": ("body",), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return _error(400, f"malformed JSON: {first.get('msg')} ({first.get('ctx', {}).get('error', '')})", "body")
    field = _field(first.get("loc", ()))
    same = [e for e in errors if _field(e.get("loc", ())) == field]
    kind = first.get("type", "")
    given = first.get("input")
    if kind == "missing":
        message = "is required"
    elif kind in ("string_too_short", "too_short"):
        message = "must not be empty"
    elif kind == "model_attributes_type" or (field == "body" and not isinstance(given, dict)):
        message = f"the body must be a JSON object, got {type(given).__name__}"
    elif len(same) > 1:
        message = f"expected {' or '.join(_expected(e) for e in same)}, got {_type_name(given)}"
    else:
        message = first.get("msg", "invalid")
    return _error(422, f"{field}: {message}", field)


def _expected(error) -> str:
    tag = next((p for p in reversed(error.get("loc", ())) if isinstance(p, str)), "")
    return {"str": "a string", "TextDocument": "a {text} object", "list[str]": "a list of strings"}.get(tag, tag)


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", type(None): "null", bool: "a boolean", int: "a number"}.get(
        type(value), type(value).__name__
    )


def _error(status: int, message: str, field=None, limit=None, headers=None) -> JSONResponse:
    body = ErrorResponse(error=message, field=field, limit=limit).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------------- the app


class _Around:
    """What every request goes through: the API key, a 500 with an id in the log for a failure, and the request
    counters and latency.

    A plain ASGI middleware, not Starlette's ``@app.middleware("http")``: that one hands the endpoint a
    ``receive`` that never reports the client's disconnect, so ``request.is_disconnected()`` stays False and a
    request whose client has gone would still be computed (tested over real HTTP)."""

    def __init__(self, app, api_key: Optional[str], metrics: "Metrics", routes):
        self.app, self.api_key, self.metrics, self.routes = app, api_key, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        start = time.perf_counter()
        if self.api_key and path not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                response = _error(
                    401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", "Authorization"
                )
                self.metrics.requests[(path, 401)] += 1
                return await response(scope, receive, send)
        status = {}

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:  # noqa: BLE001 -- a failure answers this request only; the server lives on
            error_id = uuid.uuid4().hex[:12]
            log.exception("error id %s on %s %s", error_id, scope["method"], path)
            if "code" not in status:  # nothing sent yet: the client gets the id
                await _error(500, f"internal server error (id {error_id} in the server's log)")(
                    scope, receive, send_and_note
                )
        known = any(getattr(r, "path", None) == path for r in self.routes)
        endpoint = path if known else "other"
        self.metrics.requests[(endpoint, status.get("code", 500))] += 1
        self.metrics.latency[endpoint].observe(time.perf_counter() - start)


def _describe(model) -> dict:
    """dtype and device(s) of a Reranker or Embedder (a device pool: its workers' devices), and a layer-wise
    reranker's cutoff layer."""
    params = model.model.parameters() if hasattr(model, "model") else model.encoder.parameters()
    p = next(params)
    devices = getattr(model, "devices", None)
    out = {"dtype": str(p.dtype).replace("torch.", ""), "device": ",".join(devices) if devices else str(p.device)}
    cutoff = getattr(model, "cutoff_layers", None)
    if cutoff is not None:
        out["cutoff_layers"] = list(cutoff)
    return out


def build_app(
    reranker=None,
    embedder=None,
    *,
    api_key: Optional[str] = None,
    reranker_name: Optional[str] = None,
    embedder_name: Optional[str] = None,
    max_batch_tokens: int = 16384,
    max_wait_ms: float = 0.0,
    max_queue_tokens: int = 262144,
    batching: bool = True,
    **limits,
) -> FastAPI:
    """A FastAPI app serving ``reranker`` (a ``fastrank.Reranker``) and/or ``embedder`` (a ``fastrank.Embedder``).

    Args:
        api_key: when set, every endpoint but ``/health`` and the API docs needs ``Authorization: Bearer <key>``.
        reranker_name, embedder_name: the ``model`` names reported back (default: the model's ``name_or_path``).
        max_batch_tokens: tokens per model call at most, over the requests merged into it (tokens the model
            computes: a reranker's shared query prefix counts once, see ``Reranker.computed_tokens``).
        max_wait_ms: how long a batch waits for more requests once the model is free; 0 (the default) runs what
            queued while the model was busy at once, so a request alone never waits.
        max_queue_tokens: tokens (counted as for ``max_batch_tokens``) waiting or running at most, per model;
            beyond it a request gets 503 + Retry-After.
        batching: False runs every request alone (the baseline for benchmarks).
        limits: per-request limits (``max_documents``, ``max_texts``, ``max_text_chars``, ``max_request_tokens``);
            a request over one gets 413 naming it.
    """
    from fastrank import __version__

    if reranker is None and embedder is None:
        raise ValueError("reranker, embedder: give at least one model to serve")
    unknown = set(limits) - set(DEFAULT_LIMITS)
    if unknown:
        raise ValueError(f"unknown limits {sorted(unknown)}; the limits are {sorted(DEFAULT_LIMITS)}")
    limits = {**DEFAULT_LIMITS, **limits}
    sizes = dict(limits, max_batch_tokens=max_batch_tokens, max_queue_tokens=max_queue_tokens)
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    if max_wait_ms < 0:
        raise ValueError(f"max_wait_ms: must be >= 0, got {max_wait_ms!r}")
    cutoff = getattr(reranker, "cutoff_layers", None)
    if cutoff is not None and len(cutoff) != 1:
        raise ValueError(
            f"reranker: a layer-wise reranker scoring at layers {list(cutoff)} gives several scores per document; "
            "the APIs return one: load it with one cutoff layer (--cutoff-layers N)"
        )

    metrics = Metrics()
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastrank-model")
    batchers: Dict[str, Batcher] = {}

    def on_batch(model_kind):
        def record(n_items, n_tokens, seconds):
            metrics.batch_size[model_kind].observe(n_items)
            metrics.batch_latency[model_kind].observe(seconds)

        return record

    common = dict(
        executor=executor,
        max_batch_tokens=max_batch_tokens,
        max_wait_ms=max_wait_ms,
        max_queue_tokens=max_queue_tokens,
        batching=batching,
    )
    if reranker is not None:
        reranker_name = reranker_name or getattr(reranker.model, "name_or_path", None) or "reranker"

        def run_rerank(items, options):
            (normalize,) = options
            pairs, encoded = zip(*items)  # the encodings the request was counted with: not tokenised again
            return reranker.score(
                list(pairs), normalize=normalize, max_tokens=max_batch_tokens, show_progress=False, tokenized=encoded
            )

        batchers["reranker"] = Batcher(run_rerank, on_batch=on_batch("reranker"), **common)
    if embedder is not None:
        embedder_name = embedder_name or getattr(embedder.encoder.model, "name_or_path", None) or "embedder"

        def run_embed(items, options):
            (normalize,) = options
            texts, ids = zip(*items)
            vectors = embedder.encode(
                list(texts), normalize=normalize, max_tokens=max_batch_tokens, show_progress=False, tokenized=ids
            )
            return list(np.asarray(vectors, dtype=np.float32))

        batchers["embedder"] = Batcher(run_embed, on_batch=on_batch("embedder"), **common)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for b in batchers.values():  # uvicorn has drained the requests in flight by now
            await b.close()
        executor.shutdown(wait=True)

    app = FastAPI(
        title="fastrank serve",
        version=__version__,
        lifespan=lifespan,
        description="Rerank and embed over the APIs clients already speak. `POST /rerank` is Jina's shape (Cohere "
        "v1 plus `usage`); TEI's rerank shape (`query`, `texts`) is served at `POST /tei/rerank`. The `model` field "
        "of a request is echoed back and not checked: the server computes with the one model it serves. "
        "With an API key set, every endpoint but `/health` and these docs needs `Authorization: Bearer <key>`.",
        responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 413: {"model": ErrorResponse}},
    )
    app.state.metrics, app.state.batchers, app.state.limits = metrics, batchers, limits

    @app.exception_handler(RequestValidationError)
    async def on_validation(request, exc):
        return _validation_error(exc)

    @app.exception_handler(ApiError)
    async def on_api_error(request, exc: ApiError):
        return _error(exc.status, exc.message, exc.field, exc.limit, exc.headers or None)

    app.add_middleware(_Around, api_key=api_key, metrics=metrics, routes=app.routes)

    # ------------------------------------------------------------------ helpers

    def need(kind: str):
        if kind not in batchers:
            raise ApiError(404, f"this server has no {kind}: start it with --{kind} PATH", "model")
        return batchers[kind]

    def check_count(n: int, field: str, limit: str):
        if n > limits[limit]:
            raise ApiError(413, f"{field}: {n} items, over the server's limit {limit}={limits[limit]}", field, limit)

    def check_chars(texts, field: str):
        top = limits["max_text_chars"]
        for i, t in enumerate(texts):
            if len(t) > top:
                name = f"{field}[{i}]" if field != "query" else field
                raise ApiError(
                    413, f"{name}: {len(t)} characters, over the server's limit max_text_chars={top}", name,
                    "max_text_chars",
                )  # fmt: skip

    def check_tokens(total: int):
        if total > limits["max_request_tokens"]:
            top = limits["max_request_tokens"]
            raise ApiError(
                413, f"the request has {total} tokens, over the server's limit max_request_tokens={top}", None,
                "max_request_tokens",
            )  # fmt: skip

    async def in_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def compute(request: Request, batcher: Batcher, items, tokens, cost, options, endpoint):
        """Submit (``cost``: the tokens the model computes), and drop the submission if the client disconnects
        before its batch runs."""
        task = asyncio.ensure_future(batcher.submit(items, cost, options))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.05)
                if done:
                    break
                if await request.is_disconnected():
                    task.cancel()
                    raise ApiError(499, "the client disconnected")
            results = task.result()
        except Overloaded as e:
            raise ApiError(503, str(e), None, "max_queue_tokens", **{"Retry-After": str(e.retry_after)}) from None
        except TooLarge as e:
            raise ApiError(413, str(e), None, "max_queue_tokens") from None
        finally:
            if not task.done():
                task.cancel()
        metrics.items[endpoint] += len(items)
        metrics.tokens[endpoint] += int(sum(tokens))
        return results

    def cut_documents(texts: List[str], n: Optional[int]) -> List[str]:
        if n is None:
            return texts
        tok = reranker.tokenizer
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        return [t if len(i) <= n else tok.decode(i[:n]) for t, i in zip(texts, ids)]

    def check_truncation(cut: List[bool], field: str, limit: int, truncate, direction) -> None:
        """TEI's ``truncate``: False makes an over-long input an error rather than cut it (the default, None,
        cuts it, as TEI's ``--auto-truncate`` does); only the end of a text is ever cut."""
        if not any(cut):
            return
        first = cut.index(True)
        if truncate is False:
            raise ApiError(
                413,
                f"{field}[{first}]: longer than the model's {limit} tokens ({sum(cut)} inputs are); send "
                "truncate: true to cut them, or shorten them",
                field,
                "max_length",
            )
        if direction.lower() == "left":
            raise ApiError(
                422,
                f"truncation_direction: 'Left' is not supported ({field}[{first}] needs cutting, and this server "
                "cuts the end of a text); send 'Right', or shorten the input",
                "truncation_direction",
            )

    async def rerank(
        request: Request,
        query: str,
        texts: List[str],
        normalize: bool,
        endpoint: str,
        max_doc=None,
        truncate=None,
        direction="Right",
    ):
        batcher = need("reranker")
        field = "documents" if endpoint != "/tei/rerank" else "texts"
        check_count(len(texts), field, "max_documents")
        check_chars([query], "query")
        check_chars(texts, field)

        def prepare():
            docs = cut_documents(texts, max_doc)
            pairs = [(query, d) for d in docs]
            encoded = reranker.tokenize(pairs)
            return pairs, encoded, reranker.computed_tokens(pairs, encoded)

        pairs, encoded, cost = await in_thread(prepare)
        check_truncation([e.truncated for e in encoded], field, reranker.preset.max_length, truncate, direction)
        tokens = [len(e.input_ids) for e in encoded]
        check_tokens(sum(tokens))
        scores = await compute(request, batcher, list(zip(pairs, encoded)), tokens, cost, (normalize,), endpoint)
        return scores, int(sum(tokens))

    async def embed(
        request: Request, texts: List[str], normalize, field: str, endpoint: str, truncate=None, direction="Right"
    ):
        batcher = need("embedder")
        if not texts:
            raise ApiError(422, f"{field}: must not be empty", field)
        check_count(len(texts), field, "max_texts")
        check_chars(texts, field)

        def prepare():
            ids = embedder.encoder.tokenize(texts, "passage", None)
            if truncate is False or direction.lower() == "left":  # which inputs were cut: their full length
                full = embedder.encoder.tokenize(texts, "passage", 1 << 30)
                return ids, [len(a) < len(b) for a, b in zip(ids, full)]
            return ids, []

        ids, cut = await in_thread(prepare)
        limit = getattr(embedder.encoder, "max_length", None) or embedder.encoder.passage_max_len
        check_truncation(cut, field, limit, truncate, direction)
        tokens = [len(i) for i in ids]
        check_tokens(sum(tokens))
        vectors = await compute(request, batcher, list(zip(texts, ids)), tokens, sum(tokens), (normalize,), endpoint)
        return vectors, int(sum(tokens))

    def cohere_results(scores, documents, top_n, return_documents):
        out = []
        for i in best_first(scores, top_n):
            doc = None
            if return_documents:
                d = documents[i]
                doc = TextDocument(text=d if isinstance(d, str) else d.text)
            out.append(RerankResult(index=i, relevance_score=scores[i], document=doc))
        return out

    def meta(version: str, tokens: int) -> Meta:
        return Meta(
            api_version=ApiVersion(version=version),
            billed_units=BilledUnits(search_units=1, input_tokens=tokens),
            tokens=Tokens(input_tokens=tokens),
        )

    def doc_texts(documents) -> List[str]:
        return [d if isinstance(d, str) else d.text for d in documents]

    # ------------------------------------------------------------------ endpoints

    exclude = dict(response_model_exclude_none=True)

    @app.post("/v1/rerank", response_model=RerankResponse, tags=["Cohere"], **exclude)
    async def cohere_v1_rerank(body: RerankV1Request, request: Request):
        """Cohere's v1 rerank: results best first, `relevance_score` in [0, 1] (the preset's normalisation)."""
        scores, tokens = await rerank(request, body.query, doc_texts(body.documents), True, "/v1/rerank")
        results = cohere_results(scores, body.documents, body.top_n, body.return_documents)
        return RerankResponse(id=str(uuid.uuid4()), results=results, meta=meta("1", tokens))

    @app.post("/v2/rerank", response_model=RerankResponse, tags=["Cohere"], **exclude)
    async def cohere_v2_rerank(body: RerankV2Request, request: Request):
        """Cohere's v2 rerank: `max_tokens_per_doc` cuts each document to that many tokens first."""
        scores, tokens = await rerank(
            request, body.query, list(body.documents), True, "/v2/rerank", body.max_tokens_per_doc
        )
        results = cohere_results(scores, body.documents, body.top_n, False)
        return RerankResponse(id=str(uuid.uuid4()), results=results, meta=meta("2", tokens))

    @app.post("/rerank", response_model=JinaRerankResponse, tags=["Jina"], **exclude)
    async def jina_rerank(body: JinaRerankRequest, request: Request):
        """Jina's rerank (Cohere v1 plus `usage`; `return_documents` defaults to true). TEI's rerank shape is at
        `/tei/rerank`: both APIs claim `/rerank`, and this server gives it to Jina's (and Cohere's) clients."""
        scores, tokens = await rerank(request, body.query, doc_texts(body.documents), True, "/rerank")
        return JinaRerankResponse(
            id=str(uuid.uuid4()),
            model=body.model or reranker_name,
            results=cohere_results(scores, body.documents, body.top_n, body.return_documents),
            meta=meta("1", tokens),
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )

    @app.post("/tei/rerank", response_model=List[TEIRank], tags=["TEI"], **exclude)
    async def tei_rerank(body: TEIRerankRequest, request: Request):
        """TEI's rerank: a bare list `[{index, score, text?}]`, best first; `raw_scores` skips the normalisation."""
        scores, _ = await rerank(
            request,
            body.query,
            list(body.texts),
            not body.raw_scores,
            "/tei/rerank",
            truncate=body.truncate,
            direction=body.truncation_direction,
        )
        return [
            TEIRank(index=i, score=scores[i], text=body.texts[i] if body.return_text else None)
            for i in best_first(scores)
        ]

    @app.post("/embed", response_model=List[List[float]], tags=["TEI"])
    async def tei_embed(body: TEIEmbedRequest, request: Request):
        """TEI's embed: one list of floats per input."""
        texts = [body.inputs] if isinstance(body.inputs, str) else list(body.inputs)
        vectors, _ = await embed(
            request, texts, body.normalize, "inputs", "/embed", body.truncate, body.truncation_direction
        )
        return [v.tolist() for v in vectors]

    @app.post("/v1/embeddings", response_model=OpenAIEmbeddingResponse, tags=["OpenAI"])
    async def openai_embeddings(body: OpenAIEmbeddingRequest, request: Request):
        """OpenAI's embeddings: `encoding_format` float or base64 (little-endian float32); `dimensions` keeps the
        first n dimensions and re-normalises them, as OpenAI does."""
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if body.dimensions is not None and body.dimensions > embedder_dim():
            raise ApiError(
                422, f"dimensions: {body.dimensions} is more than the model's {embedder_dim()}", "dimensions"
            )
        vectors, tokens = await embed(request, texts, None, "input", "/v1/embeddings")
        data = []
        for i, v in enumerate(vectors):
            if body.dimensions is not None:
                v = v[: body.dimensions]
                norm = float(np.linalg.norm(v))
                v = v / norm if norm > 0 and math.isfinite(norm) else v
            v = np.ascontiguousarray(v, dtype="<f4")
            value = base64.b64encode(v.tobytes()).decode() if body.encoding_format == "base64" else v.tolist()
            data.append(OpenAIEmbedding(index=i, embedding=value))
        return OpenAIEmbeddingResponse(
            data=data, model=body.model or embedder_name, usage=Usage(prompt_tokens=tokens, total_tokens=tokens)
        )

    def embedder_dim() -> int:
        need("embedder")
        return embedder.dim

    @app.get("/health", tags=["Server"])
    async def health():
        """Liveness: 200 while the server runs (open without the API key)."""
        return {"status": "ok"}

    @app.get("/info", tags=["Server"])
    async def info():
        """What is served, on what, under which limits."""
        models = {}
        if reranker is not None:
            models["reranker"] = {"model": reranker_name, "preset": reranker.preset.name, **_describe(reranker)}
        if embedder is not None:
            models["embedder"] = {"model": embedder_name, "dim": embedder.dim, **_describe(embedder)}
        return {
            "version": __version__,
            "models": models,
            "batching": {
                "enabled": batching,
                "max_batch_tokens": max_batch_tokens,
                "max_wait_ms": max_wait_ms,
                "max_queue_tokens": max_queue_tokens,
            },
            "limits": limits,
            "auth": bool(api_key),
        }

    @app.get("/metrics", response_class=PlainTextResponse, tags=["Server"])
    async def prometheus():
        """Prometheus text format: requests by endpoint and status, items, tokens, queue depth, batch sizes and
        latencies."""
        return PlainTextResponse(metrics.render(batchers), media_type="text/plain; version=0.0.4")

    return app
