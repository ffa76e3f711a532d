"""rms_norm against float64 formulas and the real HF modules: values, the fused residual add, gradients, layouts,
dtypes and bad input.

Tolerances. mean(x^2) is an fp32 sum of H positive terms, off by ~sqrt(H) * u relatively (dot_atol(H, .)), and
rstd, n = x * rstd and the output inherit that relative error (plus a few roundings, inside the SAFETY margin).
Half precision adds a rounding per stored value (STORE_RTOL: 2^-7 for bf16, which also covers the interpreter's
truncation): the normalised value rounded to x's dtype and the output rounded to its dtype in the Llama form, the
output alone in the Gemma form. Gradients: dx = rstd * (gn - n * mean(gn * n)) holds one length-H dot, so its
error is dot_atol(H) of the row's term sizes, plus the stored rounding; the weight gradient is a length-M sum of
g * n, whose terms carry the rounding of n to x's dtype in the Llama form.
"""

from __future__ import annotations

import os

import pytest
import torch
from tolerances import STORE_RTOL, assert_close, dot_atol
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from fastrank.benchmarks import rms_norm as bench
from fastrank.ops.rms_norm import RMSNormConfig, rms_norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 48), (7, 100), (33, 64), (2, 3, 48)]  # H not a power of two; 1, 7, 33 rows; 3-D input
SHAPE_IDS = ["M1-H48", "M7-H100", "M33-H64", "2x3-H48"]
EPS = 1e-6
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"  # set by conftest.py on a machine with no GPU


def make(shape, dtype, device, unit_offset=False, weight_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (2.0 * torch.randn(shape, generator=gen)).to(dtype).to(device)
    residual = torch.randn(shape, generator=gen).to(dtype).to(device)
    h = shape[-1]
    w = 0.5 * torch.randn(h, generator=gen) if unit_offset else 1.0 + 0.5 * torch.randn(h, generator=gen)
    return x, residual, w.to(weight_dtype or dtype).to(device)


def oracle(xs, weight, unit_offset, eps=EPS):
    """float64 RMSNorm with no intermediate rounding, and the row's |n| for the tolerances."""
    x64, w64 = xs.double(), weight.double()
    n = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    return (n * (1.0 + w64) if unit_offset else w64 * n), n


def value_tol(h, want, x_dtype, out_dtype, unit_offset):
    """(atol, rtol) of a forward output (see the module docstring)."""
    roundings = STORE_RTOL[out_dtype] + (0.0 if unit_offset else STORE_RTOL[x_dtype])
    return dot_atol(h, want.abs()), roundings


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(backend, device, dtype, shape, unit_offset, residual):
    x, r, w = make(shape, dtype, device, unit_offset)
    if residual:
        out, s = rms_norm(x, w, EPS, residual=r, unit_offset=unit_offset)
        # s is HF's `residual + hidden_states` in x's dtype: exact on the reference, one store rounding in Triton
        assert s.dtype == dtype and s.shape == x.shape
        assert_close(s, r + x, atol=0.0, rtol=STORE_RTOL[dtype], what="s = residual + x")
        xs = s
    else:
        out = rms_norm(x, w, EPS, unit_offset=unit_offset)
        xs = x
    assert out.dtype == dtype and out.shape == x.shape
    want, _ = oracle(xs, w, unit_offset)
    atol, rtol = value_tol(shape[-1], want, dtype, dtype, unit_offset)
    assert_close(out, want, atol=atol, rtol=rtol, what=f"rms_norm unit_offset={unit_offset}")


HF_NORMS = {
    "qwen2": (Qwen2RMSNorm, False),
    "llama": (LlamaRMSNorm, False),
    "gemma": (GemmaRMSNorm, True),
    "gemma2": (Gemma2RMSNorm, True),
}
# (x dtype, weight dtype): the model's own dtype, and a weight kept in another dtype (output promoted in the Llama
# form, x's dtype in the Gemma form)
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float16),
]


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=lambda p: f"x-{p[0]}-w-{p[1]}".replace("torch.", ""))
@pytest.mark.parametrize("family", list(HF_NORMS))
def test_matches_hf_module(backend, device, family, pair):
    """The HF module, instantiated with random weights, on the same input: bit for bit on the reference path
    (it runs the module's own ops), within the roundings of fp32 statistics on the Triton path."""
    x_dtype, w_dtype = pair
    cls, unit_offset = HF_NORMS[family]
    h = 100
    module = cls(h, eps=1e-5).to(device)
    x, r, w = make((2, 7, h), x_dtype, device, unit_offset, weight_dtype=w_dtype, seed=1)
    with torch.no_grad():
        module.weight.copy_(w.float())
    module.to(w_dtype)
    want = module(x)
    eps = module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps
    assert eps == 1e-5
    got = rms_norm(x, module.weight, eps, unit_offset=unit_offset)
    assert got.dtype == want.dtype  # promote(weight, x) for Llama's form, x's dtype for Gemma's
    # the decoder layer's `hidden_states = residual + hidden_states` followed by the norm
    want_s = r + x
    want_res = module(want_s)
    got_res, got_s = rms_norm(x, module.weight, 1e-5, residual=r, unit_offset=unit_offset)
    if backend == "torch":
        assert torch.equal(got, want), f"max |diff| {(got.double() - want.double()).abs().max().item():.3g}"
        assert torch.equal(got_s, want_s) and torch.equal(got_res, want_res)
    else:
        exact, _ = oracle(x, module.weight, unit_offset, eps=1e-5)
        atol, rtol = value_tol(h, exact, x_dtype, want.dtype, unit_offset)
        # both sides are within (atol, rtol) of the exact value
        assert_close(got, want, atol=2 * atol, rtol=2 * rtol, what=f"{family} vs HF")
        if x_dtype == torch.float16 or (x_dtype == torch.bfloat16 and not INTERPRETING):
            # The rounding order, checked sharper than a tolerance can: the kernel's stores round to nearest
            # (the interpreter truncates bf16), so only an fp32 statistic a ulp apart can flip an element. A
            # kernel rounding once where the module rounds twice (or the reverse) agrees on ~70% of them.
            same = (got == want).double().mean().item()
            assert same >= 0.97, f"only {same:.1%} of the elements equal the HF module's: wrong rounding order?"
        assert_close(got_s, want_s, atol=0.0, rtol=STORE_RTOL[x_dtype], what="s vs HF")
        exact, _ = oracle(got_s, module.weight, unit_offset, eps=1e-5)
        atol, rtol = value_tol(h, exact, x_dtype, want.dtype, unit_offset)
        assert_close(got_res, module(got_s), atol=2 * atol, rtol=2 * rtol, what=f"{family} + residual vs HF")


