"""pool: sequence pooling (cls, mean, last token, special tokens / last k) with fused L2 normalisation.

One program per (sequence, block of H) streams that sequence's tokens once, weighting each by whether
the mode selects it (a real token for ``mean``; the first or last real token; a token whose id is one of
the given special ids; one of the last k real tokens), and accumulates the sum and the count in fp32.
Loads of unselected tokens are masked off, so ``cls``/``last``/``special`` read only the rows they pool.
Normalisation is a second, per-sequence pass over the ``[N, H]`` result. Padded input with either
padding side (positions come from the attention mask), or packed input with ``cu_seqlens``.

Backward: one program per (sequence, block of H) writes ``w_t / count * g`` for every token of the
sequence (zero where the mode did not select it), so the gradient is written in one pass with no
separate zero fill (packed input keeps a zero fill for rows outside every sequence).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrank import common
from fastrank.common import PoolConfig, cached_device_tensor, cdiv, is_interpreting, next_power_of_2

_INTERPRET = is_interpreting()

# The mode numbers and status codes of fastrank.common, as constants the kernels can read.
_CLS = tl.constexpr(common.MODE_CLS)
_LAST = tl.constexpr(common.MODE_LAST)
_SPECIAL = tl.constexpr(common.MODE_SPECIAL)
_LAST_K = tl.constexpr(common.MODE_LAST_K)
_EMPTY = tl.constexpr(common.POOL_EMPTY)
_NO_SPECIAL = tl.constexpr(common.POOL_NO_SPECIAL)
_SHORT = tl.constexpr(common.POOL_SHORT)
_BAD_CU_SEQLENS = tl.constexpr(common.POOL_BAD_CU_SEQLENS)


@triton.jit
def _pool_bounds(
    mask_ptr,
    cu_seqlens_ptr,
    n,
    N,
    T,
    stride_mn,
    stride_mt,
    LAST_K,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """(start, end, lo, hi, ok) of sequence n: its rows [start, end), the row range [lo, hi) the mode
    can select from, and whether cu_seqlens is consistent there."""
    if PACKED:
        start = tl.load(cu_seqlens_ptr + n).to(tl.int64)
        end = tl.load(cu_seqlens_ptr + n + 1).to(tl.int64)
        ok = (start >= 0) & (end >= start) & (end <= T)
        ok = ok & ((n != 0) | (start == 0)) & ((n != N - 1) | (end == T))
        start = tl.where(ok, start, 0)
        end = tl.where(ok, end, 0)
        first = start
        last = end - 1
    else:
        start = tl.full((), 0, tl.int64)
        end = tl.full((), 0, tl.int64) + T
        ok = True
        if HAS_MASK:
            first = tl.full((), 0, tl.int64) + T
            last = tl.full((), -1, tl.int64)
            for t0 in range(0, T, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                real = tl.load(mask_ptr + n * stride_mn + offs_t * stride_mt, mask=offs_t < T, other=0) != 0
                first = tl.minimum(first, tl.min(tl.where(real, offs_t, T), axis=0).to(tl.int64))
                last = tl.maximum(last, tl.max(tl.where(real, offs_t, -1), axis=0).to(tl.int64))
        else:
            first = start
            last = end - 1
    if MODE == _CLS:  # cls: the first real token
        lo = first
        hi = tl.minimum(first + 1, end)
    elif MODE == _LAST:  # last: the last real token
        lo = tl.maximum(last, 0)
        hi = last + 1
    elif MODE == _LAST_K:  # last k real tokens
        lo = tl.maximum(last - LAST_K + 1, start)
        hi = last + 1
    else:  # mean, special ids: the whole sequence
        lo = start
        hi = end
    return start, end, lo, hi, ok


@triton.jit
def _pool_token_weights(
    mask_ptr,
    input_ids_ptr,
    ids_ptr,
    offs_t,
    n,
    lo,
    hi,
    T,
    K,
    stride_mn,
    stride_mt,
    stride_in,
    stride_it,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """1.0 where the mode selects token offs_t of sequence n, else 0.0 (fp32, [BLOCK_T])."""
    selected = (offs_t >= lo) & (offs_t < hi)
    if HAS_MASK:
        selected = selected & (tl.load(mask_ptr + n * stride_mn + offs_t * stride_mt, mask=selected, other=0) != 0)
    if MODE == _SPECIAL:
        if PACKED:
            tok = tl.load(input_ids_ptr + offs_t * stride_it, mask=selected, other=-1)
        else:
            tok = tl.load(input_ids_ptr + n * stride_in + offs_t * stride_it, mask=selected, other=-1)
        offs_k = tl.arange(0, BLOCK_K)
        special = tl.load(ids_ptr + offs_k, mask=offs_k < K, other=-2)
        hit = tl.sum((tok[:, None].to(tl.int64) == special[None, :].to(tl.int64)).to(tl.int32), axis=1) > 0
        selected = selected & hit
    return selected.to(tl.float32)


@triton.jit
def _pool_fwd_kernel(
    # data pointers
    hidden_ptr,
    mask_ptr,
    input_ids_ptr,
    ids_ptr,
    cu_seqlens_ptr,
    out_ptr,
    count_ptr,
    status_ptr,
    # sizes
    N,
    T,
    H,
    K,
    LAST_K,
    # strides
    stride_hn,
    stride_ht,
    stride_hh,
    stride_mn,
    stride_mt,
    stride_in,
    stride_it,
    stride_on,
    # feature flags
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (n, j): out[n, j*BLOCK_H : (j+1)*BLOCK_H] = mean of the selected rows of sequence n, in fp32.

    Program (n, 0) also writes count[n] (rows pooled) and status[n]."""
    n = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    start, end, lo, hi, ok = _pool_bounds(
        mask_ptr, cu_seqlens_ptr, n, N, T, stride_mn, stride_mt, LAST_K, MODE, HAS_MASK, PACKED, BLOCK_T
    )
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    count = tl.zeros((), dtype=tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        w = _pool_token_weights(
            mask_ptr,
            input_ids_ptr,
            ids_ptr,
            offs_t,
            n,
            lo,
            hi,
            T,
            K,
            stride_mn,
            stride_mt,
            stride_in,
            stride_it,
            MODE,
            HAS_MASK,
            PACKED,
            BLOCK_K,
        )
        rows = tl.load(
            hidden_ptr + n * stride_hn + offs_t[:, None].to(tl.int64) * stride_ht + offs_h[None, :] * stride_hh,
            mask=(w[:, None] != 0) & h_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(rows * w[:, None], axis=0)
        count += tl.sum(w, axis=0)
    # count = 0 gives NaN: an invalid sequence stays visible even when the status is not read back.
    tl.store(out_ptr + n * stride_on + offs_h, acc / count, mask=h_mask)
    if pid_h == 0:
        tl.store(count_ptr + n, count)
        if MODE == _LAST_K:
            bad = count < LAST_K
            code = tl.where(bad, tl.where(count == 0, _EMPTY, _SHORT), 0)
        elif MODE == _SPECIAL:
            any_real = hi > lo
            if HAS_MASK:
                real_count = tl.zeros((), dtype=tl.int32)
                for t0 in range(lo, hi, BLOCK_T):
                    offs_t = t0 + tl.arange(0, BLOCK_T)
                    m = tl.load(mask_ptr + n * stride_mn + offs_t * stride_mt, mask=offs_t < hi, other=0)
                    real_count += tl.sum((m != 0).to(tl.int32), axis=0)
                any_real = real_count > 0
            code = tl.where(count == 0, tl.where(any_real, _NO_SPECIAL, _EMPTY), 0)
        else:
            code = tl.where(count == 0, _EMPTY, 0)
        tl.store(status_ptr + n, tl.where(ok, code, _BAD_CU_SEQLENS))


@triton.jit
def _pool_normalize_kernel(x_ptr, y_ptr, norm_ptr, H, stride_xn, stride_yn, BLOCK_H: tl.constexpr):
    """y[n] = x[n] / max(||x[n]||, 1e-12) (torch.nn.functional.normalize), norm[n] = ||x[n]||, fp32."""
    n = tl.program_id(0).to(tl.int64)
    sq = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(x_ptr + n * stride_xn + offs, mask=offs < H, other=0.0)
        sq += x * x
    norm = tl.sqrt(tl.sum(sq, axis=0))
    scale = 1.0 / tl.maximum(norm, 1e-12)
    for h0 in range(0, H, BLOCK_H):
        offs = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(x_ptr + n * stride_xn + offs, mask=offs < H, other=0.0)
        tl.store(y_ptr + n * stride_yn + offs, x * scale, mask=offs < H)
    tl.store(norm_ptr + n, norm)


@triton.jit
def _pool_bwd_kernel(
    grad_out_ptr,
    count_ptr,
    mask_ptr,
    input_ids_ptr,
    ids_ptr,
    cu_seqlens_ptr,
    grad_hidden_ptr,
    N,
    T,
    H,
    K,
    LAST_K,
    stride_gn,
    stride_mn,
    stride_mt,
    stride_in,
    stride_it,
    stride_dn,
    stride_dt,
    stride_dh,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (n, j): grad_hidden[n, t, block j] = w_t / count[n] * grad_out[n, block j] for every row t of
    sequence n (zeros where w_t = 0)."""
    n = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)
    start, end, lo, hi, ok = _pool_bounds(
        mask_ptr, cu_seqlens_ptr, n, N, T, stride_mn, stride_mt, LAST_K, MODE, HAS_MASK, PACKED, BLOCK_T
    )
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    g = tl.load(grad_out_ptr + n * stride_gn + offs_h, mask=h_mask, other=0.0).to(tl.float32)
    g = g / tl.load(count_ptr + n)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        w = _pool_token_weights(
            mask_ptr,
            input_ids_ptr,
            ids_ptr,
            offs_t,
            n,
            lo,
            hi,
            T,
            K,
            stride_mn,
            stride_mt,
            stride_in,
            stride_it,
            MODE,
            HAS_MASK,
            PACKED,
            BLOCK_K,
        )
        tl.store(
            grad_hidden_ptr + n * stride_dn + offs_t[:, None].to(tl.int64) * stride_dt + offs_h[None, :] * stride_dh,
            (w[:, None] * g[None, :]).to(grad_hidden_ptr.dtype.element_ty),
            mask=(offs_t[:, None] < end) & h_mask[None, :],
        )


# ------------------------------------------------------------------------------------------------
# drivers
# ------------------------------------------------------------------------------------------------
def _blocks(t: int, h: int):
    if _INTERPRET:  # the interpreter pays per program and per loop trip: few, mid-sized blocks
        return min(next_power_of_2(max(t, 1)), 32), min(next_power_of_2(h), 64)
    return 32, min(next_power_of_2(h), 128)


def _layout(hidden, attention_mask, input_ids, packed):
    """(n-stride, t-stride, h-stride) of hidden and of input_ids, and the mask strides."""
    if packed:
        hs = (0, hidden.stride(0), hidden.stride(1))
        ids_s = (0, input_ids.stride(-1)) if input_ids is not None else (0, 0)
    else:
        hs = hidden.stride()
        ids_s = input_ids.stride() if input_ids is not None else (0, 0)
    ms = attention_mask.stride() if attention_mask is not None else (0, 0)
    return hs, ids_s, ms


def pool_forward(hidden, attention_mask, input_ids, cu_seqlens, config: PoolConfig, needs_grad: bool):
    """Launch the pooling (and normalisation) kernels. Returns ``(out fp32 [N, H], count [N], status [N],
    pooled fp32 or None, norm or None)``; the last two are kept for backward when normalising."""
    device = hidden.device
    packed = cu_seqlens is not None
    if packed:
        n = cu_seqlens.shape[0] - 1
        t, h = hidden.shape
    else:
        n, t, h = hidden.shape
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    ids = cached_device_tensor(config.token_ids, torch.int64, device) if config.token_ids else None
    pooled = torch.empty((n, h), dtype=torch.float32, device=device)
    count = torch.empty((n,), dtype=torch.float32, device=device)
    status = torch.empty((n,), dtype=torch.int32, device=device)
    block_t, block_h = _blocks(t, h)
    hs, ids_s, ms = _layout(hidden, mask, input_ids, packed)
    if n > 0:
        _pool_fwd_kernel[(n, cdiv(h, block_h))](
            hidden,
            mask,
            input_ids,
            ids,
            cu_seqlens,
            pooled,
            count,
            status,
            n,
            t,
            h,
            len(config.token_ids),
            config.last_k or 0,
            *hs,
            *ms,
            *ids_s,
            pooled.stride(0),
            MODE=config.mode_code,
            HAS_MASK=mask is not None,
            PACKED=packed,
            BLOCK_T=block_t,
            BLOCK_H=block_h,
            BLOCK_K=max(2, next_power_of_2(len(config.token_ids) or 1)),
            num_warps=4,
        )
    if not config.normalize:
        return pooled, count, status, None, None
    out = torch.empty_like(pooled)
    norm = torch.empty((n,), dtype=torch.float32, device=device)
    if n > 0:
        _pool_normalize_kernel[(n,)](
            pooled,
            out,
            norm,
            h,
            pooled.stride(0),
            out.stride(0),
            BLOCK_H=min(next_power_of_2(h), 64 if _INTERPRET else 1024),
            num_warps=4,
        )
    return out, count, status, (pooled if needs_grad else None), norm


def pool_backward(
    grad_out, hidden_meta, out, pooled, norm, count, attention_mask, input_ids, cu_seqlens, config: PoolConfig
):
    """Gradient with respect to the hidden states, ``hidden_meta`` = (shape, dtype, device)."""
    shape, dtype, device = hidden_meta
    packed = cu_seqlens is not None
    grad = grad_out.float()
    if config.normalize:
        # d(x / |x|) = (g - y (y . g)) / |x|, with torch's clamp of |x| at 1e-12.
        grad = (grad - out * (out * grad).sum(1, keepdim=True)) / norm.clamp_min(1e-12)[:, None]
    if packed:
        n = cu_seqlens.shape[0] - 1
        t, h = shape
        grad_hidden = torch.zeros(shape, dtype=dtype, device=device)  # rows outside every sequence stay 0
    else:
        n, t, h = shape
        grad_hidden = torch.empty(shape, dtype=dtype, device=device)
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    ids = cached_device_tensor(config.token_ids, torch.int64, device) if config.token_ids else None
    block_t, block_h = _blocks(t, h)
    _, ids_s, ms = _layout(grad_hidden, mask, input_ids, packed)
    ds = (0, grad_hidden.stride(0), grad_hidden.stride(1)) if packed else grad_hidden.stride()
    if n > 0:
        _pool_bwd_kernel[(n, cdiv(h, block_h))](
            grad.contiguous(),
            count,
            mask,
            input_ids,
            ids,
            cu_seqlens,
            grad_hidden,
            n,
            t,
            h,
            len(config.token_ids),
            config.last_k or 0,
            h,
            *ms,
            *ids_s,
            *ds,
            MODE=config.mode_code,
            HAS_MASK=mask is not None,
            PACKED=packed,
            BLOCK_T=block_t,
            BLOCK_H=block_h,
            BLOCK_K=max(2, next_power_of_2(len(config.token_ids) or 1)),
            num_warps=4,
        )
    return grad_hidden
