"""contrastive_loss against torch's matmul + cross_entropy (the [B, P] score matrix held for backward).

Providers, forward and backward into q and p: ``torch`` (``F.cross_entropy(q @ p.T / tau, i * G)``) and
``fastrank``. With ``_kd`` the FlagEmbedding distillation term is added on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

import fastrank
from fastrank.benchmarks.protocol import Benchmark, Provider


@dataclass(frozen=True)
class Case:
    mode: str  # train | train_kd
    queries: int  # B
    group_size: int  # G: passages per query (one positive), so P = B * G passages
    dim: int  # D: embedding dimension
    dtype: str

    def label(self) -> str:
        return (
            f"{self.mode} B={self.queries} G={self.group_size} P={self.queries * self.group_size} D={self.dim} "
            f"{self.dtype}"
        )


def quick_cases(device: torch.device):
    if device.type == "cuda":
        return [Case(mode="train", queries=4096, group_size=8, dim=1024, dtype="bfloat16")]
    # CPU, reduced: P = 16384 passages, so the [B, P] fp32 matrix (134 MB) dwarfs a 256-row chunk (16 MB).
    return [Case(mode="train", queries=2048, group_size=8, dim=256, dtype="float32")]


def full_cases(device: torch.device):
    if device.type != "cuda":
        return quick_cases(device) + [Case(mode="train_kd", queries=2048, group_size=8, dim=256, dtype="float32")]
    return [
        Case(mode="train", queries=4096, group_size=8, dim=1024, dtype="bfloat16"),
        Case(mode="train_kd", queries=4096, group_size=8, dim=1024, dtype="bfloat16"),
        Case(mode="train", queries=1024, group_size=16, dim=768, dtype="bfloat16"),
        Case(mode="train", queries=8192, group_size=8, dim=1024, dtype="bfloat16"),
        Case(mode="train", queries=4096, group_size=8, dim=1024, dtype="float32"),
    ]


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(0)
    b, g, d = case.queries, case.group_size, case.dim
    q = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=-1).to(device=device, dtype=dtype)
    p = torch.nn.functional.normalize(torch.randn(b * g, d, generator=gen), dim=-1).to(device=device, dtype=dtype)
    q.requires_grad_(True)
    p.requires_grad_(True)
    tau = 0.02
    targets = torch.arange(b, device=device) * g
    teacher = torch.randn(b, g, generator=gen).to(device) if case.mode == "train_kd" else None
    rows = torch.arange(b, device=device)[:, None] * g + torch.arange(g, device=device)[None, :]

    def torch_loss():
        scores = (q @ p.t()).float() / tau
        loss = torch.nn.functional.cross_entropy(scores, targets)
        if teacher is not None:
            group = scores.gather(1, rows)
            loss = loss - (torch.log_softmax(group, -1) * torch.softmax(teacher, -1)).sum(-1).mean()
        return torch.autograd.grad(loss, (q, p))

    def ours():
        loss = fastrank.contrastive_loss(q, p, temperature=tau, teacher_scores=teacher)
        return torch.autograd.grad(loss, (q, p))

    return {"torch": torch_loss, "fastrank": ours}


BENCHMARK = Benchmark(
    name="contrastive",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=("torch", "fastrank"),
    table_label=lambda case: (
        f"{case['mode']} B={case['queries']} G={case['group_size']} D={case['dim']} {case['dtype']}"
    ),
    legacy_keys={"n": "queries", "t": "group_size", "hidden": "dim"},
)
