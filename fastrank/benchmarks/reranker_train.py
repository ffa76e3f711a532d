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
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Union

import torch

import fastrank
from fastrank.benchmarks.harness import Unavailable, reference_baseline
from fastrank.benchmarks.synthetic import _WORDS, build_causal_lm, build_tokenizer, qwen25_config

FLAG_MODEL = "FlagEmbedding.finetune.reranker.decoder_only.base.modeling"


@dataclass(frozen=True)
class Case:
    mode: str  # step | step_ckpt
    n: int  # B (queries)
    t: int  # G (pairs per query)
    layers: int
    dtype: str
    batch_size: int  # max tokens per pair (query_max_len + passage_max_len)

    def label(self) -> str:
        return f"{self.mode} B={self.n} G={self.t} len<={self.batch_size} layers={self.layers} {self.dtype}"


def quick_cases(device: torch.device):
    if device.type == "cuda":
        return [Case("step_ckpt", 4, 8, 24, "bfloat16", 512), Case("step", 4, 8, 24, "bfloat16", 512)]
    # CPU: 2 layers, fp32, and fewer, shorter pairs: the baseline's fp32 logits and their gradient for
    # 4 x 8 x 512 tokens would be 20 GB. 2 x 8 x 256 tokens keep them at 5 GB.
    return [Case("step", 2, 8, 2, "float32", 256)]


def full_cases(device: torch.device):
    if device.type == "cuda":
        return quick_cases(device) + [Case("step_ckpt", 8, 16, 24, "bfloat16", 512)]
    return quick_cases(device) + [Case("step_ckpt", 2, 8, 2, "float32", 256)]


def case_dict(case: Case) -> dict:
    return asdict(case)


def items_per_call(case: Case) -> int:
    return case.n * case.t


def _records(n: int, g: int, words: int, seed: int = 0):
    rng = random.Random(seed)

    def text(k):
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    return [{"query": text(rng.randint(8, 24)) + "?", "pos": [text(words)], "neg": [text(words) for _ in range(g - 1)]}
            for _ in range(n)]


def _batch(case: Case, tokenizer, device):
    import json
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.jsonl")
        with open(path, "w") as f:
            for record in _records(case.n, case.t, case.batch_size):  # long passages: most pairs fill the budget
                f.write(json.dumps(record) + "\n")
        query_max = case.batch_size // 4
        data = fastrank.RerankTrainDataset(path, tokenizer, train_group_size=case.t, query_max_len=query_max,
                                           passage_max_len=case.batch_size - query_max, answer=None)
        batch = fastrank.RerankCollator(tokenizer, padding_side="left")([data[i] for i in range(case.n)])
    return {k: v.to(device) for k, v in batch["pair"].items()}


def providers(case: Case, device: torch.device) -> Dict[str, Union[Callable[[], object], Unavailable]]:
    tokenizer = build_tokenizer(padding_side="left")
    config = qwen25_config(num_layers=case.layers, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, use_cache=False)
    model = build_causal_lm(config, dtype=getattr(torch, case.dtype), device=device).train()
    if case.mode == "step_ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pair = _batch(case, tokenizer, device)
    ours = fastrank.LLMRerankerModel(model, tokenizer, train_group_size=case.t).train()

    def fastrank_step():
        model.zero_grad(set_to_none=True)
        ours(pair=pair).loss.backward()

    def flagembedding(modeling):
        reference = modeling.CrossDecoderModel(model, tokenizer, train_batch_size=case.n).train()

        def flag_step():
            model.zero_grad(set_to_none=True)
            reference(pair=pair).loss.backward()

        return flag_step

    return {"flagembedding": reference_baseline(FLAG_MODEL, flagembedding), "fastrank": fastrank_step}
