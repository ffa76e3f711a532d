"""One LLM reranker training step (forward and backward) against FlagEmbedding's own training model.

Model: Qwen2.5-0.5B's shape from its config with random weights (no download), every parameter trained,
with a byte-level BPE tokenizer built in code. Batch: B queries x G pairs from ``RerankTrainDataset`` (the
package layout, lengths up to ``query_max_len + passage_max_len``). Passages are either long enough that
every pair fills that budget (``passage_words=0``: the padded batch holds no padding, and all the engine
saves is each query's prefix, computed once for its G pairs) or of ``passage_words // 10`` to
``passage_words`` words, as real passages vary (then the padded batch also pads every pair to the longest).
Every provider wraps the same model and takes the same pairs:

- ``flagembedding``: ``FlagEmbedding.finetune.reranker.decoder_only.base.modeling.CrossDecoderModel``
  on the left-padded batch (``RerankCollator(padding_side="left")``): the HF forward's full ``[N, T, V]``
  logits, then ``logits[:, -1, yes]`` and the grouped cross-entropy;
- ``fastrank_padded``: ``fastrank.LLMRerankerModel`` on that padded batch: the backbone, then score_head
  on the "Yes" row only;
- ``fastrank``: ``fastrank.LLMRerankerModel`` on the engine's layout (``RerankCollator(share_prefix=True)``):
  one stream of real tokens, each query's prefix (its tokens up to where its G pairs differ) once, the G
  passages after it; same loss and gradients as the padded batch.

The padded providers run the model with its own sdpa attention, the packed one with fastrank's engine
switched on (``harness.attention_switched``).

``ckpt`` cases turn on the backbone's gradient checkpointing for all (the recipe's setting), which leaves
the logits as the largest tensor of the baseline's step.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Dict, Optional

import torch

import fastrank
from fastrank.benchmarks.harness import Unavailable, attention_switched, reference_baseline
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
    query_max_length: Optional[int] = None  # query_max_len; None: a quarter of pair_max_length
    passage_words: int = 0  # 0: passages fill the budget; else passages of passage_words // 10 .. passage_words words

    @property
    def query_max_len(self) -> int:
        return self.query_max_length or self.pair_max_length // 4

    def label(self) -> str:
        return (
            f"{self.mode} B={self.queries} G={self.group_size} len<={self.pair_max_length} "
            f"query_len<={self.query_max_len} layers={self.layers} {self.dtype}"
            + (f" passages<={self.passage_words}w" if self.passage_words else "")
        )


def quick_cases(device: torch.device):
    if device.type == "cuda":
        shape = dict(queries=4, group_size=8, pair_max_length=512, layers=24, dtype="bfloat16")
        return [Case(mode="step_ckpt", **shape), Case(mode="step", **shape)]
    # CPU: 2 layers, fp32, and fewer, shorter pairs: the baseline's fp32 logits and their gradient for
    # 4 x 8 x 512 tokens would be 20 GB. 2 x 8 x 256 tokens keep them at 5 GB. Passages of 20-200 words.
    return [
        Case(
            mode="step",
            queries=2,
            group_size=8,
            pair_max_length=256,
            query_max_length=64,
            layers=2,
            dtype="float32",
            passage_words=200,
        )
    ]


def full_cases(device: torch.device):
    if device.type == "cuda":
        # FlagEmbedding's recipe lengths (query 64, passage 448), G=16: passages filling the budget, and varied.
        recipe = Case(
            mode="step_ckpt",
            queries=8,
            group_size=16,
            pair_max_length=512,
            query_max_length=64,
            layers=24,
            dtype="bfloat16",
        )
        return quick_cases(device) + [recipe, dataclasses.replace(recipe, passage_words=200)]
    return quick_cases(device) + [
        Case(mode="step_ckpt", queries=2, group_size=8, pair_max_length=256, layers=2, dtype="float32"),
    ]


def _records(n: int, g: int, words: int, seed: int = 0, varied: bool = False):
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    def passage():
        return text(rng.randint(max(1, words // 10), words) if varied else words)

    return [
        {"query": text(rng.randint(8, 24)) + "?", "pos": [passage()], "neg": [passage() for _ in range(g - 1)]}
        for _ in range(n)
    ]


def _features(features: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}


def _batches(case: Case, tokenizer, device):
    """The same B groups as the padded batch (left padding) and as the engine's shared-prefix layout."""
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.jsonl")
        with open(path, "w") as f:
            words = case.passage_words or case.pair_max_length  # long passages fill the budget
            for record in _records(case.queries, case.group_size, words, varied=bool(case.passage_words)):
                f.write(json.dumps(record) + "\n")
        data = fastrank.RerankTrainDataset(
            path,
            tokenizer,
            train_group_size=case.group_size,
            query_max_len=case.query_max_len,
            passage_max_len=case.pair_max_length - case.query_max_len,
            answer=None,
        )
        items = [data[i] for i in range(case.queries)]
    padded = fastrank.RerankCollator(tokenizer, padding_side="left")(items)["pair"]
    shared = fastrank.RerankCollator(tokenizer, share_prefix=True)(items)["pair"]
    return _features(padded, device), _features(shared, device)


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
    padded, shared = _batches(case, tokenizer, device)
    ours = fastrank.LLMRerankerModel(model, tokenizer, train_group_size=case.group_size).train()

    def step(module, pair):
        def call():
            model.zero_grad(set_to_none=True)
            module(pair=pair).loss.backward()

        return call

    def flagembedding(modeling):
        reference = modeling.CrossDecoderModel(model, tokenizer, train_batch_size=case.queries).train()
        return step(reference, padded)

    flag = reference_baseline(FLAG_MODEL, flagembedding)
    return {
        "flagembedding": flag
        if isinstance(flag, Unavailable)
        else attention_switched(model, flag, packed=False, fused=False),
        "fastrank_padded": attention_switched(model, step(ours, padded), packed=False, fused=True),
        "fastrank": attention_switched(model, step(ours, shared), packed=True, fused=True),
    }


BENCHMARK = Benchmark(
    name="reranker_train",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=("flagembedding", "fastrank_padded", "fastrank"),
    table_label=lambda case: (
        f"{case['mode']} B={case['queries']} G={case['group_size']} L<={case['pair_max_length']}"
        + (f" q<={case['query_max_length']}" if case.get("query_max_length") else "")
        + (f" p<={case['passage_words']}w" if case.get("passage_words") else "")
        + f" {case['layers']}l {case['dtype']}"
    ),
    items_per_call=lambda case: case.queries * case.group_size,
    unit="pairs",
    end_to_end={"cuda": dict(warmup=2, repeats=10), "cpu": dict(warmup=1, repeats=3)},
    legacy_keys={"n": "queries", "t": "group_size", "batch_size": "pair_max_length"},
)
