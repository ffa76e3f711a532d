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
from typing import Callable, Dict

import torch

import fastrank

QWEN25_05B_HEAD = dict(hidden=896, vocab=151936)
YES_ID = 9454  # an id in Qwen2.5's range; the value does not matter for timing
DIGIT_IDS = [16, 17, 18, 19, 20, 21, 22]  # seven ids, as the digit convention scores


@dataclass(frozen=True)
class Case:
    mode: str  # forward | train | lse | lse_train
    n: int
    t: int
    hidden: int
    vocab: int
    dtype: str  # "bfloat16" | "float32" | ...

    @property
    def token_ids(self):
        return DIGIT_IDS if self.mode.startswith("lse") else [YES_ID % self.vocab]

    def label(self) -> str:
        return f"{self.mode} N={self.n} T={self.t} H={self.hidden} V={self.vocab} {self.dtype}"


def _inputs(case: Case, device: torch.device):
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(case.n, case.t, case.hidden, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(case.vocab, case.hidden, generator=gen) / case.hidden**0.5).to(device=device, dtype=dtype)
    lengths = torch.randint(case.t // 2 + 1, case.t + 1, (case.n,), generator=gen)
    lengths[0] = case.t
    steps = torch.arange(case.t)
    mask = (steps[None, :] >= case.t - lengths[:, None]).long().to(device)  # left padding
    return hidden, weight, mask


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    steps = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask != 0, steps, -1).amax(1)


def providers(case: Case, device: torch.device) -> Dict[str, Callable[[], object]]:
    """Closures that each compute the case's scores (and gradients, in train modes) from the same inputs."""
    hidden, weight, mask = _inputs(case, device)
    ids = case.token_ids
    ids_t = torch.tensor(ids, device=device)
    train = case.mode.endswith("train")
    lse = case.mode.startswith("lse")
    if train:
        hidden.requires_grad_(True)
        weight.requires_grad_(True)
    rows = torch.arange(case.n, device=device)

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
        fns = {"full_logits": full_logits, "logits_to_keep": logits_to_keep, "torch_sliced": torch_sliced, "fastrank": ours}
    if not train:
        return {name: torch.no_grad()(fn) for name, fn in fns.items()}

    grad_seed = torch.randn(case.n, len(ids), device=device)

    def with_backward(fn):
        def run():
            out = fn()
            return torch.autograd.grad((out * grad_seed).sum(), (hidden, weight))

        return run

    return {name: with_backward(fn) for name, fn in fns.items()}


def quick_cases(device: torch.device):
    if device.type == "cuda":
        shape = dict(n=64, t=512, dtype="bfloat16", **QWEN25_05B_HEAD)
        return [Case(mode=m, **shape) for m in ("forward", "train", "lse", "lse_train")]
    # CPU: the reference path against full logits; T kept small so full logits take well under a second.
    shape = dict(n=4, t=32, dtype="float32", **QWEN25_05B_HEAD)
    return [Case(mode=m, **shape) for m in ("forward", "train", "lse")]


def full_cases(device: torch.device):
    if device.type != "cuda":
        return quick_cases(device)
    cases = []
    for mode in ("forward", "train", "lse", "lse_train"):
        for n, t in [(1, 512), (16, 512), (64, 128), (64, 512), (256, 512)]:
            cases.append(Case(mode=mode, n=n, t=t, dtype="bfloat16", **QWEN25_05B_HEAD))
    cases.append(Case(mode="forward", n=64, t=512, dtype="float32", **QWEN25_05B_HEAD))
    cases.append(Case(mode="train", n=64, t=512, dtype="float32", **QWEN25_05B_HEAD))
    return cases


def case_dict(case: Case) -> dict:
    d = asdict(case)
    d["token_ids"] = case.token_ids
    return d
