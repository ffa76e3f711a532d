"""rope against Hugging Face's own apply_rotary_pos_emb (bit for bit) and a float64 formula: values, gradients,
layouts, the Llama family's rotary embeddings, in-place use and bad input."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from tiny_models import CONFIGS
from tolerances import STORE_RTOL, UNIT_ROUNDOFF, assert_close
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from fastrank.benchmarks import rope as bench_rope
from fastrank.ops.rope import rope

rope_room = importlib.import_module("fastrank.ops.rope")  # the module: fastrank.ops.rope is also the function

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, Hq, Hkv, T, D): one token, GQA 3/1, odd T across a block edge, D with a half that is not a power of 2.
SHAPES = [(1, 2, 2, 1, 16), (2, 3, 1, 7, 64), (2, 4, 2, 33, 80)]
SHAPE_IDS = ["B1-T1-D16", "B2-gqa3/1-T7-D64", "B2-T33-D80"]
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The Llama family: transformers.models.<arch>.modeling_<arch> has <name>RotaryEmbedding and apply_rotary_pos_emb.
MODEL_NAMES = {
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "llama": "Llama",
    "mistral": "Mistral",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
}


def hf_inputs(b, hq, hk, t, d, dtype, device, *, cos_batch=None, seed=0, requires_grad=False):
    """q and k as a Llama-family attention layer passes them (non-contiguous ``[B, H, T, D]`` views of
    ``[B, T, H * D]`` projections), and cos/sin from HF's rotary embedding with a different start position
    per row (``cos_batch=1``: one table for every row)."""
    gen = torch.Generator().manual_seed(seed)
    q_proj = torch.randn(b, t, hq * d, generator=gen).to(device=device, dtype=dtype)
    k_proj = torch.randn(b, t, hk * d, generator=gen).to(device=device, dtype=dtype)
    if requires_grad:
        q_proj.requires_grad_(True)
        k_proj.requires_grad_(True)
    q = q_proj.view(b, t, hq, d).transpose(1, 2)
    k = k_proj.view(b, t, hk, d).transpose(1, 2)
    rows = b if cos_batch is None else cos_batch
    position_ids = torch.arange(t)[None, :] + 5 * torch.arange(rows)[:, None]
    cos, sin = rotary(position_ids.to(device), d, dtype)
    return q_proj, k_proj, q, k, cos, sin


def rotary(position_ids, head_dim, dtype, arch="qwen2"):
    """cos/sin ``[B, T, D]`` from the arch's own rotary embedding module (a tiny config with this head dim)."""
    config = CONFIGS[arch]()
    config.head_dim = head_dim
    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    emb = getattr(module, f"{MODEL_NAMES[arch]}RotaryEmbedding")(config).to(position_ids.device)
    x = torch.zeros(1, dtype=dtype, device=position_ids.device)
    return emb(x, position_ids)


def formula64(x, cos, sin):
    """float64 ``x * cos + rotate_half(x) * sin`` and the magnitude ``|x * cos| + |rotate_half(x) * sin|``
    each of its elements is rounded against."""
    x, c, s = x.double(), cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * c + rot * s, (x * c).abs() + (rot * s).abs()


def rounding_atol(dtype, scale):
    """Two rounded products and a rounded sum, each off by at most one rounding (relative u) of a value no
    larger than ``scale``; u is STORE_RTOL (bf16: 2^-7, the interpreter's truncation) or fp32's unit
    roundoff; 1e-7 covers fp16's subnormals (absolute spacing 2^-24)."""
    u = STORE_RTOL[dtype] or UNIT_ROUNDOFF[torch.float32]
    return 3.0 * u * scale + (1e-7 if dtype == torch.float16 else 1e-30)


def exact_expected(backend, dtype):
    """Bit equality with HF holds on the reference path, and for the kernels everywhere but bf16 under the
    interpreter (whose fp32 -> bf16 casts truncate; fp16 casts go through numpy and round like torch)."""
    return not (backend == "triton" and INTERPRETING and dtype == torch.bfloat16)


