"""gated_activation: ``act(gate) * up``, the middle of the gated MLP of Hugging Face decoder layers
(``down_proj(act_fn(gate_proj(x)) * up_proj(x))``), forward and backward in one pass each.

Each program owns a ``[BLOCK_M, BLOCK_N]`` tile of the ``[M, I]`` rows (when gate, up and the output are all
contiguous the driver hands them over as one ``[1, M * I]`` row, so tiles never straddle a ragged row end). Math
in fp32 after every load, with HF's rounding order: ``act(gate)`` is rounded to gate's dtype, then multiplied by
``up`` and rounded again on the store.

Activations (``ACT``): 0 = SiLU ``x * sigmoid(x)`` (Qwen, Llama, Mistral); 1 = GELU with the tanh
approximation (Gemma's ``gelu_pytorch_tanh``), written through ``0.5 * x * (1 + tanh(y)) = x * sigmoid(2y)``,
``y = sqrt(2/pi) * (x + 0.044715 x^3)``: no ``libdevice`` tanh, which the interpreter cannot run, and no
cancellation in ``1 + tanh``. The sigmoid exponentiates ``-|z|`` only (``1 / (1 + e)`` or ``e / (1 + e)``), so
nothing overflows for any finite input.

Backward: ``d_up = g * act(gate)`` (act rounded as in the forward) and ``d_gate = g * up * act'(gate)``, fp32
inside, one rounding on the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrank.common import cdiv, is_interpreting, next_power_of_2

_INTERPRET = is_interpreting()

ACTIVATION_CODES = {"silu": 0, "gelu_tanh": 1}
_SILU = tl.constexpr(0)  # anything else: gelu_tanh
# Globals a compiled kernel reads must be constexpr (the interpreter would accept plain floats).
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi), torch's kBeta
_KAPPA = tl.constexpr(0.044715)


@triton.jit
def _sigmoid(z):
    """1 / (1 + exp(-z)) with exp taken of -|z| only: never overflows (no inf, no NaN for any finite z)."""
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    return tl.where(z >= 0, r, e * r)


@triton.jit
def _act(x, ACT: tl.constexpr):
    """act(x) in fp32."""
    if ACT == _SILU:
        return x * _sigmoid(x)
    else:
        y = _SQRT_2_OVER_PI * (x + _KAPPA * x * x * x)
        return x * _sigmoid(2.0 * y)


@triton.jit
def _act_and_grad(x, ACT: tl.constexpr):
    """(act(x), act'(x)) in fp32."""
    if ACT == _SILU:
        sig = _sigmoid(x)
        return x * sig, sig * (1.0 + x * (1.0 - sig))
    else:
        y = _SQRT_2_OVER_PI * (x + _KAPPA * x * x * x)
        sig = _sigmoid(2.0 * y)
        dy = _SQRT_2_OVER_PI * (1.0 + 3.0 * _KAPPA * x * x)
        return x * sig, sig + 2.0 * x * sig * (1.0 - sig) * dy


@triton.jit
def _gated_fwd_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    M,
    N,
    stride_gm,
    stride_um,
    stride_om,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program i * cdiv(N, BLOCK_N) + j, on tile (i, j): out = round(round(act(gate)) * up)."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rows = (pid // tiles_n).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % tiles_n).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(gate_ptr + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * stride_um + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a = _act(g, ACT).to(gate_ptr.dtype.element_ty).to(tl.float32)  # HF: act_fn(gate) in gate's dtype
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], (a * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    grad_ptr,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    M,
    N,
    stride_dm,
    stride_gm,
    stride_um,
    stride_dgm,
    stride_dum,
    ACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program i * cdiv(N, BLOCK_N) + j, on tile (i, j): d_up = grad * round(act(gate)),
    d_gate = grad * up * act'(gate)."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rows = (pid // tiles_n).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % tiles_n).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    d = tl.load(grad_ptr + rows[:, None] * stride_dm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + rows[:, None] * stride_um + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    a = a.to(gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dup_ptr + rows[:, None] * stride_dum + cols[None, :], (d * a).to(dup_ptr.dtype.element_ty), mask=mask)
    tl.store(
        dgate_ptr + rows[:, None] * stride_dgm + cols[None, :], (d * u * da).to(dgate_ptr.dtype.element_ty), mask=mask
    )


# ------------------------------------------------------------------------------------------------
# drivers
# ------------------------------------------------------------------------------------------------
def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[M, I]`` rows with unit stride along I (a view when the layout allows, else a copy)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _layout(*tensors):
    """The tensors as 2-D rows, flattened to one ``[1, numel]`` row when every one of them is contiguous (then no
    tile straddles a row end)."""
    if all(t.is_contiguous() for t in tensors):
        return [t.view(1, -1) for t in tensors]
    return [_rows(t) for t in tensors]


def _blocks(m: int, n: int):
    """(BLOCK_M, BLOCK_N, num_warps) for an ``[m, n]`` problem."""
    if _INTERPRET:
        block_n = min(next_power_of_2(n), 1024)
        return max(1, min(next_power_of_2(m), 1024 // block_n)), block_n, 1
    if m == 1:
        return 1, min(next_power_of_2(n), 2048), 8 if n >= 2048 else 4
    block_n = min(next_power_of_2(n), 1024)
    return max(1, min(next_power_of_2(m), 2048 // block_n)), block_n, 4


def gated_activation_forward(gate, up, config, needs_grad: bool = False):
    """``(act(gate) * up, None)`` (``config.activation``), shaped like gate, in its dtype. Nothing but gate and up
    is needed for backward (``needs_grad`` changes nothing here), so the second output, the activation the
    reference path keeps, is always None."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out, None
    g2, u2, o2 = _layout(gate, up, out)
    m, n = g2.shape
    block_m, block_n, warps = _blocks(m, n)
    _gated_fwd_kernel[(cdiv(m, block_m) * cdiv(n, block_n),)](
        g2,
        u2,
        o2,
        m,
        n,
        g2.stride(0),
        u2.stride(0),
        o2.stride(0),
        ACT=ACTIVATION_CODES[config.activation],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
    )
    return out, None


def gated_activation_backward(grad_out, gate, up, act, config):
    """``(d_gate, d_up)`` for the output gradient ``grad_out``, in gate's and up's dtype; ``act`` (always None
    from this path's forward) is ignored: the kernel recomputes the activation."""
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if dgate.numel() == 0:
        return dgate, dup
    d2, g2, u2, dg2, du2 = _layout(grad_out, gate, up, dgate, dup)
    m, n = g2.shape
    block_m, block_n, warps = _blocks(m, n)
    _gated_bwd_kernel[(cdiv(m, block_m) * cdiv(n, block_n),)](
        d2,
        g2,
        u2,
        dg2,
        du2,
        m,
        n,
        d2.stride(0),
        g2.stride(0),
        u2.stride(0),
        dg2.stride(0),
        du2.stride(0),
        ACT=ACTIVATION_CODES[config.activation],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
    )
    return dgate, dup
