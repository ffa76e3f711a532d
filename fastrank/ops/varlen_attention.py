"""varlen_attention: attention over packed segments of a flat token stream, where a segment may read the keys and
values of a shared prefix segment.

One room: the input checks, the plain-PyTorch reference (the CPU path and the test oracle: per segment,
``scaled_dot_product_attention`` on the prefix's keys followed by the segment's own, exactly what Hugging Face's
sdpa attention computes on the unshared sequence), the autograd Function shared by both paths and the public
function. The Triton kernels and their launch code are in ``fastrank.kernels.varlen_attention``.
"""

from __future__ import annotations

import math
import weakref
from typing import List, Optional

import torch

from fastrank.common import VarlenAttentionConfig, accumulate_dtype
from fastrank.ops.base import (
    FLOAT_DTYPES,
    Implementation,
    compiling,
    dtype_name,
    integer_tensor,
    present,
    require_tensor,
    restore,
    same_device,
    saved_tensor_hooks_active,
)
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
REFERENCE_BUCKET_ROWS = 8192  # padded query rows per attention call of the reference


def attend_reference(q, k, v, mask, config: VarlenAttentionConfig) -> torch.Tensor:
    """Masked attention, HF-style: ``q`` ``[B, Hq, L, D]``, ``k``/``v`` ``[B, Hkv, K, D]``, ``mask`` ``[B, 1, L, K]``,
    bool (True = attend) or, without softcap, sdpa's additive float mask in q's dtype. Returns ``[B, Hq, L, D]``
    in q's dtype.

    Without softcap: ``scaled_dot_product_attention`` in the input dtype with ``enable_gqa`` (the same numbers
    as repeating the kv heads as transformers' ``repeat_kv`` does, without the copies). With softcap, the
    manual computation (HF's eager path) in the accumulate dtype."""
    group = q.shape[1] // k.shape[1]
    if config.softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=config.scale, enable_gqa=group > 1
        )
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    acc = accumulate_dtype(q.dtype)
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * config.scale
    scores = torch.tanh(scores / config.softcap) * config.softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.to(acc)).to(q.dtype)


_ADDITIVE_MASK_MAX = 1 << 20  # entries of a bucket's mask kept as a float mask as well


