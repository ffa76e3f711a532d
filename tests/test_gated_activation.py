"""gated_activation against float64 formulas and HF's ACT2FN: values, gradients, layouts, dtypes and bad input.

Tolerances. The output is ``round(round(act(gate)) * up)``: two roundings to the inputs' dtype (STORE_RTOL each;
bf16's 2^-7 also covers the interpreter's truncation). The fp32 activation itself is off by a few ulp of the
terms it is built from, not of its value: torch's tanh-GELU (the reference path) forms ``1 + tanh(y)``, which
cancels for negative inputs, and SiLU's derivative ``sig * (1 + x (1 - sig))`` cancels near its zero, so the
absolute part scales with ``|x|`` (and the cube in GELU's inner argument): ACT_TERMS below, times a few u.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from tolerances import SAFETY, STORE_RTOL, UNIT_ROUNDOFF, assert_close
from transformers.activations import ACT2FN

from fastrank.benchmarks import gated_activation as bench
from fastrank.ops.gated_activation import (
    ACTIVATIONS,
    GatedActivationConfig,
    activation_name,
    gated_activation,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 48), (7, 100), (33, 64), (2, 3, 48)]  # I not a power of two; 1, 7, 33 rows; 3-D input
SHAPE_IDS = ["M1-I48", "M7-I100", "M33-I64", "2x3-I48"]
HF_NAME = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"  # set by conftest.py on a machine with no GPU
U = UNIT_ROUNDOFF[torch.float32]


def make(shape, dtype, device, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    gate = (scale * torch.randn(shape, generator=gen)).to(dtype).to(device)
    up = torch.randn(shape, generator=gen).to(dtype).to(device)
    return gate, up


def act64(x, activation):
    return F.silu(x) if activation == "silu" else F.gelu(x, approximate="tanh")


def act_terms(x):
    """The size of the terms an fp32 activation (or its derivative) is formed from, relative to which its error
    is a few u (see the module docstring)."""
    x = x.double().abs()
    return 1.0 + x * (1.0 + 0.134 * x * x)


# Half the spacing of the dtype's subnormals, where a rounding is absolute rather than relative (fp16 results
# below 6e-5 are subnormal; bf16 shares fp32's exponent range).
SUBNORMAL = {torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}


def fp32_atol(*factors, dtype=torch.float32):
    """A few u of the product of the term sizes ``factors`` (fp32 arithmetic), plus two subnormal roundings of
    ``dtype`` scaled by the last factor (the other operand of the rounded product)."""
    out = SAFETY * 4 * U
    for f in factors:
        out = out * f.double().abs()
    return out + 2 * SUBNORMAL[dtype] * (1.0 + factors[-1].double().abs())


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(backend, device, dtype, shape, activation):
    gate, up = make(shape, dtype, device)
    out = gated_activation(gate, up, activation)
    assert out.dtype == dtype and out.shape == gate.shape
    want = act64(gate.double(), activation) * up.double()
    atol = fp32_atol(act_terms(gate), up, dtype=dtype)
    assert_close(out, want, atol=atol, rtol=2 * STORE_RTOL[dtype], what=f"{activation} * up")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_hf_act2fn(backend, device, dtype, activation):
    """HF's MLP middle, ``ACT2FN[hidden_act](gate) * up``, forward and autograd backward: bit for bit on the
    reference path (the same torch ops), within the roundings on the Triton path."""
    gate, up = make((9, 100), dtype, device, seed=1)
    g = torch.randn(gate.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    act_fn = ACT2FN[HF_NAME[activation]]
    hf_gate, hf_up = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    want = act_fn(hf_gate) * hf_up
    want.backward(g)
    ours_gate, ours_up = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    got = gated_activation(ours_gate, ours_up, activation)
    got.backward(g)
    with torch.no_grad():
        got_inference = gated_activation(gate, up, activation)  # the no-autograd fast path
    assert torch.equal(got_inference, got.detach())
    if backend == "torch":
        assert torch.equal(got, want), f"max |diff| {(got.double() - want.double()).abs().max().item():.3g}"
        assert torch.equal(ours_gate.grad, hf_gate.grad) and torch.equal(ours_up.grad, hf_up.grad)
        return
    # Triton: each within the float64 test's allowance of the exact value, so twice that of each other
    atol = fp32_atol(act_terms(gate), up, dtype=dtype)
    assert_close(got, want.detach(), atol=2 * atol, rtol=4 * STORE_RTOL[dtype], what=f"{activation} vs HF")
    if dtype == torch.float16 or (dtype == torch.bfloat16 and not INTERPRETING):
        # HF's rounding order (act rounded, then the product), checked sharper than a tolerance can
        same = (got == want).double().mean().item()
        assert same >= 0.97, f"only {same:.1%} of the elements equal HF's: wrong rounding order?"
    # HF's backward rounds grad * up before the activation's derivative; the kernel rounds once
    atol_up = 2 * fp32_atol(act_terms(gate), g, dtype=dtype)
    assert_close(ours_up.grad, hf_up.grad, atol=atol_up, rtol=4 * STORE_RTOL[dtype], what="grad up vs HF")
    atol_gate = 2 * fp32_atol(act_terms(gate), up, g, dtype=dtype)
    assert_close(ours_gate.grad, hf_gate.grad, atol=atol_gate, rtol=4 * STORE_RTOL[dtype], what="grad gate vs HF")


def grads_float64(gate, up, g, activation):
    g64 = gate.detach().double().requires_grad_(True)
    u64 = up.detach().double().requires_grad_(True)
    (act64(g64, activation) * u64).backward(g.double())
    return g64.grad, u64.grad


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_match_float64(backend, device, dtype, activation):
    shape = (3, 11, 48)
    gate, up = make(shape, dtype, device, seed=3)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype).to(device)
    gate.requires_grad_(True)
    up.requires_grad_(True)
    gated_activation(gate, up, activation).backward(g)
    d_gate, d_up = grads_float64(gate, up, g, activation)
    assert gate.grad.dtype == dtype and up.grad.dtype == dtype
    # d_up = g * round(act): two roundings; d_gate = g * up * act': the reference rounds g * up first (2)
    rtol = 2 * STORE_RTOL[dtype]
    assert_close(up.grad, d_up, atol=fp32_atol(act_terms(gate), g, dtype=dtype), rtol=rtol, what="grad up")
    atol = fp32_atol(act_terms(gate), up, g, dtype=dtype)
    assert_close(gate.grad, d_gate, atol=atol, rtol=rtol, what="grad gate")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_gradients_match_reference(monkeypatch, device, dtype, activation):
    gate0, up0 = make((17, 100), dtype, device, seed=5)
    g = torch.randn(gate0.shape, generator=torch.Generator().manual_seed(6)).to(dtype).to(device)
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTRANK_BACKEND", backend)
        gate, up = gate0.clone().requires_grad_(True), up0.clone().requires_grad_(True)
        gated_activation(gate, up, activation).backward(g)
        grads[backend] = (gate.grad, up.grad)
    rtol = 4 * STORE_RTOL[dtype]
    atol = 2 * fp32_atol(act_terms(gate0), g, dtype=dtype)
    assert_close(grads["triton"][1], grads["torch"][1], atol=atol, rtol=rtol, what="grad up: triton vs reference")
    atol = 2 * fp32_atol(act_terms(gate0), up0, g, dtype=dtype)
    assert_close(grads["triton"][0], grads["torch"][0], atol=atol, rtol=rtol, what="grad gate: triton vs reference")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_gradcheck_float64(monkeypatch, activation):
    monkeypatch.setenv("FASTRANK_BACKEND", "torch")
    gen = torch.Generator().manual_seed(7)
    gate = (3 * torch.randn(3, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    up = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: gated_activation(a, b, activation), (gate, up))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_extreme_inputs_stay_finite(backend, device, activation):
    """exp overflows to inf for very negative inputs: the sigmoid written as 1 / (1 + exp(-x)) gives 0 there, and
    nothing turns into NaN, forward or backward."""
    gate = torch.tensor([[-1e4, -200.0, -90.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 90.0, 200.0, 1e4]], device=device)
    up = torch.full_like(gate, 0.5)
    g = torch.ones_like(gate)
    gate.requires_grad_(True)
    up.requires_grad_(True)
    out = gated_activation(gate, up, activation)
    out.backward(g)
    d_gate, d_up = grads_float64(gate, up, g, activation)
    assert torch.isfinite(out).all() and torch.isfinite(gate.grad).all() and torch.isfinite(up.grad).all()
    want = act64(gate.detach().double(), activation) * 0.5
    assert_close(out, want, atol=fp32_atol(act_terms(gate), up), rtol=0.0, what="extreme forward")
    assert_close(up.grad, d_up, atol=fp32_atol(act_terms(gate)), rtol=0.0, what="extreme grad up")
    assert_close(gate.grad, d_gate, atol=fp32_atol(act_terms(gate), up), rtol=0.0, what="extreme grad gate")


@pytest.mark.parametrize("layout", ["fused_gate_up", "transposed", "sliced_3d"])
def test_non_contiguous_input(backend, device, layout):
    gen = torch.Generator().manual_seed(8)
    i = 48
    if layout == "fused_gate_up":  # one [M, 2I] projection chunked in two: row stride 2I, read in place
        gate, up = torch.randn(9, 2 * i, generator=gen).to(device).chunk(2, dim=-1)
    elif layout == "transposed":  # stride(-1) != 1: copied to rows
        gate = torch.randn(i, 9, generator=gen).to(device).t()
        up = torch.randn(i, 9, generator=gen).to(device).t()
    else:
        gate = torch.randn(3, 8, i, generator=gen).to(device)[:, ::3]
        up = torch.randn(3, 8, i, generator=gen).to(device)[:, 1::3]
    assert not gate.is_contiguous()
    got, want = gated_activation(gate, up), gated_activation(gate.contiguous(), up.contiguous())
    if backend == "torch":  # HF's ops on the strided tensors themselves (torch may take a scalar loop for them)
        assert torch.equal(got, F.silu(gate) * up)
    assert_close(got, want, atol=2 * fp32_atol(act_terms(gate), up), what="strided vs contiguous")
    leaf_gate = gate.detach().clone().requires_grad_(True)  # clone keeps the strides
    leaf_up = up.detach().clone().requires_grad_(True)
    g = torch.randn(gate.shape, generator=gen).to(device)
    gated_activation(leaf_gate, leaf_up).backward(g)
    flat_gate = gate.contiguous().requires_grad_(True)
    flat_up = up.contiguous().requires_grad_(True)
    gated_activation(flat_gate, flat_up).backward(g)
    assert_close(leaf_up.grad, flat_up.grad, atol=2 * fp32_atol(act_terms(gate), g), what="grad up, strided")
    atol = 2 * fp32_atol(act_terms(gate), up, g)
    assert_close(leaf_gate.grad, flat_gate.grad, atol=atol, what="grad gate, strided")
    if backend == "triton":  # the kernels read the same rows either way
        assert torch.equal(got, want) and torch.equal(leaf_gate.grad, flat_gate.grad)


def test_empty_input(backend, device):
    gate = torch.randn(0, 48, device=device, requires_grad=True)
    up = torch.randn(0, 48, device=device, requires_grad=True)
    out = gated_activation(gate, up)
    assert out.shape == (0, 48)
    out.sum().backward()
    assert gate.grad.shape == (0, 48) and up.grad.shape == (0, 48)


def test_activation_name():
    assert activation_name("silu") == "silu"
    assert activation_name("swish") == "silu"
    assert activation_name("gelu_pytorch_tanh") == "gelu_tanh"
    # the tanh approximation written in several torch ops, the erf GELU and the rest: not reproduced exactly
    for name in ("gelu_new", "gelu_fast", "gelu_python_tanh", "gelu", "relu", "quick_gelu", "tanh"):
        assert activation_name(name) is None, name
    assert activation_name(None) is None


def test_mapped_hf_activations_are_exactly_ours():
    """Every HF name activation_name maps computes our function bit for bit, and the tanh-GELU variants it leaves
    out do not (in half precision they round differently), which is why they are left out."""
    x = torch.linspace(-8.0, 8.0, 4001)
    for dtype in DTYPES:
        xd = x.to(dtype)
        for hf_name in ("silu", "swish", "gelu_pytorch_tanh"):
            ours = act64(xd, activation_name(hf_name))  # F.silu / F.gelu(tanh) in xd's dtype
            assert torch.equal(ACT2FN[hf_name](xd), ours), (hf_name, dtype)
    for hf_name in ("gelu_new", "gelu_fast", "gelu_python_tanh"):
        xb = x.to(torch.bfloat16)
        assert not torch.equal(ACT2FN[hf_name](xb), F.gelu(xb, approximate="tanh")), hf_name


def test_config_is_frozen():
    cfg = GatedActivationConfig(activation="silu")
    with pytest.raises(Exception):
        cfg.activation = "gelu_tanh"  # type: ignore[misc]
    assert hash(cfg) == hash(GatedActivationConfig(activation="silu"))


def test_bad_arguments_raise(device):
    gate, up = make((4, 8), torch.float32, device)
    cases = [
        (
            lambda: gated_activation(gate, up, "relu"),
            r"activation: 'relu' is not supported; choose from silu, gelu_tanh",
        ),
        (lambda: gated_activation(gate, up, "gelu_pytorch_tanh"), r"activation: .*see activation_name"),
        (lambda: gated_activation(gate, up, None), "activation"),
        (lambda: gated_activation(gate.long(), up), "gate: must be float16"),
        (lambda: gated_activation(gate[0, 0], up[0, 0]), "gate: must be \\[..., I\\]"),
        (lambda: gated_activation(gate.tolist(), up), "gate: expected a torch.Tensor"),
        (lambda: gated_activation(gate, up.tolist()), "up: expected a torch.Tensor"),
        (lambda: gated_activation(gate, up.half()), "up: dtype"),
        (lambda: gated_activation(gate, up[:, :4]), "up: shape"),
        (lambda: gated_activation(gate, up[None]), "up: shape"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=f"^{pattern}"):
            call()


@pytest.mark.parametrize("mode", ["fwd", "train"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_benchmark_providers_agree(mode, activation):
    """The benchmark's baseline computes what fastrank computes (so the ratio compares like with like)."""
    case = bench.Case(mode=mode, tokens=5, intermediate_size=24, dtype="float32", activation=activation)
    fns = bench.BENCHMARK.providers_of(case, torch.device("cpu"))
    got, want = fns["fastrank"](), fns["torch_unfused"]()
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    gpu = bench.quick_cases(torch.device("cuda"))
    assert {(c.tokens, c.intermediate_size, c.dtype) for c in gpu} == {(8192, 4864, "bfloat16")}


