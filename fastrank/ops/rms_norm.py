"""rms_norm: the RMSNorm of Hugging Face decoder layers (Llama, Qwen2/3, Mistral; Gemma, Gemma 2 with
``unit_offset``), optionally fused with the residual add that precedes it.

One room: the configuration, the input checks, the plain-PyTorch reference (the CPU path and the test oracle),
the autograd Function shared by both paths and the public function. The Triton kernels and their launch code
are in ``fastrank.kernels.rms_norm``.

Numerics follow the HF modules op for op (``LlamaRMSNorm`` / ``Qwen2RMSNorm``, ``GemmaRMSNorm`` /
``Gemma2RMSNorm``): statistics in fp32, and the output rounded where the module rounds it. The reference path
runs the very same torch ops, so on CPU its forward equals the HF module's bit for bit in every dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch

from fastrank.common import accumulate_dtype
from fastrank.ops.base import (
    FLOAT_DTYPES,
    Implementation,
    compiling,
    dtype_name,
    present,
    require_tensor,
    restore,
    same_device,
)
from fastrank.utils import select_backend


@dataclass(frozen=True)
class RMSNormConfig:
    """The static part of an rms_norm call."""

    eps: float  # added to mean(x^2) before the rsqrt
    unit_offset: bool  # Gemma: scale by (1 + weight) in fp32, one rounding; else weight * n.to(x.dtype)
    has_residual: bool  # s = residual + x is formed (and returned) first, and normalised


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def check_rms_norm_inputs(x, weight, eps, residual, unit_offset) -> RMSNormConfig:
    """Validate rms_norm's arguments; a ValueError naming the argument otherwise."""
    require_tensor("x", x, "[..., H]")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x: must be float16, bfloat16 or float32, got {dtype_name(x.dtype)}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x: must be [..., H] with H >= 1, got shape {tuple(x.shape)}")
    h = x.shape[-1]
    require_tensor("weight", weight, "[H]")
    if weight.dim() != 1 or weight.shape[0] != h:
        raise ValueError(f"weight: must be 1-D [H] with H={h} (x's last dimension), got shape {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight: must be a floating-point tensor, got {dtype_name(weight.dtype)}")
    same_device("weight", weight, x, "x")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: must be a finite number >= 0, got {eps!r}")
    if not isinstance(unit_offset, bool):
        raise ValueError(f"unit_offset: must be True (Gemma: scale by 1 + weight) or False, got {unit_offset!r}")
    if residual is not None:
        require_tensor("residual", residual, "shaped like x")
        if residual.shape != x.shape:
            raise ValueError(f"residual: shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(
                f"residual: dtype {dtype_name(residual.dtype)} differs from x's {dtype_name(x.dtype)}; "
                "HF adds the two in the hidden states' dtype, cast one of them"
            )
        same_device("residual", residual, x, "x")
    return RMSNormConfig(eps=float(eps), unit_offset=unit_offset, has_residual=residual is not None)


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------
def rms_norm_forward_reference(x, weight, residual, config: RMSNormConfig, needs_grad: bool):
    """The reference of ``fastrank.kernels.rms_norm.rms_norm_forward``: ``(out, s or None, rstd [M] or None)``.

    The ops of the HF modules in their order (so the outputs are theirs bit for bit), with fewer temporaries:
    products land in place in tensors this function allocated. float64 input is normalised in float64 (for
    gradcheck), where the HF modules would drop to float32."""
    s = None
    if residual is not None:
        s = residual + x
        x = s
    acc = accumulate_dtype(x.dtype)
    h = x.to(acc)
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + config.eps)
    n = h.mul_(rstd) if h is not x else h * rstd
    if config.unit_offset:
        out = n.mul_(1.0 + weight.to(acc)).to(x.dtype)
    elif torch.promote_types(weight.dtype, x.dtype) == x.dtype and not (x.dtype == torch.bfloat16 and x.is_cpu):
        # a fresh tensor either way: `weight * n` in place. (torch's in-place bf16 multiply on CPU is slower than
        # its out-of-place one, by 30% at 1024 x 896.)
        out = n.to(x.dtype).mul_(weight)
    else:
        out = weight * n.to(x.dtype)
    return out, s, (rstd.reshape(-1) if needs_grad else None)