class _Bucket:
    """Segments of similar length attended in one call: the stream rows its queries ``[B * L]`` and its keys and
    values ``[B * (P + L)]`` read (the prefix's rows, then the segment's own), and the mask ``[B, 1, L, P + L]``.
    A padding slot reads its segment's first row, which every query of the segment sees anyway: masked out (and its
    query's output dropped), it adds exactly nothing, and no value of another segment (not even a NaN) reaches it."""

    def __init__(self, segs, bounds, pre, causal: bool, m: int, device):
        lengths = [bounds[s + 1] - bounds[s] for s in segs]
        heads = [bounds[pre[s] + 1] - bounds[pre[s]] if pre[s] >= 0 else 0 for s in segs]
        n, width, head = len(segs), max(lengths), max(heads)
        q_rows = torch.full((n, width), -1, dtype=torch.long)
        k_rows = torch.empty((n, head + width), dtype=torch.long)
        for i, s in enumerate(segs):
            k_rows[i].fill_(bounds[s])
            q_rows[i, : lengths[i]] = torch.arange(bounds[s], bounds[s + 1])
            k_rows[i, head : head + lengths[i]] = q_rows[i, : lengths[i]]
            if heads[i]:
                k_rows[i, : heads[i]] = torch.arange(bounds[pre[s]], bounds[pre[s] + 1])
        lengths_t, heads_t = torch.tensor(lengths), torch.tensor(heads)
        pos = torch.arange(width)
        own = pos[None, None, :] < lengths_t[:, None, None]  # own key j is a real token
        if causal:
            own = own & (pos[None, None, :] <= pos[None, :, None])
        own = own.expand(n, width, width)
        prefix_keys = (torch.arange(head)[None, :] < heads_t[:, None])[:, None, :].expand(n, width, head)
        mask = torch.cat([prefix_keys, own], dim=2)
        mask[:, :, head] |= ~mask.any(dim=2)  # a padding query row sees one key, never none (no NaN)
        self.shape = (n, width, head + width)
        self.q_read = k_rows[:, head:].reshape(-1)  # (CPU) the query rows: own rows, padding on the first
        self.kv_rows = k_rows.reshape(-1).to(device)
        self.mask = mask[:, None].to(device)
        self.stream_rows = q_rows.reshape(-1)  # (CPU) the stream row of each query row, -1 on padding
        self._additive = {}

    def sdpa_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as sdpa's additive float mask (0 where a key is seen, -inf elsewhere) in ``dtype``: what sdpa
        turns a boolean mask into on every call, made once per dtype here (the same numbers). Only small masks
        are kept so (at most 4 MiB in fp32); a large one stays boolean, its conversion small next to the call."""
        mask = self._additive.get(dtype)
        if mask is None:
            if self.mask.numel() > _ADDITIVE_MASK_MAX:
                return self.mask
            mask = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            mask = self._additive[dtype] = mask.masked_fill_(~self.mask, float("-inf"))
        return mask


class _Plan:
    """A stream's buckets and ``order``: the row of the buckets' concatenated ``[B * L]`` outputs that holds each
    stream row's result (with ``zero_row``, one past them, for rows no segment covers, which only a
    ``cu_seqlens`` left unchecked can leave)."""

    def __init__(self, buckets, m: int, device):
        order = torch.full((m,), -1, dtype=torch.long)
        offset = 0
        for bucket in buckets:
            real = bucket.stream_rows >= 0
            order[bucket.stream_rows[real]] = torch.arange(offset, offset + real.numel())[real]
            offset += real.numel()
        self.zero_row = bool((order < 0).any())
        self.order = torch.where(order < 0, offset, order).to(device)
        self.buckets = buckets
        # All buckets' query rows, concatenated: the stream row each reads.
        reads = [bucket.q_read for bucket in buckets]
        self.q_rows = (torch.cat(reads) if reads else torch.zeros(0, dtype=torch.long)).to(device)
        self.sizes = [bucket.shape[0] * bucket.shape[1] for bucket in buckets]


def _padded_area(segs, bounds, pre) -> int:
    """Query-key pairs one padded attention call over these segments computes: rows x (prefix + own) keys."""
    width = max(bounds[s + 1] - bounds[s] for s in segs)
    head = max(bounds[pre[s] + 1] - bounds[pre[s]] if pre[s] >= 0 else 0 for s in segs)
    return len(segs) * width * (head + width)


def _reference_plan(cu_seqlens, prefix, causal: bool, m: int) -> _Plan:
    """The buckets of a stream, cached on its ``cu_seqlens`` tensor: every layer of a forward (and its
    backward) passes the same segment tensors, and builds the index tensors once."""
    key = (id(cu_seqlens), id(prefix), causal, m)
    version = None if cu_seqlens.is_inference() else cu_seqlens._version  # inference tensors have no counter
    hit = _PLAN_CACHE.get(key)
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == version:
        return hit[2]
    bounds = cu_seqlens.tolist()
    n = len(bounds) - 1
    pre = prefix.tolist() if prefix is not None else [-1] * n
    pre = [p if 0 <= p < n and p != s else -1 for s, p in enumerate(pre)]
    families = []  # the segments without a prefix, then those with one
    for with_prefix in (False, True):
        segs = [s for s in range(n) if (pre[s] >= 0) == with_prefix and bounds[s + 1] > bounds[s]]
        segs.sort(key=lambda s: bounds[s + 1] - bounds[s])
        groups = []
        while segs:  # shortest first; a bucket grows while its padded rows stay under the budget
            take = 1
            while take < len(segs) and (take + 1) * (bounds[segs[take] + 1] - bounds[segs[take]]) <= (
                REFERENCE_BUCKET_ROWS
            ):
                take += 1
            groups.append(segs[:take])
            segs = segs[take:]
        families.append(groups)
    groups = families[0] + families[1]
    if len(groups) == 2 and len(families[0]) == 1:
        # A small stream (one bucket of each kind, e.g. a few prefixes and their documents): one call for both
        # when that costs little more work than two (each call has its own fixed cost).
        merged = sorted(groups[0] + groups[1], key=lambda s: bounds[s + 1] - bounds[s])
        if len(merged) * (bounds[merged[-1] + 1] - bounds[merged[-1]]) <= REFERENCE_BUCKET_ROWS:
            area = _padded_area(merged, bounds, pre)
            if area <= 1.25 * (_padded_area(groups[0], bounds, pre) + _padded_area(groups[1], bounds, pre)):
                groups = [merged]
    buckets = [_Bucket(segs, bounds, pre, causal, m, cu_seqlens.device) for segs in groups]
    plan = _Plan(buckets, m, cu_seqlens.device)
    if len(_PLAN_CACHE) >= 16:
        _PLAN_CACHE.clear()
    _PLAN_CACHE[key] = (weakref.ref(cu_seqlens), version, plan)
    return plan


_PLAN_CACHE: dict = {}


def _reference_attention(q, k, v, cu_seqlens, prefix, config: VarlenAttentionConfig) -> torch.Tensor:
    """All segments, bucketed by length: each bucket's queries against its prefix's and its own keys under a
    mask that lets each query see its prefix and its own segment (causally), which is exactly its unshared
    sequence's attention, as one padded ``scaled_dot_product_attention`` call. The rows are gathered with
    ``index_select`` (every bucket's queries at once) and the results put back in stream order by one more: no
    zero-filled output, no scatter."""
    m, hq, d = q.shape
    plan = _reference_plan(cu_seqlens, prefix, config.causal, m)
    if not plan.buckets:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    hkv = k.shape[1]
    queries = q.index_select(0, plan.q_rows)  # every bucket's query rows
    queries = queries.split(plan.sizes) if len(plan.buckets) > 1 else (queries,)
    pieces = []
    for bucket, qb in zip(plan.buckets, queries):
        n, width, keys = bucket.shape
        qb = qb.view(n, width, hq, d).transpose(1, 2)
        kb, vb = (x.index_select(0, bucket.kv_rows).view(n, keys, hkv, d).transpose(1, 2) for x in (k, v))
        mask = bucket.mask if config.softcap is not None else bucket.sdpa_mask(q.dtype)
        o = attend_reference(qb, kb, vb, mask, config)
        pieces.append(o.transpose(1, 2).reshape(n * width, hq, d))
    if plan.zero_row:
        pieces.append(q.new_zeros((1, hq, d)))
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).index_select(0, plan.order)


class ReferenceGraph:
    """The reference forward's autograd graph, kept for backward when a gradient is needed: its leaves (q, and k
    and v in the accumulate dtype, so a prefix's dk/dv sums the gradients of every segment that reads it there,
    rounded once) and its output. Backward then runs sdpa's own backward on it, as the padded model would,
    instead of computing the attention a second time."""

    def __init__(self, q, k, v, cu_seqlens, prefix, config: VarlenAttentionConfig):
        acc = accumulate_dtype(k.dtype)
        with torch.enable_grad():
            self.leaves = (q.detach().requires_grad_(True),) + tuple(
                x.detach().to(acc).requires_grad_(True) for x in (k, v)
            )
            qq, kk, vv = self.leaves
            self.out = _reference_attention(qq, kk.to(k.dtype), vv.to(v.dtype), cu_seqlens, prefix, config)

    def grads(self, grad_out, k_dtype, v_dtype):
        dq, dk, dv = torch.autograd.grad(self.out, self.leaves, grad_out.to(self.out.dtype))
        return dq, dk.to(k_dtype), dv.to(v_dtype)


def varlen_attention_forward_reference(q, k, v, cu_seqlens, prefix, config: VarlenAttentionConfig, needs_grad=False):
    """The reference of ``fastrank.kernels.varlen_attention.varlen_attention_forward``: ``(out [M, Hq, D], state)``
    where ``state`` is the ``ReferenceGraph`` backward uses when ``needs_grad``, else None (the reference has no
    log-sum-exp)."""
    if needs_grad:
        graph = ReferenceGraph(q, k, v, cu_seqlens, prefix, config)
        return graph.out.detach(), graph
    return _reference_attention(q, k, v, cu_seqlens, prefix, config), None


def varlen_attention_backward_reference(grad_out, q, k, v, cu_seqlens, prefix, out, state, config):
    """The reference of ``fastrank.kernels.varlen_attention.varlen_attention_backward``: ``(dq, dk, dv)`` through
    the forward's ``ReferenceGraph`` (recomputed here when the forward kept none)."""
    graph = state if isinstance(state, ReferenceGraph) else ReferenceGraph(q, k, v, cu_seqlens, prefix, config)
    return graph.grads(grad_out, k.dtype, v.dtype)


