"""`fastrank rerank` and `fastrank demo-model` from the command line."""

from __future__ import annotations

import json

import pytest
from tolerances import SAME_COMPUTATION, assert_close

import fastrank
from fastrank.cli import main


def _rerank(model, *flags, preset="qwen3-reranker") -> int:
    """`fastrank rerank --model MODEL --preset PRESET FLAGS...`; its exit status."""
    return main(["rerank", "--model", str(model), "--preset", preset, *flags])


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
    code = _rerank(demo_model, "--input", str(src), "--output", str(dst), "--top-k", "2", "--no-progress")
    assert code == 1  # some lines were bad
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 4, 5, 6, 7]  # one record per input line, the empty one too
    first = out[0]
    assert first["id"] == "q1" and len(first["results"]) == 2
    assert first["results"][0]["relevance_score"] >= first["results"][1]["relevance_score"]
    assert "empty line" in out[1]["error"] and "score" in out[2]
    assert "not valid JSON" in out[3]["error"] and "non-empty list" in out[4]["error"]
    assert "documents[1]" in out[5]["error"] and "'query' must be a string" in out[6]["error"]
    err = capsys.readouterr().err
    assert f"{src}:2:" in err and f"{src}:4:" in err and f"{src}:7:" in err
    assert "5 of 7 lines could not be scored" in err and "the other 2 were scored" in err

    # The same scores as the Python API.
    reranker = fastrank.Reranker.from_pretrained(demo_model, "qwen3-reranker", device="cpu")
    ranked = reranker.rank("what river?", ["river water", "music album", "city"], top_k=2)
    assert [r["index"] for r in ranked] == [r["index"] for r in first["results"]]
    assert_close(
        [r["relevance_score"] for r in ranked],
        [r["relevance_score"] for r in first["results"]],
        SAME_COMPUTATION,
        what="API vs CLI scores",
    )


def test_rerank_all_good_lines_exit_zero(demo_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"query": "a", "document": "b"}) + "\n")
    dst = tmp_path / "out.jsonl"
    assert _rerank(demo_model, "--input", str(src), "--output", str(dst), "--normalize", preset="lb-reranker") == 0
    (record,) = [json.loads(x) for x in dst.read_text().splitlines()]
    assert 0.0 <= record["score"] <= 1.0


@pytest.fixture
def progress_bars_restored():
    """main(--no-progress) turns Hugging Face's progress bars off process-wide; later tests get them back."""
    from transformers.utils import logging as hf_logging

    yield
    hf_logging.enable_progress_bar()


def test_errors_are_one_line_with_the_trace_on_request(demo_model, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"query": "a", "document": "b"}) + "\n")
    missing = str(tmp_path / "no-such-model")
    assert _rerank(missing, "--input", str(src)) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("fastrank rerank: error:") and f"there is no folder {missing}" in err
    with pytest.raises(ValueError, match="there is no folder"):
        main(["--traceback", "rerank", "--model", missing, "--preset", "qwen3-reranker", "--input", str(src)])
    # A random model named after no known reranker: the preset must be given, never guessed.
    assert main(["rerank", "--model", demo_model, "--input", str(src)]) == 1
    assert "cannot tell which reranker" in capsys.readouterr().err
    assert _rerank(demo_model, "--input", str(tmp_path / "nope")) == 1
    assert "--input: there is no file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value",
    [("--top-k", "-1"), ("--top-k", "0"), ("--max-length", "0"), ("--batch-size", "0"), ("--max-tokens", "-3")],
)
def test_non_positive_numbers_are_refused(demo_model, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _rerank(demo_model, flag, value)
    assert exit_info.value.code == 2 and f"argument {flag}: expected a positive integer" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert (
        exit_info.value.code == 0
        and capsys.readouterr().out.strip() == f"fastrank {fastrank.__version__} (distribution fastrank-llm)"
    )


def test_no_progress_silences_loading_bars(demo_model, tmp_path, capsys, progress_bars_restored):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"query": "a", "document": "b"}) + "\n")
    assert _rerank(demo_model, "--input", str(src), "--output", str(tmp_path / "out.jsonl"), "--no-progress") == 0
    assert capsys.readouterr().err == ""
