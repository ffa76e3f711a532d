"""varlen_attention: attention over packed segments of a flat token stream, where a segment may read the keys and
values of a shared prefix segment.

One room: the input checks, the plain-PyTorch reference (the CPU path and the test oracle: per segment,
``scaled_dot_product_attention`` on the prefix's keys followed by the segment's own, exactly what Hugging Face's
sdpa attention computes on the unshared sequence), the autograd Function shared by both paths and the public
function. The Triton kernels and their launch code are in ``fastrank.kernels.varlen_attention``.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from fastrank.common import VarlenAttentionConfig, accumulate_dtype
from fastrank.ops.base import FLOAT_DTYPES, Implementation, dtype_name, integer_tensor, require_tensor, same_device
from fastrank.utils import can_sync, checks_enabled, select_backend

MAX_HEAD_DIM = 256  # the kernels pad head_dim to a power of two up to this


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def _positive_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be a positive finite number, got {value!r}")
    return float(value)


def check_varlen_attention_inputs(q, k, v, cu_seqlens, prefix, max_seqlen, causal, scale, softcap):
    """Validate varlen_attention's arguments (shapes, dtypes, devices, options: no host read). Returns
    ``(cu_seqlens, prefix, causal, scale, softcap)`` with list inputs made tensors and the default scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        shape = "[M, Hq, D]" if name == "q" else "[M, Hkv, D]"
        require_tensor(name, t, shape)
        if t.dim() != 3:
            raise ValueError(f"{name}: must be 3-D {shape} (tokens, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: must be float16, bfloat16 or float32, got {dtype_name(t.dtype)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(
                f"{name}: dtype {dtype_name(t.dtype)} differs from q's {dtype_name(q.dtype)}; cast them to one dtype"
            )
        same_device(name, t, q, "q")
    m, hq, d = q.shape
    if k.shape[0] != m:
        raise ValueError(f"k: has {k.shape[0]} tokens but q has M={m}; q, k and v are rows of the same stream")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    if k.shape[2] != d:
        raise ValueError(f"k: head_dim {k.shape[2]} differs from q's D={d}")
    hkv = k.shape[1]
    if hkv == 0 or hq == 0 or hq % hkv:
        raise ValueError(
            f"k: Hkv={hkv} kv heads must divide the Hq={hq} query heads (grouped-query attention: query head h "
            "reads kv head h // (Hq // Hkv))"
        )
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim D={d} is outside 1..{MAX_HEAD_DIM}")

    cu_seqlens = integer_tensor("cu_seqlens", cu_seqlens, q.device, "[S + 1]")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens: must be 1-D [S + 1] with S >= 1 (offsets 0, len0, len0+len1, ..., M), "
            f"got shape {tuple(cu_seqlens.shape)}"
        )
    same_device("cu_seqlens", cu_seqlens, q, "q")
    s = cu_seqlens.shape[0] - 1
    if prefix is not None:
        prefix = integer_tensor("prefix", prefix, q.device, "[S]")
        if prefix.dim() != 1 or prefix.shape[0] != s:
            raise ValueError(
                f"prefix: must be 1-D [S] with one entry per segment (S={s} from cu_seqlens), "
                f"got shape {tuple(prefix.shape)}"
            )
        same_device("prefix", prefix, q, "q")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"max_seqlen: must be a non-negative int (the longest segment) or None, got {max_seqlen!r}")
    if not isinstance(causal, bool):
        raise ValueError(f"causal: must be True or False, got {causal!r}")
    scale = 1.0 / math.sqrt(d) if scale is None else _positive_number("scale", scale)
    if softcap is not None:
        softcap = _positive_number("softcap", softcap)
    return cu_seqlens, prefix, causal, scale, softcap


