"""varlen_attention with shared prefixes against torch's sdpa on the padded, unshared equivalent.

The shape is a reranking batch: ``queries`` prefixes (template head plus query) of ``prefix_len`` tokens, each
followed by ``docs`` documents of ``doc_len // 2 .. doc_len`` tokens. Providers, same numbers:
- ``torch_sdpa_padded``: what Hugging Face's sdpa attention runs: every document as its own sequence
  ``[prefix, document]``, right-padded to the longest, kv heads repeated (``repeat_kv``), one
  ``scaled_dot_product_attention`` call with the causal-and-padding mask;
- ``flex_attention``: torch's ``flex_attention`` (compiled) on the same packed stream with a block mask
  built from the segments (own segment causally, plus the prefix it reads): the well-kept alternative to
  fastrank's kernel on GPU (CUDA only);
- ``fastrank``: ``fastrank.functional.varlen_attention`` on the packed stream, each prefix stored once and
  read by its documents (Triton on CUDA, the chunked reference on CPU).
Modes: forward (``fwd``), forward + backward into q, k and v (``train``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from fastrank.benchmarks.harness import Unavailable
from fastrank.benchmarks.protocol import Benchmark, Provider
from fastrank.functional import varlen_attention
from fastrank.utils import value_checks


@dataclass(frozen=True)
class Case:
    mode: str  # fwd | train
    queries: int  # prefixes in the batch
    docs: int  # documents per prefix
    prefix_len: int  # tokens of each prefix
    doc_len: int  # longest document (lengths are drawn from doc_len // 2 .. doc_len)
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    dtype: str

    def label(self) -> str:
        return (
            f"{self.mode} Q={self.queries}x{self.docs} P={self.prefix_len} L<={self.doc_len} "
            f"H={self.heads}/{self.kv_heads} D={self.head_dim} {self.dtype}"
        )


def quick_cases(device: torch.device):
    if device.type == "cuda":  # Qwen2.5-0.5B's attention (14 heads, 2 kv heads, D 64)
        shape = dict(queries=16, docs=16, prefix_len=96, doc_len=160, heads=14, kv_heads=2, head_dim=64)
        return [Case(mode=m, dtype="bfloat16", **shape) for m in ("fwd", "train")]
    shape = dict(queries=2, docs=4, prefix_len=32, doc_len=32, heads=4, kv_heads=2, head_dim=32)
    return [Case(mode=m, dtype="float32", **shape) for m in ("fwd", "train")]


def full_cases(device: torch.device):
    if device.type != "cuda":
        return quick_cases(device)
    cases = []
    for mode in ("fwd", "train"):
        for queries, docs, prefix_len, doc_len, heads, kv_heads, head_dim in [
            (16, 16, 96, 160, 14, 2, 64),  # Qwen2.5-0.5B
            (8, 32, 128, 384, 32, 8, 128),  # Qwen3-4B-sized heads, long documents
            (32, 8, 64, 96, 8, 4, 256),  # Gemma-2-2B-sized heads
        ]:
            cases.append(Case(mode, queries, docs, prefix_len, doc_len, heads, kv_heads, head_dim, dtype="bfloat16"))
    return cases


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator().manual_seed(0)
    n_docs = case.queries * case.docs
    doc_lens = torch.randint(max(1, case.doc_len // 2), case.doc_len + 1, (n_docs,), generator=gen).tolist()
    # the packed stream: prefix 0, its documents, prefix 1, its documents, ...
    lengths, prefix = [], []
    for qi in range(case.queries):
        head = len(lengths)
        lengths.append(case.prefix_len)
        prefix.append(-1)
        for di in range(case.docs):
            lengths.append(doc_lens[qi * case.docs + di])
            prefix.append(head)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    m = starts[-1]
    cu = torch.tensor(starts, dtype=torch.int32, device=device)
    pre = torch.tensor(prefix, dtype=torch.int64, device=device)
    max_seqlen = max(lengths)
    d = case.head_dim
    q = torch.randn(m, case.heads, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(m, case.kv_heads, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(m, case.kv_heads, d, generator=gen).to(device=device, dtype=dtype)

    # the unshared padded batch: one row per document, [prefix, document, padding]
    t = case.prefix_len + max(doc_lens)
    rows = torch.zeros(n_docs, t, dtype=torch.long)
    valid = torch.zeros(n_docs, t, dtype=torch.bool)
    docs = [s for s in range(len(lengths)) if prefix[s] >= 0]
    for r, s in enumerate(docs):
        p = prefix[s]
        idx = list(range(starts[p], starts[p + 1])) + list(range(starts[s], starts[s + 1]))
        rows[r, : len(idx)] = torch.tensor(idx)
        valid[r, : len(idx)] = True
    rows, valid = rows.to(device), valid.to(device)
    qp, kp, vp = (x[rows].transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, T, D]
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    mask = (causal[None] & valid[:, None, :])[:, None]  # [B, 1, T, T]: causal, no padded key
    group = case.heads // case.kv_heads
    train = case.mode == "train"
    leaves = (q, k, v, qp, kp, vp)
    if train:
        for x in leaves:
            x.requires_grad_(True)
    grad_packed = torch.randn(m, case.heads, d, generator=gen).to(device=device, dtype=dtype)
    grad_padded = torch.randn(n_docs, case.heads, t, d, generator=gen).to(device=device, dtype=dtype)

    def padded():
        kk, vv = (x.repeat_interleave(group, dim=1) if group > 1 else x for x in (kp, vp))
        out = torch.nn.functional.scaled_dot_product_attention(qp, kk, vv, attn_mask=mask)
        if train:
            return torch.autograd.grad(out, (qp, kp, vp), grad_padded)
        return out

    def ours():
        with value_checks(False):  # as the engine calls it: no read back of cu_seqlens / prefix per call
            out = varlen_attention(q, k, v, cu, prefix=pre, max_seqlen=max_seqlen)
        if train:
            return torch.autograd.grad(out, (q, k, v), grad_packed)
        return out

    fns = {"torch_sdpa_padded": padded, "flex_attention": _flex(case, q, k, v, starts, prefix, grad_packed, train)}
    fns["fastrank"] = ours
    return fns if train else {n: fn if isinstance(fn, Unavailable) else torch.no_grad()(fn) for n, fn in fns.items()}


def _flex(case: Case, q, k, v, starts, prefix, grad, train: bool):
    """flex_attention over the packed stream with the segments' block mask, or why it cannot run here."""
    if not q.is_cuda:
        return Unavailable("flex_attention runs compiled on CUDA only")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return Unavailable(f"torch.nn.attention.flex_attention does not import: {e}")
    device = q.device
    lengths = torch.tensor([b - a for a, b in zip(starts[:-1], starts[1:])], device=device)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    pre = torch.tensor(prefix, device=device)
    m = q.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        own = (seg[q_idx] == seg[kv_idx]) & (kv_idx <= q_idx)
        return own | (seg[kv_idx] == pre[seg[q_idx]])

    block_mask = create_block_mask(mask_mod, None, None, m, m, device=device)
    compiled = torch.compile(flex_attention)
    qh, kh, vh = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, H, M, D]
    gqa = case.heads != case.kv_heads

    def run():
        out = compiled(qh, kh, vh, block_mask=block_mask, enable_gqa=gqa)
        if train:
            return torch.autograd.grad(out, (q, k, v), grad.transpose(0, 1)[None])
        return out

    return run


BENCHMARK = Benchmark(
    name="varlen_attention",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=("torch_sdpa_padded", "flex_attention", "fastrank"),
    table_label=lambda case: (
        f"{case['mode']} {case['queries']}x{case['docs']} P={case['prefix_len']} L<={case['doc_len']} "
        f"D={case['head_dim']} {case['dtype']}"
    ),
)
