"""gated_activation against the HF gated MLP's unfused middle.

Providers, on the same ``[tokens, I]`` gate and up projections:
- ``torch_unfused``: HF's ``act_fn(gate) * up`` (``F.silu``, or ``F.gelu(approximate="tanh")`` for Gemma), which
  keeps ``act_fn(gate)`` for backward;
- ``fastrank``: ``fastrank.ops.gated_activation.gated_activation`` (Triton on CUDA, the reference path on CPU).
Modes: ``fwd`` and ``train`` (forward + backward into gate and up).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F

from fastrank.benchmarks.harness import ELEMENTWISE_PROVIDERS, elementwise_providers
from fastrank.benchmarks.protocol import Benchmark, Provider
from fastrank.ops.gated_activation import gated_activation


@dataclass(frozen=True)
class Case:
    mode: str  # fwd | train
    tokens: int  # M rows
    intermediate_size: int  # I
    dtype: str
    activation: str = "silu"  # silu | gelu_tanh

    def label(self) -> str:
        return f"{self.mode} {self.activation} M={self.tokens} I={self.intermediate_size} {self.dtype}"


def quick_cases(device: torch.device):
    if device.type == "cuda":  # Qwen2.5-0.5B: intermediate 4864, a batch of 8192 tokens
        return [Case(mode=m, tokens=8192, intermediate_size=4864, dtype="bfloat16") for m in ("fwd", "train")]
    return [Case(mode=m, tokens=256, intermediate_size=4864, dtype="float32") for m in ("fwd", "train")]


def full_cases(device: torch.device):
    if device.type != "cuda":
        return quick_cases(device) + [
            Case(mode=m, tokens=256, intermediate_size=4864, dtype="bfloat16", activation=a)
            for a in ("silu", "gelu_tanh")
            for m in ("fwd", "train")
        ]
    cases = []
    for m, i, act in [(8192, 4864, "silu"), (8192, 18944, "silu"), (8192, 9216, "gelu_tanh")]:
        cases += [
            Case(mode=mode, tokens=m, intermediate_size=i, dtype="bfloat16", activation=act)
            for mode in ("fwd", "train")
        ]
    return cases


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(0)
    m, i = case.tokens, case.intermediate_size
    gate = torch.randn(m, i, generator=gen).to(device=device, dtype=dtype)
    up = torch.randn(m, i, generator=gen).to(device=device, dtype=dtype)
    grad = torch.randn(m, i, generator=gen).to(device=device, dtype=dtype)
    train = case.mode == "train"
    if train:
        gate.requires_grad_(True)
        up.requires_grad_(True)

    def unfused():
        act = F.silu(gate) if case.activation == "silu" else F.gelu(gate, approximate="tanh")
        return act * up

    def ours():
        return gated_activation(gate, up, case.activation)

    def liger():
        if case.activation == "silu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction as function
        else:
            from liger_kernel.ops.geglu import LigerGELUMulFunction as function

        return lambda: function.apply(gate, up)

    return elementwise_providers(unfused, ours, liger, device, train, (gate, up), grad)


BENCHMARK = Benchmark(
    name="gated_activation",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=ELEMENTWISE_PROVIDERS,
    table_label=lambda case: (
        f"{case['mode']} {case.get('activation', 'silu')} M={case['tokens']} I={case['intermediate_size']} "
        f"{case['dtype']}"
    ),
)