# ------------------------------------------------------------------------------------------------
# autograd and the public function
# ------------------------------------------------------------------------------------------------
# Chooses this op's path apart from the other ops' (falls back to FASTRANK_BACKEND): the interpreted kernel is
# slow, so the CPU tests of whole models run it only where they test it.
ATTENTION_BACKEND_VARIABLE = "FASTRANK_ATTENTION_BACKEND"


# ------------------------------------------------------------------------------------------------
# both paths as custom ops, for torch.compile (see fastrank.ops.base.compiling)
# ------------------------------------------------------------------------------------------------
# The reference is one too: it plans its buckets from cu_seqlens read back to the host, which a traced graph
# cannot do, so under torch.compile it runs as one opaque node, without keeping its autograd graph (backward
# recomputes it, as under activation checkpointing).
@torch.library.custom_op("fastrank::varlen_attention_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix: Optional[torch.Tensor],
    causal: bool,
    scale: float,
    softcap: Optional[float],
    max_seqlen: int,
    backend: str,
) -> List[torch.Tensor]:
    """``[out]`` on the reference path, ``[out, lse]`` on the Triton path."""
    config = VarlenAttentionConfig(causal=causal, scale=scale, softcap=softcap, max_seqlen=max_seqlen)
    out, lse = _eager_implementation(backend).forward(q, k, v, cu_seqlens, prefix, config)
    return present(out, lse)