def assert_like_hf(got, want, backend, dtype, scale, what):
    if exact_expected(backend, dtype):
        assert torch.equal(got, want), f"{what}: differs from HF by up to {(got.double() - want.double()).abs().max()}"
    else:
        assert_close(got, want, atol=rounding_atol(dtype, scale), rtol=0.0, what=what)


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_matches_hf_and_float64(backend, device, dtype, shape):
    b, hq, hk, t, d = shape
    _, _, q, k, cos, sin = hf_inputs(b, hq, hk, t, d, dtype, device)
    assert not q.is_contiguous() or b * t == 1
    got_q, got_k = rope(q, k, cos, sin)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    for got, want, x, name in ((got_q, want_q, q, "q"), (got_k, want_k, k, "k")):
        assert got.shape == x.shape and got.dtype == dtype and got.device == x.device
        # Laid out as [B, T, H, D]: the rows attention reads are contiguous.
        assert got.transpose(1, 2).is_contiguous(), f"{name}_embed is not laid out as [B, T, H, D]"
        exact, scale = formula64(x, cos, sin)
        assert_close(got, exact, atol=rounding_atol(dtype, scale), rtol=0.0, what=f"{name}_embed vs float64")
        assert_like_hf(got, want, backend, dtype, scale, f"{name}_embed vs HF")


