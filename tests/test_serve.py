"""`fastrank serve`: the Cohere, Jina, TEI and OpenAI shapes, errors, the API key, metrics, batching across
requests, the queue bound, and a real server process called with the real cohere and openai clients."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from references import require
from tiny_models import tiny_causal_lm, tiny_tokenizer

import fastrank
from fastrank.serve import build_app

PRESET = "qwen3-reranker"
QUERY = "where does the river flow"
DOCS = ["the river flows to the sea", "a recipe for bread", "rivers and streams", "taxes are due in april"]
TEXTS = ["river water", "a long history of the city and its music", "yes"]
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32, scored in another batch


@pytest.fixture(scope="module")
def models():
    reranker = fastrank.Reranker(tiny_causal_lm("qwen2"), tiny_tokenizer("qwen2"), PRESET)
    embedder = fastrank.Embedder(
        fastrank.BiEncoder(tiny_causal_lm("qwen2", seed=1), tiny_tokenizer("qwen2"), pooling="last", normalize=True)
    )
    return reranker, embedder


@pytest.fixture(scope="module")
def client(models):
    with TestClient(build_app(*models, reranker_name="tiny-rr", embedder_name="tiny-emb")) as c:
        yield c


def test_cohere_v1_and_jina_shapes_equal_rank(client, models):
    want = models[0].rank(QUERY, DOCS, normalize=True)
    r = client.post("/v1/rerank", json={"model": "x", "query": QUERY, "documents": DOCS, "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "results", "meta"}
    assert [x["index"] for x in body["results"]] == [w["index"] for w in want]
    np.testing.assert_allclose(
        [x["relevance_score"] for x in body["results"]], [w["relevance_score"] for w in want], **TOL
    )
    assert body["results"][0]["document"] == {"text": DOCS[want[0]["index"]]}
    assert body["meta"]["tokens"]["input_tokens"] > 0
    # {text} objects, top_n, no documents back
    r = client.post("/v1/rerank", json={"query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 2})
    assert [set(x) for x in r.json()["results"]] == [{"index", "relevance_score"}] * 2
    # Jina: v1 plus usage, documents back by default
    r = client.post("/rerank", json={"model": "jina", "query": QUERY, "documents": DOCS})
    body = r.json()
    assert body["usage"]["total_tokens"] == body["meta"]["tokens"]["input_tokens"] > 0
    assert body["model"] == "jina" and body["results"][0]["document"]["text"] in DOCS


def test_cohere_v2_and_tei_rerank(client, models):
    want = models[0].rank(QUERY, DOCS, normalize=True)
    body = client.post("/v2/rerank", json={"model": "m", "query": QUERY, "documents": DOCS, "top_n": 3}).json()
    assert [x["index"] for x in body["results"]] == [w["index"] for w in want[:3]]
    assert body["meta"]["api_version"]["version"] == "2"
    cut = client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS, "max_tokens_per_doc": 1}).json()
    assert cut["meta"]["tokens"]["input_tokens"] < body["meta"]["tokens"]["input_tokens"] + 100
    raw = models[0].rank(QUERY, DOCS)
    r = client.post("/tei/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True})
    got = r.json()
    assert [x["index"] for x in got] == [w["index"] for w in raw]
    np.testing.assert_allclose([x["score"] for x in got], [w["relevance_score"] for w in raw], **TOL)
    assert got[0]["text"] == DOCS[raw[0]["index"]]


def test_embeddings_tei_and_openai(client, models):
    want = models[1].encode(TEXTS)
    got = client.post("/embed", json={"inputs": TEXTS}).json()
    np.testing.assert_allclose(np.array(got), want, **TOL)
    assert len(client.post("/embed", json={"inputs": "one"}).json()) == 1
    body = client.post("/v1/embeddings", json={"input": TEXTS, "model": "e"}).json()
    assert body["object"] == "list" and body["model"] == "e"
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["data"][0]["object"] == "embedding"
    np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), want, **TOL)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    b64 = client.post("/v1/embeddings", json={"input": TEXTS, "encoding_format": "base64", "dimensions": 8}).json()
    vec = np.frombuffer(base64.b64decode(b64["data"][1]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, want[1][:8] / np.linalg.norm(want[1][:8]), **TOL)


@pytest.mark.parametrize(
    "path, body, status, field",
    [
        ("/v1/rerank", {"query": "", "documents": DOCS}, 422, "query"),
        ("/v1/rerank", {"query": QUERY, "documents": []}, 422, "documents"),
        ("/v1/rerank", {"query": QUERY, "documents": ["a", 3]}, 422, "documents[1]"),
        ("/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 0}, 422, "top_n"),
        ("/v1/rerank", {"documents": DOCS}, 422, "query"),
        ("/v2/rerank", {"query": QUERY, "documents": [{"text": "a"}]}, 422, "documents[0]"),
        ("/tei/rerank", {"query": QUERY, "texts": []}, 422, "texts"),
        ("/embed", {"inputs": []}, 422, "inputs"),
        ("/v1/embeddings", {"input": [1, 2]}, 422, "input"),
        ("/v1/embeddings", {"input": "a", "dimensions": 10_000}, 422, "dimensions"),
        ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, 422, "encoding_format"),
    ],
)
def test_bad_input_names_the_field(client, path, body, status, field):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and r.json()["error"].startswith(field)


def test_malformed_json_and_limits(models):
    with TestClient(build_app(*models, max_documents=3, max_text_chars=50, max_request_tokens=40)) as c:
        r = c.post("/v1/rerank", content=b'{"query": "q", "documents": [', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
        assert r.status_code == 413 and r.json()["limit"] == "max_documents"
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": ["x" * 51]})
        assert r.status_code == 413 and r.json()["limit"] == "max_text_chars" and r.json()["field"] == "documents[0]"
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": ["y " * 24] * 3})
        assert r.status_code == 413 and r.json()["limit"] == "max_request_tokens"
        assert c.get("/health").status_code == 200  # still up


def test_only_the_served_models(models):
    with TestClient(build_app(models[0])) as c:
        r = c.post("/v1/embeddings", json={"input": "a"})
        assert r.status_code == 404 and "embedder" in r.json()["error"]
        info = c.get("/info").json()
        assert info["models"]["reranker"]["preset"] == PRESET and info["models"]["reranker"]["dtype"] == "float32"
        assert info["limits"]["max_documents"] == 1000 and info["version"] == fastrank.__version__


def test_api_key(models):
    with TestClient(build_app(*models, api_key="sekrit")) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/openapi.json").status_code == 200
        assert c.post("/embed", json={"inputs": "a"}).status_code == 401
        assert c.post("/embed", json={"inputs": "a"}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/metrics").status_code == 401
        ok = c.post("/embed", json={"inputs": "a"}, headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200


def test_server_failure_is_a_500_and_the_server_lives(models, caplog):
    class Broken:
        preset = models[0].preset
        model = models[0].model
        tokenizer = models[0].tokenizer
        tokenize = models[0].tokenize

        def score(self, pairs, **kw):
            raise RuntimeError("boom")

    with TestClient(build_app(Broken())) as c:
        r = c.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
        assert r.status_code == 500 and "id " in r.json()["error"]
        assert c.get("/health").status_code == 200
        assert 'fastrank_requests_total{endpoint="/v1/rerank",status="500"} 1' in c.get("/metrics").text


def test_metrics_text(client):
    client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS})
    text = client.get("/metrics").text
    assert 'fastrank_requests_total{endpoint="/v2/rerank",status="200"}' in text
    for name in (
        "fastrank_items_total",
        "fastrank_tokens_total",
        "fastrank_queue_tokens",
        "fastrank_batch_size_bucket",
    ):
        assert name in text
    assert 'fastrank_request_latency_seconds_bucket{endpoint="/v2/rerank",le="+Inf"}' in text


def _requests(n):
    """n distinct rerank and embed requests."""
    out = []
    for i in range(n):
        docs = [f"{d} {i}" for d in DOCS[: 1 + i % 4]] + [f"extra passage number {i} " * (1 + i % 3)]
        out.append(("rerank", f"query {i} {QUERY}", docs) if i % 2 == 0 else ("embed", None, [f"text {i}", *docs]))
    return out


def test_concurrent_requests_get_their_own_results(models):
    """64 concurrent clients, rerank and embed mixed: each gets exactly its own results (those of sequential
    in-process calls), nothing lost or swapped, and the requests were merged into fewer model calls."""
    reranker, embedder = models
    reqs = _requests(64)
    want = [
        [w["relevance_score"] for w in sorted(reranker.rank(q, d, normalize=True), key=lambda w: w["index"])]
        if kind == "rerank"
        else embedder.encode(d)
        for kind, q, d in reqs
    ]
    app = build_app(reranker, embedder, max_wait_ms=20)
    with TestClient(app) as c:

        def call(req):
            kind, q, d = req
            if kind == "rerank":
                r = c.post("/v1/rerank", json={"query": q, "documents": d})
                assert r.status_code == 200, r.text
                return [x["relevance_score"] for x in sorted(r.json()["results"], key=lambda x: x["index"])]
            r = c.post("/v1/embeddings", json={"input": d})
            assert r.status_code == 200, r.text
            return np.array([x["embedding"] for x in r.json()["data"]])

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            got = list(pool.map(call, reqs, timeout=60))
        batches = app.state.metrics.batch_size
    assert len(got) == len(reqs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)
    # requests were merged: fewer model calls than requests
    assert sum(h.count for h in batches.values()) < len(reqs)


def test_overload_is_503_with_retry_after_and_accepted_requests_are_answered(models):
    docs = ["a passage of some length about rivers"] * 3
    # the tokens the model computes for one request (its query prefix once), to size the bound in requests
    pairs = [(f"{QUERY} 10", d) for d in docs]
    one = models[0].computed_tokens(pairs, models[0].tokenize(pairs))
    assert one < sum(len(e.input_ids) for e in models[0].tokenize(pairs))  # the prefix is counted once
    bound = 3 * one + 10  # three requests fit at once
    app = build_app(models[0], max_queue_tokens=bound, max_wait_ms=50)
    with TestClient(app) as c:

        def call(i):
            return c.post("/v2/rerank", json={"query": f"{QUERY} {i}", "documents": docs})

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(call, range(32), timeout=60))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1 and r.json()["limit"] == "max_queue_tokens"
            else:
                assert len(r.json()["results"]) == 3
        assert app.state.batchers["reranker"].queued_tokens == 0
        # one request over the whole bound can never fit: 413, not 503
        r = c.post("/v2/rerank", json={"query": QUERY, "documents": ["river " * 40] * 8})
        assert r.status_code == 413


def test_cancelled_submission_is_dropped():
    import asyncio

    from fastrank.serve.batcher import Batcher

    calls = []

    def run(items, options):
        calls.append(list(items))
        time.sleep(0.05)
        return [x * 2 for x in items]

    async def main():
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            b = Batcher(run, executor=ex, max_wait_ms=30)
            first = asyncio.ensure_future(b.submit([1, 2], 2))
            gone = asyncio.ensure_future(b.submit([3], 1))
            await asyncio.sleep(0.005)
            gone.cancel()
            assert await first == [2, 4]
            assert b.queued_tokens == 0 and b.queued_requests == 0
            await b.close()

    asyncio.run(main())
    assert calls == [[1, 2]]


def test_by_default_a_lone_request_runs_at_once_and_the_queue_joins_the_next_batch():
    """max_wait_ms=0 (the default): the first submission starts while the model is idle, with no wait for
    company; the ones that arrive while it runs go together in the next call, up to the token budget."""
    import asyncio
    import threading

    from fastrank.serve.batcher import Batcher

    calls = []
    release = threading.Event()

    def run(items, options):
        calls.append(list(items))
        if len(calls) == 1:
            assert release.wait(10)  # holds the model until the others are queued
        return [x * 2 for x in items]

    async def main():
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            b = Batcher(run, executor=ex, max_batch_tokens=4)
            first = asyncio.ensure_future(b.submit([1], 1))
            for _ in range(200):  # started without waiting for company
                if calls:
                    break
                await asyncio.sleep(0.005)
            assert calls == [[1]]
            rest = [asyncio.ensure_future(b.submit([x], 2)) for x in (2, 3, 4)]
            await asyncio.sleep(0.01)
            release.set()
            assert await first == [2] and [await r for r in rest] == [[4], [6], [8]]
            await b.close()

    asyncio.run(main())
    assert calls == [[1], [2, 3], [4]]  # two of 2 tokens fill the budget of 4; the third goes next


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `fastrank serve` process on a tiny saved model (reranker and embedder from one folder)."""
    folder = tmp_path_factory.mktemp("tiny")
    tiny_causal_lm("qwen2").save_pretrained(folder)
    tiny_tokenizer("qwen2").save_pretrained(folder)
    port = _free_port()
    env = dict(os.environ, FASTRANK_API_KEY="k123")
    cmd = [sys.executable, "-m", "fastrank.cli", "serve", "--reranker", str(folder), "--preset", PRESET]
    cmd += ["--embedder", str(folder), "--port", str(port), "--device", "cpu", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{proc.stdout.read()}")
        time.sleep(0.2)
    yield proc, url, folder
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_real_clients_against_a_server_process(server):
    proc, url, folder = server
    cohere = require("cohere")
    openai = require("openai")
    reranker = fastrank.Reranker.from_pretrained(str(folder), PRESET, dtype="float32", device="cpu")
    embedder = fastrank.Embedder.from_pretrained(str(folder), device="cpu")

    got = cohere.ClientV2(api_key="k123", base_url=url).rerank(model="tiny", query=QUERY, documents=DOCS, top_n=3)
    want = reranker.rank(QUERY, DOCS, top_k=3, normalize=True)
    assert [r.index for r in got.results] == [w["index"] for w in want]
    np.testing.assert_allclose([r.relevance_score for r in got.results], [w["relevance_score"] for w in want], **TOL)

    emb = openai.OpenAI(api_key="k123", base_url=url + "/v1").embeddings.create(model="tiny", input=TEXTS)
    np.testing.assert_allclose(np.array([d.embedding for d in emb.data]), embedder.encode(TEXTS), **TOL)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="wrong", base_url=url + "/v1", max_retries=0).embeddings.create(model="t", input="a")

    import httpx

    tei = httpx.post(
        url + "/tei/rerank", json={"query": QUERY, "texts": DOCS}, headers={"Authorization": "Bearer k123"}
    )
    assert [x["index"] for x in tei.json()] == [w["index"] for w in reranker.rank(QUERY, DOCS)]


