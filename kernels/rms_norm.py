"""rms_norm: RMSNorm of Hugging Face decoder layers, optionally fused with the residual add before it.

Forward: one program per block of ``BLOCK_M`` rows holds the rows whole (``BLOCK_H`` = H rounded up to a power
of two) and, in fp32, computes ``rstd = rsqrt(mean(x^2) + eps)`` and ``n = x * rstd``, then the output with the
rounding order of the model family:

- Llama, Qwen2/3, Mistral (``UNIT_OFFSET=False``): ``weight * n.to(x.dtype)``: the normalised row is rounded to
  the input dtype first, the product to the output dtype (the promotion of weight's and x's dtypes).
- Gemma, Gemma 2 (``UNIT_OFFSET=True``): ``(n * (1 + weight)).to(x.dtype)``: one rounding.

With ``HAS_RESIDUAL`` the program first forms ``s = residual + x`` rounded to x's dtype (what HF's
``hidden_states = residual + hidden_states`` stores), writes it out, and normalises it. ``rstd`` (fp32 ``[M]``)
is stored for the backward pass.

Backward: a fixed number of programs (a few per SM) each walks its own contiguous range of rows in blocks of
``BLOCK_M`` rows, writes ``dx = rstd * (gn - n * mean(gn * n))`` with ``gn = g * w`` (plus the gradient that
reaches ``s`` directly when the residual was fused), and accumulates its rows' share of the weight gradient in
fp32 registers, stored once per program as a partial sum; the partial sums ``[programs, H]`` are then reduced
by one torch sum in fp32. No atomics.

Configurations are read duck-typed (``config.eps``, ``config.unit_offset``): the frozen dataclass lives in the
op's room, ``fastrank.ops.rms_norm``, and kernels import nothing of fastrank but ``fastrank.common``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrank.common import cdiv, is_interpreting, next_power_of_2, num_sms

_INTERPRET = is_interpreting()


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    s_ptr,
    rstd_ptr,
    M,
    H,
    stride_xm,
    stride_rm,
    stride_om,
    stride_sm,
    eps,
    UNIT_OFFSET: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    STORE_RSTD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program i normalises rows [i * BLOCK_M, (i + 1) * BLOCK_M)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < M
    col_ok = cols < H
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (r + x).to(s_ptr.dtype.element_ty)  # HF: residual + hidden_states, in the input dtype
        tl.store(s_ptr + rows[:, None] * stride_sm + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / H + eps)
    n = x * rstd[:, None]
    w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        y = n * (1.0 + w[None, :])
    else:
        y = n.to(x_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_RSTD:
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    grad_out_ptr,
    grad_s_ptr,
    x_ptr,
    weight_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    M,
    H,
    rows_per_program,
    stride_gm,
    stride_gsm,
    stride_xm,
    stride_dxm,
    UNIT_OFFSET: tl.constexpr,
    HAS_GRAD_S: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program p: dx of rows [p * rows_per_program, (p + 1) * rows_per_program), and those rows' part of the
    weight gradient, dw_partial[p] (fp32)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < H
    w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        w = 1.0 + w
    dw = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    for m0 in range(0, rows_per_program, BLOCK_M):
        rows = first + m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M  # rows_per_program is a multiple of BLOCK_M: no overlap with the next program
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_out_ptr + rows[:, None] * stride_gm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        n = x * rstd[:, None]
        gn = g * w[None, :]
        c = tl.sum(gn * n, axis=1) / H
        dx = rstd[:, None] * (gn - n * c[:, None])
        if HAS_GRAD_S:
            dx += tl.load(grad_s_ptr + rows[:, None] * stride_gsm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            if UNIT_OFFSET:
                dw += g * n
            else:  # the forward multiplied weight by n rounded to x's dtype
                dw += g * n.to(x_ptr.dtype.element_ty).to(tl.float32)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid.to(tl.int64) * H + cols, tl.sum(dw, axis=0), mask=col_ok)


# ------------------------------------------------------------------------------------------------
# drivers
# ------------------------------------------------------------------------------------------------
MAX_H = 65536  # one row is held whole in registers


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[M, H]`` rows with unit stride along H (a view when the layout allows, else a copy)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _fwd_blocks(h: int):
    """(BLOCK_M, BLOCK_H, num_warps)."""
    block_h = next_power_of_2(h)
    if _INTERPRET:  # the interpreter pays per program: several rows at once
        return max(1, min(16, 2048 // block_h)), block_h, 1
    block_m = max(1, min(16, 4096 // block_h))
    tile = block_m * block_h
    return block_m, block_h, 4 if tile <= 4096 else (8 if tile <= 16384 else 16)


def _bwd_blocks(h: int):
    block_h = next_power_of_2(h)
    if _INTERPRET:
        return max(1, min(16, 2048 // block_h)), block_h, 1
    block_m = max(1, min(8, 2048 // block_h))
    tile = block_m * block_h
    return block_m, block_h, 4 if tile <= 2048 else (8 if tile <= 8192 else 16)


def _check_width(h: int) -> None:
    if h > MAX_H:
        raise ValueError(f"x: H={h} is wider than the rms_norm kernel's {MAX_H}; use FASTRANK_BACKEND=torch")


def rms_norm_forward(x, weight, residual, config, needs_grad: bool):
    """Launch the forward kernel on ``x`` ``[..., H]`` (and ``residual``, same shape and dtype).

    Returns ``(out, s, rstd)``: ``out`` shaped like x, in x's dtype (``config.unit_offset``) or the promotion of
    weight's and x's dtypes; ``s = residual + x`` in x's dtype (None without residual); ``rstd`` fp32 ``[M]``
    (M = rows of x), None unless ``needs_grad``."""
    h = x.shape[-1]
    _check_width(h)
    x2 = _rows(x)
    m = x2.shape[0]
    out_dtype = x.dtype if config.unit_offset else torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    has_res = residual is not None
    r2 = _rows(residual) if has_res else None
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device) if has_res else None
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device) if needs_grad else None
    block_m, block_h, warps = _fwd_blocks(h)
    if m > 0:
        _rms_norm_fwd_kernel[(cdiv(m, block_m),)](
            x2,
            r2,
            weight.contiguous(),
            out,
            s,
            rstd,
            m,
            h,
            x2.stride(0),
            r2.stride(0) if has_res else 0,
            h,
            h,
            float(config.eps),
            UNIT_OFFSET=bool(config.unit_offset),
            HAS_RESIDUAL=has_res,
            STORE_RSTD=needs_grad,
            BLOCK_M=block_m,
            BLOCK_H=block_h,
            num_warps=warps,
        )
    return out, s, rstd


def rms_norm_backward(grad_out, grad_s, xs, weight, rstd, config, needs_weight_grad: bool):
    """Gradients of ``rms_norm_forward``: ``grad_out`` of the output, ``grad_s`` of ``s`` (None without residual),
    ``xs`` the normalised input (x, or s with residual), ``rstd`` as saved. Returns ``(dx, dweight)``: dx in xs's
    dtype and shape (also the residual's gradient), dweight in weight's dtype (None unless
    ``needs_weight_grad``), its sum over rows taken in fp32."""
    h = xs.shape[-1]
    x2 = _rows(xs)
    g2 = _rows(grad_out)
    gs2 = _rows(grad_s) if grad_s is not None else None
    m = x2.shape[0]
    dx = torch.empty(xs.shape, dtype=xs.dtype, device=xs.device)
    block_m, block_h, warps = _bwd_blocks(h)
    blocks = cdiv(m, block_m)
    programs = max(1, min(blocks, (2 if _INTERPRET else 4) * num_sms(xs.device)))
    rows_per_program = cdiv(blocks, programs) * block_m
    programs = cdiv(m, rows_per_program) if m > 0 else 1
    dw_partial = torch.empty((programs, h), dtype=torch.float32, device=xs.device) if needs_weight_grad else None
    if m > 0:
        _rms_norm_bwd_kernel[(programs,)](
            g2,
            gs2,
            x2,
            weight.contiguous(),
            rstd,
            dx,
            dw_partial,
            m,
            h,
            rows_per_program,
            g2.stride(0),
            gs2.stride(0) if gs2 is not None else 0,
            x2.stride(0),
            h,
            UNIT_OFFSET=bool(config.unit_offset),
            HAS_GRAD_S=gs2 is not None,
            COMPUTE_DW=needs_weight_grad,
            BLOCK_M=block_m,
            BLOCK_H=block_h,
            num_warps=warps,
        )
    if not needs_weight_grad:
        return dx, None
    if m == 0:
        return dx, torch.zeros_like(weight)
    return dx, dw_partial.sum(0).to(weight.dtype)
