"""varlen_attention: attention over a flat stream of packed segments, where a segment may read a shared prefix.

The stream holds ``M`` real tokens cut into ``S`` segments by ``cu_seqlens``. Segment ``s`` attends to all of
the keys of its prefix segment ``prefix[s]`` (if any), then to its own keys (causally, or all of them), so a
document that shares its template and query with others sees exactly what it would see unshared, while the
prefix's tokens are stored and computed once.

Forward (FlashAttention-2): program ``(i, s, h)`` owns queries ``[i*BLOCK_M, (i+1)*BLOCK_M)`` of segment ``s``
for query head ``h`` (grid sized by ``max_seqlen``; programs past their segment's end return at once). It
streams the prefix's key blocks (bounds mask only), then its own key blocks (causal: up to the block
diagonal), keeping an online softmax in base 2 (log2 e folded into the scale) with fp32 accumulators, and
writes the output and the natural log-sum-exp ``[Hq, M]`` (fp32) for backward. Grouped-query attention: query
head ``h`` reads kv head ``h // (Hq // Hkv)``.

Backward (FlashAttention-2, recomputing the probabilities from the saved log-sum-exp): a small kernel writes
``delta = rowsum(dO * O)`` in fp32 ``[Hq, M]``; the dQ kernel walks the same key blocks as the forward; the
dK/dV kernel owns one key block of one segment and one kv head, loops over that head's group of query heads
and over every query that reads those keys: the segment's own queries (causal: from the key block on) and,
when the segment is somebody's prefix, all queries of every segment naming it (a CSR list built on the
device from ``prefix``). Every program writes only its own rows: no atomics, any dtype, deterministic.

On GPU the dots run on the input dtype (tensor cores) with fp32 accumulation; fp32 inputs and the
interpreter (whose bf16 ``tl.dot`` is silently wrong) take fp32 operands (``fastrank.common.dot_fp32``).
``head_dim`` may be any size up to 256: it is padded to a power of two with masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrank.common import VarlenAttentionConfig, cdiv, dot_fp32, is_interpreting, next_power_of_2

_INTERPRET = is_interpreting()

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# ------------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    """tanh from exp (no libdevice): stable for any |x| (exp(-2|x|) underflows to 0, never overflows)."""
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits(qk, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Scores in base-2 units, ``s * log2(e)`` with ``s = scale * qk`` (or ``softcap * tanh(scale * qk /
    softcap)``), and the tanh (for the softcap's derivative; ``qk`` itself when there is no softcap)."""
    if HAS_SOFTCAP:
        t = _tanh(qk * (scale / softcap))
        s = t * (softcap * LOG2E)
    else:
        t = qk
        s = qk * (scale * LOG2E)
    return s, t


@triton.jit
def _segment(cu_seqlens_ptr, seg):
    start = tl.load(cu_seqlens_ptr + seg).to(tl.int64)
    end = tl.load(cu_seqlens_ptr + seg + 1).to(tl.int64)
    return start, end


