"""rope: rotary position embedding of q and k in one launch, rounded step by step like Hugging Face's formula.

HF's ``apply_rotary_pos_emb`` computes ``q * cos + rotate_half(q) * sin`` (``rotate_half(x) = cat(-x2, x1)``
over the two halves of the head dim) as three tensor ops, each rounded to the storage dtype. Written per half,
with ``c1, c2, s1, s2`` the halves of ``cos`` and ``sin``::

    out1 = r(r(x1 * c1) - r(x2 * s1))        # (-x2) * s1 rounds to exactly -(x2 * s1)
    out2 = r(r(x2 * c2) + r(x1 * s2))

and the backward (the transpose of the same linear map; no gradient into cos and sin)::

    dx1 = r(r(g1 * c1) + r(g2 * s2))
    dx2 = r(r(g2 * c2) - r(g1 * s1))

which is the forward with ``(s1, s2)`` replaced by ``(-s2, -s1)`` (negation is exact), so one kernel serves
both. ``r`` rounds to the storage dtype; the kernel does every step in fp32 (fp64 for fp64 input) and casts
to the storage dtype and back between steps, so on a GPU its results equal HF's bit for bit: torch's CUDA
and CPU kernels also compute each half-precision op in fp32 and round once (round to nearest even, like
Triton's casts). fp32 carries more than twice the bits of fp16 and bf16, so an fp32 result rounded again to
half precision equals the correctly rounded half-precision op: the compiler may lower a product or sum and
its cast to native bf16/fp16 instructions (it does for sm_90) without changing a bit. Floating-point
contraction is switched off at launch (``enable_fp_fusion=False``): an fma of ``x1 * c1 - x2 * s1`` would
skip the product's rounding and differ from torch in fp32. The interpreter truncates fp32 -> bf16 casts, so
there bf16 results can differ from HF by an ulp per rounding step.

One program per (block of BLOCK_T tokens, batch row b): it loads that block's cos/sin halves once and
applies them to every head of q, then every head of k, BLOCK_H heads at a time, reading and writing the two
halves of each head as ``[BLOCK_T, BLOCK_H, BLOCK_HALF]`` tiles. Every stride is passed, so q and k may be
HF's non-contiguous ``[B, H, T, D]`` views of ``[B, T, H * D]`` projections, and cos/sin may have batch 1
(stride 0 broadcasts it). The outputs are written wherever their strides point: fresh ``[B, T, H, D]``
buffers (the layout the attention after it reads), or q and k themselves (in place: every element is read
before the same thread writes it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrank.common import cdiv, is_interpreting, next_power_of_2

_INTERPRET = is_interpreting()


@triton.jit
def _rope_heads(
    x_ptr,
    o_ptr,
    b,
    offs_t,
    t_mask,
    c1,
    c2,
    s1,
    s2,
    H,
    HALF,
    stride_xb,
    stride_xh,
    stride_xt,
    stride_xd,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    COMPUTE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate all H heads of x at the tokens offs_t of batch row b into o; cos/sin halves are
    [BLOCK_T, 1, BLOCK_HALF] tiles in COMPUTE, already set up for the direction (forward or backward)."""
    dt = o_ptr.dtype.element_ty  # the storage dtype, x's
    offs_d = tl.arange(0, BLOCK_HALF)
    td_mask = t_mask[:, None, None] & (offs_d < HALF)[None, None, :]
    x_row = x_ptr + b * stride_xb + offs_t[:, None, None] * stride_xt + offs_d[None, None, :] * stride_xd
    o_row = o_ptr + b * stride_ob + offs_t[:, None, None] * stride_ot + offs_d[None, None, :] * stride_od
    for h0 in range(0, H, BLOCK_H):
        offs_h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)  # h * stride_h passes 2^31 for contiguous [B, H, T, D]
        mask = td_mask & (offs_h < H)[None, :, None]
        x_ptrs = x_row + offs_h[None, :, None] * stride_xh
        # Upcast right after the load: the interpreter has no bf16 arithmetic, and fp32 is torch's opmath.
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(COMPUTE)
        x2 = tl.load(x_ptrs + HALF * stride_xd, mask=mask, other=0.0).to(COMPUTE)
        # Each product rounded to the storage dtype and widened back (a no-op in fp32), then the sum rounded by
        # the store: what HF's separate tensor ops store. Casts are fine in the interpreter; bf16 math is not.
        o1 = (x1 * c1).to(dt).to(COMPUTE) - (x2 * s1).to(dt).to(COMPUTE)
        o2 = (x2 * c2).to(dt).to(COMPUTE) + (x1 * s2).to(dt).to(COMPUTE)
        o_ptrs = o_row + offs_h[None, :, None] * stride_oh
        tl.store(o_ptrs, o1.to(dt), mask=mask)
        tl.store(o_ptrs + HALF * stride_od, o2.to(dt), mask=mask)


