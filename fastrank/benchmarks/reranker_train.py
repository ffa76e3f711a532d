"""One LLM reranker training step (forward and backward) against FlagEmbedding's own training model.

Model: Qwen2.5-0.5B's shape from its config with random weights (no download), every parameter trained,
with a byte-level BPE tokenizer built in code. Batch: B queries x G pairs from ``RerankTrainDataset`` (the
package layout, left padded, lengths up to ``query_max_len + passage_max_len``). Both providers wrap the
same model and take the same batch:

- ``flagembedding``: ``FlagEmbedding.finetune.reranker.decoder_only.base.modeling.CrossDecoderModel``:
  the HF forward's full ``[N, T, V]`` logits, then ``logits[:, -1, yes]`` and the grouped cross-entropy;
- ``fastrank``: ``fastrank.LLMRerankerModel``: the backbone, then score_head on the "Yes" row only.

``ckpt`` cases turn on the backbone's gradient checkpointing for both (the recipe's setting), which leaves
the logits as the largest tensor of the baseline's step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict

import torch

import fastrank
from fastrank.benchmarks.harness import reference_baseline
from fastrank.benchmarks.protocol import Benchmark, Provider
from fastrank.benchmarks.synthetic import _WORDS, build_causal_lm, build_tokenizer, qwen25_config

FLAG_MODEL = "FlagEmbedding.finetune.reranker.decoder_only.base.modeling"


@dataclass(frozen=True)
class Case:
    mode: str  # step | step_ckpt (gradient checkpointing)
    queries: int  # B
    group_size: int  # G: pairs per query (one positive)
    pair_max_length: int  # tokens per pair: query_max_len + passage_max_len
    layers: int  # of Qwen2.5-0.5B's 24
    dtype: str

    def label(self) -> str:
        return (
            f"{self.mode} B={self.queries} G={self.group_size} len<={self.pair_max_length} layers={self.layers} "
            f"{self.dtype}"
        )


def quick_cases(device: torch.device):
    if device.type == "cuda":
        shape = dict(queries=4, group_size=8, pair_max_length=512, layers=24, dtype="bfloat16")
        return [Case(mode="step_ckpt", **shape), Case(mode="step", **shape)]
    # CPU: 2 layers, fp32, and fewer, shorter pairs: the baseline's fp32 logits and their gradient for
    # 4 x 8 x 512 tokens would be 20 GB. 2 x 8 x 256 tokens keep them at 5 GB.
    return [Case(mode="step", queries=2, group_size=8, pair_max_length=256, layers=2, dtype="float32")]


def full_cases(device: torch.device):
    if device.type == "cuda":
        return quick_cases(device) + [
            Case(mode="step_ckpt", queries=8, group_size=16, pair_max_length=512, layers=24, dtype="bfloat16"),
        ]
    return quick_cases(device) + [
        Case(mode="step_ckpt", queries=2, group_size=8, pair_max_length=256, layers=2, dtype="float32"),
    ]


def _records(n: int, g: int, words: int, seed: int = 0):
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    return [
        {"query": text(rng.randint(8, 24)) + "?", "pos": [text(words)], "neg": [text(words) for _ in range(g - 1)]}
        for _ in range(n)
    ]


def _batch(case: Case, tokenizer, device):
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.jsonl")
        with open(path, "w") as f:
            # long passages: most pairs fill the budget
            for record in _records(case.queries, case.group_size, case.pair_max_length):
                f.write(json.dumps(record) + "\n")
        query_max = case.pair_max_length // 4
        data = fastrank.RerankTrainDataset(
            path,
            tokenizer,
            train_group_size=case.group_size,
            query_max_len=query_max,
            passage_max_len=case.pair_max_length - query_max,
            answer=None,
        )
        batch = fastrank.RerankCollator(tokenizer, padding_side="left")([data[i] for i in range(case.queries)])
    return {k: v.to(device) for k, v in batch["pair"].items()}


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    tokenizer = build_tokenizer(padding_side="left")
    config = qwen25_config(
        num_layers=case.layers,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=False,
    )
    model = build_causal_lm(config, dtype=getattr(torch, case.dtype), device=device).train()
    if case.mode == "step_ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pair = _batch(case, tokenizer, device)
    ours = fastrank.LLMRerankerModel(model, tokenizer, train_group_size=case.group_size).train()

    def fastrank_step():
        model.zero_grad(set_to_none=True)
        ours(pair=pair).loss.backward()

    def flagembedding(modeling):
        reference = modeling.CrossDecoderModel(model, tokenizer, train_batch_size=case.queries).train()

        def flag_step():
            model.zero_grad(set_to_none=True)
            reference(pair=pair).loss.backward()

        return flag_step

    return {"flagembedding": reference_baseline(FLAG_MODEL, flagembedding), "fastrank": fastrank_step}


BENCHMARK = Benchmark(
    name="reranker_train",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=("flagembedding", "fastrank"),
    table_label=lambda case: (
        f"{case['mode']} B={case['queries']} G={case['group_size']} "
        f"L<={case['pair_max_length']} {case['layers']}l {case['dtype']}"
    ),
    items_per_call=lambda case: case.queries * case.group_size,
    unit="pairs",
    end_to_end={"cuda": dict(warmup=2, repeats=10), "cpu": dict(warmup=1, repeats=3)},
    legacy_keys={"n": "queries", "t": "group_size", "batch_size": "pair_max_length"},
)