@_forward_op.register_fake
def _(q, k, v, cu_seqlens, prefix, causal, scale, softcap, max_seqlen, backend):
    m, hq, _ = q.shape
    lse = q.new_empty((hq, m), dtype=torch.float32) if backend == "triton" else None
    return present(q.new_empty(q.shape), lse)


@torch.library.custom_op("fastrank::varlen_attention_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: Optional[torch.Tensor],
    causal: bool,
    scale: float,
    softcap: Optional[float],
    max_seqlen: int,
    backend: str,
) -> List[torch.Tensor]:
    config = VarlenAttentionConfig(causal=causal, scale=scale, softcap=softcap, max_seqlen=max_seqlen)
    if backend == "triton":
        backward = _eager_implementation(backend).backward
        return list(backward(grad_out, q, k, v, cu_seqlens, prefix, out, lse, config))
    # A custom op runs below autograd, where the ReferenceGraph's autograd.grad records nothing; torch.func's
    # vjp brings its own: the same backward formulas (sdpa's, index_select's), with k and v in the accumulate
    # dtype as ReferenceGraph has them.
    acc = accumulate_dtype(k.dtype)

    def attend(qq, kk, vv):
        return _reference_attention(qq, kk.to(k.dtype), vv.to(v.dtype), cu_seqlens, prefix, config)

    _, vjp = torch.func.vjp(attend, q, k.to(acc), v.to(acc))
    dq, dk, dv = vjp(grad_out.to(q.dtype))
    return [dq, dk.to(k.dtype), dv.to(v.dtype)]