def _grads_float64(xs, weight, unit_offset, g, g_s):
    """float64 gradients of ``rms_norm(xs)`` (no intermediate rounding) with output gradient g, plus g_s reaching
    xs directly (the fused residual's s), and the term sizes the tolerances need."""
    x64 = xs.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    out, n = oracle(x64, w64, unit_offset)
    out.backward(g.double())
    dx = x64.grad + (g_s.double() if g_s is not None else 0.0)
    n = n.detach()
    rstd = (n / x64.detach()).nan_to_num(0.0).abs().amax(-1, keepdim=True)
    gn = g.double().abs() * ((1.0 + w64.detach()) if unit_offset else w64.detach()).abs()
    # dx = rstd * (gn - n * mean(gn * n)): the terms' sizes
    dx_terms = rstd * (gn + n.abs() * (gn * n.abs()).mean(-1, keepdim=True))
    dw_terms = (g.double().abs() * n.abs()).reshape(-1, n.shape[-1]).sum(0)
    return dx, w64.grad, dx_terms, dw_terms


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize(
    "dtype,weight_dtype",
    [(d, d) for d in DTYPES] + [(torch.bfloat16, torch.float32)],
    ids=["float32", "float16", "bfloat16", "bfloat16-fp32-weight"],
)
def test_gradients_match_float64(backend, device, dtype, weight_dtype, unit_offset, residual):
    shape = (3, 11, 48)  # 33 rows: the Triton backward's programs each walk several row blocks
    x, r, w = make(shape, dtype, device, unit_offset, weight_dtype=weight_dtype, seed=2)
    out_dtype = dtype if unit_offset else torch.promote_types(weight_dtype, dtype)
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(shape, generator=gen).to(out_dtype).to(device)
    g_s = torch.randn(shape, generator=gen).to(dtype).to(device) if residual else None
    x.requires_grad_(True)
    w.requires_grad_(True)
    r.requires_grad_(True)
    if residual:
        out, s = rms_norm(x, w, EPS, residual=r, unit_offset=unit_offset)
        torch.autograd.backward((out, s), (g, g_s))
        xs = s.detach()
        assert torch.equal(r.grad, x.grad), "x and residual must receive the same gradient (that of s)"
    else:
        out = rms_norm(x, w, EPS, unit_offset=unit_offset)
        out.backward(g)
        xs = x.detach()
    with torch.no_grad():  # the inference fast path (no autograd Function) computes the same values
        again = rms_norm(x, w, EPS, residual=r if residual else None, unit_offset=unit_offset)
    assert torch.equal(again[0] if residual else again, out.detach())
    dx, dw, dx_terms, dw_terms = _grads_float64(xs, w, unit_offset, g, g_s)
    h, m = shape[-1], x.numel() // shape[-1]
    assert out.dtype == out_dtype and x.grad.dtype == dtype and w.grad.dtype == weight_dtype
    assert_close(x.grad, dx, atol=dot_atol(h, dx_terms) + 1e-30, rtol=STORE_RTOL[dtype], what="grad x")
    n_rounding = 0.0 if unit_offset else STORE_RTOL[dtype]
    atol = dot_atol(m, dw_terms) + n_rounding * dw_terms
    assert_close(w.grad, dw, atol=atol, rtol=STORE_RTOL[weight_dtype], what="grad weight")


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_gradients_match_reference(monkeypatch, device, dtype, unit_offset, residual):
    shape = (17, 100)
    x0, r0, w0 = make(shape, dtype, device, unit_offset, seed=4)
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(shape, generator=gen).to(dtype).to(device)
    g_s = torch.randn(shape, generator=gen).to(dtype).to(device)
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTRANK_BACKEND", backend)
        x, r, w = (t.clone().requires_grad_(True) for t in (x0, r0, w0))
        if residual:
            out, s = rms_norm(x, w, EPS, residual=r, unit_offset=unit_offset)
            torch.autograd.backward((out, s), (g, g_s))
            xs = s.detach()
        else:
            rms_norm(x, w, EPS, unit_offset=unit_offset).backward(g)
            xs = x0
        grads[backend] = (x.grad, w.grad, r.grad if residual else None)
    _, _, dx_terms, dw_terms = _grads_float64(xs, w0, unit_offset, g, g_s if residual else None)
    (dx_t, dw_t, dr_t), (dx_r, dw_r, dr_r) = grads["triton"], grads["torch"]
    # Each is within the float64 test's allowance of the exact value: twice that of each other. With a residual
    # each backend differentiates at its own s, which may differ by one rounding (the interpreter truncates bf16):
    # that moves n, and every term of dx and dw, by as much again relative to the terms.
    s_rounding = STORE_RTOL[dtype] if residual else 0.0
    atol_x = 2 * (dot_atol(shape[-1], dx_terms) + s_rounding * dx_terms) + 1e-30
    assert_close(dx_t, dx_r, atol=atol_x, rtol=2 * STORE_RTOL[dtype], what="grad x: triton vs reference")
    n_rounding = 0.0 if unit_offset else STORE_RTOL[dtype]
    atol_w = 2 * (dot_atol(shape[0], dw_terms) + (n_rounding + s_rounding) * dw_terms)
    assert_close(dw_t, dw_r, atol=atol_w, rtol=2 * STORE_RTOL[dtype], what="grad weight: triton vs reference")
    if residual:
        assert torch.equal(dr_t, dx_t) and torch.equal(dr_r, dx_r)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_reference_gradcheck_float64(monkeypatch, unit_offset, residual):
    monkeypatch.setenv("FASTRANK_BACKEND", "torch")
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    if residual:
        fn = lambda x, r, w: rms_norm(x, w, 1e-3, residual=r, unit_offset=unit_offset)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, r, w))
    else:
        fn = lambda x, w: rms_norm(x, w, 1e-3, unit_offset=unit_offset)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w))