@triton.jit
def _rope_kernel(
    # data pointers
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    # sizes
    T,
    HQ,
    HK,
    HALF,
    # strides: q, k, their outputs as [B, H, T, D]; cos, sin as [B, T, D] (stride_cb = 0 broadcasts batch 1)
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_qob,
    stride_qoh,
    stride_qot,
    stride_qod,
    stride_kob,
    stride_koh,
    stride_kot,
    stride_kod,
    stride_cb,
    stride_ct,
    stride_cd,
    stride_sb,
    stride_st,
    stride_sd,
    # feature flags
    BACKWARD: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Program (j, b): tokens [j*BLOCK_T, (j+1)*BLOCK_T) of batch row b, every head of q and of k."""
    b = tl.program_id(1).to(tl.int64)
    # int64 token offsets: t * stride_t reaches past 2^31 for long rows of wide models.
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    t_mask = offs_t < T
    offs_d = tl.arange(0, BLOCK_HALF)
    cs_mask = t_mask[:, None] & (offs_d < HALF)[None, :]
    # cos/sin halves, loaded once for the tokens of this block and reused by every head of q and k.
    c_ptrs = cos_ptr + b * stride_cb + offs_t[:, None] * stride_ct + offs_d[None, :] * stride_cd
    s_ptrs = sin_ptr + b * stride_sb + offs_t[:, None] * stride_st + offs_d[None, :] * stride_sd
    c1 = tl.load(c_ptrs, mask=cs_mask, other=0.0).to(COMPUTE)[:, None, :]
    c2 = tl.load(c_ptrs + HALF * stride_cd, mask=cs_mask, other=0.0).to(COMPUTE)[:, None, :]
    s1 = tl.load(s_ptrs, mask=cs_mask, other=0.0).to(COMPUTE)[:, None, :]
    s2 = tl.load(s_ptrs + HALF * stride_sd, mask=cs_mask, other=0.0).to(COMPUTE)[:, None, :]
    if BACKWARD:
        # The transpose of the rotation: (s1, s2) -> (-s2, -s1); negation is exact, so the rounding of
        # each product is the one autograd through HF's formula performs.
        s1, s2 = -s2, -s1
    _rope_heads(
        q_ptr,
        q_out_ptr,
        b,
        offs_t,
        t_mask,
        c1,
        c2,
        s1,
        s2,
        HQ,
        HALF,
        stride_qb,
        stride_qh,
        stride_qt,
        stride_qd,
        stride_qob,
        stride_qoh,
        stride_qot,
        stride_qod,
        COMPUTE,
        BLOCK_HQ,
        BLOCK_HALF,
    )
    _rope_heads(
        k_ptr,
        k_out_ptr,
        b,
        offs_t,
        t_mask,
        c1,
        c2,
        s1,
        s2,
        HK,
        HALF,
        stride_kb,
        stride_kh,
        stride_kt,
        stride_kd,
        stride_kob,
        stride_koh,
        stride_kot,
        stride_kod,
        COMPUTE,
        BLOCK_HK,
        BLOCK_HALF,
    )


# ------------------------------------------------------------------------------------------------
# drivers
# ------------------------------------------------------------------------------------------------
_TILE = 4096  # elements per [BLOCK_T, BLOCK_H, BLOCK_HALF] tile on a GPU: 32 per thread at 4 warps


def _blocks(t: int, hq: int, hk: int, half: int):
    """(BLOCK_T, BLOCK_HQ, BLOCK_HK, BLOCK_HALF)."""
    block_half = next_power_of_2(half)
    block_hq = min(next_power_of_2(hq), 16)
    block_hk = min(next_power_of_2(hk), 16)
    if _INTERPRET:  # the interpreter pays per program and per loop trip: few programs, whole rows
        return min(next_power_of_2(t), 16), block_hq, block_hk, block_half
    # As many tokens as fill a tile of the wider of q's and k's head blocks, so each load is a few KiB.
    block_t = max(1, min(64, _TILE // (max(block_hq, block_hk) * block_half)))
    return min(block_t, next_power_of_2(t)), block_hq, block_hk, block_half


def _out_like(x: torch.Tensor) -> torch.Tensor:
    """An empty ``[B, H, T, D]`` tensor laid out in memory as ``[B, T, H, D]``."""
    b, h, t, d = x.shape
    return torch.empty((b, t, h, d), dtype=x.dtype, device=x.device).transpose(1, 2)


def _batch_strides(table: torch.Tensor):
    """(b, t, d) strides of a ``[Bc, T, D]`` cos or sin; batch 1 gets stride 0 so every row reads it."""
    sb, st, sd = table.stride()
    return (0 if table.shape[0] == 1 else sb), st, sd


def _launch(q, k, cos, sin, q_out, k_out, backward: bool):
    b, hq, t, d = q.shape
    hk = k.shape[1]
    if q.numel() == 0 and k.numel() == 0:
        return
    half = d // 2
    block_t, block_hq, block_hk, block_half = _blocks(t, hq, hk, half)
    compute = tl.float64 if q.dtype == torch.float64 else tl.float32
    _rope_kernel[(cdiv(t, block_t), b)](
        q,
        k,
        cos,
        sin,
        q_out,
        k_out,
        t,
        hq,
        hk,
        half,
        *q.stride(),
        *k.stride(),
        *q_out.stride(),
        *k_out.stride(),
        *_batch_strides(cos),
        *_batch_strides(sin),
        BACKWARD=backward,
        COMPUTE=compute,
        BLOCK_T=block_t,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_HALF=block_half,
        num_warps=4,
        # No fma contraction: HF rounds each product before the sum (this matters in fp32).
        enable_fp_fusion=False,
    )


def rope_forward(q, k, cos, sin, config):
    """Rotate q ``[B, Hq, T, D]`` and k ``[B, Hkv, T, D]`` by cos/sin ``[1 or B, T, D]`` (all one dtype,
    checked by ``fastrank.ops.rope``). Returns ``(q_out, k_out)``: new tensors laid out as ``[B, T, H, D]``
    (viewed as ``[B, H, T, D]``), or q and k themselves when ``config.inplace``."""
    if config.inplace:
        q_out, k_out = q, k
    else:
        q_out, k_out = _out_like(q), _out_like(k)
    _launch(q, k, cos, sin, q_out, k_out, backward=False)
    return q_out, k_out


def rope_backward(grad_q, grad_k, cos, sin, config):
    """Gradients with respect to q and k of ``rope_forward``'s outputs, laid out as ``[B, T, H, D]`` (so the
    transpose and view HF made of its projections hand them back contiguous)."""
    dq, dk = _out_like(grad_q), _out_like(grad_k)
    _launch(grad_q, grad_k, cos, sin, dq, dk, backward=True)
    return dq, dk
