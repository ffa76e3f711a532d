"""score_head against float64 formulas: values, log-sum-exp, gradients, layouts, dtypes and bad input.

Every test runs twice through the ``backend`` fixture: on the PyTorch reference and on the Triton
kernels (compiled on a GPU, interpreted on CPU).
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import STORE_RTOL, assert_close, dot_atol

import fastrank

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, T, H, V, K): N=1 and T=1, K=1, K=7, K=10; H not a multiple of any block; V not a multiple of a tile.
SHAPES = [(1, 1, 8, 5, 1), (3, 9, 40, 257, 7), (5, 13, 100, 1000, 10)]


# ------------------------------------------------------------------------------------------------
# builders and the float64 oracle
# ------------------------------------------------------------------------------------------------
def random_lengths(n, t, gen=None):
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    lengths[0] = t  # one full row, so T is really used
    return lengths.tolist()


def make_mask(lengths, t, side, device):
    mask = torch.zeros(len(lengths), t, dtype=torch.long, device=device)
    for i, length in enumerate(lengths):
        if side == "right":
            mask[i, :length] = 1
        else:
            mask[i, t - length :] = 1
    return mask


def last_real(mask):
    t = mask.shape[1]
    return torch.where(mask != 0, torch.arange(t, device=mask.device), -1).amax(1)


def make_head(v, h, dtype, device, with_bias=True):
    weight = (torch.randn(v, h, device=device) / math.sqrt(h)).to(dtype)
    bias = (0.5 * torch.randn(v, device=device)).to(dtype) if with_bias else None
    return weight, bias


def pick_ids(v, k):
    ids = torch.randperm(v)[:k].tolist()
    if k > 1:
        ids[-1] = v - 1  # the last vocabulary row, past any full tile
    return ids


def oracle(rows_h, weight, bias, ids, combine=None):
    """float64 logits [N, K or C], their |.|-sums, log-sum-exp [N] and its |.|-sum bound."""
    h64 = rows_h.double()
    w64 = weight.double()
    b64 = bias.double() if bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    idx = torch.tensor(ids, device=weight.device)
    logits = h64 @ w64[idx].t() + b64[idx]
    abs_dot = h64.abs() @ w64[idx].abs().t() + b64[idx].abs()
    if combine is not None:
        mix = torch.tensor(combine, dtype=torch.float64, device=weight.device)
        logits = logits @ mix.t()
        abs_dot = abs_dot @ mix.abs().t()
    full = h64 @ w64.t() + b64
    lse = torch.logsumexp(full, dim=1)
    lse_abs = (h64.abs() @ w64.abs().t() + b64.abs()).amax(1)
    return logits, abs_dot, lse, lse_abs


# ------------------------------------------------------------------------------------------------
# forward values
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}xT{}xH{}xV{}xK{}".format(*s))
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padded_matches_float64(backend, device, dtype, side, shape):
    n, t, h, v, k = shape
    hidden = torch.randn(n, t, h, device=device).to(dtype)
    weight, bias = make_head(v, h, dtype, device)
    ids = pick_ids(v, k)
    mask = make_mask(random_lengths(n, t), t, side, device)

    out = fastrank.score_head(hidden, weight, ids, attention_mask=mask, bias=bias)

    assert out.dtype == torch.float32 and out.shape == (n, k)
    rows = hidden[torch.arange(n, device=device), last_real(mask)]
    want, abs_dot, _, _ = oracle(rows, weight, bias, ids)
    assert_close(out, want, atol=dot_atol(h, abs_dot), what="logits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_log_sum_exp_matches_float64(backend, device, dtype):
    n, t, h, v = 4, 6, 72, 1000
    hidden = torch.randn(n, t, h, device=device).to(dtype)
    weight, bias = make_head(v, h, dtype, device)
    weight = (weight.float() * 3).to(dtype)  # logits of a few units: the log-sum-exp is not ~log(V)
    mask = make_mask([6, 2, 5, 1], t, "left", device)
    ids = [3, 999, 500]

    res = fastrank.score_head(hidden, weight, ids, attention_mask=mask, bias=bias, return_lse=True)

    assert isinstance(res, fastrank.ScoreHeadOutput)
    rows = hidden[torch.arange(n, device=device), last_real(mask)]
    want, abs_dot, want_lse, lse_abs = oracle(rows, weight, bias, ids)
    assert_close(res.logits, want, atol=dot_atol(h, abs_dot), what="logits")
    assert_close(res.lse, want_lse, atol=dot_atol(h, lse_abs), rtol=1e-6, what="lse")
    # exact full-softmax probabilities of the K tokens, without [N, V] logits
    full = rows.double() @ weight.double().t() + bias.double()
    want_p = torch.softmax(full, dim=1)[:, ids]
    assert_close(torch.exp(res.logits - res.lse[:, None]), want_p, atol=1e-5, rtol=1e-4, what="probabilities")


def test_left_right_and_packed_give_the_same_scores(backend, device):
    n, t, h, v = 5, 11, 48, 300
    lengths = [11, 3, 7, 1, 9]
    seqs = [torch.randn(length, h, device=device) for length in lengths]
    weight, bias = make_head(v, h, torch.float32, device)
    ids = [0, 7, 299]

    def padded(side):
        hidden = torch.full((n, t, h), float("nan"), device=device)  # padding must never be read
        for i, s in enumerate(seqs):
            if side == "right":
                hidden[i, : len(s)] = s
            else:
                hidden[i, t - len(s) :] = s
        return fastrank.score_head(hidden, weight, ids, attention_mask=make_mask(lengths, t, side, device), bias=bias)

    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    packed = fastrank.score_head(torch.cat(seqs), weight, ids, cu_seqlens=cu, bias=bias)
    packed_3d = fastrank.score_head(torch.cat(seqs)[None], weight, ids, cu_seqlens=cu, bias=bias)
    right, left = padded("right"), padded("left")

    want, abs_dot, _, _ = oracle(torch.stack([s[-1] for s in seqs]), weight, bias, ids)
    for name, got in [("right", right), ("left", left), ("packed", packed), ("packed [1, M, H]", packed_3d)]:
        assert_close(got, want, atol=dot_atol(h, abs_dot), what=name)
    assert torch.equal(right, left) and torch.equal(right, packed), "layouts must see identical rows"


def test_explicit_positions_padded_and_packed(backend, device):
    """The research layout scores one position before the appended answer token."""
    n, t, h, v = 3, 8, 40, 120
    lengths = [8, 5, 3]
    hidden = torch.randn(n, t, h, device=device)
    weight, _ = make_head(v, h, torch.float32, device, with_bias=False)
    mask = make_mask(lengths, t, "right", device)
    positions = torch.tensor([6, 3, 0], device=device)
    ids = [11, 12]

    got = fastrank.score_head(hidden, weight, ids, attention_mask=mask, positions=positions)
    want, abs_dot, _, _ = oracle(hidden[torch.arange(n, device=device), positions], weight, None, ids)
    assert_close(got, want, atol=dot_atol(h, abs_dot), what="padded positions")

    flat = torch.cat([hidden[i, :length] for i, length in enumerate(lengths)])
    cu = torch.tensor([0, 8, 13, 16], device=device)
    got_packed = fastrank.score_head(flat, weight, ids, cu_seqlens=cu, positions=positions)
    assert_close(got_packed, want, atol=dot_atol(h, abs_dot), what="packed positions")


def test_no_mask_scores_the_last_column(backend, device):
    hidden = torch.randn(2, 5, 24, device=device)
    weight, bias = make_head(50, 24, torch.float32, device)
    got = fastrank.score_head(hidden, weight, [4], bias=bias)
    want, abs_dot, _, _ = oracle(hidden[:, -1], weight, bias, [4])
    assert_close(got, want, atol=dot_atol(24, abs_dot))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.float32], ids=str)
def test_mask_dtypes(backend, device, mask_dtype):
    hidden = torch.randn(3, 6, 16, device=device)
    weight, _ = make_head(40, 16, torch.float32, device, with_bias=False)
    mask = make_mask([6, 2, 4], 6, "left", device)
    got = fastrank.score_head(hidden, weight, [1, 2], attention_mask=mask.to(mask_dtype))
    want = fastrank.score_head(hidden, weight, [1, 2], attention_mask=mask)
    assert torch.equal(got, want)


def test_mask_with_holes_uses_last_real_token(backend, device):
    hidden = torch.randn(2, 6, 16, device=device)
    weight, _ = make_head(40, 16, torch.float32, device, with_bias=False)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0]], device=device)
    got = fastrank.score_head(hidden, weight, [3], attention_mask=mask)
    want, abs_dot, _, _ = oracle(hidden[[0, 1], [3, 4]], weight, None, [3])
    assert_close(got, want, atol=dot_atol(16, abs_dot))


def test_combine_yes_minus_no_and_matrix(backend, device):
    n, t, h, v = 4, 7, 56, 200
    hidden = torch.randn(n, t, h, device=device).to(torch.bfloat16)
    weight, bias = make_head(v, h, torch.bfloat16, device)
    mask = make_mask([7, 4, 2, 6], t, "right", device)
    rows = hidden[torch.arange(n, device=device), last_real(mask)]

    yes_no = fastrank.score_head(hidden, weight, [9, 10], attention_mask=mask, bias=bias, combine=[1.0, -1.0])
    want, abs_dot, _, _ = oracle(rows, weight, bias, [9, 10], combine=[[1.0, -1.0]])
    assert yes_no.shape == (n, 1)
    assert_close(yes_no, want, atol=dot_atol(h, abs_dot), what="yes minus no")

    mix = [[0.5, 0.25, -1.0], [0.0, 2.0, 1.0], [1.0, 1.0, 1.0]]
    got = fastrank.score_head(hidden, weight, [1, 2, 3], attention_mask=mask, bias=bias, combine=torch.tensor(mix))
    want, abs_dot, _, _ = oracle(rows, weight, bias, [1, 2, 3], combine=mix)
    assert_close(got, want, atol=dot_atol(h, abs_dot), what="3x3 combination")


def test_strided_inputs(backend, device):
    """Non-contiguous hidden (a slice of a wider tensor) and a transposed-storage weight."""
    base = torch.randn(3, 10, 64, device=device)
    hidden = base[:, 2:9, 10:50]  # [3, 7, 40], strides (640, 64, 1)
    weight = torch.randn(40, 90, device=device).t()  # [90, 40] with strides (1, 90)
    mask = make_mask([7, 3, 5], 7, "left", device)
    got = fastrank.score_head(hidden, weight, [0, 89], attention_mask=mask)
    want, abs_dot, _, _ = oracle(hidden[torch.arange(3, device=device), last_real(mask)], weight, None, [0, 89])
    assert_close(got, want, atol=dot_atol(40, abs_dot))


def test_empty_batch(backend, device):
    weight, _ = make_head(30, 16, torch.float32, device, with_bias=False)
    got = fastrank.score_head(torch.randn(0, 4, 16, device=device), weight, [1, 2])
    assert got.shape == (0, 2)


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------
def _naive64(hidden, weight, bias, ids, select, combine, with_lse):
    rows = select(hidden)
    idx = torch.tensor(ids, device=weight.device)
    logits = rows @ weight[idx].t() + bias[idx]
    if combine is not None:
        logits = logits @ torch.tensor(combine, dtype=logits.dtype, device=logits.device).t()
    lse = torch.logsumexp(rows @ weight.t() + bias, dim=1) if with_lse else None
    return logits, lse


GRAD_CASES = [
    # (dtype, layout, with_lse, combine, ids)
    (torch.float32, "left", False, None, [3, 77, 3]),  # a repeated id: both copies add into one row
    (torch.float32, "right", True, None, [5, 100, 9, 8, 1, 0, 119]),
    (torch.bfloat16, "left", False, [[1.0, -1.0]], [4, 6]),
    (torch.float16, "right", True, [[1.0, -1.0]], [4, 6]),
    (torch.bfloat16, "packed", True, None, [2, 0, 50]),
]


@pytest.mark.parametrize(
    "dtype,layout,with_lse,combine,ids",
    GRAD_CASES,
    ids=[f"{str(c[0])[6:]}-{c[1]}-{'lse' if c[2] else 'nolse'}-{'mix' if c[3] else 'raw'}" for c in GRAD_CASES],
)
def test_gradients_match_float64(backend, device, dtype, layout, with_lse, combine, ids):
    n, t, h, v = 4, 6, 36, 120
    lengths = [6, 2, 4, 1]
    weight, bias = make_head(v, h, dtype, device)
    if layout == "packed":
        hidden = torch.randn(sum(lengths), h, device=device).to(dtype)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=device)
        scoring = (cu[1:] - 1).long()
        kwargs = dict(cu_seqlens=cu)
        select = lambda x: x[scoring]  # noqa: E731
    else:
        hidden = torch.randn(n, t, h, device=device).to(dtype)
        mask = make_mask(lengths, t, layout, device)
        scoring = last_real(mask)
        kwargs = dict(attention_mask=mask)
        select = lambda x: x[torch.arange(n, device=device), scoring]  # noqa: E731

    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    c = len(combine) if combine else len(ids)
    g_out = torch.randn(n, c, device=device)
    g_lse = torch.randn(n, device=device)

    res = fastrank.score_head(hidden, weight, ids, bias=bias, combine=combine, return_lse=with_lse, **kwargs)
    out, lse = (res.logits, res.lse) if with_lse else (res, None)
    loss = (out * g_out).sum() + ((lse * g_lse).sum() if with_lse else 0.0)
    loss.backward()

    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    b64 = bias.detach().double().requires_grad_(True)
    out64, lse64 = _naive64(h64, w64, b64, ids, select, combine, with_lse)
    loss64 = (out64 * g_out.double()).sum() + ((lse64 * g_lse.double()).sum() if with_lse else 0.0)
    loss64.backward()

    # Error bounds: each gradient entry is a sum of products; its |.|-sum sets the scale. Half-precision
    # inputs also enter the full-vocabulary backward GEMMs in their own dtype on GPU (one rounding each).
    rows64 = select(h64.detach())
    idx = torch.tensor(ids, device=device)
    mix = torch.tensor(combine, dtype=torch.float64, device=device) if combine else None
    g_k = g_out.double().abs() if mix is None else g_out.double().abs() @ mix.abs()
    p_abs = torch.zeros(n, v, dtype=torch.float64, device=device)
    if with_lse:
        p_abs = torch.softmax(rows64 @ w64.detach().t() + b64.detach(), dim=1) * g_lse.double().abs()[:, None]
    sel = torch.zeros(n, v, dtype=torch.float64, device=device).index_add(1, idx, g_k)
    coef = sel + p_abs  # |d loss / d logit_v| bound per row
    red_h = v if with_lse else len(ids)
    half = STORE_RTOL[dtype]

    dh_abs = coef @ w64.detach().abs()
    tol_h = dot_atol(red_h, dh_abs) + half * dh_abs
    assert_close(select(hidden.grad), select(h64.grad), atol=tol_h, rtol=half, what="grad hidden (scoring rows)")
    untouched = hidden.grad.clone()
    if layout == "packed":
        untouched[scoring] = 0
    else:
        untouched[torch.arange(n, device=device), scoring] = 0
    assert torch.count_nonzero(untouched) == 0, "gradient leaked into non-scoring positions"

    dw_abs = coef.t() @ rows64.abs()
    assert_close(weight.grad, w64.grad, atol=dot_atol(n, dw_abs) + half * dw_abs, rtol=half, what="grad weight")
    if not with_lse:
        others = torch.ones(v, dtype=torch.bool, device=device)
        others[idx] = False
        assert torch.count_nonzero(weight.grad[others]) == 0, "weight rows outside token_ids got gradient"
    db_abs = coef.sum(0)
    assert_close(bias.grad, b64.grad, atol=dot_atol(n, db_abs) + half * db_abs, rtol=half, what="grad bias")


def test_lse_not_in_loss_costs_no_vocabulary_gradient(backend, device):
    hidden = torch.randn(2, 3, 16, device=device, requires_grad=True)
    weight = torch.randn(64, 16, device=device, requires_grad=True)
    res = fastrank.score_head(hidden, weight, [5], return_lse=True)
    res.logits.sum().backward()
    others = torch.ones(64, dtype=torch.bool)
    others[5] = False
    assert torch.count_nonzero(weight.grad[others.to(device)]) == 0


def test_tied_embedding_gradients_accumulate(backend, device):
    """A tied LM head shares its parameter with the input embedding; both gradients must land in it."""
    v, h = 50, 16
    emb = torch.nn.Embedding(v, h).to(device)
    ids_in = torch.tensor([[1, 2, 3], [4, 5, 6]], device=device)
    hidden = torch.tanh(emb(ids_in))
    out = fastrank.score_head(hidden, emb.weight, [2, 7])
    out.sum().backward()
    got = emb.weight.grad.clone()

    emb.weight.grad = None
    hidden = torch.tanh(emb(ids_in))
    (hidden[:, -1] @ emb.weight[[2, 7]].t()).sum().backward()
    assert_close(got, emb.weight.grad, atol=1e-6, what="tied grad")


def test_reference_gradcheck_float64(monkeypatch):
    monkeypatch.setenv("FASTRANK_BACKEND", "torch")
    hidden = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(20, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]])

    def fn(hd, w, b):
        res = fastrank.score_head(
            hd, w, [1, 4, 19], attention_mask=mask, bias=b, combine=[[1, -1, 0.5]], return_lse=True
        )
        return res.logits, res.lse

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def _good(device):
    hidden = torch.randn(2, 4, 8, device=device)
    weight = torch.randn(30, 8, device=device)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]], device=device)
    return hidden, weight, mask


@pytest.mark.parametrize(
    "case,arg",
    [
        ("empty_row", "attention_mask"),
        ("position_past_end", "positions"),
        ("position_on_padding", "positions"),
        ("negative_position", "positions"),
        ("packed_position_outside", "positions"),
        ("empty_packed_sequence", "cu_seqlens"),
        ("cu_seqlens_not_ending_at_M", "cu_seqlens"),
        ("cu_seqlens_decreasing", "cu_seqlens"),
    ],
)
def test_bad_values_raise(backend, device, case, arg):
    hidden, weight, mask = _good(device)
    flat = torch.randn(7, 8, device=device)
    calls = {
        "empty_row": lambda: fastrank.score_head(
            hidden, weight, [1], attention_mask=torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], device=device)
        ),
        "position_past_end": lambda: fastrank.score_head(
            hidden, weight, [1], positions=torch.tensor([3, 4], device=device)
        ),
        "position_on_padding": lambda: fastrank.score_head(
            hidden, weight, [1], attention_mask=mask, positions=torch.tensor([2, 0], device=device)
        ),
        "negative_position": lambda: fastrank.score_head(hidden, weight, [1], positions=[-1, 0]),
        "packed_position_outside": lambda: fastrank.score_head(
            flat, weight, [1], cu_seqlens=torch.tensor([0, 3, 7], device=device), positions=[2, 4]
        ),
        "empty_packed_sequence": lambda: fastrank.score_head(
            flat, weight, [1], cu_seqlens=torch.tensor([0, 3, 3, 7], device=device)
        ),
        "cu_seqlens_not_ending_at_M": lambda: fastrank.score_head(
            flat, weight, [1], cu_seqlens=torch.tensor([0, 3, 6], device=device)
        ),
        "cu_seqlens_decreasing": lambda: fastrank.score_head(
            flat, weight, [1], cu_seqlens=torch.tensor([0, 5, 2, 7], device=device)
        ),
    }
    with pytest.raises(ValueError, match=f"^{arg}"):
        calls[case]()


def test_bad_arguments_raise(device):
    hidden, weight, mask = _good(device)
    cases = [
        (lambda: fastrank.score_head(hidden, weight, []), "token_ids"),
        (lambda: fastrank.score_head(hidden, weight, [30]), r"token_ids\[0\]=30"),
        (lambda: fastrank.score_head(hidden, weight, [1, -1]), r"token_ids\[1\]=-1"),
        (lambda: fastrank.score_head(hidden, weight, list(range(17))), "token_ids"),
        (lambda: fastrank.score_head(hidden, weight, [1.5]), r"token_ids\[0\]"),
        (lambda: fastrank.score_head(hidden, weight.half(), [1]), "weight: dtype"),
        (lambda: fastrank.score_head(hidden, weight[:, :7], [1]), "weight: has H=7"),
        (lambda: fastrank.score_head(hidden, weight, [1], attention_mask=mask[:, :3]), "attention_mask: shape"),
        (lambda: fastrank.score_head(hidden, weight, [1], positions=[1, 2, 3]), "positions: must be 1-D"),
        (
            lambda: fastrank.score_head(hidden, weight, [1], positions=torch.tensor([1.0, 2.0])),
            "positions: must hold integers",
        ),
        (lambda: fastrank.score_head(hidden, weight, [1], bias=torch.zeros(29, device=hidden.device)), "bias: must be"),
        (lambda: fastrank.score_head(hidden, weight, [1, 2], combine=[1.0, 2.0, 3.0]), "combine"),
        (lambda: fastrank.score_head(hidden[0], weight, [1]), "hidden: a 2-D tensor needs cu_seqlens"),
        (lambda: fastrank.score_head(hidden, weight, [1], cu_seqlens=torch.tensor([0, 4])), "hidden: packed input"),
        (
            lambda: fastrank.score_head(hidden.reshape(8, 8), weight, [1], cu_seqlens=[0, 8], attention_mask=mask),
            "attention_mask: cannot",
        ),
        (lambda: fastrank.score_head(hidden.long(), weight, [1]), "hidden: must be"),
        (lambda: fastrank.score_head(hidden, weight, [1], return_lse=1), "return_lse"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=f"^{pattern}"):
            call()


def test_device_mismatch_raises():
    hidden = torch.randn(2, 4, 8, device="meta")
    weight = torch.randn(30, 8)
    with pytest.raises(ValueError, match="^weight: is on cpu but hidden is on meta"):
        fastrank.score_head(hidden, weight, [1])


def test_checks_off_marks_invalid_rows_nan(backend, monkeypatch, device):
    """FASTRANK_CHECKS=0 skips the read-back; invalid rows then score NaN, valid rows are unaffected."""
    monkeypatch.setenv("FASTRANK_CHECKS", "0")
    hidden, weight, _ = _good(device)
    mask = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]], device=device)
    res = fastrank.score_head(hidden, weight, [1, 2], attention_mask=mask, return_lse=True)
    assert torch.isnan(res.logits[0]).all() and torch.isnan(res.lse[0])
    assert torch.isfinite(res.logits[1]).all() and torch.isfinite(res.lse[1])
    flat = torch.randn(7, 8, device=device)
    out = fastrank.score_head(flat, weight, [1], cu_seqlens=torch.tensor([0, 3, 9], device=device))
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()  # the sequence running past M


def test_backend_selection(monkeypatch):
    from fastrank.utils import select_backend

    cpu = torch.zeros(1)
    monkeypatch.setenv("FASTRANK_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="^FASTRANK_BACKEND='cuda-please'"):
        select_backend(cpu)
    monkeypatch.setenv("FASTRANK_BACKEND", "auto")
    assert select_backend(cpu) == "torch"
    monkeypatch.setenv("FASTRANK_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="^FASTRANK_BACKEND=triton needs CUDA tensors"):
        select_backend(cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(cpu) == "triton"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_qwen_head_shape_on_gpu(backend, dtype):
    """The real Qwen2.5-0.5B head shape (H=896, V=151936) with the log-sum-exp and gradients."""
    device = torch.device("cuda")
    n, t, h, v = 64, 96, 896, 151936
    hidden = torch.randn(n, t, h, device=device).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, device=device) / math.sqrt(h)).to(dtype).requires_grad_(True)
    mask = make_mask(random_lengths(n, t), t, "left", device)
    ids = [9454, 2753, 16, 17, 18, 19, 20]
    res = fastrank.score_head(hidden, weight, ids, attention_mask=mask, return_lse=True)
    rows = hidden.detach()[torch.arange(n, device=device), last_real(mask)]
    want, abs_dot, want_lse, lse_abs = oracle(rows, weight.detach(), None, ids)
    assert_close(res.logits, want, atol=dot_atol(h, abs_dot), what="logits")
    assert_close(res.lse, want_lse, atol=dot_atol(h, lse_abs), rtol=1e-6, what="lse")
    (res.logits.sum() + res.lse.sum()).backward()
    full = rows.double() @ weight.detach().double().t()
    p = torch.softmax(full, 1)
    coef = p.clone()
    coef[:, ids] += 1
    want_dh = coef @ weight.detach().double()
    got_dh = hidden.grad[torch.arange(n, device=device), last_real(mask)]
    scale = coef @ weight.detach().double().abs()
    assert_close(
        got_dh, want_dh, atol=dot_atol(v, scale) + STORE_RTOL[dtype] * scale, rtol=STORE_RTOL[dtype], what="grad hidden"
    )