def check_segment_values(cu_seqlens: torch.Tensor, prefix, total: int, max_seqlen: Optional[int]) -> int:
    """The data-dependent checks (one small read back): ``cu_seqlens`` partitions the ``total`` rows,
    ``max_seqlen`` covers the longest segment, ``prefix`` names other segments, one level deep. Returns the
    longest segment's length."""
    cu = cu_seqlens.detach().cpu().long()
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths < 0).any()):
        raise ValueError(
            f"cu_seqlens: must start at 0, never decrease and end at M={total} (the q/k/v rows); "
            f"got {cu.tolist()[:12]}{'...' if cu.numel() > 12 else ''}"
        )
    longest = int(lengths.max())
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen: {max_seqlen} is shorter than the longest segment ({longest} tokens)")
    if prefix is not None:
        s = lengths.numel()
        pre = prefix.detach().cpu().long()
        bad = ((pre < -1) | (pre >= s)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"prefix: entries must be -1 (no prefix) or a segment index in [0, {s}); segment {bad[0]} has "
                f"{int(pre[bad[0]])}"
            )
        own = (pre == torch.arange(s)).nonzero().flatten().tolist()
        if own:
            raise ValueError(f"prefix: segment {own[0]} names itself as its prefix")
        has = pre >= 0
        chained = (has & (pre[pre.clamp_min(0)] >= 0)).nonzero().flatten().tolist()
        if chained:
            c = chained[0]
            raise ValueError(
                f"prefix: segment {c} reads segment {int(pre[c])}, which has a prefix of its own "
                f"({int(pre[pre[c]])}); prefixes are one level deep"
            )
    return longest


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------
REFERENCE_CHUNK_ROWS = 1024  # query rows per dense-mask attention call of the reference


def attend_reference(q, k, v, mask, config: VarlenAttentionConfig) -> torch.Tensor:
    """Masked attention, HF-style: ``q`` ``[1, Hq, L, D]``, ``k``/``v`` ``[1, Hkv, K, D]``, ``mask`` bool ``[L, K]``
    (True = attend). Returns ``[1, Hq, L, D]`` in q's dtype.

    Without softcap: ``scaled_dot_product_attention`` in the input dtype, kv heads repeated as transformers'
    ``repeat_kv`` does. With softcap, the manual computation (HF's eager path) in the accumulate dtype."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if config.softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=config.scale)
    acc = accumulate_dtype(q.dtype)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * config.scale
    scores = torch.tanh(scores / config.softcap) * config.softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.to(acc)).to(q.dtype)


def _chunks(bounds: List[int], pre: List[int]):
    """Runs of consecutive non-empty segments of at most ``REFERENCE_CHUNK_ROWS`` rows (a longer segment alone),
    each with the valid prefixes its segments read: ``(first, stop, prefixes)``."""
    n = len(bounds) - 1
    s = 0
    while s < n:
        stop = s + 1
        while stop < n and bounds[stop + 1] - bounds[s] <= REFERENCE_CHUNK_ROWS:
            stop += 1
        prefixes = sorted({pre[i] for i in range(s, stop) if 0 <= pre[i] < n and pre[i] != i})
        if bounds[stop] > bounds[s]:
            yield s, stop, prefixes
        s = stop


def _reference_attention(q, k, v, cu_seqlens, prefix, config: VarlenAttentionConfig) -> torch.Tensor:
    """All segments, a chunk of consecutive segments per call: the chunk's queries against its own rows and
    the rows of the prefixes they read, under a mask that lets each query see its prefix and its own segment
    (causally), which is exactly its unshared sequence's attention."""
    bounds = cu_seqlens.tolist()
    n = len(bounds) - 1
    pre = prefix.tolist() if prefix is not None else [-1] * n
    device = q.device
    out = torch.zeros(q.shape, dtype=q.dtype, device=device)
    pieces = []
    for first, stop, prefixes in _chunks(bounds, pre):
        a, b = bounds[first], bounds[stop]
        outside = [p for p in prefixes if not first <= p < stop]
        key_rows = [torch.arange(bounds[p], bounds[p + 1], device=device) for p in outside]
        key_rows.append(torch.arange(a, b, device=device))
        key_rows = torch.cat(key_rows)
        lengths = torch.tensor([bounds[i + 1] - bounds[i] for i in range(n)], device=device)
        seg_of_row = torch.repeat_interleave(torch.arange(n, device=device), lengths)
        starts = torch.tensor(bounds[:-1], device=device)
        q_seg = seg_of_row[a:b]
        q_pos = torch.arange(a, b, device=device) - starts[q_seg]
        k_seg = seg_of_row[key_rows]
        k_pos = key_rows - starts[k_seg]
        q_pre = torch.tensor(pre, device=device)[q_seg]
        own = k_seg[None, :] == q_seg[:, None]
        if config.causal:
            own = own & (k_pos[None, :] <= q_pos[:, None])
        mask = own | ((k_seg[None, :] == q_pre[:, None]) & (q_pre[:, None] != q_seg[:, None]))
        keys = k.index_select(0, key_rows).transpose(0, 1)[None]
        values = v.index_select(0, key_rows).transpose(0, 1)[None]
        o = attend_reference(q[a:b].transpose(0, 1)[None], keys, values, mask, config)[0].transpose(0, 1)
        pieces.append((a, b, o))
    if not pieces:
        return out
    rows = torch.cat([torch.arange(a, b, device=device) for a, b, _ in pieces])
    return out.index_put((rows,), torch.cat([o for _, _, o in pieces]))


