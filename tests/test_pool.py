"""pool against float64 formulas written row by row: values, gradients, layouts, dtypes and bad input."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from tolerances import STORE_RTOL, assert_close, dot_atol

import fastrank

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECIAL = [7, 9]  # the special token ids of these tests
MODES = [
    ("mean", {}),
    ("cls", {}),
    ("last", {}),
    ("special", {"token_ids": SPECIAL}),
    ("special", {"last_k": 3}),
]
MODE_IDS = ["mean", "cls", "last", "special-ids", "special-last3"]


def make_batch(lengths, t, h, side, dtype, device, seed=0):
    """Hidden states, mask and input ids; each row holds special tokens at two of its last three real slots."""
    gen = torch.Generator().manual_seed(seed)
    n = len(lengths)
    hidden = torch.randn(n, t, h, generator=gen).to(dtype).to(device)
    mask = torch.zeros(n, t, dtype=torch.long)
    ids = torch.randint(20, 100, (n, t), generator=gen)
    for i, length in enumerate(lengths):
        cols = list(range(length)) if side == "right" else list(range(t - length, t))
        mask[i, cols] = 1
        for c, tok in zip(cols[-3:][:2], SPECIAL):
            ids[i, c] = tok
    return hidden, mask.to(device), ids.to(device)


def selected_positions(mask_row, ids_row, mode, kw):
    real = [j for j in range(len(mask_row)) if mask_row[j]]
    if mode == "mean":
        return real
    if mode == "cls":
        return real[:1]
    if mode == "last":
        return real[-1:]
    if "last_k" in kw:
        return real[-kw["last_k"] :]
    return [j for j in real if int(ids_row[j]) in kw["token_ids"]]


def oracle(hidden, mask, ids, mode, kw, normalize):
    """float64, one row at a time; also the |.|-sum scale of each mean and the pooled positions."""
    out, scale, chosen = [], [], []
    for i in range(hidden.shape[0]):
        pos = selected_positions(mask[i].tolist(), ids[i].tolist(), mode, kw)
        rows = hidden[i, pos].double()
        v = rows.mean(0)
        scale.append(rows.abs().mean(0))
        if normalize:
            v = v / v.norm().clamp_min(1e-12)
        out.append(v)
        chosen.append(pos)
    return torch.stack(out), torch.stack(scale), chosen


SHAPES = [([1], 1, 8), ([5, 3, 1, 4], 5, 40), ([9, 2, 7], 9, 100)]


@pytest.mark.parametrize("shape", SHAPES, ids=["N1-T1", "N4-T5-H40", "N3-T9-H100"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode,kw", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool_matches_float64(backend, device, dtype, mode, kw, normalize, side, shape):
    lengths, t, h = shape
    if mode == "special" and min(lengths) < 3:
        lengths = [max(3, x) for x in lengths]
        t = max(t, 3)
    hidden, mask, ids = make_batch(lengths, t, h, side, dtype, device)
    extra = dict(kw, input_ids=ids) if "token_ids" in kw else kw
    got = fastrank.pool(hidden, mask, mode=mode, normalize=normalize, **extra)
    want, scale, _ = oracle(hidden, mask, ids, mode, kw, normalize)
    assert got.dtype == torch.float32 and got.shape == (len(lengths), h)
    tol = dot_atol(t, scale)  # a mean of up to T fp32-accumulated terms
    if normalize:
        tol = (
            tol
            / want.new_tensor([max(r.norm().item(), 1e-12) for r in oracle(hidden, mask, ids, mode, kw, False)[0]])[
                :, None
            ]
            + 1e-6
        )
    assert_close(got, want, atol=tol, rtol=1e-6, what=f"{mode} {kw}")


def test_padding_sides_and_packed_agree(backend, device):
    lengths, h = [6, 2, 9, 4], 24
    seqs = [torch.randn(n, h, device=device) for n in lengths]
    tok = [torch.randint(20, 100, (n,), device=device) for n in lengths]
    for s in tok:
        s[-2] = SPECIAL[0]
    t = max(lengths)

    def padded(side):
        hidden = torch.full((len(lengths), t, h), float("nan"), device=device)  # padding must never be read
        mask = torch.zeros(len(lengths), t, dtype=torch.long, device=device)
        ids = torch.zeros(len(lengths), t, dtype=torch.long, device=device)
        for i, (s, k) in enumerate(zip(seqs, tok)):
            cols = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
            hidden[i, cols], mask[i, cols], ids[i, cols] = s, 1, k
        return hidden, mask, ids

    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=device)
    flat, flat_ids = torch.cat(seqs), torch.cat(tok)
    for mode, kw in MODES:
        outs = []
        for side in ("right", "left"):
            hidden, mask, ids = padded(side)
            extra = dict(kw, input_ids=ids) if "token_ids" in kw else kw
            if "last_k" in kw:
                extra = {"last_k": 2}
            outs.append(fastrank.pool(hidden, mask, mode=mode, normalize=True, **extra))
        extra = dict(kw, input_ids=flat_ids) if "token_ids" in kw else kw
        if "last_k" in kw:
            extra = {"last_k": 2}
        outs.append(fastrank.pool(flat, mode=mode, normalize=True, cu_seqlens=cu, **extra))
        outs.append(fastrank.pool(flat[None], mode=mode, normalize=True, cu_seqlens=cu, **extra))
        for other in outs[1:]:
            assert_close(other, outs[0], atol=1e-6, rtol=1e-6, what=f"{mode} {kw}")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode,kw", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pool_gradients(backend, device, dtype, mode, kw, normalize):
    lengths, t, h = [5, 3, 7], 7, 33
    hidden, mask, ids = make_batch(lengths, t, h, "left", dtype, device, seed=3)
    hidden.requires_grad_(True)
    extra = dict(kw, input_ids=ids) if "token_ids" in kw else kw
    g = torch.randn(len(lengths), h, device=device)
    (fastrank.pool(hidden, mask, mode=mode, normalize=normalize, **extra) * g).sum().backward()

    h64 = hidden.detach().double().requires_grad_(True)
    want, _, chosen = oracle(h64, mask, ids, mode, kw, normalize)
    (want * g.double()).sum().backward()
    # fp32 arithmetic on exactly representable inputs; a bf16 gradient adds one rounding (rtol).
    half = STORE_RTOL[dtype]
    scale = g.double().abs().amax(1)[:, None, None] * (4.0 if normalize else 1.0)
    atol = dot_atol(h, scale) + 1e-7
    assert_close(hidden.grad, h64.grad, atol=atol.expand_as(hidden), rtol=half, what="grad hidden")
    outside = torch.ones_like(hidden.grad, dtype=torch.bool)
    for i, pos in enumerate(chosen):
        outside[i, pos] = False
    assert torch.count_nonzero(hidden.grad[outside]) == 0, "gradient leaked to positions that were not pooled"


def test_packed_gradients(backend, device):
    h = 16  # sequences of 4, 1 and 6 rows
    cu = torch.tensor([0, 4, 5, 11], device=device)
    flat = torch.randn(11, h, device=device, requires_grad=True)
    g = torch.randn(3, h, device=device)
    (fastrank.pool(flat, mode="mean", normalize=True, cu_seqlens=cu) * g).sum().backward()
    f64 = flat.detach().double().requires_grad_(True)
    means = torch.stack([f64[a:b].mean(0) for a, b in [(0, 4), (4, 5), (5, 11)]])
    (torch.nn.functional.normalize(means, dim=-1) * g.double()).sum().backward()
    assert_close(flat.grad, f64.grad, atol=1e-6, rtol=1e-5)


def test_reference_gradcheck_float64(monkeypatch):
    monkeypatch.setenv("FASTRANK_BACKEND", "torch")
    hidden = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert torch.autograd.gradcheck(lambda x: fastrank.pool(x, mask, mode="mean", normalize=True), (hidden,))


def _bad(device):
    hidden = torch.randn(2, 4, 8, device=device)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]], device=device)
    ids = torch.tensor([[5, 7, 5, 5], [5, 5, 5, 5]], device=device)
    return hidden, mask, ids


@pytest.mark.parametrize(
    "case,arg",
    [
        ("empty_row", "attention_mask"),
        ("special_absent", "token_ids"),
        ("last_k_too_long", "last_k"),
        ("cu_seqlens_past_end", "cu_seqlens"),
        ("empty_packed", "cu_seqlens"),
    ],
)
def test_bad_values_raise(backend, device, case, arg):
    hidden, mask, ids = _bad(device)
    flat = torch.randn(6, 8, device=device)
    calls = {
        "empty_row": lambda: fastrank.pool(hidden, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], device=device)),
        "special_absent": lambda: fastrank.pool(hidden, mask, mode="special", token_ids=[7], input_ids=ids),
        "last_k_too_long": lambda: fastrank.pool(hidden, mask, mode="special", last_k=4),
        "cu_seqlens_past_end": lambda: fastrank.pool(flat, cu_seqlens=torch.tensor([0, 3, 9], device=device)),
        "empty_packed": lambda: fastrank.pool(flat, cu_seqlens=torch.tensor([0, 6, 6], device=device)),
    }
    with pytest.raises(ValueError, match=f"^{arg}"):
        calls[case]()


def test_bad_arguments_raise(device):
    hidden, mask, ids = _bad(device)
    cases = [
        (lambda: fastrank.pool(hidden, mask, mode="max"), "mode"),
        (lambda: fastrank.pool(hidden, mask, mode="special"), "token_ids"),
        (lambda: fastrank.pool(hidden, mask, mode="special", token_ids=[7], last_k=2, input_ids=ids), "token_ids"),
        (lambda: fastrank.pool(hidden, mask, mode="special", token_ids=[7]), "input_ids"),
        (lambda: fastrank.pool(hidden, mask, mode="special", last_k=0), "last_k"),
        (lambda: fastrank.pool(hidden, mask, mode="mean", last_k=2), "token_ids/last_k"),
        (lambda: fastrank.pool(hidden, mask[:, :3]), "attention_mask: shape"),
        (lambda: fastrank.pool(hidden, mask, mode="special", token_ids=[7], input_ids=ids[:, :2]), "input_ids: shape"),
        (lambda: fastrank.pool(hidden, mask, normalize=1), "normalize"),
        (lambda: fastrank.pool(hidden[0], mask), "hidden: a 2-D tensor needs cu_seqlens"),
        (lambda: fastrank.pool(hidden.long(), mask), "hidden: must be float16"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=f"^{pattern}"):
            call()


def test_checks_off_marks_invalid_rows_nan(backend, monkeypatch, device):
    monkeypatch.setenv("FASTRANK_CHECKS", "0")
    hidden, mask, ids = _bad(device)
    out = fastrank.pool(hidden, mask, mode="special", token_ids=[7], input_ids=ids, normalize=True)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


@pytest.mark.gpu
@pytest.mark.slow
def test_large_shape_on_gpu(backend):
    device = torch.device("cuda")
    n, t, h = 64, 512, 1024
    lengths = torch.randint(1, t + 1, (n,)).tolist()
    hidden, mask, ids = make_batch(lengths, t, h, "left", torch.bfloat16, device)
    got = fastrank.pool(hidden, mask, mode="mean", normalize=True)
    want = torch.nn.functional.normalize((hidden.double() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    assert (got.double() - want).abs().max() < 1e-5 * math.sqrt(t)


def test_cpu_training_of_padded_mean_runs_under_autograd_and_keeps_nan_padding_out(monkeypatch):
    """On CPU, fp32 padded mean pooling runs the batched matmul (under torch's autograd with a gradient; not the
    Function); padding holding NaN sends the call to the exact Function path, so it still never reaches the
    result or the gradient; an empty row still raises naming attention_mask, and is NaN with checks off."""
    pool_module = importlib.import_module("fastrank.ops.pool")
    applied = []
    apply = pool_module.PoolFunction.apply
    monkeypatch.setattr(pool_module.PoolFunction, "apply", lambda *a: applied.append(1) or apply(*a))
    lengths, t, h = [5, 3, 7], 7, 33
    hidden, mask, _ = make_batch(lengths, t, h, "left", torch.float32, torch.device("cpu"), seed=4)
    g = torch.randn(len(lengths), h)
    grads = []
    for fill in (0.0, float("nan")):
        x = hidden.detach().clone()
        x[mask == 0] = fill
        x.requires_grad_(True)
        out = fastrank.pool(x, mask, mode="mean", normalize=True)
        (out * g).sum().backward()
        grads.append((out.detach(), x.grad))
        assert torch.isfinite(out).all() and torch.count_nonzero(x.grad[mask == 0]) == 0
    assert applied == [1]  # the NaN-padded call only
    assert_close(grads[1][0], grads[0][0], atol=1e-6, rtol=1e-6, what="pooled, exact path vs autograd path")
    assert_close(grads[1][1], grads[0][1], atol=1e-6, rtol=1e-6, what="gradient, exact path vs autograd path")
    empty = mask.clone()
    empty[1] = 0
    x = hidden.detach().clone().requires_grad_(True)
    with pytest.raises(ValueError, match=r"^attention_mask: sequence\(s\) \[1\] have no real token"):
        fastrank.pool(x, empty, mode="mean")
    monkeypatch.setenv("FASTRANK_CHECKS", "0")
    out = fastrank.pool(x, empty, mode="mean")
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
