"""contrastive_loss: in-batch softmax cross-entropy over q @ p.T / tau without the [B, P] score matrix.

Forward: a program owns BLOCK_M query rows and one slice of the passages (the slices split P so that the
grid fills the GPU when B alone does not), computes each tile of scores ``s = q p^T / tau`` in fp32
(tensor cores on half inputs) and keeps, per row, an online log-sum-exp over the candidates (all
passages, or the row's own group), the score of its target, and, with teacher scores, the log-sum-exp over
its own group and the teacher-weighted sum of its group's scores. Only these fp32 numbers per row and
slice are written; the slices are merged and the loss assembled in torch.

Backward, in-batch: the coefficient of each score, ``c = (softmax - onehot) + (group softmax - teacher)``,
is rebuilt tile by tile from the saved row statistics, one chunk of passage columns at a time: a kernel
recomputes the chunk's score tiles and writes ``c * row_grad / tau`` for all B rows and the chunk's columns
(``[B, P_chunk]``, by default at most 2^24 entries: 32 MiB in bf16 where torch holds ``[B, P]`` several
times over); then ``dp[chunk] = c^T q`` is final and ``dq += c p[chunk]`` accumulates in fp32 ``[B, D]``,
both on the vendor GEMM. Each score tile is computed twice in all (forward, backward) and each product
once, with no atomics: four GEMM-sized passes where eager torch does three plus several full passes
over the fp32 score matrix.

Backward, own group only: the candidates form a band (each row's G passages), so one kernel owns blocks of
query rows and accumulates ``dq = c p / tau`` and another owns blocks of passage rows and accumulates
``dp = c^T q / tau``, each visiting only the tiles that meet the band; each writes only its own rows. A
program's accumulator is a [BLOCK, D] fp32 slab it updates in place chunk by chunk over D (it stays in
L2), so D may be any size.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastrank.common import ContrastiveConfig, cdiv, dot_fp32, is_interpreting, matmul_acc, next_power_of_2, num_sms

_INTERPRET = is_interpreting()


def fp32_matmul_precision() -> str:
    """``tl.dot``'s ``input_precision`` for fp32 operands that does what torch's own fp32 matmuls do on CUDA under
    ``torch.set_float32_matmul_precision``: ``"highest"`` (torch's default) is true fp32 GEMMs, so ``"ieee"`` (not
    ``"tf32x3"``: close to fp32 but not the same numbers); ``"high"`` and ``"medium"`` are both TF32 in torch's
    cuBLAS matmuls (it has no bf16-internal fp32 GEMM on CUDA; ``torch.backends.cuda.matmul.fp32_precision`` reads
    ``"tf32"`` for both), so ``"tf32"``. Where the legacy setting cannot be read (torch >= 2.9 raises once its
    per-backend API has been mixed in), the CUDA matmul's own ``fp32_precision`` decides."""
    try:
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:
        return "tf32" if getattr(torch.backends.cuda.matmul, "fp32_precision", "ieee") == "tf32" else "ieee"
    return "ieee" if precision == "highest" else "tf32"


def dot_precision(dtype: torch.dtype) -> str:
    """The ``FP32_PRECISION`` a launch passes for inputs of ``dtype``: torch's setting for fp32 inputs; exact for the
    fp32 dots of half inputs, which only the interpreter runs (it ignores the precision; a GPU runs half operands)."""
    return fp32_matmul_precision() if dtype == torch.float32 else "ieee"