@pytest.mark.parametrize("layout", ["transposed", "strided_rows", "sliced_3d"])
def test_non_contiguous_input(backend, device, layout):
    gen = torch.Generator().manual_seed(7)
    h = 48
    if layout == "transposed":  # stride(-1) != 1: the rows are copied
        x = torch.randn(h, 9, generator=gen).to(device).t()
        r = torch.randn(h, 9, generator=gen).to(device).t()
    elif layout == "strided_rows":  # unit stride along H, a row stride of 2H: read in place
        x = torch.randn(9, 2 * h, generator=gen).to(device)[:, :h]
        r = torch.randn(9, 2 * h, generator=gen).to(device)[:, h:]
    else:
        x = torch.randn(3, 8, h, generator=gen).to(device)[:, ::3]
        r = torch.randn(3, 8, h, generator=gen).to(device)[:, 1::3]
    w = (1.0 + 0.5 * torch.randn(h, generator=gen)).to(device)
    assert not x.is_contiguous()
    xc, rc = x.contiguous(), r.contiguous()
    got, want = rms_norm(x, w), rms_norm(xc, w)
    out, s = rms_norm(x, w, residual=r, unit_offset=True)
    out_c, s_c = rms_norm(xc, w, residual=rc, unit_offset=True)
    assert torch.equal(s, s_c)
    if backend == "triton":  # the kernel reads the same rows either way
        assert torch.equal(got, want) and torch.equal(out, out_c)
    else:  # the reference runs HF's ops on the strided tensor itself: its reduction order may differ
        unfused = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
        assert torch.equal(got, w * unfused)
        assert_close(got, want, atol=dot_atol(h, want.abs()), what="strided vs contiguous")
        assert_close(out, out_c, atol=dot_atol(h, out_c.abs()), what="strided vs contiguous, residual")
    # gradients through a non-contiguous leaf
    base = x.detach().clone().requires_grad_(True)
    g = torch.randn(x.shape, generator=gen).to(device)
    rms_norm(base, w).backward(g)
    flat = xc.clone().requires_grad_(True)
    rms_norm(flat, w).backward(g)
    assert_close(base.grad, flat.grad, atol=1e-6, rtol=1e-6, what="grad through a strided x")