def varlen_attention_forward_reference(q, k, v, cu_seqlens, prefix, config: VarlenAttentionConfig):
    """The reference of ``fastrank.kernels.varlen_attention.varlen_attention_forward``: ``(out [M, Hq, D], None)``
    (no log-sum-exp: the reference backward recomputes through autograd)."""
    return _reference_attention(q, k, v, cu_seqlens, prefix, config), None


def varlen_attention_backward_reference(grad_out, q, k, v, cu_seqlens, prefix, out, lse, config):
    """The reference of ``fastrank.kernels.varlen_attention.varlen_attention_backward``: ``(dq, dk, dv)``,
    recomputed under autograd (nothing of the forward is kept). The key and value leaves are in the accumulate
    dtype, so a prefix's dk/dv sums the gradients of every segment that reads it there, rounded once."""
    acc = accumulate_dtype(k.dtype)
    with torch.enable_grad():
        qq = q.detach().requires_grad_(True)
        kk, vv = (x.detach().to(acc).requires_grad_(True) for x in (k, v))
        o = _reference_attention(qq, kk.to(k.dtype), vv.to(v.dtype), cu_seqlens, prefix, config)
        dq, dk, dv = torch.autograd.grad(o, (qq, kk, vv), grad_out.to(o.dtype))
    return dq, dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------------------------------------
# autograd and the public function
# ------------------------------------------------------------------------------------------------
# Chooses this op's path apart from the other ops' (falls back to FASTRANK_BACKEND): the interpreted kernel is
# slow, so the CPU tests of whole models run it only where they test it.
ATTENTION_BACKEND_VARIABLE = "FASTRANK_ATTENTION_BACKEND"


def _implementation(backend: str) -> Implementation:
    if backend == "triton":
        from fastrank.kernels import varlen_attention as kernel

        return Implementation(kernel.varlen_attention_forward, kernel.varlen_attention_backward)
    return Implementation(varlen_attention_forward_reference, varlen_attention_backward_reference)


