"""End-to-end reranking: score a list of (query, passage) pairs, from text to scores.

Model: Qwen2.5-0.5B's shape built from its config with random weights (no download), with a byte-level
BPE tokenizer built in code; the bge-reranker-v2-gemma preset's layout and "Yes"-logit convention. Every
provider tokenises, batches, runs the model and returns one score per pair in input order:

- ``hf_full_logits``: plain transformers as FlagEmbedding drives it: pairs sorted by length, fixed batches,
  padded to a multiple of 8, ``model(**batch).logits`` (``[B, L, V]``), the last real token's "Yes" logit.
- ``hf_logits_to_keep``: the same with left padding and ``logits_to_keep=1``: full-vocabulary logits at the
  last position only.
- ``flagembedding``: ``FlagEmbedding.FlagLLMReranker.compute_score`` itself, loading the same weights from
  disk (reported as not run, with the reason, when FlagEmbedding is missing or does not import).
- ``fastrank_padded``: ``fastrank.Reranker(..., packed=False).score``: length-sorted, padded token-budget
  batches, backbone only, score_head;
- ``fastrank_unfused``: ``fastrank.Reranker.score`` packed, with the decoder's RMSNorm, RoPE and gated
  activation as HF computes them and no CUDA graphs (fastrank before issue 15), to measure what those give;
- ``fastrank``: ``fastrank.Reranker.score`` (packed, the default): each batch one stream of real tokens, no
  padding (every pair has its own query here, so no prefix is shared: packing alone), the decoder's
  elementwise work through fastrank's fused ops, and on CUDA the forward replayed as CUDA graphs;
- ``fastrank_compiled`` / ``fastrank_fused_compiled`` (CUDA only): the compiler's route to the same fusion,
  ``fastrank`` with its layers through ``torch.compile`` (Inductor; ``fastrank.engine.compile``): HF's own layer
  forward, whose elementwise kernels Inductor generates, or fastrank's fused one, its ops as custom ops.
  Compilation happens in the warm-up call, out of the timed ones.
- ``fastrank_liger`` (CUDA only, with ``liger-kernel`` installed): ``fastrank`` with its fused forwards calling
  Liger-Kernel's RMSNorm, fused add + RMSNorm, RoPE and SiLU-times-up instead of fastrank's kernels.

The plain-transformers and padded providers run the model with its own sdpa attention, the packed ones with
fastrank's engine switched on; the plain-transformers ones run HF's own modules, fastrank's the fused ones
(``harness.attention_switched``).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Dict

import torch

import fastrank
from fastrank.benchmarks.harness import Unavailable, attention_switched, decoder_flops, reference_baseline
from fastrank.benchmarks.protocol import Benchmark, Provider
from fastrank.benchmarks.synthetic import build_causal_lm, build_tokenizer, qwen25_config, synthetic_pairs
from fastrank.data.batching import collate, pad_token_id_of
from fastrank.engine.fusion import check_kernels

PRESET = "bge-reranker-v2-gemma"


@dataclass(frozen=True)
class Case:
    pairs: int  # (query, passage) pairs scored per call
    max_length: int  # tokens per pair, truncated beyond
    batch_size: int  # pairs per batch (fastrank's token budget per batch: batch_size * max_length)
    layers: int  # of Qwen2.5-0.5B's 24
    dtype: str

    def label(self) -> str:
        return (
            f"{self.pairs} pairs max_length={self.max_length} batch={self.batch_size} layers={self.layers} {self.dtype}"
        )


def quick_cases(device: torch.device):
    if device.type == "cuda":
        return [Case(pairs=1024, max_length=512, batch_size=64, layers=24, dtype="bfloat16")]
    # CPU: the full vocabulary with 2 of the 24 layers; few, short pairs so full logits stay affordable
    # (one full-logit batch of 8 x 128 tokens is 78 MB of fp32 logits and about 3 s on 2 cores).
    return [Case(pairs=16, max_length=128, batch_size=8, layers=2, dtype="float32")]


def full_cases(device: torch.device):
    if device.type == "cuda":
        return [
            Case(pairs=1024, max_length=512, batch_size=64, layers=24, dtype="bfloat16"),
            Case(pairs=1024, max_length=1024, batch_size=32, layers=24, dtype="bfloat16"),
        ]
    return [Case(pairs=1024, max_length=512, batch_size=16, layers=2, dtype="float32")]


_CACHE: Dict[tuple, tuple] = {}


def _setup(case: Case, device: torch.device):
    key = (case.layers, case.dtype, str(device))
    if key not in _CACHE:
        _CACHE.clear()
        tokenizer = build_tokenizer(padding_side="right")
        config = qwen25_config(
            num_layers=case.layers, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
        )
        model = build_causal_lm(config, dtype=getattr(torch, case.dtype), device=device)
        _CACHE[key] = (model, tokenizer, None)
    return _CACHE[key]


def _saved_copy(case: Case, device: torch.device):
    """The model saved to disk, for FlagEmbedding (which only loads from a path)."""
    model, tokenizer, path = _CACHE[(case.layers, case.dtype, str(device))]
    if path is None:
        path = tempfile.mkdtemp(prefix="fastrank-bench-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)  # about 1 GB of weights
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        _CACHE[(case.layers, case.dtype, str(device))] = (model, tokenizer, path)
    return path


def _hf_scores(model, tokenizer, pairs, case: Case, logits_to_keep: bool):
    """FlagEmbedding's loop on plain transformers (sorted by length, fixed batches, full-logit forward)."""
    template = fastrank.get_preset(PRESET).template
    yes = fastrank.get_preset(PRESET).convention.token_ids(tokenizer)[0]
    encoded = [e.input_ids for e in template.tokenize(tokenizer, pairs, case.max_length)]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    scores = torch.empty(len(encoded))
    pad = pad_token_id_of(tokenizer)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(order), case.batch_size):
            idx = order[start : start + case.batch_size]
            side = "left" if logits_to_keep else "right"
            batch = collate([encoded[i] for i in idx], pad, side, device=device)
            if logits_to_keep:
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1).logits[
                    :, -1
                ]
            else:
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                last = batch.attention_mask.sum(1) - 1  # right padding, as FlagEmbedding's pooling assumes
                logits = logits[torch.arange(len(idx), device=device), last]
            scores[torch.tensor(idx)] = logits[:, yes].float().cpu()
    return scores.tolist()