def test_sigterm_finishes_requests_in_flight(server):
    proc, url, _ = server
    import httpx

    results = []
    docs = [f"passage {i} about rivers and the sea " * 20 for i in range(250)]

    def call():
        r = httpx.post(
            url + "/v2/rerank",
            json={"query": QUERY, "documents": docs},
            headers={"Authorization": "Bearer k123"},
            timeout=60,
        )
        results.append(r)

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.time() + 30
    while (
        'fastrank_queue_requests{model="reranker"} 1'
        not in httpx.get(url + "/metrics", headers={"Authorization": "Bearer k123"}).text
    ):  # wait until the request is in flight (queued or running)
        assert time.time() < deadline and thread.is_alive(), f"never seen in flight: {results}"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    thread.join(60)
    # uvicorn re-raises the signal once it has drained, so the exit status is -SIGTERM (or 0)
    assert proc.wait(60) in (0, -signal.SIGTERM)
    assert len(results) == 1 and results[0].status_code == 200 and len(results[0].json()["results"]) == 250


def test_tei_truncate_false_refuses_over_long_inputs_and_left_cuts_are_refused(models):
    import dataclasses

    # budgets that the first input fits and the second does not
    fits = len(models[0].tokenize([(QUERY, DOCS[0])])[0].input_ids)
    reranker = fastrank.Reranker(
        models[0].model, models[0].tokenizer, dataclasses.replace(fastrank.get_preset(PRESET), max_length=fits + 4)
    )
    fits = len(models[1].encoder.tokenize([TEXTS[0]])[0])
    embedder = fastrank.Embedder(
        fastrank.BiEncoder(models[1].encoder.model, models[1].tokenizer, pooling="last", max_length=fits + 4)
    )
    long_text = " ".join(["river"] * 60)
    with TestClient(build_app(reranker, embedder)) as c:
        for path, body in (
            ("/tei/rerank", {"query": QUERY, "texts": [DOCS[0], long_text]}),
            ("/embed", {"inputs": [TEXTS[0], long_text]}),
        ):
            field = "texts" if path == "/tei/rerank" else "inputs"
            r = c.post(path, json={**body, "truncate": False})
            assert (
                r.status_code == 413
                and f"{field}[1]: longer than the model's" in r.json()["error"]
                and r.json()["field"] == field
            )
            assert c.post(path, json={**body, "truncate": True}).status_code == 200
            assert c.post(path, json=body).status_code == 200  # the default cuts, as TEI's --auto-truncate
            r = c.post(path, json={**body, "truncation_direction": "Left"})
            assert r.status_code == 422 and "truncation_direction: 'Left' is not supported" in r.text
            short = {**body, field: body[field][:1]}
            assert c.post(path, json={**short, "truncate": False, "truncation_direction": "Left"}).status_code == 200


