"""rope against Hugging Face's unfused rotary embedding.

Providers, on the same inputs, laid out as a Llama-family attention layer hands them over: q and k are the
non-contiguous ``proj(x).view(B, T, H, D).transpose(1, 2)`` views of ``[B, T, H * D]`` projections, cos and
sin ``[B, T, D]`` tables in the same dtype (positions ``0..T-1`` per row, rope theta 1e6 as Qwen2.5):
- ``torch_unfused``: ``transformers``' ``apply_rotary_pos_emb(q, k, cos, sin)`` (Qwen2's, the same function
  as Llama's, Mistral's, Qwen3's and Gemma's): five tensor ops per input, autograd through them;
- ``fastrank``: ``fastrank.ops.rope.rope`` (one Triton launch per direction on CUDA, the reference path on
  CPU).
Modes: forward (``fwd``, under no_grad) and forward + backward into the projections (``train``; the
gradients flow back through the transpose and view as in a model, so the layout of each path's gradient
counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from fastrank.benchmarks.harness import ELEMENTWISE_PROVIDERS, elementwise_providers
from fastrank.benchmarks.protocol import Benchmark, Provider
from fastrank.ops.rope import rope

ROPE_THETA = 1e6  # Qwen2.5's


@dataclass(frozen=True)
class Case:
    mode: str  # fwd | train
    batch: int  # B
    seq_len: int  # T
    q_heads: int  # Hq
    kv_heads: int  # Hkv
    head_dim: int  # D
    dtype: str

    def label(self) -> str:
        return (
            f"{self.mode} B={self.batch} T={self.seq_len} Hq={self.q_heads} Hkv={self.kv_heads} "
            f"D={self.head_dim} {self.dtype}"
        )


# Qwen2.5-0.5B's attention (14 query heads, 2 key/value heads, head dim 64) on 8,192 tokens.
QWEN25_05B = dict(batch=16, seq_len=512, q_heads=14, kv_heads=2, head_dim=64, dtype="bfloat16")


def quick_cases(device: torch.device):
    if device.type == "cuda":
        return [Case(mode=m, **QWEN25_05B) for m in ("fwd", "train")]
    shape = dict(batch=4, seq_len=128, q_heads=14, kv_heads=2, head_dim=64, dtype="float32")
    return [Case(mode=m, **shape) for m in ("fwd", "train")]


def full_cases(device: torch.device):
    if device.type != "cuda":
        cases = list(quick_cases(device))
        shape = dict(batch=4, seq_len=128, q_heads=14, kv_heads=2, head_dim=64, dtype="bfloat16")
        return cases + [Case(mode=m, **shape) for m in ("fwd", "train")]
    shapes = [
        QWEN25_05B,
        dict(QWEN25_05B, batch=1, seq_len=8192),  # one long row
        dict(QWEN25_05B, dtype="float16"),
        dict(QWEN25_05B, dtype="float32"),
        dict(batch=16, seq_len=512, q_heads=16, kv_heads=8, head_dim=128, dtype="bfloat16"),  # Qwen3-0.6B
        dict(batch=16, seq_len=512, q_heads=32, kv_heads=8, head_dim=128, dtype="bfloat16"),  # Llama-3-8B
    ]
    return [Case(mode=m, **shape) for m in ("fwd", "train") for shape in shapes]


def rope_tables(batch: int, seq_len: int, head_dim: int, dtype: torch.dtype, device, theta: float = ROPE_THETA):
    """cos and sin ``[B, T, D]`` as HF's default rotary embedding builds them (fp32, then cast to dtype)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    positions = torch.arange(seq_len, device=device, dtype=torch.float32).expand(batch, seq_len)
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    dtype = getattr(torch, case.dtype)
    b, t, hq, hk, d = case.batch, case.seq_len, case.q_heads, case.kv_heads, case.head_dim
    gen = torch.Generator().manual_seed(0)
    q_proj = torch.randn(b, t, hq * d, generator=gen).to(device=device, dtype=dtype)
    k_proj = torch.randn(b, t, hk * d, generator=gen).to(device=device, dtype=dtype)
    cos, sin = rope_tables(b, t, d, dtype, device)
    train = case.mode == "train"
    if train:
        q_proj.requires_grad_(True)
        k_proj.requires_grad_(True)
    grad_q = torch.randn(b, hq, t, d, generator=gen).to(device=device, dtype=dtype)
    grad_k = torch.randn(b, hk, t, d, generator=gen).to(device=device, dtype=dtype)

    def heads(proj, h):  # what a Llama-family attention layer does to its projection's output
        return proj.view(b, t, h, d).transpose(1, 2)

    def unfused():
        return apply_rotary_pos_emb(heads(q_proj, hq), heads(k_proj, hk), cos, sin)

    def ours():
        return rope(heads(q_proj, hq), heads(k_proj, hk), cos, sin)

    def liger():
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        return lambda: liger_rotary_pos_emb(heads(q_proj, hq), heads(k_proj, hk), cos, sin)

    return elementwise_providers(unfused, ours, liger, device, train, (q_proj, k_proj), (grad_q, grad_k))


BENCHMARK = Benchmark(
    name="rope",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=ELEMENTWISE_PROVIDERS,
    table_label=lambda case: (
        f"{case['mode']} B={case['batch']} T={case['seq_len']} {case['q_heads']}/{case['kv_heads']}x"
        f"{case['head_dim']} {case['dtype']}"
    ),
)