@pytest.mark.parametrize("chunk", [None, 100], ids=["one-step", "steps-of-100-elements"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_hf_bit_for_bit(monkeypatch, dtype, chunk):
    """The reference path is the CPU path: its outputs and gradients are HF's, bit for bit, for every layout
    rope accepts (contiguous or HF's views, batch-1 tables, GQA), values including large and tiny ones, whether
    it takes the tokens in one step or in several."""
    monkeypatch.setenv("FASTRANK_BACKEND", "torch")
    if chunk is not None:
        monkeypatch.setattr(rope_room, "_CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(rope_room, "_ONE_STEP_ELEMENTS", 0)
    for b, hq, hk, t, d in [(2, 3, 1, 7, 64), (3, 2, 2, 5, 80), (1, 4, 4, 9, 16)]:
        for cos_batch in (None, 1):
            q_proj, k_proj, q, k, cos, sin = hf_inputs(b, hq, hk, t, d, dtype, "cpu", cos_batch=cos_batch, seed=t)
            with torch.no_grad():
                q_proj[0, 0, :4] = torch.tensor([6e4 if dtype == torch.float16 else 1e30, 1e-6, -3.0, 0.0])
            for qq, kk in ((q, k), (q.contiguous(), k.contiguous())):
                got, want = rope(qq, kk, cos, sin), apply_rotary_pos_emb(qq, kk, cos, sin)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (b, hq, hk, t, d, cos_batch)
            grads = [torch.randn(x.shape).to(dtype) for x in (q, k)]
            q_proj.requires_grad_(True)
            k_proj.requires_grad_(True)
            results = []
            for fn in (rope, apply_rotary_pos_emb):
                outs = fn(q_proj.view(b, t, hq, d).transpose(1, 2), k_proj.view(b, t, hk, d).transpose(1, 2), cos, sin)
                results.append(torch.autograd.grad(outs, (q_proj, k_proj), grads))
            assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("arch", list(MODEL_NAMES))
def test_llama_family_rotary_embeddings(backend, device, arch):
    """Each model's own rotary embedding and apply_rotary_pos_emb, batch of 2 with other positions per row."""
    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    b, hq, hk, t, d = 2, 4, 2, 9, 16
    q = torch.randn(b, t, hq, d, device=device).to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(b, t, hk, d, device=device).to(torch.bfloat16).transpose(1, 2)
    position_ids = torch.stack([torch.arange(t), torch.arange(40, 40 + t)]).to(device)
    cos, sin = rotary(position_ids, d, torch.bfloat16, arch)
    assert cos.shape == (b, t, d) and not torch.equal(cos[0], cos[1])
    got = rope(q, k, cos, sin)
    want = module.apply_rotary_pos_emb(q, k, cos, sin)
    for g, w, x, name in zip(got, want, (q, k), "qk"):
        assert_like_hf(g, w, backend, torch.bfloat16, formula64(x, cos, sin)[1], f"{arch} {name}_embed")


def test_table_layouts_agree(backend, device):
    """cos/sin as [B, T, D], as one [1, T, D] table broadcast over rows, and as [T, D]; non-contiguous q/k and
    their contiguous copies: all the same result."""
    _, _, q, k, cos, sin = hf_inputs(3, 2, 1, 6, 32, torch.float32, device, cos_batch=1)
    want = rope(q, k, cos, sin)
    for args in (
        (q, k, cos.expand(3, -1, -1), sin.expand(3, -1, -1)),
        (q, k, cos[0], sin[0]),
        (q.contiguous(), k.contiguous(), cos.contiguous(), sin.contiguous()),
        (q, k, torch.stack((cos, -cos), -1)[..., 0], sin),  # a table with stride 2 along D
    ):
        got = rope(*args)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_no_tokens(backend, device):
    _, _, q, k, cos, sin = hf_inputs(2, 3, 1, 0, 16, torch.float32, device)
    got_q, got_k = rope(q, k, cos, sin)
    assert got_q.shape == (2, 3, 0, 16) and got_k.shape == (2, 1, 0, 16)


def test_inplace(backend, device, monkeypatch):
    monkeypatch.setattr(rope_room, "_CHUNK_ELEMENTS", 100)  # the reference in several steps
    monkeypatch.setattr(rope_room, "_ONE_STEP_ELEMENTS", 0)
    for dtype in (torch.float32, torch.bfloat16):
        _, _, q, k, cos, sin = hf_inputs(2, 3, 1, 7, 16, dtype, device)
        want_q, want_k = rope(q, k, cos, sin)
        q_strides, k_strides, versions = q.stride(), k.stride(), (q._version, k._version)
        with torch.no_grad():
            got_q, got_k = rope(q, k, cos, sin, inplace=True)
        assert got_q is q and got_k is k and q.stride() == q_strides and k.stride() == k_strides
        assert q._version > versions[0] and k._version > versions[1], "autograd's version counters not bumped"
        assert torch.equal(q, want_q) and torch.equal(k, want_k)
    # Outside no_grad too, when nothing needs a gradient.
    _, _, q, k, cos, sin = hf_inputs(1, 2, 2, 3, 16, torch.float32, device)
    want = rope(q, k, cos, sin)
    rope(q, k, cos, sin, inplace=True)
    assert torch.equal(q, want[0]) and torch.equal(k, want[1])


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_gradients(backend, device, dtype):
    b, hq, hk, t, d = 2, 3, 1, 7, 80
    q_proj, k_proj, q, k, cos, sin = hf_inputs(b, hq, hk, t, d, dtype, device, requires_grad=True)
    gq = torch.randn(q.shape, device=device).to(dtype)
    gk = torch.randn(k.shape, device=device).to(dtype)
    outs = rope(q, k, cos, sin)  # through the autograd Function; without grad, rope skips it: the same values
    assert all(torch.equal(a, b) for a, b in zip(outs, rope(q.detach(), k.detach(), cos, sin)))
    assert outs[0].transpose(1, 2).is_contiguous() and outs[1].transpose(1, 2).is_contiguous()
    dq, dk = torch.autograd.grad(outs, (q, k), (gq, gk))
    assert dq.transpose(1, 2).is_contiguous() and dk.transpose(1, 2).is_contiguous(), "gradients not [B, T, H, D]"
    want = torch.autograd.grad(apply_rotary_pos_emb(q, k, cos, sin), (q, k), (gq, gk))
    for got, hf, x, g, name in ((dq, want[0], q, gq, "dq"), (dk, want[1], k, gk, "dk")):
        x64 = x.detach().double().requires_grad_(True)
        out64, _ = formula64(x64, cos, sin)
        (exact,) = torch.autograd.grad(out64, x64, g.double())
        # The backward rotates g the other way: the same two rounded products and rounded sum.
        _, scale = formula64(g, cos, sin.roll(d // 2, -1))  # halves swapped: [s2, s1]
        assert_close(got, exact, atol=rounding_atol(dtype, scale), rtol=0.0, what=f"{name} vs float64")
        assert_like_hf(got, hf, backend, dtype, scale, f"{name} vs HF's autograd")
    # Through the projections' view and transpose, as in a model.
    dq_proj, dk_proj = torch.autograd.grad(rope(q, k, cos, sin), (q_proj, k_proj), (gq, gk))
    assert torch.equal(dq_proj, dq.transpose(1, 2).reshape(b, t, hq * d))
    assert torch.equal(dk_proj, dk.transpose(1, 2).reshape(b, t, hk * d))


def test_gradcheck_float64(backend, device):
    q = torch.randn(2, 3, 4, 6, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(2, 4, 1, 6, dtype=torch.float64, device=device).transpose(1, 2).requires_grad_(True)
    angles = torch.randn(2, 4, 6, dtype=torch.float64, device=device)
    cos, sin = angles.cos(), angles.sin() * 1.5  # unequal halves: checks the general formula, not just HF's
    # The interpreter pays ~0.1 s per launch: random projections of the Jacobian (fast_mode) for the kernels.
    assert torch.autograd.gradcheck(lambda a, b: rope(a, b, cos, sin), (q, k), fast_mode=backend == "triton")


def test_no_gradient_into_cos_sin(backend, device):
    _, _, q, k, cos, sin = hf_inputs(1, 2, 1, 3, 16, torch.float32, device, requires_grad=True)
    for name in ("cos", "sin"):
        tables = {"cos": cos, "sin": sin}
        tables[name] = tables[name].clone().requires_grad_(True)
        with pytest.raises(ValueError, match=f"^{name}: requires grad"):
            rope(q, k, tables["cos"], tables["sin"])
        with torch.no_grad():  # nothing records a graph: allowed
            rope(q, k, tables["cos"], tables["sin"])


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_bad_arguments_raise(device):
    _, _, q, k, cos, sin = hf_inputs(2, 3, 1, 5, 16, torch.float32, device)
    odd = torch.randn(2, 3, 5, 15, device=device)
    leaf = q.detach().clone().requires_grad_(True)
    cases = [
        (lambda: rope(q[0], k, cos, sin), "q: must be"),
        (lambda: rope(q.long(), k, cos, sin), "q: must be float16"),
        (lambda: rope(odd, odd[:, :1], cos[..., :15], sin[..., :15]), "q: head dim D=15 must be even"),
        (lambda: rope(q, k[:, :, :4], cos, sin), "k: must be"),
        (lambda: rope(q, k[..., :8], cos, sin), "k: must be"),
        (lambda: rope(q, k[:1], cos, sin), "k: must be"),
        (lambda: rope(q, k.half(), cos, sin), "k: dtype float16 differs"),
        (lambda: rope(q, k.to("meta"), cos, sin), "k: is on meta"),
        (lambda: rope(q, k, cos[:, :4], sin), "cos: must be"),
        (lambda: rope(q, k, cos, sin[..., :8]), "sin: must be"),
        (lambda: rope(q, k, torch.cat((cos, cos[:1])), sin), "cos: must be"),
        (lambda: rope(q, k, cos[0, 0], sin), "cos: must be"),
        (lambda: rope(q, k, cos.double(), sin), "cos: dtype float64 differs"),
        (lambda: rope(q, k, cos, sin.bfloat16()), "sin: dtype bfloat16 differs"),
        (lambda: rope(q, k, cos.to("meta"), sin), "cos: is on meta"),
        (lambda: rope(q, k, cos, None), "sin: expected a torch.Tensor"),
        (lambda: rope(q, k, cos, sin, inplace=1), "inplace: must be True or False"),
        (lambda: rope(leaf, k, cos, sin, inplace=True), "inplace: True overwrites q and k"),
        (lambda: rope(q, q, cos, sin, inplace=True), "k: is the same tensor as q"),
        (lambda: rope(q[:, :1].expand(-1, 3, -1, -1), k, cos, sin, inplace=True), "q: inplace=True needs"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=f"^{pattern}"):
            call()


# ------------------------------------------------------------------------------------------------
# the benchmark, and realistic shapes on a GPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fwd", "train"])
def test_benchmark_providers_agree(mode):
    case = bench_rope.Case(mode=mode, batch=2, seq_len=9, q_heads=3, kv_heads=1, head_dim=16, dtype="bfloat16")
    fns = bench_rope.BENCHMARK.providers_of(case, torch.device("cpu"))
    assert set(fns) == {"torch_unfused", "torch_compile", "liger", "fastrank"}
    # torch.compile and Liger are the GPU alternatives: on CPU they are reported as not run, with the reason
    assert "GPU only" in fns["torch_compile"].reason and "CUDA only" in fns["liger"].reason
    got, want = fns["fastrank"](), fns["torch_unfused"]()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert bench_rope.quick_cases(torch.device("cpu")) and bench_rope.full_cases(torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_is_hf_bit_for_bit_on_gpu(monkeypatch, dtype):
    """Qwen2.5-0.5B's attention shape on 8,192 tokens: the kernel's outputs and gradients are HF's, bit for bit."""
    monkeypatch.setenv("FASTRANK_BACKEND", "triton")
    q_proj, k_proj, q, k, cos, sin = hf_inputs(16, 14, 2, 512, 64, dtype, "cuda", requires_grad=True)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    got = rope(q, k, cos, sin)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    got_grads = torch.autograd.grad(got, (q_proj, k_proj), (gq, gk))
    want_grads = torch.autograd.grad(want, (q_proj, k_proj), (gq, gk))
    assert torch.equal(got_grads[0], want_grads[0]) and torch.equal(got_grads[1], want_grads[1])
    with torch.no_grad():
        rope(q, k, cos, sin, inplace=True)
    assert torch.equal(q, want[0]) and torch.equal(k, want[1])
