"""contrastive_loss against float64 cross-entropy of the full score matrix: value, gradients, modes, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import STORE_RTOL, UNIT_ROUNDOFF, assert_close

import fastrank

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(b, g, d, dtype, device, extra=0, normalize=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=gen)
    p = torch.randn(b * g + extra * g, d, generator=gen)
    if normalize:
        q, p = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(p, dim=-1)
    return q.to(dtype).to(device), p.to(dtype).to(device)


def oracle(q, p, tau, g, in_batch=True, targets=None, teacher=None):
    """float64: F.cross_entropy over the full [B, P] (or per-group) scores, plus FlagEmbedding's KD term."""
    q64 = q.detach().double().requires_grad_(True)
    p64 = p.detach().double().requires_grad_(True)
    b = q.shape[0]
    scores = q64 @ p64.t() / tau
    targets = torch.arange(b, device=q.device) * g if targets is None else targets
    starts = (targets // g) * g
    group = torch.stack([scores[i, int(starts[i]) : int(starts[i]) + g] for i in range(b)])
    if in_batch:
        loss = torch.nn.functional.cross_entropy(scores, targets)
    else:
        loss = torch.nn.functional.cross_entropy(group, targets - starts)
    if teacher is not None:
        t = torch.softmax(teacher.double(), dim=-1)
        loss = loss - (torch.log_softmax(group, dim=-1) * t).sum(-1).mean()
    loss.backward()
    lse = torch.logsumexp(scores if in_batch else group, dim=1)
    return loss.detach(), q64.grad, p64.grad, lse.detach()


def tolerances(q, p, tau, dtype, device):
    """Score error: fp32 accumulation over D of exactly representable products (sqrt(D) * u * sum |q_k p_k|),
    divided by tau; the loss and the log-sum-exp inherit it. A gradient entry sums coefficients of total
    magnitude <= 4 / B (softmax minus one-hot, plus the distillation term) times rows of the other side,
    and adds one rounding of its dtype, plus the coefficients rounded to that dtype for half inputs on GPU."""
    d, b = q.shape[1], q.shape[0]
    absdot = (q.detach().double().abs() @ p.detach().double().abs().t()).max().item()
    score_err = 4 * math.sqrt(d) * UNIT_ROUNDOFF[torch.float32] * absdot / tau
    loss_atol = 2 * score_err + 1e-7
    half = STORE_RTOL[dtype]
    coef = STORE_RTOL[dtype] if (dtype != torch.float32 and device.type == "cuda") else 0.0
    qmax, pmax = q.detach().abs().max().item(), p.detach().abs().max().item()
    gq = 4 * pmax / tau / b * (half + coef + 2 * score_err) + 1e-7
    gp = 4 * qmax / tau / b * (half + coef + 2 * score_err) + 1e-7
    return loss_atol, gq, gp


CASES = [
    # (B, G, D, tau): B=1; P = 21 (not a tile multiple); D odd; tau 0.01
    (1, 4, 16, 0.05),
    (3, 7, 37, 0.05),
    (6, 3, 40, 0.01),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-G{}-D{}-tau{}".format(*c))
@pytest.mark.parametrize("in_batch", [True, False], ids=["in_batch", "own_group"])
@pytest.mark.parametrize("distill", [False, True], ids=["ce", "ce+kd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(backend, device, dtype, distill, in_batch, case):
    b, g, d, tau = case
    q, p = make(b, g, d, dtype, device)
    q.requires_grad_(True)
    p.requires_grad_(True)
    teacher = torch.randn(b, g, device=device) * 3 if distill else None
    loss, lse = fastrank.contrastive_loss(
        q, p, temperature=tau, in_batch=in_batch, teacher_scores=teacher, return_lse=True
    )
    loss.backward()
    want, gq, gp, want_lse = oracle(q, p, tau, g, in_batch, teacher=teacher)
    loss_atol, gq_atol, gp_atol = tolerances(q, p, tau, dtype, device)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, want, atol=loss_atol, rtol=1e-6, what="loss")
    assert_close(lse, want_lse, atol=loss_atol * b, rtol=1e-6, what="lse")
    half = STORE_RTOL[dtype]
    assert_close(q.grad, gq, atol=gq_atol, rtol=half, what="grad q")
    assert_close(p.grad, gp, atol=gp_atol, rtol=half, what="grad p")


@pytest.mark.parametrize("distill", [False, True], ids=["ce", "ce+kd"])
def test_backward_in_column_chunks(backend, device, monkeypatch, distill):
    """The in-batch backward walks the passages in chunks: force several, the last one ragged, and get the
    same loss and gradients; the forward's passage splits are merged on the way."""
    from fastrank.kernels import contrastive as kernel

    monkeypatch.setattr(kernel, "CHUNK_ENTRIES", 1)  # one tile of columns per chunk
    b, g, d, tau = 5, 9, 33, 0.05  # P = 45: chunks of 16, 16 and 13 on the interpreter's tiles
    q, p = make(b, g, d, torch.float32, device)
    q.requires_grad_(True)
    p.requires_grad_(True)
    teacher = torch.randn(b, g, device=device) if distill else None
    loss = fastrank.contrastive_loss(q, p, temperature=tau, teacher_scores=teacher)
    loss.backward()
    want, gq, gp, _ = oracle(q, p, tau, g, teacher=teacher)
    loss_atol, gq_atol, gp_atol = tolerances(q, p, tau, torch.float32, device)
    assert_close(loss, want, atol=loss_atol, rtol=1e-6, what="loss")
    assert_close(q.grad, gq, atol=gq_atol, rtol=0, what="grad q")
    assert_close(p.grad, gp, atol=gp_atol, rtol=0, what="grad p")


def test_small_temperature_does_not_overflow(backend, device):
    """Unnormalised embeddings at tau = 0.01: scores in the thousands, fp32 online log-sum-exp stays finite."""
    q, p = make(4, 5, 24, torch.float32, device, normalize=False)
    q.requires_grad_(True)
    loss = fastrank.contrastive_loss(q, p, temperature=0.01)
    loss.backward()
    want, gq, _, _ = oracle(q, p, 0.01, 5)
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all()
    assert (q @ p.t()).abs().max() / 0.01 > 500
    assert_close(loss, want, atol=1e-3, rtol=1e-5)
    assert_close(q.grad, gq, atol=1e-3, rtol=1e-4)


def test_explicit_targets_over_a_gathered_set(backend, device):
    """Cross-device style: this rank's queries against every rank's passages (P > B * G)."""
    b, g, d = 3, 4, 20
    q, p = make(b, g, d, torch.float32, device, extra=5)  # 5 more queries' groups from other ranks
    offset = 2  # this rank's groups start after two other queries' groups
    targets = (torch.arange(b, device=device) + offset) * g
    teacher = torch.randn(b, g, device=device)
    q.requires_grad_(True)
    p.requires_grad_(True)
    loss = fastrank.contrastive_loss(q, p, temperature=0.05, group_size=g, targets=targets, teacher_scores=teacher)
    loss.backward()
    want, gq, gp, _ = oracle(q, p, 0.05, g, targets=targets, teacher=teacher)
    assert_close(loss, want, atol=1e-5, rtol=1e-6)
    assert_close(q.grad, gq, atol=1e-6, rtol=1e-5)
    assert_close(p.grad, gp, atol=1e-6, rtol=1e-5)


def test_module_and_mnrl_layout(backend, device):
    """sentence-transformers' MNRL layout: candidates = [positives; negatives], target i, scale = 1 / tau."""
    b, d = 4, 12
    a, pos = make(b, 1, d, torch.float32, device, seed=1)
    _, neg = make(b, 1, d, torch.float32, device, seed=2)
    cand = torch.cat([pos, neg])
    loss = fastrank.ContrastiveLoss(temperature=1 / 20.0, group_size=1)(a, cand, targets=torch.arange(b, device=device))
    want = torch.nn.functional.cross_entropy(a.double() @ cand.double().t() * 20.0, torch.arange(b, device=device))
    assert_close(loss, want, atol=1e-5, rtol=1e-6)


def test_bad_input_raises(device):
    q, p = make(2, 3, 8, torch.float32, device)
    cases = [
        (lambda: fastrank.contrastive_loss(q, p[:5], temperature=0.1), "group_size"),
        (lambda: fastrank.contrastive_loss(q, p, temperature=0.1, group_size=4), "p: P=6 passages are not divisible"),
        (lambda: fastrank.contrastive_loss(q, p, temperature=0.0), "temperature"),
        (lambda: fastrank.contrastive_loss(q, p, temperature=-1), "temperature"),
        (lambda: fastrank.contrastive_loss(q, p[:, :7], temperature=0.1), "p: has D=7"),
        (lambda: fastrank.contrastive_loss(q, p.half(), temperature=0.1), "p: dtype"),
        (
            lambda: fastrank.contrastive_loss(q, p, temperature=0.1, targets=torch.tensor([0, 6], device=device)),
            "targets: 6",
        ),
        (
            lambda: fastrank.contrastive_loss(q, p, temperature=0.1, targets=torch.tensor([0], device=device)),
            "targets: must be 1-D",
        ),
        (
            lambda: fastrank.contrastive_loss(q, p, temperature=0.1, teacher_scores=torch.zeros(2, 2, device=device)),
            "teacher_scores",
        ),
        (lambda: fastrank.contrastive_loss(q[:0], p, temperature=0.1), "q: the batch is empty"),
        (lambda: fastrank.contrastive_loss(q[0], p, temperature=0.1), "q: must be 2-D"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=f"^{pattern}"):
            call()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_large_batch_on_gpu(backend, dtype):
    device = torch.device("cuda")
    b, g, d = 512, 8, 1024
    q, p = make(b, g, d, dtype, device)
    q.requires_grad_(True)
    p.requires_grad_(True)
    teacher = torch.randn(b, g, device=device)
    loss = fastrank.contrastive_loss(q, p, temperature=0.02, teacher_scores=teacher)
    loss.backward()
    want, gq, gp, _ = oracle(q, p, 0.02, g, teacher=teacher)
    loss_atol, gq_atol, gp_atol = tolerances(q, p, 0.02, dtype, device)
    assert_close(loss, want, atol=loss_atol, rtol=1e-5)
    assert_close(q.grad, gq, atol=gq_atol, rtol=STORE_RTOL[dtype])
    assert_close(p.grad, gp, atol=gp_atol, rtol=STORE_RTOL[dtype])


@pytest.mark.parametrize("in_batch", [True, False], ids=["in_batch", "own_group"])
@pytest.mark.parametrize("distill", [False, True], ids=["ce", "ce+kd"])
def test_row_chunks_and_groups_apart(backend, device, monkeypatch, distill, in_batch):
    """More query rows than one chunk of the reference (forced to 3 rows, the last chunk ragged) or one row block of
    the kernels (16 rows when interpreted): each block's groups then cover a few of the passage tiles only, the
    others skip the target and distillation terms."""
    from fastrank.ops import contrastive as reference

    monkeypatch.setattr(reference, "_contrastive_chunk_rows", lambda p_rows: 3)
    monkeypatch.setattr(reference, "_own_group_chunk_rows", lambda group_size, dim: 3)
    b, g, d, tau = 40, 2, 16, 0.05
    q, p = make(b, g, d, torch.float32, device, seed=4, extra=1)  # P = 82 passages
    targets = (torch.arange(b, device=device) + 1) * g  # groups from column 2: block edges off the tile edges
    q.requires_grad_(True)
    p.requires_grad_(True)
    teacher = torch.randn(b, g, device=device) * 3 if distill else None
    loss, lse = fastrank.contrastive_loss(
        q, p, temperature=tau, group_size=g, in_batch=in_batch, targets=targets, teacher_scores=teacher, return_lse=True
    )
    loss.backward()
    want, gq, gp, want_lse = oracle(q, p, tau, g, in_batch, targets=targets, teacher=teacher)
    loss_atol, gq_atol, gp_atol = tolerances(q, p, tau, torch.float32, device)
    assert_close(loss, want, atol=loss_atol, rtol=1e-6, what="loss")
    assert_close(lse, want_lse, atol=loss_atol * b, rtol=1e-6, what="lse")
    assert_close(q.grad, gq, atol=gq_atol, rtol=0, what="grad q")
    assert_close(p.grad, gp, atol=gp_atol, rtol=0, what="grad p")


def test_gradient_scales_with_the_upstream_gradient(backend, device):
    """The reference computes the gradients of the mean loss along with the forward and scales them in backward:
    a weighted loss, and a second backward through a retained graph, get the same gradients as the oracle's."""
    b, g, d, tau = 5, 3, 20, 0.05
    q, p = make(b, g, d, torch.float32, device, seed=5)
    q.requires_grad_(True)
    p.requires_grad_(True)
    teacher = torch.randn(b, g, device=device)
    loss = fastrank.contrastive_loss(q, p, temperature=tau, teacher_scores=teacher)
    dq1, dp1 = torch.autograd.grad(2.5 * loss, (q, p), retain_graph=True)
    dq2, dp2 = torch.autograd.grad(-0.5 * loss, (q, p))
    _, gq, gp, _ = oracle(q, p, tau, g, teacher=teacher)
    _, gq_atol, gp_atol = tolerances(q, p, tau, torch.float32, device)
    assert_close(dq1, 2.5 * gq, atol=2.5 * gq_atol, rtol=0, what="grad q, x2.5")
    assert_close(dp1, 2.5 * gp, atol=2.5 * gp_atol, rtol=0, what="grad p, x2.5")
    assert_close(dq2, -0.5 * gq, atol=gq_atol, rtol=0, what="grad q, x-0.5, second backward")
    assert_close(dp2, -0.5 * gp, atol=gp_atol, rtol=0, what="grad p, x-0.5, second backward")


@pytest.mark.parametrize(
    "setting,expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")], ids=["highest", "high", "medium"]
)
@pytest.mark.parametrize("in_batch", [True, False], ids=["in_batch", "own_group"])
def test_fp32_dots_follow_torch_matmul_precision(device, monkeypatch, setting, expected, in_batch):
    """fp32 inputs: every kernel launch passes the tl.dot precision torch's own fp32 matmuls use under
    torch.set_float32_matmul_precision (exact at "highest", TF32 at "high" and "medium", as torch's cuBLAS matmuls);
    half inputs are unaffected. The numbers stay within tolerance (the interpreter ignores the precision; a GPU's
    TF32 gets TF32's unit roundoff, 2^-11, in place of fp32's)."""
    from fastrank.kernels import contrastive as kernel

    seen = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            launch = self.fn[grid]

            def run(*args, **kwargs):
                seen.append(kwargs["FP32_PRECISION"])
                return launch(*args, **kwargs)

            return run

    for name in (
        "_contrastive_fwd_kernel",
        "_contrastive_coef_kernel",
        "_contrastive_dq_kernel",
        "_contrastive_dp_kernel",
    ):
        monkeypatch.setattr(kernel, name, Recorder(getattr(kernel, name)))
    monkeypatch.setenv("FASTRANK_BACKEND", "triton")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        assert kernel.fp32_matmul_precision() == expected
        assert kernel.dot_precision(torch.float32) == expected
        assert kernel.dot_precision(torch.bfloat16) == kernel.dot_precision(torch.float16) == "ieee"
        b, g, d, tau = 5, 3, 20, 0.05
        q, p = make(b, g, d, torch.float32, device, seed=6)
        q.requires_grad_(True)
        p.requires_grad_(True)
        teacher = torch.randn(b, g, device=device)
        loss = fastrank.contrastive_loss(q, p, temperature=tau, in_batch=in_batch, teacher_scores=teacher)
        loss.backward()
    finally:
        torch.set_float32_matmul_precision(previous)
    assert len(seen) >= 2 and set(seen) == {expected}  # the forward and the backward's kernels
    want, gq, gp, _ = oracle(q, p, tau, g, in_batch, teacher=teacher)
    loss_atol, gq_atol, gp_atol = tolerances(q, p, tau, torch.float32, device)
    widen = 2.0**13 if (device.type == "cuda" and expected == "tf32") else 1.0  # 2^-11 / 2^-24
    assert_close(loss, want, atol=loss_atol * widen, rtol=1e-6, what="loss")
    assert_close(q.grad, gq, atol=gq_atol * widen, rtol=0, what="grad q")
    assert_close(p.grad, gp, atol=gp_atol * widen, rtol=0, what="grad p")
