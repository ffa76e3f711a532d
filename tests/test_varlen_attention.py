"""varlen_attention against float64 attention over each segment's unshared sequence (its prefix's tokens, then its
own): values, gradients (a prefix's keys and values collect every reader's), layouts, dtypes and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import assert_close, attention_atol, attention_grad_atol

import fastrank.functional as F
from fastrank.kernels.varlen_attention import readers_csr
from fastrank.utils import value_checks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# name: (segment lengths, prefix, Hq, Hkv, head_dim, scale, softcap)
CASES = {
    # 1-token segments, one of them a 1-token prefix; GQA with one kv head
    "one_token": ([1, 1, 3, 1, 2], [-1, 0, -1, 2, 0], 2, 1, 8, None, None),
    # a prefix longer than its segments (and than a key block); odd head_dim, GQA 2:1, custom scale
    "long_prefix": ([19, 4, 2], [-1, 0, 0], 4, 2, 40, 0.3, None),
    # no prefix at all, an empty segment, a segment longer than a block; odd head_dim 72
    "no_prefix": ([5, 0, 17, 1], None, 2, 2, 72, None, None),
    # five segments sharing one prefix, all four query heads on one kv head, softcap
    "five_share": ([9, 3, 5, 1, 4, 6], [-1, 0, 0, 0, 0, 0], 4, 1, 32, None, 2.0),
    # two prefixes in one stream, one named before it appears, and a plain segment; softcap and custom scale
    "two_prefixes": ([4, 6, 7, 3, 5, 2], [1, -1, -1, 2, 2, -1], 4, 2, 24, 0.5, 3.0),
}
GRAD_CASES = ["one_token", "five_share", "two_prefixes"]

pytestmark = pytest.mark.attention_kernel  # the interpreted kernel itself (see conftest.backend)


def make_inputs(case, dtype, device, seed=0):
    lengths, prefix, hq, hkv, d, scale, softcap = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    m = sum(lengths)
    q = (1.5 * torch.randn(m, hq, d, generator=gen)).to(dtype).to(device)
    k = (1.5 * torch.randn(m, hkv, d, generator=gen)).to(dtype).to(device)
    v = torch.randn(m, hkv, d, generator=gen).to(dtype).to(device)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    pre = torch.tensor(prefix, dtype=torch.int64, device=device) if prefix is not None else None
    return q, k, v, cu, pre, dict(scale=scale, softcap=softcap)


def oracle(q, k, v, cu, prefix, causal, scale, softcap):
    """float64 attention of every segment's unshared sequence ``[prefix tokens, own tokens]`` (all its rows, with
    the standard causal or full mask), keeping the segment's own rows. Also per row: the bound on
    ``scale * sum |q k|`` and on ``|v|`` over the keys it sees, and the number of those keys."""
    q, k, v = (x.double() for x in (q, k, v))
    m, hq, d = q.shape
    group = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    bounds = cu.tolist()
    pre = prefix.tolist() if prefix is not None else [-1] * (len(bounds) - 1)
    outs, score_abs, v_abs, n_keys = [], torch.zeros(m, 1, 1), torch.zeros(m, 1, 1), 1
    for s in range(len(bounds) - 1):
        a, b = bounds[s], bounds[s + 1]
        pa, pb = (bounds[pre[s]], bounds[pre[s] + 1]) if pre[s] >= 0 else (0, 0)
        rows = [torch.cat([x[pa:pb], x[a:b]]) for x in (q, k, v)]  # the unshared sequence
        sq, sk, sv = rows[0], rows[1].repeat_interleave(group, 1), rows[2].repeat_interleave(group, 1)
        n = sq.shape[0]
        scores = torch.einsum("ihd,jhd->hij", sq, sk) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if causal:
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out = torch.einsum("hij,jhd->ihd", scores.softmax(-1), sv)
        outs.append(out[pb - pa :])
        if b > a:
            abs_scores = torch.einsum("ihd,jhd->hij", sq.abs(), sk.abs()) * scale
            score_abs[a:b] = abs_scores.amax((0, 2))[pb - pa :, None, None]
            v_abs[a:b] = sv.abs().max()
            n_keys = max(n_keys, n)
    return torch.cat(outs), score_abs, v_abs, n_keys


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_float64(backend, device, dtype, case, causal):
    q, k, v, cu, prefix, opts = make_inputs(case, dtype, device)
    got = F.varlen_attention(q, k, v, cu, prefix=prefix, causal=causal, **opts)
    assert got.dtype == dtype and got.shape == q.shape
    want, score_abs, v_abs, n_keys = oracle(q, k, v, cu, prefix, causal, **opts)
    tol = attention_atol(dtype, q.shape[-1], n_keys, score_abs, v_abs, want.abs())
    assert_close(got, want, atol=tol, what=f"{case} causal={causal}")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_match_float64(backend, device, dtype, case, causal):
    q, k, v, cu, prefix, opts = make_inputs(case, dtype, device, seed=1)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = F.varlen_attention(*leaves, cu, prefix=prefix, causal=causal, **opts)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    (out.float() * grad.float()).sum().backward()

    ref = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    want, score_abs, _, n_keys = oracle(*ref, cu, prefix, causal, **opts)
    (want * grad.double()).sum().backward()
    for name, got, r in zip("qkv", leaves, ref):
        assert got.grad.dtype == dtype
        tol = attention_grad_atol(dtype, n_keys + q.shape[-1], score_abs.max().item(), r.grad.abs().max().item())
        assert_close(got.grad, r.grad, atol=tol, what=f"d{name} {case} causal={causal}")


def test_prefix_gets_every_readers_gradient(backend, device):
    """dK/dV of a shared prefix equal the sum of what each reader alone sends it."""
    q, k, v, cu, prefix, opts = make_inputs("long_prefix", torch.float32, device, seed=3)

    def grads(rows):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = F.varlen_attention(*leaves, cu, prefix=prefix, **opts)
        out[rows].sum().backward()
        return leaves[1].grad[:19], leaves[2].grad[:19]  # the prefix segment's rows

    together = grads(slice(19, None))
    alone = [grads(slice(19, 23)), grads(slice(23, 25))]
    for i in range(2):
        assert_close(together[i], sum(a[i] for a in alone), atol=1e-5, what="prefix dk/dv")
    assert together[0].abs().max() > 0.1


@pytest.mark.parametrize("hkv", [1, 2])
def test_hf_layout_views(backend, device, hkv):
    """q, k, v as views of HF's [1, H, M, D] (``x[0].transpose(0, 1)``), and a last dim that is not contiguous."""
    lengths, hq, d = [6, 5, 3], 4, 20
    m = sum(lengths)
    cu = torch.tensor([0, 6, 11, 14], device=device)
    prefix = torch.tensor([-1, 0, 0], device=device)
    q4, k4, v4 = (torch.randn(1, h, m, d, device=device, requires_grad=True) for h in (hq, hkv, hkv))
    q, k, v = (x[0].transpose(0, 1) for x in (q4, k4, v4))
    assert not q.is_contiguous()
    out = F.varlen_attention(q, k, v, cu, prefix=prefix, max_seqlen=6)
    want, score_abs, v_abs, n_keys = oracle(q.detach(), k.detach(), v.detach(), cu, prefix, True, None, None)
    assert_close(out, want, atol=attention_atol(torch.float32, d, n_keys, score_abs, v_abs), what="views")
    out.sum().backward()
    assert q4.grad.shape == q4.shape and k4.grad.abs().sum() > 0
    # last dimension strided: copied, same values
    k_t = torch.stack([k.detach(), torch.zeros_like(k)], dim=-1)[..., 0]  # [M, Hkv, D] with stride(-1) == 2
    assert k_t.stride(-1) == 2
    again = F.varlen_attention(q.detach(), k_t, v.detach(), cu, prefix=prefix)
    assert_close(again, out.detach(), atol=1e-6, what="strided last dim")


