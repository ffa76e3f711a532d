"""`fastrank rerank` and `fastrank demo-model` from the command line."""

from __future__ import annotations

import json

import pytest

import fastrank
from fastrank.cli import main


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demo"))
    assert main(["demo-model", path, "--layers", "1"]) == 0
    return path


def test_rerank_jsonl(demo_model, tmp_path, capsys):
    lines = [
        json.dumps({"id": "q1", "query": "what river?", "documents": ["river water", {"text": "music album"}, "city"]}),
        "",
        json.dumps({"query": "music", "document": "album of music"}),
        "{broken json",
        json.dumps({"query": "q", "documents": []}),
        json.dumps({"query": "q", "documents": ["a", 5]}),
        json.dumps({"query": 3, "document": "x"}),
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    dst = tmp_path / "out.jsonl"
    code = main(["rerank", "--model", demo_model, "--preset", "qwen3-reranker", "--input", str(src),
                 "--output", str(dst), "--top-k", "2", "--no-progress"])
    assert code == 1  # some lines were bad
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [o["line"] for o in out] == [1, 3, 4, 5, 6, 7]
    first = out[0]
    assert first["id"] == "q1" and len(first["results"]) == 2
    assert first["results"][0]["relevance_score"] >= first["results"][1]["relevance_score"]
    assert "score" in out[1]
    assert "not valid JSON" in out[2]["error"] and "non-empty list" in out[3]["error"]
    assert "documents[1]" in out[4]["error"] and "'query' must be a string" in out[5]["error"]
    err = capsys.readouterr().err
    assert f"{src}:4:" in err and f"{src}:7:" in err and "4 of 6 lines could not be scored" in err

    # The same scores as the Python API.
    reranker = fastrank.Reranker.from_pretrained(demo_model, "qwen3-reranker", device="cpu")
    ranked = reranker.rank("what river?", ["river water", "music album", "city"], top_k=2)
    assert [r["index"] for r in ranked] == [r["index"] for r in first["results"]]
    assert [r["relevance_score"] for r in ranked] == pytest.approx([r["relevance_score"] for r in first["results"]], abs=1e-6)


def test_rerank_all_good_lines_exit_zero(demo_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"query": "a", "document": "b"}) + "\n")
    dst = tmp_path / "out.jsonl"
    assert main(["rerank", "--model", demo_model, "--preset", "lb-reranker", "--input", str(src), "--output", str(dst),
                 "--normalize"]) == 0
    (record,) = [json.loads(x) for x in dst.read_text().splitlines()]
    assert 0.0 <= record["score"] <= 1.0