def test_empty_rows(backend, device):
    x = torch.randn(0, 48, device=device, requires_grad=True)
    w = torch.ones(48, device=device, requires_grad=True)
    out = rms_norm(x, w)
    assert out.shape == (0, 48)
    out.sum().backward()
    assert x.grad.shape == (0, 48) and torch.equal(w.grad, torch.zeros(48, device=device))


def test_config_is_frozen():
    cfg = RMSNormConfig(eps=1e-6, unit_offset=False, has_residual=False)
    with pytest.raises(Exception):
        cfg.eps = 1.0  # type: ignore[misc]
    assert hash(cfg) == hash(RMSNormConfig(eps=1e-6, unit_offset=False, has_residual=False))


def test_bad_arguments_raise(device):
    x = torch.randn(4, 8, device=device)
    w = torch.ones(8, device=device)
    cases = [
        (lambda: rms_norm(x.long(), w), "x: must be float16"),
        (lambda: rms_norm(x.tolist(), w), "x: expected a torch.Tensor"),
        (lambda: rms_norm(torch.tensor(1.0, device=device), w), "x: must be"),
        (lambda: rms_norm(torch.randn(4, 0, device=device), torch.ones(0, device=device)), "x: must be"),
        (lambda: rms_norm(x, torch.ones(9, device=device)), "weight: must be 1-D"),
        (lambda: rms_norm(x, torch.ones(1, 8, device=device)), "weight: must be 1-D"),
        (lambda: rms_norm(x, w.long()), "weight: must be a floating-point"),
        (lambda: rms_norm(x, None), "weight: expected a torch.Tensor"),
        (lambda: rms_norm(x, w, -1e-6), "eps"),
        (lambda: rms_norm(x, w, True), "eps"),
        (lambda: rms_norm(x, w, "1e-6"), "eps"),
        (lambda: rms_norm(x, w, float("nan")), "eps"),
        (lambda: rms_norm(x, w, unit_offset=1), "unit_offset"),
        (lambda: rms_norm(x, w, residual=torch.randn(4, 9, device=device)), "residual: shape"),
        (lambda: rms_norm(x, w, residual=x.half()), "residual: dtype"),
        (lambda: rms_norm(x, w, residual=x.tolist()), "residual: expected a torch.Tensor"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=f"^{pattern}"):
            call()


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_benchmark_providers_agree(mode, unit_offset):
    """The benchmark's baseline computes what fastrank computes (so the ratio compares like with like)."""
    case = bench.Case(mode=mode, tokens=5, hidden_size=24, dtype="float32", unit_offset=unit_offset)
    fns = bench.BENCHMARK.providers_of(case, torch.device("cpu"))
    got, want = fns["fastrank"](), fns["torch_unfused"]()
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert {c.mode for c in bench.quick_cases(torch.device("cpu"))} <= set(bench.MODES)
    gpu = bench.quick_cases(torch.device("cuda"))
    assert {(c.tokens, c.hidden_size, c.dtype) for c in gpu} == {(8192, 896, "bfloat16")}


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_expanded_output_gradient(backend, device, residual):
    """``out.sum().backward()`` hands the backward a stride-0 gradient: it is read as rows all the same."""
    x, r, w = make((5, 48), torch.float32, device, seed=9)
    grads = []
    for grad in ("sum", "ones"):
        xl, rl, wl = (t.clone().requires_grad_(True) for t in (x, r, w))
        outs = rms_norm(xl, wl, residual=rl) if residual else (rms_norm(xl, wl),)
        if grad == "sum":
            sum(o.sum() for o in outs).backward()
        else:
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        grads.append((xl.grad, wl.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