@triton.jit
def _prefix_range(cu_seqlens_ptr, prefix_ptr, seg, S):
    """The token range [lo, hi) of segment ``seg``'s prefix; empty when it has none (-1, or an index that is
    not another segment: the host checks refuse those, the kernel only stays in bounds)."""
    p = tl.load(prefix_ptr + seg).to(tl.int64)
    ok = (p >= 0) & (p < S) & (p != seg)
    p = tl.where(ok, p, 0)
    lo, hi = _segment(cu_seqlens_ptr, p)
    return tl.where(ok, lo, 0), tl.where(ok, hi, 0)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b accumulated in fp32: exact fp32 operands, or the operands' own half dtype (tensor cores)."""
    if DOT_FP32:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    offs_m,
    lo,
    hi,
    stride_km,
    stride_vm,
    D,
    scale,
    softcap,
    CAUSAL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Fold keys [lo, hi) into the online softmax of the query block (rows ``offs_m``)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        kt = tl.load(
            k_base + offs_n[None, :].to(tl.int64) * stride_km + offs_d[:, None],
            mask=d_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        v = tl.load(
            v_base + offs_n[:, None].to(tl.int64) * stride_vm + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s, _t = _logits(_dot(q, kt, DOT_FP32), scale, softcap, HAS_SOFTCAP)
        valid = n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _varlen_attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    cu_seqlens_ptr,
    prefix_ptr,
    S,
    D,
    GROUP,
    scale,
    softcap,
    stride_qm,
    stride_qh,
    stride_km,
    stride_kh,
    stride_vm,
    stride_vh,
    stride_om,
    stride_oh,
    stride_lh,
    CAUSAL: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (i, s, h): o and lse of queries [i*BLOCK_M, (i+1)*BLOCK_M) of segment s, query head h."""
    pid_m = tl.program_id(0)
    seg = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    start, end = _segment(cu_seqlens_ptr, seg)
    m0 = start + pid_m * BLOCK_M
    if m0 >= end:
        return
    hk = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(
        q_ptr + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = k_ptr + hk * stride_kh
    v_base = v_ptr + hk * stride_vh
    # -1e30 rather than -inf keeps (m_i - m_new) finite before the first real score.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if HAS_PREFIX:
        plo, phi = _prefix_range(cu_seqlens_ptr, prefix_ptr, seg, S)
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            offs_m,
            plo,
            phi,
            stride_km,
            stride_vm,
            D,
            scale,
            softcap,
            False,
            HAS_SOFTCAP,
            DOT_FP32,
            BLOCK_N,
            BLOCK_D,
        )
    hi = end
    if CAUSAL:
        hi = tl.minimum(end, m0 + BLOCK_M)
    acc, l_i, m_i = _fwd_inner(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        offs_m,
        start,
        hi,
        stride_km,
        stride_vm,
        D,
        scale,
        softcap,
        CAUSAL,
        HAS_SOFTCAP,
        DOT_FP32,
        BLOCK_N,
        BLOCK_D,
    )
    out = acc / l_i[:, None]
    tl.store(
        o_ptr + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )
    tl.store(lse_ptr + h * stride_lh + offs_m, (m_i + tl.log2(l_i)) * LN2, mask=m_mask)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------
@triton.jit
def _varlen_attn_delta_kernel(
    o_ptr,
    do_ptr,
    delta_ptr,
    M,
    D,
    stride_om,
    stride_oh,
    stride_dom,
    stride_doh,
    stride_lh,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (i, h): delta[h, rows of block i] = rowsum(dO * O) in fp32."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
    o = tl.load(o_ptr + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + h * stride_lh + offs_m, delta, mask=offs_m < M)


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    offs_m,
    lo,
    hi,
    stride_km,
    stride_vm,
    D,
    scale,
    softcap,
    CAUSAL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Add to dq (unscaled) the contributions of keys [lo, hi)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        kt = tl.load(
            k_base + offs_n[None, :].to(tl.int64) * stride_km + offs_d[:, None],
            mask=d_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        vt = tl.load(
            v_base + offs_n[None, :].to(tl.int64) * stride_vm + offs_d[:, None],
            mask=d_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s, t = _logits(_dot(q, kt, DOT_FP32), scale, softcap, HAS_SOFTCAP)
        valid = n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, vt, DOT_FP32)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), DOT_FP32)
    return dq


@triton.jit
def _varlen_attn_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    cu_seqlens_ptr,
    prefix_ptr,
    S,
    D,
    GROUP,
    scale,
    softcap,
    stride_qm,
    stride_qh,
    stride_km,
    stride_kh,
    stride_vm,
    stride_vh,
    stride_dom,
    stride_doh,
    stride_dqm,
    stride_dqh,
    stride_lh,
    CAUSAL: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (i, s, h): dq of queries [i*BLOCK_M, (i+1)*BLOCK_M) of segment s, query head h."""
    pid_m = tl.program_id(0)
    seg = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    start, end = _segment(cu_seqlens_ptr, seg)
    m0 = start + pid_m * BLOCK_M
    if m0 >= end:
        return
    hk = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    md_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(do_ptr + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=md_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(lse_ptr + h * stride_lh + offs_m, mask=m_mask, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + h * stride_lh + offs_m, mask=m_mask, other=0.0)
    k_base = k_ptr + hk * stride_kh
    v_base = v_ptr + hk * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if HAS_PREFIX:
        plo, phi = _prefix_range(cu_seqlens_ptr, prefix_ptr, seg, S)
        dq = _dq_inner(
            dq,
            q,
            do,
            lse2,
            delta,
            k_base,
            v_base,
            offs_m,
            plo,
            phi,
            stride_km,
            stride_vm,
            D,
            scale,
            softcap,
            False,
            HAS_SOFTCAP,
            DOT_FP32,
            BLOCK_N,
            BLOCK_D,
        )
    hi = end
    if CAUSAL:
        hi = tl.minimum(end, m0 + BLOCK_M)
    dq = _dq_inner(
        dq,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        offs_m,
        start,
        hi,
        stride_km,
        stride_vm,
        D,
        scale,
        softcap,
        CAUSAL,
        HAS_SOFTCAP,
        DOT_FP32,
        BLOCK_N,
        BLOCK_D,
    )
    tl.store(
        dq_ptr + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
        (dq * scale).to(dq_ptr.dtype.element_ty),
        mask=md_mask,
    )


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    offs_n,
    lo,
    hi,
    stride_qm,
    stride_dom,
    D,
    scale,
    softcap,
    CAUSAL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Add to dk (unscaled) and dv the contributions of queries [lo, hi) of one query head, working on the
    transposed score block ``[BLOCK_N, BLOCK_M]``."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < hi
        md_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :], mask=md_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :], mask=md_mask, other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(lse_base + offs_m, mask=m_mask, other=0.0) * LOG2E
        delta = tl.load(delta_base + offs_m, mask=m_mask, other=0.0)
        st, tt = _logits(_dot(k, tl.trans(q), DOT_FP32), scale, softcap, HAS_SOFTCAP)
        valid = m_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_m[None, :] >= offs_n[:, None])
        pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0)
        dv += _dot(pt.to(do.dtype), do, DOT_FP32)
        dpt = _dot(v, tl.trans(do), DOT_FP32)
        dst = pt * (dpt - delta[None, :])
        if HAS_SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dk += _dot(dst.to(q.dtype), q, DOT_FP32)
    return dk, dv


