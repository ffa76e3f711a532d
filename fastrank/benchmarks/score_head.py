"""score_head against the unfused ways of getting the same numbers.

The input of every provider is what a reranker's head stage receives: the backbone's last hidden state
``[N, T, H]`` with a left-padded attention mask (so the scoring position is really looked up), the LM
head ``[V, H]`` and the token ids. Providers:

- ``full_logits``: ``lm_head(hidden)`` at every position, then the last real token, then the ids. What
  ``model(**batch).logits[...]`` does, and FlagEmbedding's reranker with it.
- ``logits_to_keep``: gather the scoring rows first, then the full-vocabulary projection ``[N, V]``
  (transformers' ``logits_to_keep``), then the ids.
- ``torch_sliced``: gather the rows and project onto ``W[ids]`` in plain torch: the cheapest unfused form.
- ``fastrank``: ``fastrank.score_head`` (Triton on CUDA, the reference path on CPU).

Modes: ``forward`` (inference, no grad), ``train`` (forward + backward into hidden and weight),
``lse`` (the K log-probabilities under the full softmax, as lb-reranker's digit score needs; the
baselines take ``log_softmax`` of full logits) and ``lse_train``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

import torch

import fastrank
from fastrank.benchmarks.protocol import Benchmark, Provider

QWEN25_05B_HEAD = dict(hidden_size=896, vocab_size=151936)
YES_ID = 9454  # an id in Qwen2.5's range; the value does not matter for timing
DIGIT_IDS = [16, 17, 18, 19, 20, 21, 22]  # seven ids, as the digit convention scores


@dataclass(frozen=True)
class Case:
    mode: str  # forward | train | lse | lse_train
    sequences: int  # N
    seq_len: int  # T, left padded
    hidden_size: int  # H
    vocab_size: int  # V
    dtype: str  # "bfloat16" | "float32" | ...

    @property
    def token_ids(self):
        return DIGIT_IDS if self.mode.startswith("lse") else [YES_ID % self.vocab_size]

    def label(self) -> str:
        return f"{self.mode} N={self.sequences} T={self.seq_len} H={self.hidden_size} V={self.vocab_size} {self.dtype}"


def _inputs(case: Case, device: torch.device):
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    n, t, h = case.sequences, case.seq_len, case.hidden_size
    hidden = torch.randn(n, t, h, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(case.vocab_size, h, generator=gen) / h**0.5).to(device=device, dtype=dtype)
    lengths = torch.randint(t // 2 + 1, t + 1, (n,), generator=gen)
    lengths[0] = t
    steps = torch.arange(t)
    mask = (steps[None, :] >= t - lengths[:, None]).long().to(device)  # left padding
    return hidden, weight, mask


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    steps = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask != 0, steps, -1).amax(1)


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    """Closures that each compute the case's scores (and gradients, in train modes) from the same inputs."""
    hidden, weight, mask = _inputs(case, device)
    ids = case.token_ids
    ids_t = torch.tensor(ids, device=device)
    train = case.mode.endswith("train")
    lse = case.mode.startswith("lse")
    if train:
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
    rows = torch.arange(case.sequences, device=device)

    def head_from_full(scores_nv):  # [N, V] logits -> what the case returns
        if lse:
            return torch.log_softmax(scores_nv.float(), dim=-1)[:, ids_t]
        return scores_nv[:, ids_t].float()

    def full_logits():
        logits = hidden @ weight.t()  # [N, T, V]
        return head_from_full(logits[rows, _last_real(mask)])

    def logits_to_keep():
        return head_from_full(hidden[rows, _last_real(mask)] @ weight.t())

    def torch_sliced():
        h = hidden[rows, _last_real(mask)]
        out = (h @ weight[ids_t].t()).float()
        if lse:
            # the sliced form cannot normalise without the whole vocabulary: chunked log-sum-exp by hand
            total = torch.logsumexp(torch.cat([(h @ w.t()).float() for w in weight.split(16384)], dim=1), dim=1)
            out = out - total[:, None]
        return out

    def ours():
        if lse:
            res = fastrank.score_head(hidden, weight, ids, attention_mask=mask, return_lse=True)
            return res.logits - res.lse[:, None]
        return fastrank.score_head(hidden, weight, ids, attention_mask=mask)

    fns = {"full_logits": full_logits, "logits_to_keep": logits_to_keep, "fastrank": ours}
    if not lse:
        fns = {
            "full_logits": full_logits,
            "logits_to_keep": logits_to_keep,
            "torch_sliced": torch_sliced,
            "fastrank": ours,
        }
    if not train:
        return {name: torch.no_grad()(fn) for name, fn in fns.items()}

    grad_seed = torch.randn(case.sequences, len(ids), device=device)

    def with_backward(fn):
        def run():
            out = fn()
            return torch.autograd.grad((out * grad_seed).sum(), (hidden, weight))

        return run

    return {name: with_backward(fn) for name, fn in fns.items()}


def quick_cases(device: torch.device):
    if device.type == "cuda":
        shape = dict(sequences=64, seq_len=512, dtype="bfloat16", **QWEN25_05B_HEAD)
        return [Case(mode=m, **shape) for m in ("forward", "train", "lse", "lse_train")]
    # CPU: the reference path against full logits; T kept small so full logits take well under a second.
    shape = dict(sequences=4, seq_len=32, dtype="float32", **QWEN25_05B_HEAD)
    return [Case(mode=m, **shape) for m in ("forward", "train", "lse")]


def full_cases(device: torch.device):
    if device.type != "cuda":
        return quick_cases(device)
    cases = []
    for mode in ("forward", "train", "lse", "lse_train"):
        for n, t in [(1, 512), (16, 512), (64, 128), (64, 512), (256, 512)]:
            cases.append(Case(mode=mode, sequences=n, seq_len=t, dtype="bfloat16", **QWEN25_05B_HEAD))
    cases.append(Case(mode="forward", sequences=64, seq_len=512, dtype="float32", **QWEN25_05B_HEAD))
    cases.append(Case(mode="train", sequences=64, seq_len=512, dtype="float32", **QWEN25_05B_HEAD))
    return cases


def _case_dict(case: Case) -> dict:
    d = asdict(case)
    d["token_ids"] = case.token_ids
    return d


BENCHMARK = Benchmark(
    name="score_head",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=("full_logits", "logits_to_keep", "torch_sliced", "fastrank"),
    table_label=lambda case: f"{case['mode']} N={case['sequences']} T={case['seq_len']} {case['dtype']}",
    case_dict=_case_dict,
    legacy_keys={"n": "sequences", "t": "seq_len", "hidden": "hidden_size", "vocab": "vocab_size"},
)