def test_expanded_output_gradient(backend, device):
    """``out.sum().backward()`` hands the backward a stride-0 gradient: it is read as rows all the same."""
    gate0, up0 = make((5, 48), torch.float32, device, seed=9)
    grads = []
    for grad in ("sum", "ones"):
        gate, up = gate0.clone().requires_grad_(True), up0.clone().requires_grad_(True)
        out = gated_activation(gate, up, "gelu_tanh")
        if grad == "sum":
            out.sum().backward()
        else:
            out.backward(torch.ones_like(out))
        grads.append((gate.grad, up.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_reference_function_equals_the_cpu_training_path(activation, dtype):
    """On CPU, training runs HF's formula under torch's autograd; the Function's reference forward and backward
    (the contract the Triton path shares) give the same outputs and gradients bit for bit."""
    from fastrank.ops.gated_activation import GatedActivationConfig, GatedActivationFunction

    gate0, up0 = make((7, 100), dtype, torch.device("cpu"), seed=3)
    grad = torch.randn(7, 100).to(dtype)
    results = []
    for through_function in (False, True):
        gate, up = gate0.clone().requires_grad_(True), up0.clone().requires_grad_(True)
        if through_function:
            out = GatedActivationFunction.apply(gate, up, GatedActivationConfig(activation), "torch")
        else:
            out = gated_activation(gate, up, activation)
        out.backward(grad)
        results.append((out.detach(), gate.grad, up.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