@triton.jit
def _varlen_attn_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    cu_seqlens_ptr,
    readers_ptr,
    readers_idx_ptr,
    D,
    GROUP,
    scale,
    softcap,
    stride_qm,
    stride_qh,
    stride_km,
    stride_kh,
    stride_vm,
    stride_vh,
    stride_dom,
    stride_doh,
    stride_dkm,
    stride_dkh,
    stride_dvm,
    stride_dvh,
    stride_lh,
    CAUSAL: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (j, s, hk): dk and dv of keys [j*BLOCK_N, (j+1)*BLOCK_N) of segment s, kv head hk, summed over
    the kv head's query heads and every query that reads these keys."""
    pid_n = tl.program_id(0)
    seg = tl.program_id(1).to(tl.int64)
    hk = tl.program_id(2).to(tl.int64)
    start, end = _segment(cu_seqlens_ptr, seg)
    n0 = start + pid_n * BLOCK_N
    if n0 >= end:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < end
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    nd_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + hk * stride_kh + offs_n[:, None] * stride_km + offs_d[None, :], mask=nd_mask, other=0.0)
    v = tl.load(v_ptr + hk * stride_vh + offs_n[:, None] * stride_vm + offs_d[None, :], mask=nd_mask, other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    q_lo = start
    if CAUSAL:
        q_lo = n0  # queries before the block see none of its keys
    r_lo = 0
    r_hi = 0
    if HAS_PREFIX:
        r_lo = tl.load(readers_ptr + seg).to(tl.int64)
        r_hi = tl.load(readers_ptr + seg + 1).to(tl.int64)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = q_ptr + h * stride_qh
        do_base = do_ptr + h * stride_doh
        lse_base = lse_ptr + h * stride_lh
        delta_base = delta_ptr + h * stride_lh
        dk, dv = _dkdv_inner(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            offs_n,
            q_lo,
            end,
            stride_qm,
            stride_dom,
            D,
            scale,
            softcap,
            CAUSAL,
            HAS_SOFTCAP,
            DOT_FP32,
            BLOCK_M,
            BLOCK_D,
        )
        if HAS_PREFIX:
            for r in range(r_lo, r_hi):  # the segments reading this one as their prefix: all their queries
                reader = tl.load(readers_idx_ptr + r).to(tl.int64)
                a, b = _segment(cu_seqlens_ptr, reader)
                dk, dv = _dkdv_inner(
                    dk,
                    dv,
                    k,
                    v,
                    q_base,
                    do_base,
                    lse_base,
                    delta_base,
                    offs_n,
                    a,
                    b,
                    stride_qm,
                    stride_dom,
                    D,
                    scale,
                    softcap,
                    False,
                    HAS_SOFTCAP,
                    DOT_FP32,
                    BLOCK_M,
                    BLOCK_D,
                )
    tl.store(
        dk_ptr + hk * stride_dkh + offs_n[:, None] * stride_dkm + offs_d[None, :],
        (dk * scale).to(dk_ptr.dtype.element_ty),
        mask=nd_mask,
    )
    tl.store(
        dv_ptr + hk * stride_dvh + offs_n[:, None] * stride_dvm + offs_d[None, :],
        dv.to(dv_ptr.dtype.element_ty),
        mask=nd_mask,
    )


# ------------------------------------------------------------------------------------------------
# drivers
# ------------------------------------------------------------------------------------------------
def _blocks(head_dim: int, kind: str, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) of the forward (``fwd``), dQ (``dq``) or dK/dV (``dkdv``) kernel."""
    block_d = max(16, next_power_of_2(head_dim))
    if _INTERPRET:  # the interpreter pays per program and per loop trip, not per element: small blocks
        return 16, 16, block_d, 1
    if dtype == torch.float32:  # exact fp32 dots run on the FMA units: small tiles keep the registers in bounds
        return 32, 32, block_d, 4 if block_d <= 64 else 8
    if kind == "fwd":
        return (64, 64, block_d, 4) if block_d <= 128 else (32, 32, block_d, 4)
    if kind == "dq":
        if block_d <= 64:
            return 64, 32, block_d, 4
        return (64, 32, block_d, 8) if block_d <= 128 else (32, 32, block_d, 8)
    if block_d <= 64:
        return 32, 64, block_d, 4
    return (32, 64, block_d, 8) if block_d <= 128 else (16, 32, block_d, 8)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _softcap(config: VarlenAttentionConfig) -> float:
    return float(config.softcap) if config.softcap is not None else 1.0


def readers_csr(prefix: torch.Tensor, num_segments: int):
    """Which segments read each segment as their prefix, as a CSR on the device with no host read:
    ``(ptr int32 [S + 1], idx int32 [S])``; the readers of segment p are ``idx[ptr[p]:ptr[p + 1]]``.

    Entries that name no other segment (-1, out of range, the segment itself) read nothing, exactly as the
    forward kernel treats them."""
    s = num_segments
    p = prefix.long()
    own = torch.arange(s, device=p.device)
    key = torch.where((p >= 0) & (p < s) & (p != own), p, s)
    counts = torch.zeros(s + 1, dtype=torch.int64, device=p.device).scatter_add_(0, key, torch.ones_like(key))
    ptr = torch.zeros(s + 1, dtype=torch.int32, device=p.device)
    ptr[1:] = counts[:s].cumsum(0)
    idx = torch.argsort(key, stable=True).to(torch.int32)  # readers grouped by prefix; non-readers last
    return ptr, idx


def varlen_attention_forward(q, k, v, cu_seqlens, prefix, config: VarlenAttentionConfig, needs_grad: bool = False):
    """Launch the forward kernel. Returns ``(out [M, Hq, D] in q's dtype, lse fp32 [Hq, M])``; the log-sum-exp
    is what backward recomputes the probabilities from, whether or not a gradient is needed."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    m, hq, d = q.shape
    hkv = k.shape[1]
    s = cu_seqlens.shape[0] - 1
    out = torch.empty((m, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, m), dtype=torch.float32, device=q.device)
    block_m, block_n, block_d, warps = _blocks(d, "fwd", q.dtype)
    if m == 0 or s == 0 or config.max_seqlen <= 0:
        return out, lse
    _varlen_attn_fwd_kernel[(cdiv(config.max_seqlen, block_m), s, hq)](
        q,
        k,
        v,
        out,
        lse,
        cu_seqlens,
        prefix if prefix is not None else cu_seqlens,
        s,
        d,
        hq // hkv,
        float(config.scale),
        _softcap(config),
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        CAUSAL=config.causal,
        HAS_PREFIX=prefix is not None,
        HAS_SOFTCAP=config.softcap is not None,
        DOT_FP32=dot_fp32(q.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return out, lse


def varlen_attention_backward(grad_out, q, k, v, cu_seqlens, prefix, out, lse, config: VarlenAttentionConfig):
    """Gradients ``(dq, dk, dv)`` in the inputs' dtypes, from the saved output and log-sum-exp."""
    q, k, v, do, out = (_last_dim_contiguous(x) for x in (q, k, v, grad_out, out))
    m, hq, d = q.shape
    hkv = k.shape[1]
    s = cu_seqlens.shape[0] - 1
    dq = torch.empty((m, hq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((m, hkv, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((m, hkv, d), dtype=v.dtype, device=v.device)
    if m == 0 or s == 0 or config.max_seqlen <= 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((hq, m), dtype=torch.float32, device=q.device)  # [Hq, M], like lse
    block_d = max(16, next_power_of_2(d))
    block_rows = 16 if _INTERPRET else max(1, 4096 // block_d)
    _varlen_attn_delta_kernel[(cdiv(m, block_rows), hq)](
        out,
        do,
        delta,
        m,
        d,
        out.stride(0),
        out.stride(1),
        do.stride(0),
        do.stride(1),
        delta.stride(0),
        BLOCK_M=block_rows,
        BLOCK_D=block_d,
        num_warps=4,
    )
    has_prefix = prefix is not None
    if has_prefix:
        readers_ptr, readers_idx = readers_csr(prefix, s)
    else:
        readers_ptr = readers_idx = cu_seqlens
    common = dict(
        CAUSAL=config.causal,
        HAS_PREFIX=has_prefix,
        HAS_SOFTCAP=config.softcap is not None,
        DOT_FP32=dot_fp32(q.dtype),
    )
    scale, softcap = float(config.scale), _softcap(config)
    block_m, block_n, block_d, warps = _blocks(d, "dq", q.dtype)
    _varlen_attn_dq_kernel[(cdiv(config.max_seqlen, block_m), s, hq)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        cu_seqlens,
        prefix if has_prefix else cu_seqlens,
        s,
        d,
        hq // hkv,
        scale,
        softcap,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        do.stride(0),
        do.stride(1),
        dq.stride(0),
        dq.stride(1),
        lse.stride(0),
        **common,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    block_m, block_n, block_d, warps = _blocks(d, "dkdv", q.dtype)
    _varlen_attn_dkdv_kernel[(cdiv(config.max_seqlen, block_n), s, hkv)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        cu_seqlens,
        readers_ptr,
        readers_idx,
        d,
        hq // hkv,
        scale,
        softcap,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        do.stride(0),
        do.stride(1),
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        lse.stride(0),
        **common,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return dq, dk, dv
