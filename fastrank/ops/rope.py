"""rope: rotary position embedding of q and k, Hugging Face's ``apply_rotary_pos_emb`` bit for bit.

One room: the input checks, the plain-PyTorch reference (the CPU path and the test oracle), the autograd
Function shared by both paths and the public function. The Triton kernel and its launch code are in
``fastrank.kernels.rope``.

The Llama family (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2) rotates ``q`` ``[B, Hq, T, D]`` and ``k``
``[B, Hkv, T, D]`` by ``cos``/``sin`` ``[B, T, D]`` as ``x * cos + rotate_half(x) * sin`` with
``rotate_half(x) = cat(-x2, x1)``. Per half of the head dim that is ``out1 = x1*c1 - x2*s1`` and
``out2 = x2*c2 + x1*s2``: both paths compute exactly that, rounding each product and the sum to the input
dtype as HF's three tensor ops do, so their outputs equal HF's (bit for bit on the reference path and on a
GPU; the Triton interpreter truncates bf16 casts, see ``fastrank.kernels.rope``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch.autograd.function import once_differentiable

from fastrank.ops.base import Implementation, compiling, dtype_name, require_tensor, same_device
from fastrank.utils import select_backend

ROPE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class RopeConfig:
    """The static part of a rope call."""

    inplace: bool = False  # write the results into q and k (inference, no autograd) instead of new tensors


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def check_rope_inputs(q, k, cos, sin, inplace) -> Tuple[RopeConfig, torch.Tensor, torch.Tensor]:
    """Validate rope's arguments. Returns ``(config, cos, sin)`` with 2-D ``[T, D]`` tables viewed as
    ``[1, T, D]``."""
    require_tensor("q", q, "[B, Hq, T, D]")
    require_tensor("k", k, "[B, Hkv, T, D]")
    if q.dim() != 4:
        raise ValueError(f"q: must be [B, Hq, T, D] (HF's layout, after .transpose(1, 2)), got shape {tuple(q.shape)}")
    if q.dtype not in ROPE_DTYPES:
        raise ValueError(f"q: must be float16, bfloat16 or float32 (float64 for gradcheck), got {dtype_name(q.dtype)}")
    b, _, t, d = q.shape
    if d % 2 != 0 or d == 0:
        raise ValueError(f"q: head dim D={d} must be even and positive; rope rotates the two halves of D")
    if k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (b, t, d):
        raise ValueError(
            f"k: must be [B, Hkv, T, D] with q's B={b}, T={t}, D={d} (Hkv may differ), got shape {tuple(k.shape)}"
        )
    if k.dtype != q.dtype:
        raise ValueError(f"k: dtype {dtype_name(k.dtype)} differs from q's {dtype_name(q.dtype)}; cast one of them")
    same_device("k", k, q, "q")
    tables = []
    for name, table in (("cos", cos), ("sin", sin)):
        require_tensor(name, table, "[B, T, D]")
        if table.dim() == 2:
            table = table.unsqueeze(0)
        if table.dim() != 3 or table.shape[0] not in (1, b) or tuple(table.shape[1:]) != (t, d):
            raise ValueError(
                f"{name}: must be [B, T, D] = [{b}, {t}, {d}] (or batch 1, or [T, D], shared by every row), "
                f"got shape {tuple(table.shape)}"
            )
        if table.dtype != q.dtype:
            raise ValueError(
                f"{name}: dtype {dtype_name(table.dtype)} differs from q's {dtype_name(q.dtype)}; pass "
                f"{name}.to(q.dtype), as HF's rotary embedding returns it in the hidden states' dtype"
            )
        same_device(name, table, q, "q")
        if table.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"{name}: requires grad, but rope gives no gradient to cos and sin (HF computes them from buffers "
                f"under no_grad); pass {name}.detach()"
            )
        tables.append(table)
    if not isinstance(inplace, bool):
        raise ValueError(f"inplace: must be True or False, got {inplace!r}")
    if inplace:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise ValueError(
                "inplace: True overwrites q and k, which autograd needs; use it under torch.no_grad() "
                "(inference), or leave it False when training"
            )
        for name, x in (("q", q), ("k", k)):
            if any(s == 0 and n > 1 for s, n in zip(x.stride(), x.shape)):
                raise ValueError(f"{name}: inplace=True needs a tensor with memory of its own, not an expanded view")
        if q.numel() and not compiling() and q.data_ptr() == k.data_ptr():  # (Dynamo cannot compare pointers)
            raise ValueError("k: is the same tensor as q; inplace=True would rotate it twice")
    return RopeConfig(inplace=inplace), tables[0], tables[1]


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------
def _out_like(x: torch.Tensor) -> torch.Tensor:
    """An empty ``[B, H, T, D]`` tensor laid out in memory as ``[B, T, H, D]`` (as the kernel writes it)."""
    b, h, t, d = x.shape
    return torch.empty((b, t, h, d), dtype=x.dtype, device=x.device).transpose(1, 2)


# The reference takes the tokens in steps of B * step * H * D ~ _CHUNK_ELEMENTS elements, so that each step's
# temporary stays in cache; a tensor of at most _ONE_STEP_ELEMENTS fits there whole and goes in one step
# (fewer, larger ops). Both chosen by timing on one CPU thread.
_CHUNK_ELEMENTS = 1 << 17
_ONE_STEP_ELEMENTS = 1 << 20


def _tables(cos, sin, backward: bool):
    """``(cos, sa, sb)`` as ``[Bc, 1, T, *]`` views that broadcast over heads, with ``rotate_half(x) * sin =
    [x2 * sa, x1 * sb]``: ``(sa, sb) = (-s1, s2)``, since ``(-x2) * s1`` rounds to exactly ``x2 * (-s1)``; for
    backward (``dx1 = g1*c1 + g2*s2``, ``dx2 = g2*c2 - g1*s1``) ``(s2, -s1)``. Negating half the small table
    costs far less than negating half of x."""
    half = cos.shape[-1] // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    s1, s2 = sin[..., :half], sin[..., half:]
    return (cos, s2, -s1) if backward else (cos, -s1, s2)


def _rotate_step(x, cos, sa, sb, out, rotated) -> None:
    """``out = x * cos + [x2 * sa, x1 * sb]``, each product and the sum rounded to x's dtype, through the
    buffer ``rotated`` shaped like x: one full product, two half products and one sum, where HF's formula
    makes five full-size tensors. ``out`` may be ``x`` (the products that read x come first)."""
    half = x.shape[-1] // 2
    torch.mul(x[..., half:], sa, out=rotated[..., :half])
    torch.mul(x[..., :half], sb, out=rotated[..., half:])
    torch.mul(x, cos, out=out)
    torch.add(out, rotated, out=out)


def _rotate_into(x, tables, out) -> None:
    """``out = x * cos + rotate_half(x) * sin`` (``tables`` from ``_tables``; for backward, its transpose
    ``x * cos + rotate_half^T(x * sin)``), rounded as HF's ops round it. A tensor larger than
    ``_ONE_STEP_ELEMENTS`` goes in steps of about ``_CHUNK_ELEMENTS`` tokens' elements, whose temporary
    stays in cache (on one CPU thread at 8,192 tokens of Qwen2.5-0.5B's shape: forward 1.3-1.5x faster
    than HF's formula in bf16, 1.7-2.7x in fp32; see fastrank.benchmarks.rope). ``out`` may be ``x`` itself
    (in place: each step reads its tokens before overwriting them), but must not overlap it otherwise."""
    cos, sa, sb = tables
    b, h, t, d = x.shape
    if x.numel() <= _ONE_STEP_ELEMENTS:
        _rotate_step(x, cos, sa, sb, out, _out_like(x))
        return
    step = max(1, _CHUNK_ELEMENTS // (b * h * d))
    rotated = _out_like(x[:, :, :step])
    for t0 in range(0, t, step):
        rows = slice(t0, min(t, t0 + step))
        xs = x[:, :, rows]
        _rotate_step(xs, cos[:, :, rows], sa[:, :, rows], sb[:, :, rows], out[:, :, rows], rotated[:, :, : xs.shape[2]])


def rope_forward_reference(q, k, cos, sin, config: RopeConfig):
    """The reference of ``fastrank.kernels.rope.rope_forward``: ``(q_out, k_out)``, new tensors laid out as
    ``[B, T, H, D]``, or q and k overwritten when ``config.inplace``."""
    q_out, k_out = (q, k) if config.inplace else (_out_like(q), _out_like(k))
    tables = _tables(cos, sin, backward=False)
    _rotate_into(q, tables, q_out)
    _rotate_into(k, tables, k_out)
    return q_out, k_out


def rope_backward_reference(grad_q, grad_k, cos, sin, config: RopeConfig):
    """The reference of ``fastrank.kernels.rope.rope_backward``: ``(dq, dk)`` laid out as ``[B, T, H, D]``,
    with autograd-through-HF's rounding: ``dx1 = r(r(g1*c1) + r(g2*s2))``, ``dx2 = r(r(g2*c2) - r(g1*s1))``."""
    dq, dk = _out_like(grad_q), _out_like(grad_k)
    tables = _tables(cos, sin, backward=True)
    _rotate_into(grad_q, tables, dq)
    _rotate_into(grad_k, tables, dk)
    return dq, dk


# ------------------------------------------------------------------------------------------------
# the Triton path as custom ops, for torch.compile (see fastrank.ops.base.compiling)
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastrank::rope_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> List[torch.Tensor]:
    from fastrank.kernels import rope as kernel

    return list(kernel.rope_forward(q, k, cos, sin, RopeConfig(inplace=False)))


@_forward_op.register_fake
def _(q, k, cos, sin):
    return [_out_like(q), _out_like(k)]


@torch.library.custom_op("fastrank::rope_inplace", mutates_args=("q", "k"))
def _inplace_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    from fastrank.kernels import rope as kernel

    kernel.rope_forward(q, k, cos, sin, RopeConfig(inplace=True))


@_inplace_op.register_fake
def _(q, k, cos, sin):
    return None


@torch.library.custom_op("fastrank::rope_backward", mutates_args=())
def _backward_op(
    grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> List[torch.Tensor]:
    from fastrank.kernels import rope as kernel

    return list(kernel.rope_backward(grad_q, grad_k, cos, sin, RopeConfig()))


@_backward_op.register_fake
def _(grad_q, grad_k, cos, sin):
    return [_out_like(grad_q), _out_like(grad_k)]


def _forward_compiled(q, k, cos, sin, config: RopeConfig):
    if config.inplace:
        _inplace_op(q, k, cos, sin)
        return q, k
    q_out, k_out = _forward_op(q, k, cos, sin)
    return q_out, k_out


def _backward_compiled(grad_q, grad_k, cos, sin, config: RopeConfig):
    dq, dk = _backward_op(grad_q, grad_k, cos, sin)
    return dq, dk


# ------------------------------------------------------------------------------------------------
# autograd and the public function
# ------------------------------------------------------------------------------------------------
def _rotate_traced(x, tables):
    """``_rotate_into``'s result as plain tensor ops, for Dynamo to trace (it refuses ``out=`` into a strided
    view): the same products and sum, each rounded to x's dtype, for Inductor to fuse."""
    cos, sa, sb = tables
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:] * sa, x[..., :half] * sb), dim=-1)