def rms_norm_backward_reference(grad_out, grad_s, xs, weight, rstd, config: RMSNormConfig, needs_weight_grad: bool):
    """The reference of ``fastrank.kernels.rms_norm.rms_norm_backward``: ``(dx, dweight or None)``, computed in
    fp32 (fp64 for fp64 input) from the saved ``xs`` (x, or s) and ``rstd``, rounded once at the end."""
    acc = accumulate_dtype(xs.dtype)
    rstd = rstd.view(*xs.shape[:-1], 1)
    n = xs.to(acc) * rstd
    g = grad_out.to(acc)
    dweight = None
    if config.unit_offset:
        w = 1.0 + weight.to(acc)
        if needs_weight_grad:
            dweight = (g * n).reshape(-1, n.shape[-1]).sum(0)
    else:
        w = weight.to(acc)
        if needs_weight_grad:  # the forward multiplied weight by n rounded to x's dtype
            dweight = (g * n.to(xs.dtype)).reshape(-1, n.shape[-1]).sum(0, dtype=acc)
    gn = g * w
    c = (gn * n).mean(-1, keepdim=True)
    dx = gn.sub_(n.mul_(c)).mul_(rstd)
    if grad_s is not None:
        dx += grad_s
    return dx.to(xs.dtype), (dweight.to(weight.dtype) if dweight is not None else None)


# ------------------------------------------------------------------------------------------------
# the Triton path as custom ops, for torch.compile (see fastrank.ops.base.compiling)
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastrank::rms_norm_forward", mutates_args=())
def _forward_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: Optional[torch.Tensor],
    eps: float,
    unit_offset: bool,
    needs_grad: bool,
) -> List[torch.Tensor]:
    from fastrank.kernels import rms_norm as kernel

    config = RMSNormConfig(eps=eps, unit_offset=unit_offset, has_residual=residual is not None)
    return present(*kernel.rms_norm_forward(x, weight, residual, config, needs_grad))


@_forward_op.register_fake
def _(x, weight, residual, eps, unit_offset, needs_grad):
    out_dtype = x.dtype if unit_offset else torch.promote_types(weight.dtype, x.dtype)
    out = x.new_empty(x.shape, dtype=out_dtype)
    s = x.new_empty(x.shape) if residual is not None else None
    rstd = x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32) if needs_grad else None
    return present(out, s, rstd)


@torch.library.custom_op("fastrank::rms_norm_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor,
    grad_s: Optional[torch.Tensor],
    xs: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    unit_offset: bool,
    needs_weight_grad: bool,
) -> List[torch.Tensor]:
    from fastrank.kernels import rms_norm as kernel

    config = RMSNormConfig(eps=0.0, unit_offset=unit_offset, has_residual=grad_s is not None)
    return present(*kernel.rms_norm_backward(grad_out, grad_s, xs, weight, rstd, config, needs_weight_grad))


@_backward_op.register_fake
def _(grad_out, grad_s, xs, weight, rstd, unit_offset, needs_weight_grad):
    return present(xs.new_empty(xs.shape), weight.new_empty(weight.shape) if needs_weight_grad else None)


def _forward_compiled(x, weight, residual, config: RMSNormConfig, needs_grad: bool):
    outputs = _forward_op(x, weight, residual, config.eps, config.unit_offset, needs_grad)
    return restore(outputs, True, residual is not None, needs_grad)


def _backward_compiled(grad_out, grad_s, xs, weight, rstd, config: RMSNormConfig, needs_weight_grad: bool):
    outputs = _backward_op(grad_out, grad_s, xs, weight, rstd, config.unit_offset, needs_weight_grad)
    return restore(outputs, True, needs_weight_grad)