def test_each_request_is_tokenised_once(models):
    reranker = fastrank.Reranker(models[0].model, models[0].tokenizer, PRESET)
    calls = []
    tokenize = reranker.tokenize
    reranker.tokenize = lambda pairs, max_length=None: calls.append(len(pairs)) or tokenize(pairs, max_length)
    with TestClient(build_app(reranker)) as c:
        r = c.post("/v2/rerank", json={"query": QUERY, "documents": DOCS})
    assert r.status_code == 200 and calls == [len(DOCS)]
    want = models[0].rank(QUERY, DOCS, normalize=True)
    np.testing.assert_allclose(
        [x["relevance_score"] for x in r.json()["results"]], [w["relevance_score"] for w in want], **TOL
    )


def test_a_client_that_disconnects_while_queued_costs_no_model_work(models):
    """Over real HTTP (uvicorn on a loopback port): a request still waiting for the model when its client hangs
    up is dropped before its batch runs, and counted as status 499."""
    import httpx
    import uvicorn

    reranker = fastrank.Reranker(models[0].model, models[0].tokenizer, PRESET)
    seen = []
    score = reranker.score

    def slow_score(pairs, **kwargs):
        seen.extend(d for _, d in pairs)
        time.sleep(1.0)  # holds the model while the second request waits in the queue
        return score(pairs, **kwargs)

    reranker.score = slow_score
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP proto: asyncio sets NODELAY
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(build_app(reranker, max_wait_ms=0), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        first = threading.Thread(
            target=lambda: seen.append(
                httpx.post(url + "/v2/rerank", json={"query": QUERY, "documents": ["first"]}, timeout=30).status_code
            )
        )
        first.start()
        time.sleep(0.3)  # the first request is in the model
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v2/rerank", json={"query": QUERY, "documents": ["gone"]}, timeout=0.3)
        first.join(30)
        time.sleep(0.3)
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert seen == ["first", 200]  # "gone" never reached the model
    assert 'fastrank_requests_total{endpoint="/v2/rerank",status="499"} 1' in metrics


# ------------------------------------------------------------------------------------------------
# layer-wise rerankers and device pools behind the same endpoints
# ------------------------------------------------------------------------------------------------
LAYERWISE = os.path.join(os.path.dirname(__file__), "fixtures", "layerwise_minicpm")


def test_a_layerwise_reranker_is_served_at_its_cutoff_layer():
    reranker = fastrank.Reranker.from_pretrained(LAYERWISE, device="cpu", cutoff_layers=3)
    want = reranker.score([(QUERY, d) for d in DOCS], normalize=True)  # Cohere's relevance scores are in [0, 1]
    with TestClient(build_app(reranker)) as c:
        r = c.post("/v2/rerank", json={"query": QUERY, "documents": DOCS})
        assert r.status_code == 200, r.text
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        info = c.get("/info").json()
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], want, **TOL)
    assert info["models"]["reranker"]["cutoff_layers"] == [3]
    several = fastrank.Reranker.from_pretrained(LAYERWISE, device="cpu", cutoff_layers=[3, 5])
    with pytest.raises(ValueError, match=r"reranker: .*several scores per document.*--cutoff-layers"):
        build_app(several)