def _forward_traced(q, k, cos, sin, config: RopeConfig):
    tables = _tables(cos, sin, backward=False)
    q_out, k_out = _rotate_traced(q, tables), _rotate_traced(k, tables)
    if config.inplace:
        return q.copy_(q_out), k.copy_(k_out)
    return q_out, k_out


def _backward_traced(grad_q, grad_k, cos, sin, config: RopeConfig):
    tables = _tables(cos, sin, backward=True)
    return _rotate_traced(grad_q, tables), _rotate_traced(grad_k, tables)


def _implementation(backend: str) -> Implementation:
    if compiling():
        if backend == "triton":
            return Implementation(_forward_compiled, _backward_compiled)
        return Implementation(_forward_traced, _backward_traced)
    if backend == "triton":
        from fastrank.kernels import rope as kernel

        return Implementation(kernel.rope_forward, kernel.rope_backward)
    return Implementation(rope_forward_reference, rope_backward_reference)


class RopeFunction(torch.autograd.Function):
    """rope's autograd, shared by both paths.

    Inputs: q, k, cos, sin, a ``RopeConfig`` and the backend name. Outputs: the rotated q and k. Saves only
    cos and sin (the map is linear in q and k); gives no gradient to cos and sin (the checks refuse tables
    that require one). With ``config.inplace`` the outputs are q and k themselves, marked dirty.
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, config, backend):
        impl = _implementation(backend)
        q_out, k_out = impl.forward(q, k, cos, sin, config)
        if config.inplace:
            ctx.mark_dirty(q, k)
        ctx.config = config
        ctx.backward_impl = impl.backward
        ctx.save_for_backward(cos, sin)
        return q_out, k_out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        dq, dk = ctx.backward_impl(grad_q, grad_k, cos, sin, ctx.config)
        return dq, dk, None, None, None, None


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inplace: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary position embeddings to q and k in one pass: HF's ``apply_rotary_pos_emb(q, k, cos, sin)``
    (``unsqueeze_dim=1``) of Llama, Mistral, Qwen2, Qwen3, Gemma and Gemma 2, with the same results.

    ``q_embed = q * cos + rotate_half(q) * sin`` with ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``,
    each product and the sum rounded to the input dtype as HF's tensor ops round them, so the outputs equal
    HF's bit for bit (on the reference path and on a GPU; the Triton interpreter truncates bf16 casts,
    within one bf16 ulp per step).

    Args:
        q: ``[B, Hq, T, D]`` queries, float16, bfloat16 or float32, any strides: typically HF's
            non-contiguous ``proj(x).view(B, T, Hq, D).transpose(1, 2)``. D even.
        k: ``[B, Hkv, T, D]`` keys, q's dtype and device (Hkv may differ from Hq: grouped-query attention).
        cos: ``[B, T, D]`` HF's ``position_embeddings[0]`` (batch 1, or ``[T, D]``, is shared by every row),
            in q's dtype (HF's rotary embedding already casts it: a float32 table with half q is refused,
            not promoted). Receives no gradient.
        sin: like ``cos``.
        inplace: write the results into q and k and return them (inference: refused while autograd needs
            q or k). q and k then keep their own layout.

    Returns:
        ``(q_embed, k_embed)`` shaped like q and k, in q's dtype. Unless ``inplace``, they are new tensors laid
        out in memory as ``[B, T, H, D]`` and returned as its ``.transpose(1, 2)`` view ``[B, H, T, D]``: the
        ``[T, H, D]`` rows that attention reads are contiguous (``q_embed.transpose(1, 2)`` is contiguous).
        Differentiable with respect to q and k; their gradients come back in the same ``[B, T, H, D]``
        layout.

    Raises:
        ValueError: naming the argument, for a shape that does not match (q not 4-D, odd D, k's B/T/D or
            cos/sin's shape differing from q's), a dtype or device differing from q's, cos/sin requiring
            grad while autograd is on, or ``inplace=True`` while autograd needs q or k.
    """
    config, cos, sin = check_rope_inputs(q, k, cos, sin, inplace)
    backend = select_backend(q)
    if compiling() and config.inplace:
        # Under torch.compile the graph records the in-place op itself (functionalised, with the version
        # counters torch keeps); mark_dirty is the eager Function's way to the same.
        return _implementation(backend).forward(q, k, cos, sin, config)
    if not config.inplace and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        # Nothing to differentiate (inference): the same forward without the autograd Function's bookkeeping,
        # a few percent of a small call on CPU. In place goes through the Function, which bumps q's and k's
        # version counters (mark_dirty) even where a kernel, not torch, writes them.
        return _implementation(backend).forward(q, k, cos, sin, config)
    return RopeFunction.apply(q, k, cos, sin, config, backend)
