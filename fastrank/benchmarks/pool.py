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

from dataclasses import dataclass
from typing import Dict

import torch

import fastrank
from fastrank.benchmarks.protocol import Benchmark, Provider


@dataclass(frozen=True)
class Case:
    mode: str  # mean_fwd | mean_train | special_fwd | special_train
    sequences: int  # N
    seq_len: int  # T, left padded
    hidden_size: int  # H
    dtype: str

    def label(self) -> str:
        return f"{self.mode} N={self.sequences} T={self.seq_len} H={self.hidden_size} {self.dtype}"


def quick_cases(device: torch.device):
    if device.type == "cuda":
        shape = dict(sequences=64, seq_len=512, hidden_size=1024, dtype="bfloat16")
        return [Case(mode=m, **shape) for m in ("mean_fwd", "mean_train", "special_fwd")]
    shape = dict(sequences=16, seq_len=128, hidden_size=384, dtype="float32")
    return [Case(mode=m, **shape) for m in ("mean_fwd", "mean_train")]


def full_cases(device: torch.device):
    if device.type != "cuda":
        return quick_cases(device)
    cases = []
    for mode in ("mean_fwd", "mean_train", "special_fwd", "special_train"):
        for n, t, h in [(256, 128, 384), (64, 512, 1024), (16, 512, 4096)]:
            cases.append(Case(mode=mode, sequences=n, seq_len=t, hidden_size=h, dtype="bfloat16"))
    return cases


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(0)
    n, t = case.sequences, case.seq_len
    hidden = torch.randn(n, t, case.hidden_size, generator=gen).to(device=device, dtype=dtype)
    lengths = torch.randint(max(8, t // 4), t + 1, (n,), generator=gen)
    lengths[0] = t
    mask = (torch.arange(t)[None, :] >= t - lengths[:, None]).long().to(device)
    train = case.mode.endswith("train")
    special = case.mode.startswith("special")
    if train:
        hidden.requires_grad_(True)
    grad = torch.randn(n, case.hidden_size, device=device)

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


BENCHMARK = Benchmark(
    name="pool",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=("torch_unfused", "fastrank"),
    table_label=lambda case: f"{case['mode']} N={case['sequences']} T={case['seq_len']} {case['dtype']}",
    legacy_keys={"n": "sequences", "t": "seq_len", "hidden": "hidden_size"},
)
