"""contrastive_loss against torch's matmul + cross_entropy (the [B, P] score matrix held for backward).

Providers, forward and backward into q and p: ``torch`` (``F.cross_entropy(q @ p.T / tau, i * G)``) and
``fastrank``. With ``_kd`` the FlagEmbedding distillation term is added on both sides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict

import torch

import fastrank


@dataclass(frozen=True)
class Case:
    mode: str  # train | train_kd
    n: int  # B (queries)
    t: int  # G (group size)
    hidden: int  # D
    dtype: str

    def label(self) -> str:
        return f"{self.mode} B={self.n} G={self.t} P={self.n * self.t} D={self.hidden} {self.dtype}"


def quick_cases(device: torch.device):
    if device.type == "cuda":
        return [Case("train", 4096, 8, 1024, "bfloat16")]
    # CPU, reduced: P = 16384 passages, so the [B, P] fp32 matrix (134 MB) dwarfs a 256-row chunk (16 MB).
    return [Case("train", 2048, 8, 256, "float32")]


def full_cases(device: torch.device):
    if device.type != "cuda":
        return quick_cases(device) + [Case("train_kd", 2048, 8, 256, "float32")]
    return [
        Case("train", 4096, 8, 1024, "bfloat16"),
        Case("train_kd", 4096, 8, 1024, "bfloat16"),
        Case("train", 1024, 16, 768, "bfloat16"),
        Case("train", 8192, 8, 1024, "bfloat16"),
        Case("train", 4096, 8, 1024, "float32"),
    ]


def case_dict(case: Case) -> dict:
    return asdict(case)


def providers(case: Case, device: torch.device) -> Dict[str, Callable[[], object]]:
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(0)
    b, g, d = case.n, case.t, case.hidden
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