def test_serve_refuses_several_cutoff_layers_and_device_with_devices():
    from fastrank.serve import serve

    with pytest.raises(ValueError, match="cutoff_layers: the APIs give one score"):
        serve(LAYERWISE, cutoff_layers=[3, 5])
    with pytest.raises(ValueError, match="device, devices: give one"):
        serve(LAYERWISE, device="cpu", devices=["cpu"])


def test_models_in_device_pools_are_served(tmp_path, models):
    """``--devices cpu,cpu``: the merged batches run in two worker processes, with the in-process results."""
    tiny_causal_lm("qwen2").save_pretrained(tmp_path)
    tiny_tokenizer("qwen2").save_pretrained(tmp_path)
    pairs = [(QUERY, d) for d in DOCS]
    want = fastrank.Reranker.from_pretrained(str(tmp_path), PRESET, device="cpu").score(pairs, normalize=True)
    pool = fastrank.Reranker.from_pretrained(str(tmp_path), PRESET, devices=["cpu", "cpu"])
    try:
        with TestClient(build_app(pool)) as c:
            futures = []
            with concurrent.futures.ThreadPoolExecutor(4) as ex:
                for _ in range(4):
                    futures.append(ex.submit(c.post, "/v2/rerank", json={"query": QUERY, "documents": DOCS}))
            for f in futures:
                r = f.result()
                assert r.status_code == 200, r.text
                got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
                np.testing.assert_allclose([got[i] for i in range(len(DOCS))], want, **TOL)
            assert c.get("/info").json()["models"]["reranker"]["device"] == "cpu,cpu"
    finally:
        pool.close()