@pytest.mark.parametrize("causal,softcap", [(True, None), (False, 1.5)], ids=["causal", "bidirectional-softcap"])
def test_gradcheck_float64(monkeypatch, causal, softcap):
    monkeypatch.setenv("FASTRANK_BACKEND", "torch")
    gen = torch.Generator().manual_seed(4)
    cu = torch.tensor([0, 2, 4, 5])
    prefix = torch.tensor([-1, 0, 0])
    q = torch.randn(5, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 1, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 1, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: F.varlen_attention(a, b, c, cu, prefix=prefix, causal=causal, softcap=softcap), (q, k, v)
    )


def test_checks_off_with_max_seqlen(backend, device, monkeypatch):
    q, k, v, cu, prefix, opts = make_inputs("two_prefixes", torch.float32, device)
    want = F.varlen_attention(q, k, v, cu, prefix=prefix, **opts)
    with value_checks(False):
        assert_close(F.varlen_attention(q, k, v, cu, prefix=prefix, max_seqlen=7, **opts), want, atol=0.0)
        assert_close(F.varlen_attention(q, k, v, cu, prefix=prefix, **opts), want, atol=0.0)
    # a generous max_seqlen only launches programs that return at once
    assert_close(F.varlen_attention(q, k, v, cu, prefix=prefix, max_seqlen=40, **opts), want, atol=0.0)