class VarlenAttentionFunction(torch.autograd.Function):
    """varlen_attention's autograd, shared by both paths.

    Inputs: q ``[M, Hq, D]``, k and v ``[M, Hkv, D]``, cu_seqlens ``[S + 1]``, prefix ``[S]`` (or None), a
    ``VarlenAttentionConfig`` and the backend name. Output: ``[M, Hq, D]`` in q's dtype. Saves the inputs, the
    output and the fp32 log-sum-exp ``[Hq, M]`` (Triton path; None on the reference path): never an attention
    matrix.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, prefix, config, backend):
        impl = _implementation(backend)
        out, lse = impl.forward(q, k, v, cu_seqlens, prefix, config)
        ctx.config = config
        ctx.backward_impl = impl.backward
        ctx.save_for_backward(q, k, v, cu_seqlens, prefix, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, cu_seqlens, prefix, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backward_impl(grad_out, q, k, v, cu_seqlens, prefix, out, lse, ctx.config)
        return dq, dk, dv, None, None, None, None


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    prefix: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Attention within the segments of a packed token stream, each segment optionally reading a shared prefix.

    Segment ``s`` is rows ``cu_seqlens[s]:cu_seqlens[s + 1]``. Its queries attend to all keys of segment
    ``prefix[s]`` (when it is not -1) and then to their own segment's keys, causally (a query sees its own keys
    up to itself) or all of them (``causal=False``); so each segment gets exactly what attention over the
    unshared sequence ``[prefix tokens, own tokens]`` gives its own rows, while the prefix is stored and
    computed once. A prefix segment is an ordinary segment of the stream (its queries see only itself).

    Args:
        q: ``[M, Hq, D]`` queries; float16, bfloat16 or float32 (float64 runs the reference path). Any
            strides (e.g. ``q4d[0].transpose(0, 1)`` of HF's ``[1, Hq, M, D]``); a last dimension that is not
            contiguous is copied. ``D`` from 1 to 256.
        k, v: ``[M, Hkv, D]``, same dtype and device; ``Hkv`` divides ``Hq`` (grouped-query attention: query
            head ``h`` reads kv head ``h // (Hq // Hkv)``).
        cu_seqlens: ``[S + 1]`` integer offsets of the segments (0, ..., M), on q's device.
        prefix: ``[S]`` integers: the index of the segment whose keys and values segment ``s`` reads before
            its own, or -1. Many segments may share one prefix; a prefix has no prefix itself.
        max_seqlen: the longest segment's length (sizes the kernels' grids without reading ``cu_seqlens``
            back); None computes it (one device-to-host read).
        causal: causal attention within each segment (the prefix is always seen in full).
        scale: the softmax scale; default ``1 / sqrt(D)``.
        softcap: Gemma 2's ``attn_logit_softcapping``: scores ``softcap * tanh(scale * q.k / softcap)``.

    The path is chosen by ``FASTRANK_ATTENTION_BACKEND`` (``auto``, ``triton`` or ``torch``), which defaults
    to ``FASTRANK_BACKEND``.

    Returns:
        ``[M, Hq, D]`` in q's dtype (fp32 accumulation and softmax). Differentiable in q, k and v; a
        prefix's keys and values receive the gradients of every segment that reads them.

    Raises:
        ValueError: naming the argument: mismatched shapes, dtypes or devices, ``Hq % Hkv != 0``, ``D > 256``,
            ``softcap`` or ``scale`` <= 0, and (value checks, one small read back per call, off with
            ``FASTRANK_CHECKS=0`` or ``fastrank.utils.value_checks(False)``) a ``cu_seqlens`` that does not
            partition the rows, a ``max_seqlen`` shorter than a segment, a ``prefix`` out of range, naming
            its own segment, or chained.
    """
    cu_seqlens, prefix, causal, scale, softcap = check_varlen_attention_inputs(
        q, k, v, cu_seqlens, prefix, max_seqlen, causal, scale, softcap
    )
    sync_ok = can_sync(q)
    if checks_enabled() and sync_ok:
        longest = check_segment_values(cu_seqlens, prefix, q.shape[0], max_seqlen)
        if max_seqlen is None:
            max_seqlen = longest
    elif max_seqlen is None:
        if not sync_ok:
            raise ValueError(
                "max_seqlen: must be given while a CUDA graph is captured or torch.compile traces "
                "(computing it reads cu_seqlens back to the host)"
            )
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    config = VarlenAttentionConfig(causal=causal, scale=scale, softcap=softcap, max_seqlen=max_seqlen)
    backend = "torch" if q.dtype == torch.float64 else select_backend(q, ATTENTION_BACKEND_VARIABLE)
    return VarlenAttentionFunction.apply(q, k, v, cu_seqlens, prefix, config, backend)