@triton.jit
def _score_tile(
    q_ptr,
    p_ptr,
    offs_m,
    m_mask,
    offs_n,
    n_mask,
    D,
    stride_qm,
    stride_pn,
    inv_tau,
    DOT_FP32: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] tile of q p^T / tau (fp32 operands: FP32_PRECISION, see ``dot_precision``)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q = tl.load(
            q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        p_t = tl.load(
            p_ptr + offs_n[None, :].to(tl.int64) * stride_pn + offs_d[:, None],
            mask=d_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            acc = tl.dot(q.to(tl.float32), p_t.to(tl.float32), acc, input_precision=FP32_PRECISION)
        else:
            acc = tl.dot(q, p_t, acc)
    return acc * inv_tau


@triton.jit
def _contrastive_fwd_kernel(
    q_ptr,
    p_ptr,
    targets_ptr,
    teacher_ptr,
    part_ptr,
    B,
    P,
    D,
    G,
    inv_tau,
    cols_per_split,
    stride_qm,
    stride_pn,
    stride_tm,
    stride_ps,
    stride_pm,
    IN_BATCH: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """part[split, i] = over this split's passages: (lse over the candidates, target score, lse over the own
    group, sum_g t_ig s_i,group+g). A split holding none of a row's group gives -inf / 0 there."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < B
    target = tl.load(targets_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    group_lo = (target // G) * G
    group_hi = group_lo + G
    # The block's own groups span the columns [own_lo, own_hi): only tiles that meet them hold a target or, with
    # teacher scores, a group entry.
    own_lo = tl.min(tl.where(m_mask, group_lo, P), axis=0)
    own_hi = tl.max(tl.where(m_mask, group_hi, 0), axis=0)
    if IN_BATCH:
        col_lo = split * cols_per_split
        col_hi = tl.minimum(col_lo + cols_per_split, P)
    else:  # the block's rows only ever look at their own groups (one split)
        col_lo = own_lo
        col_hi = own_hi

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
        s = _score_tile(
            q_ptr,
            p_ptr,
            offs_m,
            m_mask,
            offs_n,
            n_mask,
            D,
            stride_qm,
            stride_pn,
            inv_tau,
            DOT_FP32,
            FP32_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
        )
        in_group = (offs_n[None, :] >= group_lo[:, None]) & (offs_n[None, :] < group_hi[:, None])
        if IN_BATCH:
            cand = n_mask[None, :]
        else:
            cand = in_group & n_mask[None, :]
        s_c = tl.where(cand, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_c, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s_c - m_new[:, None]), axis=1)
        m_i = m_new
        if HAS_TEACHER:
            # Only where the tile meets the block's groups: in-batch, most tiles miss them all, and the group's
            # online log-sum-exp (a second exp of the whole tile), the teacher tile's load and the target's
            # lookup would be spent on nothing there.
            if (n0 < own_hi) & (n0 + BLOCK_N > own_lo):
                pos += tl.sum(tl.where(offs_n[None, :] == target[:, None], s, 0.0), axis=1)
                s_g = tl.where(in_group & n_mask[None, :], s, float("-inf"))
                mg_new = tl.maximum(mg_i, tl.max(s_g, axis=1))
                lg_i = lg_i * tl.exp(mg_i - mg_new) + tl.sum(tl.exp(s_g - mg_new[:, None]), axis=1)
                mg_i = mg_new
                t = tl.load(
                    teacher_ptr + offs_m[:, None].to(tl.int64) * stride_tm + (offs_n[None, :] - group_lo[:, None]),
                    mask=in_group & n_mask[None, :] & m_mask[:, None],
                    other=0.0,
                )
                kd += tl.sum(t * tl.where(in_group, s, 0.0), axis=1)
        else:
            pos += tl.sum(tl.where(offs_n[None, :] == target[:, None], s, 0.0), axis=1)
    base = part_ptr + split * stride_ps + offs_m.to(tl.int64) * stride_pm
    tl.store(base + 0, m_i + tl.log(l_i), mask=m_mask)
    tl.store(base + 1, pos, mask=m_mask)
    if HAS_TEACHER:
        tl.store(base + 2, mg_i + tl.log(lg_i), mask=m_mask)
        tl.store(base + 3, kd, mask=m_mask)


@triton.jit
def _coef_tile(
    s,
    offs_m,
    m_mask,
    offs_n,
    n_mask,
    target,
    group_lo,
    group_hi,
    lse,
    lse_g,
    teacher_ptr,
    stride_tm,
    row_scale,
    IN_BATCH: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
):
    """d loss / d s for one tile: row_scale * (softmax - onehot(target)) (+ group softmax - teacher)."""
    in_group = (offs_n[None, :] >= group_lo[:, None]) & (offs_n[None, :] < group_hi[:, None])
    valid = m_mask[:, None] & n_mask[None, :]
    if IN_BATCH:
        cand = valid
    else:
        cand = valid & in_group
    c = tl.where(cand, tl.exp(s - lse[:, None]), 0.0)
    if HAS_TEACHER:
        # The targets and group entries of the tile's rows lie in their groups' columns [own_lo, own_hi); a tile
        # that misses them (most tiles, in-batch) skips the teacher tile's load and the group softmax's exp.
        own_hi = tl.max(tl.where(m_mask, group_hi, 0), axis=0)
        own_lo = tl.min(tl.where(m_mask, group_lo, own_hi), axis=0)
        if (tl.min(offs_n, axis=0) < own_hi) & (tl.max(offs_n, axis=0) >= own_lo):
            c -= tl.where((offs_n[None, :] == target[:, None]) & valid, 1.0, 0.0)
            t = tl.load(
                teacher_ptr + offs_m[:, None].to(tl.int64) * stride_tm + (offs_n[None, :] - group_lo[:, None]),
                mask=in_group & valid,
                other=0.0,
            )
            c += tl.where(in_group & valid, tl.exp(s - lse_g[:, None]) - t, 0.0)
    else:
        c -= tl.where((offs_n[None, :] == target[:, None]) & valid, 1.0, 0.0)
    return c * row_scale[:, None]


@triton.jit
def _contrastive_coef_kernel(
    q_ptr,
    p_ptr,
    targets_ptr,
    teacher_ptr,
    stats_ptr,
    grad_ptr,
    c_ptr,
    B,
    P,
    D,
    G,
    inv_tau,
    col0,
    cols,
    stride_qm,
    stride_pn,
    stride_tm,
    stride_sm,
    stride_cm,
    HAS_TEACHER: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """c[i, j - col0] = row_grad_i / tau * d loss_i / d s_ij for all query rows and the chunk's passage columns
    [col0, col0 + cols) of the in-batch loss, in c's dtype."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < B
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = col0 + offs_c
    n_mask = (offs_c < cols) & (offs_n < P)
    target = tl.load(targets_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    group_lo = (target // G) * G
    group_hi = group_lo + G
    base = stats_ptr + offs_m.to(tl.int64) * stride_sm
    lse = tl.load(base + 0, mask=m_mask, other=0.0)
    lse_g = tl.load(base + 2, mask=m_mask & HAS_TEACHER, other=0.0)
    row_scale = tl.load(grad_ptr + offs_m, mask=m_mask, other=0.0) * inv_tau
    s = _score_tile(
        q_ptr,
        p_ptr,
        offs_m,
        m_mask,
        offs_n,
        n_mask,
        D,
        stride_qm,
        stride_pn,
        inv_tau,
        DOT_FP32,
        FP32_PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
    )
    c = _coef_tile(
        s,
        offs_m,
        m_mask,
        offs_n,
        n_mask,
        target,
        group_lo,
        group_hi,
        lse,
        lse_g,
        teacher_ptr,
        stride_tm,
        row_scale,
        True,
        HAS_TEACHER,
    )
    tl.store(
        c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_c[None, :],
        c.to(c_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def _contrastive_dq_kernel(
    q_ptr,
    p_ptr,
    targets_ptr,
    teacher_ptr,
    stats_ptr,
    grad_ptr,
    dq_ptr,
    B,
    P,
    D,
    G,
    inv_tau,
    stride_qm,
    stride_pn,
    stride_tm,
    stride_sm,
    stride_dm,
    IN_BATCH: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
        s = _score_tile(
            q_ptr,
            p_ptr,
            offs_m,
            m_mask,
            offs_n,
            n_mask,
            D,
            stride_qm,
            stride_pn,
            inv_tau,
            DOT_FP32,
            FP32_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
        )
        c = _coef_tile(
            s,
            offs_m,
            m_mask,
            offs_n,
            n_mask,
            target,
            group_lo,
            group_hi,
            lse,
            lse_g,
            teacher_ptr,
            stride_tm,
            row_scale,
            IN_BATCH,
            HAS_TEACHER,
        )
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            p = tl.load(
                p_ptr + offs_n[:, None].to(tl.int64) * stride_pn + offs_d[None, :],
                mask=n_mask[:, None] & d_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            slab = dq_ptr + offs_m[:, None].to(tl.int64) * stride_dm + offs_d[None, :]
            both = m_mask[:, None] & d_mask[None, :]
            acc = tl.load(slab, mask=both, other=0.0)
            if DOT_FP32:
                acc = tl.dot(c, p, acc, input_precision=FP32_PRECISION)
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
    q_ptr,
    p_ptr,
    targets_ptr,
    teacher_ptr,
    stats_ptr,
    grad_ptr,
    dp_ptr,
    B,
    P,
    D,
    G,
    inv_tau,
    stride_qm,
    stride_pn,
    stride_tm,
    stride_sm,
    stride_dn,
    IN_BATCH: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
            s = _score_tile(
                q_ptr,
                p_ptr,
                offs_m,
                m_mask,
                offs_n,
                n_mask,
                D,
                stride_qm,
                stride_pn,
                inv_tau,
                DOT_FP32,
                FP32_PRECISION,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
            )
            c = _coef_tile(
                s,
                offs_m,
                m_mask,
                offs_n,
                n_mask,
                target,
                group_lo,
                group_hi,
                lse,
                lse_g,
                teacher_ptr,
                stride_tm,
                row_scale,
                IN_BATCH,
                HAS_TEACHER,
            )
            c_t = tl.trans(c)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D
                q = tl.load(
                    q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :],
                    other=0.0,
                ).to(tl.float32)
                slab = dp_ptr + offs_n[:, None].to(tl.int64) * stride_dn + offs_d[None, :]
                both = n_mask[:, None] & d_mask[None, :]
                acc = tl.load(slab, mask=both, other=0.0)
                if DOT_FP32:
                    acc = tl.dot(c_t, q, acc, input_precision=FP32_PRECISION)
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
def _config(dtype: torch.dtype, d: int, device: torch.device = torch.device("cpu"), teacher: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) of the score-tile kernels."""
    if _INTERPRET:
        return 16, 16, min(32, max(16, next_power_of_2(d))), 1, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
    if major >= 9 and not teacher:
        # H100, B=4096 P=32768 D=1024 (bench/tune_contrastive.py, bench/results/tune_contrastive-h100.log):
        # the forward's score GEMM runs at 400 TFLOP/s with 256 x 128 tiles (0.69 ms, 128 x 128: 0.88 ms).
        # Its 3 stages need 144 KiB of shared memory, which Hopper has.
        return 256, 128, 64, 8, 3
    if major >= 8:
        # With teacher scores the kernels carry a second online log-sum-exp and the teacher tile: 256-row
        # tiles ran 5x slower on the H100 (bench/results/contrastive-h100.json, train_kd), 128 rows do not.
        return 128, 128, 64, 8, 3
    return 64, 128, 64, 4, 2


_BAND_CONFIG_INTERPRET = (16, 16, 16, 1, 1)


# Entries of one backward chunk of coefficients [B, P_chunk]: 2^24 is 32 MiB in bf16, a sixteenth of the
# fp32 [B, P] that torch holds at B=4096, P=32768, and wide enough that each chunk's GEMMs stay efficient.
CHUNK_ENTRIES = 1 << 24


def contrastive_forward(q, p, targets, teacher, config: ContrastiveConfig):
    """Per-row statistics ``[B, 4]`` fp32: (lse over candidates, target score, lse over own group, teacher-
    weighted sum of own-group scores); the last two are zero without teacher scores."""
    temperature, group_size, in_batch = config.temperature, config.group_size, config.in_batch
    b, d = q.shape
    n = p.shape[0]
    block_m, block_n, block_d, warps, stages = _config(q.dtype, d, q.device, teacher is not None)
    row_blocks = cdiv(b, block_m)
    splits = 1
    if in_batch:  # split the passages until the grid covers every SM twice
        splits = max(1, min(cdiv(n, block_n), cdiv(2 * num_sms(q.device), max(row_blocks, 1))))
    cols_per_split = cdiv(cdiv(n, splits), block_n) * block_n
    splits = max(1, cdiv(n, cols_per_split))
    part = torch.zeros((splits, b, 4), dtype=torch.float32, device=q.device)
    if b:
        _contrastive_fwd_kernel[(row_blocks, splits)](
            q,
            p,
            targets,
            teacher,
            part,
            b,
            n,
            d,
            group_size,
            1.0 / temperature,
            cols_per_split,
            q.stride(0),
            p.stride(0),
            teacher.stride(0) if teacher is not None else 0,
            part.stride(0),
            part.stride(1),
            IN_BATCH=in_batch,
            HAS_TEACHER=teacher is not None,
            DOT_FP32=dot_fp32(q.dtype),
            FP32_PRECISION=dot_precision(q.dtype),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            num_warps=warps,
            num_stages=stages,
        )
    if splits == 1:
        return part[0]
    stats = torch.zeros((b, 4), dtype=torch.float32, device=q.device)
    stats[:, 0] = torch.logsumexp(part[:, :, 0], dim=0)
    stats[:, 1] = part[:, :, 1].sum(0)
    if teacher is not None:
        stats[:, 2] = torch.logsumexp(part[:, :, 2], dim=0)
        stats[:, 3] = part[:, :, 3].sum(0)
    return stats


def contrastive_backward(
    q, p, targets, teacher, stats, row_grad, config: ContrastiveConfig, need_q: bool, need_p: bool
):
    """``(dq, dp)`` in q's and p's dtypes for per-row upstream gradients ``row_grad`` ``[B]`` fp32."""
    backward = _backward_in_batch if config.in_batch else _backward_own_group
    return backward(q, p, targets, teacher, stats, row_grad, config.temperature, config.group_size, need_q, need_p)


def _backward_in_batch(q, p, targets, teacher, stats, row_grad, temperature, group_size, need_q, need_p):
    b, d = q.shape
    n = p.shape[0]
    block_m, block_n, block_d, warps, stages = _config(q.dtype, d, q.device, teacher is not None)
    # Half inputs: the coefficients are rounded once to the input dtype, as flash attention does with its
    # probabilities before the dV and dQ products; the products accumulate in fp32. The interpreter keeps
    # fp32 coefficients (its bf16 stores are not to be trusted).
    c_dtype = torch.float32 if (_INTERPRET or q.dtype == torch.float32) else q.dtype
    chunk = max(block_n, (CHUNK_ENTRIES // max(b, 1)) // block_n * block_n)
    dq = torch.zeros((b, d), dtype=torch.float32, device=q.device) if need_q else None
    dp = torch.empty((n, d), dtype=p.dtype, device=p.device) if need_p else None
    if need_p and b == 0:
        dp.zero_()
    if b == 0 or n == 0:
        return (dq.to(q.dtype) if need_q else None), dp
    c = torch.empty((b, min(chunk, n)), dtype=c_dtype, device=q.device)
    t_stride = teacher.stride(0) if teacher is not None else 0
    for col0 in range(0, n, chunk):
        cols = min(chunk, n - col0)
        c_view = c[:, :cols]
        _contrastive_coef_kernel[(cdiv(b, block_m), cdiv(cols, block_n))](
            q,
            p,
            targets,
            teacher,
            stats,
            row_grad,
            c_view,
            b,
            n,
            d,
            group_size,
            1.0 / temperature,
            col0,
            cols,
            q.stride(0),
            p.stride(0),
            t_stride,
            stats.stride(0),
            c_view.stride(0),
            HAS_TEACHER=teacher is not None,
            DOT_FP32=dot_fp32(q.dtype),
            FP32_PRECISION=dot_precision(q.dtype),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            num_warps=warps,
            num_stages=stages,
        )
        p_chunk = p[col0 : col0 + cols]
        if need_p:
            if c_dtype == p.dtype:
                torch.mm(c_view.t(), q, out=dp[col0 : col0 + cols])
            else:
                dp[col0 : col0 + cols] = (c_view.t() @ q.to(c_dtype)).to(p.dtype)
        if need_q:
            dq += matmul_acc(c_view, p_chunk.to(c_dtype) if c_dtype != p.dtype else p_chunk, torch.float32)
    return (dq.to(q.dtype) if need_q else None), dp


def _backward_own_group(q, p, targets, teacher, stats, row_grad, temperature, group_size, need_q, need_p):
    b, d = q.shape
    n = p.shape[0]
    # The band's work is O(B * G * D): small tiles suffice, and the fp32 slab tiles of the dq / dp kernels
    # would not fit in shared memory at the in-batch tile shapes (288 KiB at 256 x 128 on the H100).
    block_m, block_n, block_d, warps, stages = (
        _BAND_CONFIG_INTERPRET
        if _INTERPRET
        else ((32, 32, 32, 4, 2) if q.dtype == torch.float32 else (64, 64, 64, 4, 2))
    )
    common = dict(
        IN_BATCH=False,
        HAS_TEACHER=teacher is not None,
        DOT_FP32=dot_fp32(q.dtype),
        FP32_PRECISION=dot_precision(q.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=warps,
        num_stages=stages,
    )
    t_stride = teacher.stride(0) if teacher is not None else 0
    dq = dp = None
    if need_q:
        dq = torch.zeros((b, d), dtype=torch.float32, device=q.device)
        if b:
            _contrastive_dq_kernel[(cdiv(b, block_m),)](
                q,
                p,
                targets,
                teacher,
                stats,
                row_grad,
                dq,
                b,
                n,
                d,
                group_size,
                1.0 / temperature,
                q.stride(0),
                p.stride(0),
                t_stride,
                stats.stride(0),
                dq.stride(0),
                **common,
            )
        dq = dq.to(q.dtype)
    if need_p:
        dp = torch.zeros((n, d), dtype=torch.float32, device=p.device)
        if n:
            _contrastive_dp_kernel[(cdiv(n, block_n),)](
                q,
                p,
                targets,
                teacher,
                stats,
                row_grad,
                dp,
                b,
                n,
                d,
                group_size,
                1.0 / temperature,
                q.stride(0),
                p.stride(0),
                t_stride,
                stats.stride(0),
                dp.stride(0),
                **common,
            )
        dp = dp.to(p.dtype)
    return dq, dp