@_backward_op.register_fake
def _(grad_out, q, k, v, cu_seqlens, prefix, out, lse, causal, scale, softcap, max_seqlen, backend):
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)]


def _compiled_implementation(backend: str) -> Implementation:
    def forward(q, k, v, cu_seqlens, prefix, config: VarlenAttentionConfig, needs_grad: bool = False):
        c = config
        outputs = _forward_op(q, k, v, cu_seqlens, prefix, c.causal, c.scale, c.softcap, c.max_seqlen, backend)
        return restore(outputs, True, backend == "triton")

    def backward(grad_out, q, k, v, cu_seqlens, prefix, out, lse, config: VarlenAttentionConfig):
        c = config
        dq, dk, dv = _backward_op(
            grad_out, q, k, v, cu_seqlens, prefix, out, lse, c.causal, c.scale, c.softcap, c.max_seqlen, backend
        )
        return dq, dk, dv

    return Implementation(forward, backward)


def _eager_implementation(backend: str) -> Implementation:
    if backend == "triton":
        from fastrank.kernels import varlen_attention as kernel

        return Implementation(kernel.varlen_attention_forward, kernel.varlen_attention_backward)
    return Implementation(varlen_attention_forward_reference, varlen_attention_backward_reference)


def _implementation(backend: str) -> Implementation:
    return _compiled_implementation(backend) if compiling() else _eager_implementation(backend)


class VarlenAttentionFunction(torch.autograd.Function):
    """varlen_attention's autograd, shared by both paths.

    Inputs: q ``[M, Hq, D]``, k and v ``[M, Hkv, D]``, cu_seqlens ``[S + 1]``, prefix ``[S]`` (or None), a
    ``VarlenAttentionConfig`` and the backend name. Output: ``[M, Hq, D]`` in q's dtype. Saves the inputs, the
    output and the forward's state: the fp32 log-sum-exp ``[Hq, M]`` on the Triton path (never an attention
    matrix); on the reference path, when a gradient is needed, the reference's own autograd graph (what the
    padded model's sdpa would keep).
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, prefix, config, backend):
        impl = _implementation(backend)
        # Under activation checkpointing (saved-tensor hooks active) nothing beyond the saved tensors may be
        # kept: the reference recomputes in backward instead of holding its graph.
        # (The Triton path keeps only its log-sum-exp and the custom ops nothing, whatever `keep` says.)
        keep = any(ctx.needs_input_grad[:3])
        if backend == "torch" and not compiling():
            keep = keep and not saved_tensor_hooks_active()
        out, state = impl.forward(q, k, v, cu_seqlens, prefix, config, needs_grad=keep)
        ctx.config = config
        ctx.backward_impl = impl.backward
        lse = state if isinstance(state, torch.Tensor) else None
        ctx.graph = None if lse is not None else state
        ctx.save_for_backward(q, k, v, cu_seqlens, prefix, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, cu_seqlens, prefix, out, lse = ctx.saved_tensors
        state = lse if ctx.graph is None else ctx.graph
        ctx.graph = None  # release the reference graph once used
        dq, dk, dv = ctx.backward_impl(grad_out, q, k, v, cu_seqlens, prefix, out, state, ctx.config)
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
    if backend == "torch" and not compiling():
        # The reference is made of differentiable torch ops, so it runs under torch's own autograd (sdpa's backward,
        # index_select's): the numbers of VarlenAttentionFunction's torch path, whose ReferenceGraph keeps this same
        # graph, without the Function's and a nested autograd.grad's cost per call (a large part of a small call).
        # Saved-tensor hooks (checkpointing, offloading) see every tensor it keeps.
        return _reference_attention(q, k, v, cu_seqlens, prefix, config)
    return VarlenAttentionFunction.apply(q, k, v, cu_seqlens, prefix, config, backend)
