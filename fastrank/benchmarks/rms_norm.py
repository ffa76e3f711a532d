"""rms_norm against the HF modules' unfused formula.

Providers, on the same ``[tokens, H]`` hidden states and weight:
- ``torch_unfused``: what ``Qwen2RMSNorm`` / ``LlamaRMSNorm`` (or ``GemmaRMSNorm`` with ``unit_offset``) compute,
  op by op: ``h = x.float(); h = h * rsqrt(h.pow(2).mean(-1) + eps); weight * h.to(x.dtype)``, after the decoder
  layer's ``s = residual + x`` in the ``add_*`` modes;
- ``fastrank``: ``fastrank.ops.rms_norm.rms_norm`` (Triton on CUDA, the reference path on CPU), with
  ``residual=`` in the ``add_*`` modes.
Modes: ``fwd``, ``train`` (forward + backward into x and the weight), ``add_fwd``, ``add_train`` (the fused
residual add; backward into x, residual and weight with gradients arriving at both outputs, as in a decoder
layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from fastrank.benchmarks.harness import ELEMENTWISE_PROVIDERS, elementwise_providers
from fastrank.benchmarks.protocol import Benchmark, Provider
from fastrank.ops.rms_norm import rms_norm

EPS = 1e-6
MODES = ("fwd", "train", "add_fwd", "add_train")


@dataclass(frozen=True)
class Case:
    mode: str  # fwd | train | add_fwd | add_train
    tokens: int  # M rows
    hidden_size: int  # H
    dtype: str
    unit_offset: bool = False  # Gemma's (1 + weight) scaling

    def label(self) -> str:
        gemma = " gemma" if self.unit_offset else ""
        return f"{self.mode} M={self.tokens} H={self.hidden_size} {self.dtype}{gemma}"


def quick_cases(device: torch.device):
    if device.type == "cuda":  # Qwen2.5-0.5B: hidden 896, a batch of 8192 tokens
        return [Case(mode=m, tokens=8192, hidden_size=896, dtype="bfloat16") for m in MODES]
    return [Case(mode=m, tokens=1024, hidden_size=896, dtype="float32") for m in ("fwd", "train", "add_train")]


def full_cases(device: torch.device):
    if device.type != "cuda":
        return quick_cases(device) + [
            Case(mode=m, tokens=1024, hidden_size=896, dtype="bfloat16") for m in ("fwd", "train", "add_train")
        ]
    cases = []
    for m, h in [(8192, 896), (8192, 3584), (4096, 4096)]:  # Qwen2.5-0.5B, Qwen2.5-7B, Llama-3-8B
        cases += [Case(mode=mode, tokens=m, hidden_size=h, dtype="bfloat16") for mode in MODES]
    cases += [Case(mode=mode, tokens=8192, hidden_size=2304, dtype="bfloat16", unit_offset=True) for mode in MODES]
    return cases


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(0)
    m, h = case.tokens, case.hidden_size
    x = torch.randn(m, h, generator=gen).to(device=device, dtype=dtype)
    residual = torch.randn(m, h, generator=gen).to(device=device, dtype=dtype)
    scale = 0.1 if case.unit_offset else 1.0
    weight = (1.0 + scale * torch.randn(h, generator=gen)).to(device=device, dtype=dtype)
    if case.unit_offset:
        weight = weight - 1.0
    add = case.mode.startswith("add")
    train = case.mode.endswith("train")
    if train:
        for t in (x, residual, weight):
            t.requires_grad_(True)
    grad = torch.randn(m, h, generator=gen).to(device=device, dtype=dtype)
    grad_s = torch.randn(m, h, generator=gen).to(device=device, dtype=dtype)

    def unfused():
        inp = residual + x if add else x
        hs = inp.to(torch.float32)
        hs = hs * torch.rsqrt(hs.pow(2).mean(-1, keepdim=True) + EPS)
        if case.unit_offset:
            out = (hs * (1.0 + weight.float())).type_as(inp)
        else:
            out = weight * hs.to(inp.dtype)
        return (out, inp) if add else (out,)

    def ours():
        if add:
            return rms_norm(x, weight, EPS, residual=residual, unit_offset=case.unit_offset)
        return (rms_norm(x, weight, EPS, unit_offset=case.unit_offset),)

    def liger():
        offset, casting = (1.0, "gemma") if case.unit_offset else (0.0, "llama")
        if add:
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

            return lambda: LigerFusedAddRMSNormFunction.apply(x, residual, weight, EPS, offset, casting, False)
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        return lambda: (LigerRMSNormFunction.apply(x, weight, EPS, offset, casting, False),)

    inputs = (x, residual, weight) if add else (x, weight)
    grads = (grad, grad_s) if add else (grad,)
    return elementwise_providers(unfused, ours, liger, device, train, inputs, grads)


BENCHMARK = Benchmark(
    name="rms_norm",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=ELEMENTWISE_PROVIDERS,
    table_label=lambda case: (
        f"{case['mode']} M={case['tokens']} H={case['hidden_size']} {case['dtype']}"
        + (" gemma" if case.get("unit_offset") else "")
    ),
)
