"""score_head: scoring-position gather + sliced LM head, fused.

A causal-LM reranker needs, per sequence, the logits of K (1-16) vocabulary rows at one position. The
unfused forward projects every position onto the whole vocabulary: ``[N, T, V]`` logits, 10 GB in bf16
for N=64, T=512 on Qwen2.5 (V=151,936). Here one program per sequence finds the scoring row (from the
attention mask, ``positions`` or ``cu_seqlens``), reads that one hidden row and the K weight rows, and
writes K fp32 logits (optionally combined, e.g. yes minus no). Memory traffic is ``N*H + K*H`` elements.

The optional full-vocabulary log-sum-exp (for exact softmax probabilities of the K tokens) is a tiled
GEMM with an online log-sum-exp per row: each program owns ``BLOCK_N`` rows and a slice of the
vocabulary, keeps a running max and sum in fp32, and writes one partial value per (row, slice); the
``[N, V]`` scores never reach memory.

Backward: one program per sequence writes ``dh = g_K @ W[ids]`` into the scoring row of a zero gradient;
one program per H block reduces ``dW[ids] = g_K^T @ h`` over the sequences (no atomics). When the
log-sum-exp is part of the loss, its full-vocabulary backward runs chunk by chunk: a kernel rebuilds
the softmax of one vocabulary chunk from the saved fp32 log-sum-exp, and two cuBLAS GEMMs turn it into
the hidden and weight gradients; only one ``[N, chunk]`` block exists at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrank.common import (
    ScoreHeadConfig,
    cached_device_tensor,
    cdiv,
    dot_fp32,
    is_interpreting,
    matmul_acc,
    next_power_of_2,
    num_sms,
)

_INTERPRET = is_interpreting()


# ------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _score_head_fwd_kernel(
    # data pointers
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    ids_ptr,
    combine_ptr,
    mask_ptr,
    positions_ptr,
    cu_seqlens_ptr,
    out_ptr,
    rows_ptr,
    gathered_ptr,
    # sizes
    N,
    T,
    H,
    K,
    C,
    # strides
    stride_hn,
    stride_ht,
    stride_hh,
    stride_wv,
    stride_wh,
    stride_mn,
    stride_mt,
    stride_on,
    stride_gn,
    # feature flags
    HAS_BIAS: tl.constexpr,
    HAS_COMBINE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_POSITIONS: tl.constexpr,
    PACKED: tl.constexpr,
    STORE_GATHERED: tl.constexpr,
    # blocks
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program per sequence n.

    rows_ptr[n] receives the scoring row (an index into T, or into M when PACKED), or -1 when the
    sequence has no real token, -2 when ``positions[n]`` lies outside it, -3 when cu_seqlens is not a
    partition of the M packed rows. out_ptr[n] receives the K
    logits (or C combinations) in fp32; gathered_ptr[n] a copy of the scoring row when STORE_GATHERED.
    """
    n = tl.program_id(0).to(tl.int64)

    # ---- the scoring row -----------------------------------------------------------------------
    if PACKED:
        # T is M here. cu_seqlens must start at 0, never decrease and end at M, or reads would stray.
        start = tl.load(cu_seqlens_ptr + n).to(tl.int64)
        end = tl.load(cu_seqlens_ptr + n + 1).to(tl.int64)
        length = end - start
        consistent = (start >= 0) & (length >= 0) & (end <= T)
        consistent = consistent & ((n != 0) | (start == 0)) & ((n != N - 1) | (end == T))
        has_real = length > 0
        default_pos = length - 1
    elif HAS_MASK:
        # Last real token of the row: works for left, right or mixed padding, never assumes column T-1.
        start = 0
        length = T
        last = tl.full((), -1, tl.int64)
        for t0 in range(0, T, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            m = tl.load(mask_ptr + n * stride_mn + offs_t * stride_mt, mask=offs_t < T, other=0)
            last = tl.maximum(last, tl.max(tl.where(m != 0, offs_t, -1), axis=0).to(tl.int64))
        consistent = True
        has_real = last >= 0
        default_pos = last
    else:
        start = 0
        length = T
        consistent = True
        has_real = T > 0
        default_pos = T - 1

    if HAS_POSITIONS:
        pos = tl.load(positions_ptr + n).to(tl.int64)
        valid = (pos >= 0) & (pos < length)
        if HAS_MASK:
            safe_t = tl.minimum(tl.maximum(pos, 0), T - 1)
            valid = valid & (tl.load(mask_ptr + n * stride_mn + safe_t * stride_mt) != 0)
    else:
        pos = default_pos
        valid = has_real
    row = start + pos
    code = tl.where(consistent, tl.where(has_real, tl.where(valid, row, -2), -1), -3)
    tl.store(rows_ptr + n, code)
    row = tl.where(code >= 0, row, 0)  # keep loads in bounds; the caller raises on the code above

    # ---- K logits: fp32 multiply-add over H, each load upcast at once ---------------------------
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    ids = tl.load(ids_ptr + offs_k, mask=k_mask, other=0).to(tl.int64)
    h_row_ptr = hidden_ptr + n * stride_hn + row * stride_ht
    acc = tl.zeros((BLOCK_K, BLOCK_H), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        x = tl.load(h_row_ptr + offs_h * stride_hh, mask=h_mask, other=0.0).to(tl.float32)
        # An invalid row reads as NaN: its scores (and lse) come out NaN, so bad input stays visible
        # even when the status read-back is turned off.
        x = tl.where(code >= 0, x, float("nan"))
        if STORE_GATHERED:
            tl.store(gathered_ptr + n * stride_gn + offs_h, x.to(gathered_ptr.dtype.element_ty), mask=h_mask)
        w = tl.load(
            weight_ptr + ids[:, None] * stride_wv + offs_h[None, :] * stride_wh,
            mask=k_mask[:, None] & h_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += w * x[None, :]
    logits = tl.sum(acc, axis=1)
    if HAS_BIAS:
        logits += tl.load(bias_ptr + ids, mask=k_mask, other=0.0).to(tl.float32)

    if HAS_COMBINE:
        offs_c = tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        mix = tl.load(
            combine_ptr + offs_c[:, None] * K + offs_k[None, :], mask=c_mask[:, None] & k_mask[None, :], other=0.0
        )
        tl.store(out_ptr + n * stride_on + offs_c, tl.sum(mix * logits[None, :], axis=1), mask=c_mask)
    else:
        tl.store(out_ptr + n * stride_on + offs_k, logits, mask=k_mask)


@triton.jit
def _vocab_tile_scores(
    gathered_ptr,
    weight_ptr,
    bias_ptr,
    offs_n,
    n_mask,
    offs_v,
    v_mask,
    H,
    stride_gn,
    stride_wv,
    stride_wh,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    TRANS_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """fp32 ``[BLOCK_N, BLOCK_V]`` tile of ``gathered @ weight.T + bias``; columns outside v_mask are -inf.

    Half-precision operands go to the tensor cores as they are (fp32 accumulate); fp32 operands, and
    everything under the interpreter, go through an exact fp32 dot.
    """
    scores = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        x = tl.load(
            gathered_ptr + offs_n[:, None].to(tl.int64) * stride_gn + offs_h[None, :],
            mask=n_mask[:, None] & h_mask[None, :],
            other=0.0,
        )
        if TRANS_W:  # load [BLOCK_V, BLOCK_H] as stored, transpose in registers
            w_t = tl.trans(
                tl.load(
                    weight_ptr + offs_v[:, None].to(tl.int64) * stride_wv + offs_h[None, :] * stride_wh,
                    mask=v_mask[:, None] & h_mask[None, :],
                    other=0.0,
                )
            )
        else:  # [BLOCK_H, BLOCK_V]: the weight tile, read transposed
            w_t = tl.load(
                weight_ptr + offs_v[None, :].to(tl.int64) * stride_wv + offs_h[:, None] * stride_wh,
                mask=h_mask[:, None] & v_mask[None, :],
                other=0.0,
            )
        if DOT_FP32:
            scores = tl.dot(x.to(tl.float32), w_t.to(tl.float32), scores, input_precision="ieee")
        else:
            scores = tl.dot(x, w_t, scores)
    if HAS_BIAS:
        scores += tl.load(bias_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(v_mask[None, :], scores, float("-inf"))


@triton.jit
def _score_head_lse_kernel(
    gathered_ptr,
    weight_ptr,
    bias_ptr,
    partial_ptr,
    N,
    H,
    V,
    V_PER_SPLIT,
    stride_gn,
    stride_wv,
    stride_wh,
    stride_pn,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    TRANS_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program (i, s): rows [i*BLOCK_N, (i+1)*BLOCK_N) against vocabulary slice s of V_PER_SPLIT rows.

    Writes ``max + log(sum exp(scores - max))`` over the slice into partial_ptr[row, s]; the caller
    reduces the slices with one logsumexp. The running max and sum stay in fp32.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    v_start = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_start + V_PER_SPLIT, V)

    # -1e30 rather than -inf keeps (m_old - m_new) finite on the first tile.
    m_i = tl.full((BLOCK_N,), -1.0e30, dtype=tl.float32)
    s_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        scores = _vocab_tile_scores(
            gathered_ptr,
            weight_ptr,
            bias_ptr,
            offs_n,
            n_mask,
            offs_v,
            offs_v < v_end,
            H,
            stride_gn,
            stride_wv,
            stride_wh,
            HAS_BIAS,
            DOT_FP32,
            TRANS_W,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
        )
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(scores - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(partial_ptr + offs_n * stride_pn + pid_s, m_i + tl.log(s_i), mask=n_mask)


@triton.jit
def _score_head_lse_merge_kernel(partial_ptr, lse_ptr, SPLITS, stride_pn, BLOCK_S: tl.constexpr):
    """lse[n] = logsumexp over the vocabulary slices' partial values of row n (one program per row)."""
    n = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_S)
    part = tl.load(partial_ptr + n * stride_pn + offs, mask=offs < SPLITS, other=float("-inf"))
    m = tl.max(part, axis=0)
    tl.store(lse_ptr + n, m + tl.log(tl.sum(tl.exp(part - m), axis=0)))


@triton.jit
def _score_head_lse_prob_kernel(
    gathered_ptr,
    weight_ptr,
    bias_ptr,
    lse_ptr,
    grad_lse_ptr,
    prob_ptr,
    ids_ptr,
    grad_k_ptr,
    N,
    H,
    K,
    V0,
    V_CHUNK,
    stride_gn,
    stride_wv,
    stride_wh,
    stride_pn,
    stride_gkn,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    TRANS_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """prob[n, j] = softmax(h_n W^T + b)[V0 + j] * grad_lse[n] (+ grad_k[n, k] where V0 + j = ids[k], for
    k < K), j < V_CHUNK: the gradient of ``sum(grad_lse * lse)`` (and of ``sum(grad_k * logits_K)``) with
    respect to one chunk of logits, rebuilt from the saved fp32 lse."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_j = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    j_mask = offs_j < V_CHUNK
    scores = _vocab_tile_scores(
        gathered_ptr,
        weight_ptr,
        bias_ptr,
        offs_n,
        n_mask,
        V0 + offs_j,
        j_mask,
        H,
        stride_gn,
        stride_wv,
        stride_wh,
        HAS_BIAS,
        DOT_FP32,
        TRANS_W,
        BLOCK_N,
        BLOCK_V,
        BLOCK_H,
    )
    lse = tl.load(lse_ptr + offs_n, mask=n_mask, other=0.0)
    g = tl.load(grad_lse_ptr + offs_n, mask=n_mask, other=0.0)
    prob = tl.exp(scores - lse[:, None]) * g[:, None]
    # The K selected rows' own gradient, added in fp32 before the one rounding to the storage dtype.
    for k in tl.static_range(BLOCK_K):
        if k < K:
            token = tl.load(ids_ptr + k)
            g_k = tl.load(grad_k_ptr + offs_n * stride_gkn + k, mask=n_mask, other=0.0)
            prob += tl.where((V0 + offs_j)[None, :] == token, g_k[:, None], 0.0)
    tl.store(
        prob_ptr + offs_n[:, None].to(tl.int64) * stride_pn + offs_j[None, :],
        prob.to(prob_ptr.dtype.element_ty),
        mask=n_mask[:, None] & j_mask[None, :],
    )


@triton.jit
def _score_head_bwd_hidden_kernel(
    grad_k_ptr,
    weight_ptr,
    ids_ptr,
    rows_ptr,
    extra_ptr,
    grad_hidden_ptr,
    H,
    K,
    stride_gkn,
    stride_wv,
    stride_wh,
    stride_en,
    stride_dn,
    stride_dt,
    stride_dh,
    HAS_GRAD_K: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per sequence: grad_hidden[n, rows[n]] = g_K[n] @ W[ids] (if HAS_GRAD_K) + extra[n]
    (if HAS_EXTRA), the rest of grad_hidden being zeros already."""
    n = tl.program_id(0).to(tl.int64)
    row = tl.maximum(tl.load(rows_ptr + n), 0)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    ids = tl.load(ids_ptr + offs_k, mask=k_mask, other=0).to(tl.int64)
    g = tl.load(grad_k_ptr + n * stride_gkn + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    out_row_ptr = grad_hidden_ptr + n * stride_dn + row * stride_dt
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        dh = tl.zeros((BLOCK_H,), dtype=tl.float32)
        if HAS_GRAD_K:
            w = tl.load(
                weight_ptr + ids[:, None] * stride_wv + offs_h[None, :] * stride_wh,
                mask=k_mask[:, None] & h_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            dh += tl.sum(w * g[:, None], axis=0)
        if HAS_EXTRA:
            dh += tl.load(extra_ptr + n * stride_en + offs_h, mask=h_mask, other=0.0)
        tl.store(out_row_ptr + offs_h * stride_dh, dh.to(grad_hidden_ptr.dtype.element_ty), mask=h_mask)


@triton.jit
def _score_head_bwd_weight_kernel(
    grad_k_ptr,
    gathered_ptr,
    ids_ptr,
    out_ptr,
    N,
    H,
    K,
    stride_gkn,
    stride_gn,
    stride_ok,
    stride_oh,
    SCATTER: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per H block: sum over sequences of g_K[n, k] * h[n, block], exact fp32 dot.

    SCATTER (ids all distinct): write row k straight into out[ids[k]] in out's dtype; otherwise into
    out[k] (an fp32 [K, H] buffer the caller index_adds).
    """
    pid_h = tl.program_id(0)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_K, BLOCK_H), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        g_t = tl.load(  # [BLOCK_K, BLOCK_N]
            grad_k_ptr + offs_n[None, :].to(tl.int64) * stride_gkn + offs_k[:, None],
            mask=k_mask[:, None] & n_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        x = tl.load(
            gathered_ptr + offs_n[:, None].to(tl.int64) * stride_gn + offs_h[None, :],
            mask=n_mask[:, None] & h_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(g_t, x, acc, input_precision="ieee")
    if SCATTER:
        rows = tl.load(ids_ptr + offs_k, mask=k_mask, other=0).to(tl.int64)
    else:
        rows = offs_k.to(tl.int64)
    tl.store(
        out_ptr + rows[:, None] * stride_ok + offs_h[None, :] * stride_oh,
        acc.to(out_ptr.dtype.element_ty),
        mask=k_mask[:, None] & h_mask[None, :],
    )


# ------------------------------------------------------------------------------------------------
# launch configuration
# ------------------------------------------------------------------------------------------------
def _row_block_h(h: int) -> int:
    # The interpreter pays per program and per loop trip, not per lane: small blocks keep test shapes
    # cheap. On an H100, 512 lanes with 2 warps were fastest at H=896 (bench/tune_score_head.py).
    return min(next_power_of_2(h), 64 if _INTERPRET else 512)


def _lse_config(n: int, h: int, dtype: torch.dtype):
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) for the vocabulary-tile GEMMs.

    Chosen with bench/tune_score_head.py on an H100 at H=896, V=151936, bf16 (bench/results/).
    """
    if _INTERPRET:
        return 16, 32, min(32, max(16, next_power_of_2(h))), 1, 1
    if dtype == torch.float32:  # exact fp32 dot on CUDA cores: smaller tiles, twice the bytes each
        return (16 if n <= 16 else (32 if n <= 32 else 64)), 64, 32, 4, 3
    if n <= 16:
        return 16, 64, 128, 4, 3
    if n <= 64:
        return (32 if n <= 32 else 64), 128, 64, 4, 3
    return 128, 256, 64, 8, 3


# ------------------------------------------------------------------------------------------------
# drivers
# ------------------------------------------------------------------------------------------------
def score_head_forward(
    hidden, weight, bias, attention_mask, positions, cu_seqlens, config: ScoreHeadConfig, store_gathered: bool
):
    """Launch the forward kernels. Returns ``(out, lse or None, rows, gathered or None)``."""
    device = hidden.device
    k = len(config.token_ids)
    c = len(config.combine) if config.combine is not None else 0
    if config.packed:
        n = cu_seqlens.shape[0] - 1
        t, h = hidden.shape
        stride_hn, stride_ht, stride_hh = 0, hidden.stride(0), hidden.stride(1)
    else:
        n, t, h = hidden.shape
        stride_hn, stride_ht, stride_hh = hidden.stride()
    ids = cached_device_tensor(config.token_ids, torch.int64, device)
    mix = cached_device_tensor(config.combine, torch.float32, device) if c else None
    out = torch.empty((n, c or k), dtype=torch.float32, device=device)
    rows = torch.empty((n,), dtype=torch.int64, device=device)
    store_gathered = store_gathered or config.return_lse
    gathered = torch.empty((n, h), dtype=hidden.dtype, device=device) if store_gathered else None
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; Triton reads bool pointers as int1 on some versions

    if n > 0:
        _score_head_fwd_kernel[(n,)](
            hidden,
            weight,
            bias,
            ids,
            mix,
            mask,
            positions,
            cu_seqlens,
            out,
            rows,
            gathered,
            n,
            t,
            h,
            k,
            c,
            stride_hn,
            stride_ht,
            stride_hh,
            weight.stride(0),
            weight.stride(1),
            mask.stride(0) if mask is not None else 0,
            mask.stride(1) if mask is not None else 0,
            out.stride(0),
            gathered.stride(0) if gathered is not None else 0,
            HAS_BIAS=bias is not None,
            HAS_COMBINE=c > 0,
            HAS_MASK=mask is not None,
            HAS_POSITIONS=positions is not None,
            PACKED=config.packed,
            STORE_GATHERED=store_gathered,
            BLOCK_T=min(next_power_of_2(max(t, 1)), 64 if _INTERPRET else 1024),  # masks up to 1024 wide in one trip
            BLOCK_H=_row_block_h(h),
            BLOCK_K=max(2, next_power_of_2(k)),
            BLOCK_C=max(2, next_power_of_2(max(c, 1))),
            num_warps=2,
        )

    lse = _lse_forward(gathered, weight, bias) if config.return_lse else None
    return out, lse, rows, gathered


def _lse_forward(gathered, weight, bias):
    n, h = gathered.shape
    vocab = weight.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=gathered.device)
    block_n, block_v, block_h, num_warps, num_stages = _lse_config(n, h, gathered.dtype)
    n_blocks = cdiv(n, block_n)
    # Split the vocabulary so that about four programs per SM run even when N fits in one row block.
    unit = 256 if not _INTERPRET else block_v
    v_units = cdiv(vocab, unit)
    target = 4 * num_sms(gathered.device) if not _INTERPRET else 2
    splits = max(1, min(v_units, cdiv(target, n_blocks)))
    v_per_split = cdiv(v_units, splits) * unit
    splits = cdiv(vocab, v_per_split)
    partial = torch.empty((n, splits), dtype=torch.float32, device=gathered.device)
    _score_head_lse_kernel[(n_blocks, splits)](
        gathered,
        weight,
        bias,
        partial,
        n,
        h,
        vocab,
        v_per_split,
        gathered.stride(0),
        weight.stride(0),
        weight.stride(1),
        partial.stride(0),
        HAS_BIAS=bias is not None,
        DOT_FP32=dot_fp32(gathered.dtype),
        TRANS_W=False,
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_H=block_h,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits == 1:
        return partial[:, 0]
    # A kernel rather than torch.logsumexp: the latter is about eight eager ops, costly on the host.
    lse = torch.empty((n,), dtype=torch.float32, device=gathered.device)
    _score_head_lse_merge_kernel[(n,)](partial, lse, splits, partial.stride(0), BLOCK_S=next_power_of_2(splits))
    return lse


def _lse_backward(gathered, weight, bias, lse, grad_lse, token_ids, grad_k, need_weight, need_bias):
    """Backward of ``sum(grad_lse * lse) + sum(grad_k * logits_K)`` over the whole vocabulary, chunk by
    chunk: returns ``(grad_h [N, H] fp32, grad_weight or None, grad_bias or None)``.

    Per chunk, one kernel rebuilds the softmax times grad_lse from the saved fp32 lse (scores accumulated
    in fp32) and adds the K rows' own gradient into their columns, storing the result once in the input
    dtype (as Liger's fused cross-entropy stores its logit gradients); then two cuBLAS GEMMs give
    ``dh += P @ W_c`` (fp32 out) and ``dW_c = P^T @ h`` (fp32 accumulate, written once in the weight
    dtype). Peak extra memory is one ``[N, chunk]`` block.
    """
    n, h = gathered.shape
    vocab = weight.shape[0]
    device = gathered.device
    ids = cached_device_tensor(tuple(token_ids), torch.int64, device)
    grad_k = grad_k.float().contiguous()
    lse = lse.float().contiguous()
    grad_lse = grad_lse.float().contiguous()
    # One [N, chunk] block of at most 16 Mi elements (32 MiB in bf16) and at least 4096 columns: fewer
    # chunks mean fewer launches, and the bound holds whatever N and V are.
    chunk = min(vocab, max(4096, (1 << 24) // max(n, 1)))
    block_n, block_v, block_h, num_warps, num_stages = _lse_config(n, h, gathered.dtype)
    grad_h = torch.zeros((n, h), dtype=torch.float32, device=device)
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_bias = torch.empty(vocab, dtype=bias.dtype, device=device) if need_bias else None
    prob_buf = torch.empty((n, chunk), dtype=gathered.dtype, device=device)
    for v0 in range(0, vocab, chunk):
        width = min(chunk, vocab - v0)
        prob = prob_buf[:, :width]
        _score_head_lse_prob_kernel[(cdiv(n, block_n), cdiv(width, block_v))](
            gathered,
            weight,
            bias,
            lse,
            grad_lse,
            prob,
            ids,
            grad_k,
            n,
            h,
            len(token_ids),
            v0,
            width,
            gathered.stride(0),
            weight.stride(0),
            weight.stride(1),
            prob.stride(0),
            grad_k.stride(0),
            HAS_BIAS=bias is not None,
            DOT_FP32=dot_fp32(gathered.dtype),
            TRANS_W=False,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
            BLOCK_H=block_h,
            BLOCK_K=next_power_of_2(len(token_ids)),
            num_warps=num_warps,
            num_stages=num_stages,
        )
        grad_h += matmul_acc(prob, weight[v0 : v0 + width], torch.float32)
        if need_weight:
            torch.mm(prob.t(), gathered, out=grad_weight[v0 : v0 + width])
        if need_bias:
            grad_bias[v0 : v0 + width] = prob.float().sum(0).to(bias.dtype)
    return grad_h, grad_weight, grad_bias


def score_head_backward(
    grad_out, grad_lse, hidden_meta, gathered, weight, bias, lse, rows, config: ScoreHeadConfig, needs
):
    """Gradients for (hidden, weight, bias); see the module docstring for the scheme."""
    device = gathered.device
    n, h = gathered.shape
    k = len(config.token_ids)
    need_h, need_w, need_b = needs
    ids = cached_device_tensor(config.token_ids, torch.int64, device)
    if grad_out is None:
        grad_k = torch.zeros((n, k), dtype=torch.float32, device=device)
    elif config.combine is not None:
        grad_k = grad_out.float() @ cached_device_tensor(config.combine, torch.float32, device)
    else:
        grad_k = grad_out.float().contiguous()

    extra = grad_weight = grad_bias = None
    if grad_lse is not None:
        # Full-vocabulary part, chunked; the K selected rows' own gradient is folded into it.
        extra, grad_weight, grad_bias = _lse_backward(
            gathered, weight, bias, lse, grad_lse, config.token_ids, grad_k, need_w, need_b
        )

    block_k = max(16, next_power_of_2(k))
    grad_hidden = None
    if need_h:
        shape, dtype = hidden_meta
        grad_hidden = torch.zeros(shape, dtype=dtype, device=device)
        if config.packed:
            strides = (0, grad_hidden.stride(0), grad_hidden.stride(1))
        else:
            strides = grad_hidden.stride()
        if n > 0:
            _score_head_bwd_hidden_kernel[(n,)](
                grad_k,
                weight,
                ids,
                rows,
                extra,
                grad_hidden,
                h,
                k,
                grad_k.stride(0),
                weight.stride(0),
                weight.stride(1),
                extra.stride(0) if extra is not None else 0,
                *strides,
                # With the lse in the loss, extra already holds the K rows' part (folded into its chunks).
                HAS_GRAD_K=extra is None,
                HAS_EXTRA=extra is not None,
                BLOCK_H=_row_block_h(h),
                BLOCK_K=block_k,
                num_warps=2,
            )

    if grad_lse is None and need_w:
        grad_weight = torch.zeros_like(weight)
        scatter = len(set(config.token_ids)) == k
        target = grad_weight if scatter else torch.empty((k, h), dtype=torch.float32, device=device)
        block_h = 32 if _INTERPRET else 64
        if n > 0:
            _score_head_bwd_weight_kernel[(cdiv(h, block_h),)](
                grad_k,
                gathered,
                ids,
                target,
                n,
                h,
                k,
                grad_k.stride(0),
                gathered.stride(0),
                target.stride(0),
                target.stride(1),
                SCATTER=scatter,
                BLOCK_N=16 if _INTERPRET else 32,
                BLOCK_H=block_h,
                BLOCK_K=block_k,
                num_warps=4,
            )
        if not scatter:
            grad_weight.index_add_(0, ids, target.to(weight.dtype))
    if grad_lse is None and need_b:
        grad_bias = torch.zeros_like(bias)
        grad_bias.index_add_(0, ids, grad_k.sum(0).to(bias.dtype))
    return grad_hidden, grad_weight, grad_bias