# ------------------------------------------------------------------------------------------------
# autograd and the public function
# ------------------------------------------------------------------------------------------------
def _implementation(backend: str) -> Implementation:
    if backend == "triton":
        if compiling():
            return Implementation(_forward_compiled, _backward_compiled)
        from fastrank.kernels import rms_norm as kernel

        return Implementation(kernel.rms_norm_forward, kernel.rms_norm_backward)
    return Implementation(rms_norm_forward_reference, rms_norm_backward_reference)


class RMSNormFunction(torch.autograd.Function):
    """rms_norm's autograd, shared by both paths.

    Inputs: x, weight, residual (or None), an ``RMSNormConfig`` and the backend name. Outputs: the normalised
    ``out``, and with a residual also ``s = residual + x``. Saves the normalised input (x, or s), the weight and
    the fp32 ``rstd`` per row: never an fp32 copy of the hidden states. The gradient of s is the sum of what
    flows from both outputs; x and residual both receive it.
    """

    @staticmethod
    def forward(ctx, x, weight, residual, config, backend):
        impl = _implementation(backend)
        needs_grad = any(ctx.needs_input_grad[:3])
        out, s, rstd = impl.forward(x, weight, residual, config, needs_grad=needs_grad)
        ctx.config = config
        ctx.backward_impl = impl.backward
        if needs_grad:
            ctx.save_for_backward(s if s is not None else x, weight, rstd)
        if s is None:
            return out
        return out, s

    @staticmethod
    def backward(ctx, grad_out, grad_s=None):
        xs, weight, rstd = ctx.saved_tensors
        dx, dweight = ctx.backward_impl(
            grad_out, grad_s, xs, weight, rstd, ctx.config, needs_weight_grad=ctx.needs_input_grad[1]
        )
        dresidual = dx if ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None), dweight, dresidual, None, None


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    residual: Optional[torch.Tensor] = None,
    unit_offset: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """RMSNorm over the last dimension with the numerics of the Hugging Face modules, optionally fused with the
    residual add before it.

    Args:
        x: ``[..., H]`` hidden states, float16, bfloat16 or float32 (any leading dims, any strides; float64
            runs the reference path in float64).
        weight: ``[H]`` scale, any float dtype, on x's device.
        eps: added to ``mean(x^2)`` (the module's ``variance_epsilon`` / ``eps``).
        residual: optional ``[..., H]`` tensor shaped like x with x's dtype. Then ``s = residual + x`` is
            formed in x's dtype (HF's ``hidden_states = residual + hidden_states``) and normalised.
        unit_offset: ``False`` (Llama, Qwen2, Qwen3, Mistral): ``weight * (x * rstd).to(x.dtype)``, statistics
            in fp32, the normalised value rounded to x's dtype before the multiply; the output dtype is
            ``torch.promote_types(weight.dtype, x.dtype)``. ``True`` (Gemma, Gemma 2):
            ``((x * rstd) * (1 + weight.float())).to(x.dtype)``: one rounding, output in x's dtype.

    Returns:
        ``out`` shaped like x; with ``residual``, the tuple ``(out, s)`` where ``s`` (x's dtype) is the new
        residual stream. Differentiable in x, weight and residual (fp32 math; the weight gradient is summed
        over rows in fp32); with a residual, s's gradient is the sum of what reaches it through ``out`` and
        directly.

    Raises:
        ValueError: naming the argument, for a wrong shape, dtype or device, or a bad ``eps``/``unit_offset``.
    """
    config = check_rms_norm_inputs(x, weight, eps, residual, unit_offset)
    backend = "torch" if torch.float64 in (x.dtype, weight.dtype) else select_backend(x)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, residual))):
        out, s, _ = _implementation(backend).forward(x, weight, residual, config, needs_grad=False)
        return out if residual is None else (out, s)
    if residual is None:
        return RMSNormFunction.apply(x, weight, None, config, backend)
    out, s = RMSNormFunction.apply(x, weight, residual, config, backend)
    return out, s
