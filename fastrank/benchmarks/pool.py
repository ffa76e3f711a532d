"""pool against the unfused torch formulas embedders use.

Providers, on the same left-padded batch:
- ``torch_unfused``: what BGE / sentence-transformers code writes: ``(h * mask[..., None]).sum(1) /
  mask.sum(1)`` (mean), ``h[:, 0]`` (cls, right padding assumed by the reference code, so here the
  first real token is gathered), the last-8 mean of LLARA (``h[:, -8:].mean(1)``, correct for left
  padding), each followed by ``F.normalize`` when normalising;
- ``fastrank``: ``fastrank.pool`` (Triton on CUDA, the reference path on CPU).
Modes: ``mean`` and ``special`` (last 8 tokens), forward (``*_fwd``) and forward + backward (``*_train``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict

import torch

import fastrank


@dataclass(frozen=True)
class Case:
    mode: str  # mean_fwd | mean_train | special_fwd | special_train
    n: int
    t: int
    hidden: int
    dtype: str

    def label(self) -> str:
        return f"{self.mode} N={self.n} T={self.t} H={self.hidden} {self.dtype}"


def quick_cases(device: torch.device):
    if device.type == "cuda":
        return [Case(m, 64, 512, 1024, "bfloat16") for m in ("mean_fwd", "mean_train", "special_fwd")]
    return [Case(m, 16, 128, 384, "float32") for m in ("mean_fwd", "mean_train")]


def full_cases(device: torch.device):
    if device.type != "cuda":
        return quick_cases(device)
    cases = []
    for mode in ("mean_fwd", "mean_train", "special_fwd", "special_train"):
        for n, t, h in [(256, 128, 384), (64, 512, 1024), (16, 512, 4096)]:
            cases.append(Case(mode, n, t, h, "bfloat16"))
    return cases


def case_dict(case: Case) -> dict:
    return asdict(case)


def providers(case: Case, device: torch.device) -> Dict[str, Callable[[], object]]:
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(case.n, case.t, case.hidden, generator=gen).to(device=device, dtype=dtype)
    lengths = torch.randint(max(8, case.t // 4), case.t + 1, (case.n,), generator=gen)
    lengths[0] = case.t
    mask = (torch.arange(case.t)[None, :] >= case.t - lengths[:, None]).long().to(device)
    train = case.mode.endswith("train")
    special = case.mode.startswith("special")
    if train:
        hidden.requires_grad_(True)
    grad = torch.randn(case.n, case.hidden, device=device)

    def unfused():
        if special:
            pooled = hidden[:, -8:].mean(1)
        else:
            m = mask[..., None].to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    def ours():
        if special:
            return fastrank.pool(hidden, mask, mode="special", last_k=8, normalize=True)
        return fastrank.pool(hidden, mask, mode="mean", normalize=True)

    fns = {"torch_unfused": unfused, "fastrank": ours}
    if not train:
        return {k: torch.no_grad()(f) for k, f in fns.items()}

    def with_backward(fn):
        return lambda: torch.autograd.grad((fn() * grad).sum(), hidden)

    return {k: with_backward(f) for k, f in fns.items()}
