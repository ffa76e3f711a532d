"""contrastive_loss: in-batch softmax cross-entropy over q @ p.T / tau without the [B, P] score matrix.

Forward: one program per block of BLOCK_M query rows walks the passage tiles, computing each tile of
scores ``s = q p^T / tau`` in fp32 (tensor cores on half inputs) and keeping, per row, an online
log-sum-exp over the candidates (all passages, or the row's own group), the score of its target, and,
with teacher scores, the log-sum-exp over its own group and the teacher-weighted sum of its group's
scores. Only these four fp32 numbers per row are written; the loss is assembled from them in torch.

Backward (Inf-CL's scheme): the coefficient of each score, ``c = (softmax - onehot) + (group softmax -
teacher)``, is rebuilt tile by tile from the saved row statistics. One kernel owns blocks of query rows and
accumulates ``dq = c p / tau``; another owns blocks of passage rows and accumulates ``dp = c^T q / tau``;
each program writes only its own rows, so there are no atomics. A program's accumulator is a [BLOCK, D]
fp32 slab it updates in place chunk by chunk over D (it stays in L2), so D may be any size.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastrank.utils import cdiv, is_interpreting, next_power_of_2

_INTERPRET = is_interpreting()


@triton.jit
def _score_tile(q_ptr, p_ptr, offs_m, m_mask, offs_n, n_mask, D, stride_qm, stride_pn, inv_tau,
                DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of q p^T / tau."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        p_t = tl.load(p_ptr + offs_n[None, :].to(tl.int64) * stride_pn + offs_d[:, None],
                      mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(q.to(tl.float32), p_t.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(q, p_t, acc)
    return acc * inv_tau


@triton.jit
def _contrastive_fwd_kernel(
    q_ptr, p_ptr, targets_ptr, teacher_ptr, stats_ptr,
    B, P, D, G, inv_tau,
    stride_qm, stride_pn, stride_tm, stride_sm,
    IN_BATCH: tl.constexpr, HAS_TEACHER: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """stats[i] = (lse over the candidates, target score, lse over the own group, sum_g t_ig s_i,group+g)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < B
    target = tl.load(targets_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    group_lo = (target // G) * G
    group_hi = group_lo + G
    if IN_BATCH:
        col_lo = 0
        col_hi = P
    else:  # the block's rows only ever look at their own groups
        col_lo = tl.min(tl.where(m_mask, group_lo, P), axis=0)
        col_hi = tl.max(tl.where(m_mask, group_hi, 0), axis=0)

    # -1e30 rather than -inf keeps (m_old - m_new) finite on the first tile.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mg_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    lg_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    kd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < P
        s = _score_tile(q_ptr, p_ptr, offs_m, m_mask, offs_n, n_mask, D, stride_qm, stride_pn, inv_tau,
                        DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_D)
        in_group = (offs_n[None, :] >= group_lo[:, None]) & (offs_n[None, :] < group_hi[:, None])
        if IN_BATCH:
            cand = n_mask[None, :]
        else:
            cand = in_group & n_mask[None, :]
        s_c = tl.where(cand, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_c, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_c - m_new[:, None]), axis=1)
        m_i = m_new
        pos += tl.sum(tl.where(offs_n[None, :] == target[:, None], s, 0.0), axis=1)
        if HAS_TEACHER:
            s_g = tl.where(in_group & n_mask[None, :], s, float("-inf"))
            mg_new = tl.maximum(mg_i, tl.max(s_g, axis=1))
            lg_i = lg_i * tl.exp(mg_i - mg_new) + tl.sum(tl.exp(s_g - mg_new[:, None]), axis=1)
            mg_i = mg_new
            t = tl.load(teacher_ptr + offs_m[:, None].to(tl.int64) * stride_tm + (offs_n[None, :] - group_lo[:, None]),
                        mask=in_group & n_mask[None, :] & m_mask[:, None], other=0.0)
            kd += tl.sum(t * tl.where(in_group, s, 0.0), axis=1)
    base = stats_ptr + offs_m.to(tl.int64) * stride_sm
    tl.store(base + 0, m_i + tl.log(l_i), mask=m_mask)
    tl.store(base + 1, pos, mask=m_mask)
    if HAS_TEACHER:
        tl.store(base + 2, mg_i + tl.log(lg_i), mask=m_mask)
        tl.store(base + 3, kd, mask=m_mask)


@triton.jit
def _coef_tile(s, offs_m, m_mask, offs_n, n_mask, target, group_lo, group_hi, lse, lse_g, teacher_ptr, stride_tm,
               row_scale, IN_BATCH: tl.constexpr, HAS_TEACHER: tl.constexpr):
    """d loss / d s for one tile: row_scale * (softmax - onehot(target)) (+ group softmax - teacher)."""
    in_group = (offs_n[None, :] >= group_lo[:, None]) & (offs_n[None, :] < group_hi[:, None])
    valid = m_mask[:, None] & n_mask[None, :]
    if IN_BATCH:
        cand = valid
    else:
        cand = valid & in_group
    c = tl.where(cand, tl.exp(s - lse[:, None]), 0.0)
    c -= tl.where((offs_n[None, :] == target[:, None]) & valid, 1.0, 0.0)
    if HAS_TEACHER:
        t = tl.load(teacher_ptr + offs_m[:, None].to(tl.int64) * stride_tm + (offs_n[None, :] - group_lo[:, None]),
                    mask=in_group & valid, other=0.0)
        c += tl.where(in_group & valid, tl.exp(s - lse_g[:, None]) - t, 0.0)
    return c * row_scale[:, None]


@triton.jit
def _contrastive_dq_kernel(
    q_ptr, p_ptr, targets_ptr, teacher_ptr, stats_ptr, grad_ptr, dq_ptr,
    B, P, D, G, inv_tau,
    stride_qm, stride_pn, stride_tm, stride_sm, stride_dm,
    IN_BATCH: tl.constexpr, HAS_TEACHER: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program i owns query rows [i*BLOCK_M, (i+1)*BLOCK_M): dq = (c p) / tau into the fp32 dq slab."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < B
    target = tl.load(targets_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    group_lo = (target // G) * G
    group_hi = group_lo + G
    base = stats_ptr + offs_m.to(tl.int64) * stride_sm
    lse = tl.load(base + 0, mask=m_mask, other=0.0)
    lse_g = tl.load(base + 2, mask=m_mask & HAS_TEACHER, other=0.0)
    row_scale = tl.load(grad_ptr + offs_m, mask=m_mask, other=0.0)
    if IN_BATCH:
        col_lo = 0
        col_hi = P
    else:
        col_lo = tl.min(tl.where(m_mask, group_lo, P), axis=0)
        col_hi = tl.max(tl.where(m_mask, group_hi, 0), axis=0)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < P
        s = _score_tile(q_ptr, p_ptr, offs_m, m_mask, offs_n, n_mask, D, stride_qm, stride_pn, inv_tau,
                        DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_D)
        c = _coef_tile(s, offs_m, m_mask, offs_n, n_mask, target, group_lo, group_hi, lse, lse_g, teacher_ptr,
                       stride_tm, row_scale, IN_BATCH, HAS_TEACHER)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            p = tl.load(p_ptr + offs_n[:, None].to(tl.int64) * stride_pn + offs_d[None, :],
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            slab = dq_ptr + offs_m[:, None].to(tl.int64) * stride_dm + offs_d[None, :]
            both = m_mask[:, None] & d_mask[None, :]
            acc = tl.load(slab, mask=both, other=0.0)
            if DOT_FP32:
                acc = tl.dot(c, p, acc, input_precision="ieee")
            else:  # half inputs: tf32 keeps the coefficients to 10 bits, above what the bf16 gradient holds
                acc = tl.dot(c, p, acc, input_precision="tf32")
            tl.store(slab, acc, mask=both)
    for d0 in range(0, D, BLOCK_D):  # scale by 1 / tau once, at the end
        offs_d = d0 + tl.arange(0, BLOCK_D)
        both = m_mask[:, None] & (offs_d < D)[None, :]
        slab = dq_ptr + offs_m[:, None].to(tl.int64) * stride_dm + offs_d[None, :]
        tl.store(slab, tl.load(slab, mask=both, other=0.0) * inv_tau, mask=both)


@triton.jit
def _contrastive_dp_kernel(
    q_ptr, p_ptr, targets_ptr, teacher_ptr, stats_ptr, grad_ptr, dp_ptr,
    B, P, D, G, inv_tau,
    stride_qm, stride_pn, stride_tm, stride_sm, stride_dn,
    IN_BATCH: tl.constexpr, HAS_TEACHER: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program j owns passage rows [j*BLOCK_N, (j+1)*BLOCK_N): dp = (c^T q) / tau into the fp32 dp slab."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < P
    for m0 in range(0, B, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < B
        target = tl.load(targets_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        group_lo = (target // G) * G
        group_hi = group_lo + G
        touches = True
        if not IN_BATCH:  # skip query blocks whose groups miss these passages entirely
            lo = tl.min(tl.where(m_mask, group_lo, P), axis=0)
            hi = tl.max(tl.where(m_mask, group_hi, 0), axis=0)
            touches = (lo < pid * BLOCK_N + BLOCK_N) & (hi > pid * BLOCK_N)
        if touches:
            base = stats_ptr + offs_m.to(tl.int64) * stride_sm
            lse = tl.load(base + 0, mask=m_mask, other=0.0)
            lse_g = tl.load(base + 2, mask=m_mask & HAS_TEACHER, other=0.0)
            row_scale = tl.load(grad_ptr + offs_m, mask=m_mask, other=0.0)
            s = _score_tile(q_ptr, p_ptr, offs_m, m_mask, offs_n, n_mask, D, stride_qm, stride_pn, inv_tau,
                            DOT_FP32, BLOCK_M, BLOCK_N, BLOCK_D)
            c = _coef_tile(s, offs_m, m_mask, offs_n, n_mask, target, group_lo, group_hi, lse, lse_g, teacher_ptr,
                           stride_tm, row_scale, IN_BATCH, HAS_TEACHER)
            c_t = tl.trans(c)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D
                q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                            mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                slab = dp_ptr + offs_n[:, None].to(tl.int64) * stride_dn + offs_d[None, :]
                both = n_mask[:, None] & d_mask[None, :]
                acc = tl.load(slab, mask=both, other=0.0)
                if DOT_FP32:
                    acc = tl.dot(c_t, q, acc, input_precision="ieee")
                else:
                    acc = tl.dot(c_t, q, acc, input_precision="tf32")
                tl.store(slab, acc, mask=both)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        both = n_mask[:, None] & (offs_d < D)[None, :]
        slab = dp_ptr + offs_n[:, None].to(tl.int64) * stride_dn + offs_d[None, :]
        tl.store(slab, tl.load(slab, mask=both, other=0.0) * inv_tau, mask=both)


# ------------------------------------------------------------------------------------------------
# drivers
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _config(dtype: torch.dtype, d: int):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages)."""
    if _INTERPRET:
        return 16, 16, min(32, max(16, next_power_of_2(d))), 1, 1
    if dtype == torch.float32:
        return 32, 32, 32, 4, 2
    return 64, 64, 64, 4, 2


def _dot_fp32(dtype) -> bool:
    # The interpreter computes a bf16 tl.dot wrongly (silently); fp32 inputs want the exact dot, not tf32.
    return _INTERPRET or dtype == torch.float32


def contrastive_forward(q, p, targets, teacher, temperature: float, group_size: int, in_batch: bool):
    """Per-row statistics ``[B, 4]`` fp32: (lse over candidates, target score, lse over own group, teacher-
    weighted sum of own-group scores); the last two are zero without teacher scores."""
    b, d = q.shape
    n = p.shape[0]
    stats = torch.zeros((b, 4), dtype=torch.float32, device=q.device)
    block_m, block_n, block_d, warps, stages = _config(q.dtype, d)
    if b:
        _contrastive_fwd_kernel[(cdiv(b, block_m),)](
            q, p, targets, teacher, stats,
            b, n, d, group_size, 1.0 / temperature,
            q.stride(0), p.stride(0), teacher.stride(0) if teacher is not None else 0, stats.stride(0),
            IN_BATCH=in_batch, HAS_TEACHER=teacher is not None, DOT_FP32=_dot_fp32(q.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
        )
    return stats


def contrastive_backward(q, p, targets, teacher, stats, row_grad, temperature: float, group_size: int,
                         in_batch: bool, need_q: bool, need_p: bool):
    """``(dq, dp)`` in q's and p's dtypes for per-row upstream gradients ``row_grad`` ``[B]`` fp32."""
    b, d = q.shape
    n = p.shape[0]
    block_m, block_n, block_d, warps, stages = _config(q.dtype, d)
    common = dict(IN_BATCH=in_batch, HAS_TEACHER=teacher is not None, DOT_FP32=_dot_fp32(q.dtype),
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    t_stride = teacher.stride(0) if teacher is not None else 0
    dq = dp = None
    if need_q:
        dq = torch.zeros((b, d), dtype=torch.float32, device=q.device)
        if b:
            _contrastive_dq_kernel[(cdiv(b, block_m),)](
                q, p, targets, teacher, stats, row_grad, dq,
                b, n, d, group_size, 1.0 / temperature,
                q.stride(0), p.stride(0), t_stride, stats.stride(0), dq.stride(0), **common,
            )
        dq = dq.to(q.dtype)
    if need_p:
        dp = torch.zeros((n, d), dtype=torch.float32, device=p.device)
        if n:
            _contrastive_dp_kernel[(cdiv(n, block_n),)](
                q, p, targets, teacher, stats, row_grad, dp,
                b, n, d, group_size, 1.0 / temperature,
                q.stride(0), p.stride(0), t_stride, stats.stride(0), dp.stride(0), **common,
            )
        dp = dp.to(p.dtype)
    return dq, dp