def _flagembedding(flag, case: Case, device: torch.device, pairs) -> Callable[[], object]:
    """``FlagLLMReranker.compute_score`` on the same weights, loaded from a saved copy."""
    path = _saved_copy(case, device)
    reference = flag.FlagLLMReranker(
        path,
        use_bf16=case.dtype == "bfloat16",
        use_fp16=case.dtype == "float16",
        devices=[str(device)],
        batch_size=case.batch_size,
    )
    reference.model.to(device)

    def flagembedding():
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
            return reference.compute_score([list(p) for p in pairs], max_length=case.max_length)

    return flagembedding


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    model, tokenizer, _ = _setup(case, device)
    pairs = synthetic_pairs(case.pairs, seed=0)
    fns = {
        "hf_full_logits": lambda: _hf_scores(model, tokenizer, pairs, case, logits_to_keep=False),
        "hf_logits_to_keep": lambda: _hf_scores(model, tokenizer, pairs, case, logits_to_keep=True),
    }
    fns = {name: attention_switched(model, fn, packed=False, fused=False) for name, fn in fns.items()}
    fns["flagembedding"] = reference_baseline("FlagEmbedding", lambda flag: _flagembedding(flag, case, device, pairs))

    def ours(reranker, fused=True, graphs=True, compiled=False, kernels="fastrank"):
        def score():
            with warnings.catch_warnings():  # the truncation notice; every provider truncates the same pairs
                warnings.simplefilter("ignore", UserWarning)
                return reranker.score(
                    pairs,
                    batch_size=case.batch_size,
                    max_length=case.max_length,
                    max_tokens=case.batch_size * case.max_length,
                    show_progress=False,
                )

        return attention_switched(
            model, score, packed=reranker.packed, fused=fused, graphs=graphs, compiled=compiled, kernels=kernels
        )

    fns["fastrank_padded"] = ours(fastrank.Reranker(model, tokenizer, PRESET, packed=False))
    # The packed engine as it was before the decoder's elementwise fusion and CUDA graphs: their gain.
    fns["fastrank_unfused"] = ours(fastrank.Reranker(model, tokenizer, PRESET), fused=False, graphs=False)
    fns["fastrank"] = ours(fastrank.Reranker(model, tokenizer, PRESET))
    # The compiler's route to the same fusion (vLLM's): the layers through torch.compile with fastrank's ops as
    # custom ops, HF's own layer (Inductor generates its elementwise kernels) or fastrank's fused one.
    for name, fused in (("fastrank_compiled", False), ("fastrank_fused_compiled", True)):
        if device.type != "cuda":
            fns[name] = Unavailable(
                "torch.compile is compared on GPU only (Inductor's CPU code is not the choice at stake)"
            )
        else:
            fns[name] = ours(fastrank.Reranker(model, tokenizer, PRESET), fused=fused, compiled=True)
    # The other well-kept kernels: fastrank's fused forwards calling Liger-Kernel's functions (CUDA only).
    if device.type != "cuda":
        fns["fastrank_liger"] = Unavailable("Liger-Kernel's kernels run on CUDA only")
    else:
        try:
            fns["fastrank_liger"] = ours(fastrank.Reranker(model, tokenizer, PRESET), kernels=check_kernels("liger"))
        except ValueError as e:
            fns["fastrank_liger"] = Unavailable(str(e))
    return fns


def work(case: Case) -> Dict[str, float]:
    """The real tokens of the case's pairs in the preset's layout, truncated as every provider truncates, and
    the Qwen2.5-0.5B-shaped decoder's model FLOPs over them (``harness.decoder_flops``)."""
    tokenizer = build_tokenizer(padding_side="right")
    config = qwen25_config(
        num_layers=case.layers, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id
    )
    template = fastrank.get_preset(PRESET).template
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        lengths = [
            len(e.input_ids) for e in template.tokenize(tokenizer, synthetic_pairs(case.pairs, seed=0), case.max_length)
        ]
    return {"tokens": sum(lengths), "flops": decoder_flops(config, lengths)}


BENCHMARK = Benchmark(
    name="rerank",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=(
        "hf_full_logits",
        "hf_logits_to_keep",
        "flagembedding",
        "fastrank_padded",
        "fastrank_unfused",
        "fastrank_compiled",
        "fastrank_fused_compiled",
        "fastrank_liger",
        "fastrank",
    ),
    table_label=lambda case: (
        f"{case['pairs']} pairs L<={case['max_length']} b={case['batch_size']} {case['layers']}l {case['dtype']}"
    ),
    items_per_call=lambda case: case.pairs,
    unit="pairs",
    work_per_call=work,
    end_to_end={"cuda": dict(warmup=1, repeats=5), "cpu": dict(warmup=0, repeats=1)},
    legacy_keys={"n": "pairs", "t": "max_length"},
)