def test_readers_csr():
    ptr, idx = readers_csr(torch.tensor([-1, 0, 3, -1, 0, 3, 0]), 7)
    assert ptr.tolist() == [0, 3, 3, 3, 5, 5, 5, 5]
    assert idx[:5].tolist() == [1, 4, 6, 2, 5]


def _base(device):
    return dict(
        q=torch.randn(6, 4, 8, device=device),
        k=torch.randn(6, 2, 8, device=device),
        v=torch.randn(6, 2, 8, device=device),
        cu_seqlens=torch.tensor([0, 2, 4, 6], device=device),
        prefix=torch.tensor([-1, 0, 0], device=device),
    )


BAD = [
    ("q: must be 3-D", lambda a: a.update(q=a["q"][0])),
    ("q: must be float16", lambda a: a.update(q=a["q"].long())),
    ("k: dtype float16 differs", lambda a: a.update(k=a["k"].half())),
    ("k: has 5 tokens", lambda a: a.update(k=a["k"][:5])),
    ("v: shape", lambda a: a.update(v=a["v"][:, :1])),
    ("k: head_dim", lambda a: a.update(k=a["k"][..., :4], v=a["v"][..., :4])),
    ("k: Hkv=3", lambda a: a.update(k=a["k"][:, [0, 1, 1]], v=a["v"][:, [0, 1, 1]])),
    ("q: head_dim D=300", lambda a: a.update(**{n: torch.zeros(6, a[n].shape[1], 300) for n in "qkv"})),
    ("k: is on meta", lambda a: a.update(k=a["k"].to("meta"))),
    ("cu_seqlens: must hold integers", lambda a: a.update(cu_seqlens=a["cu_seqlens"].float())),
    ("cu_seqlens: must be 1-D", lambda a: a.update(cu_seqlens=a["cu_seqlens"][None])),
    ("cu_seqlens: must start at 0", lambda a: a.update(cu_seqlens=torch.tensor([0, 2, 4, 5]))),
    ("cu_seqlens: must start at 0", lambda a: a.update(cu_seqlens=torch.tensor([0, 4, 2, 6]))),
    ("prefix: must be 1-D", lambda a: a.update(prefix=torch.tensor([-1, 0]))),
    ("prefix: must hold integers", lambda a: a.update(prefix=torch.tensor([-1.0, 0.0, 0.0]))),
    ("prefix: entries must be -1", lambda a: a.update(prefix=torch.tensor([-1, 0, 3]))),
    ("prefix: entries must be -1", lambda a: a.update(prefix=torch.tensor([-2, 0, 0]))),
    ("prefix: segment 1 names itself", lambda a: a.update(prefix=torch.tensor([-1, 1, 0]))),
    ("prefix: segment 2 reads segment 1, which has a prefix", lambda a: a.update(prefix=torch.tensor([-1, 0, 1]))),
    ("max_seqlen: 1 is shorter", lambda a: a.update(max_seqlen=1)),
    ("max_seqlen: must be a non-negative int", lambda a: a.update(max_seqlen=2.0)),
    ("causal: must be True or False", lambda a: a.update(causal=1)),
    ("scale: must be a positive", lambda a: a.update(scale=0.0)),
    ("softcap: must be a positive", lambda a: a.update(softcap=0.0)),
    ("softcap: must be a positive", lambda a: a.update(softcap=-30.0)),
    ("softcap: must be a positive", lambda a: a.update(softcap=float("inf"))),
]


@pytest.mark.parametrize("match,edit", BAD, ids=[m for m, _ in BAD])
def test_bad_input(device, match, edit):
    args = _base(device)
    edit(args)
    q, k, v, cu = (args.pop(n) for n in ("q", "k", "v", "cu_seqlens"))
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        F.varlen_attention(q, k, v, cu, **args)


def test_benchmark_providers_run(device):
    from fastrank.benchmarks.harness import Unavailable
    from fastrank.benchmarks.varlen_attention import BENCHMARK

    for case in BENCHMARK.quick_cases(torch.device("cpu")):
        fns = BENCHMARK.providers_of(case, device)
        assert set(fns) == {"torch_sdpa_padded", "flex_attention", "fastrank"}
        assert isinstance(fns["flex_attention"], Unavailable) == (device.type != "cuda")
        outs = {name: fn() for name, fn in fns.items() if not isinstance(fn, Unavailable)}
        for out in outs.values():
            out = out if isinstance(out, torch.Tensor) else torch.cat([g.flatten() for g in out])
            assert torch.isfinite(out).all()
