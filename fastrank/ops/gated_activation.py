"""gated_activation: ``act(gate) * up``, the middle of the gated MLP of Hugging Face decoder layers
(``down_proj(act_fn(gate_proj(x)) * up_proj(x))``): SiLU for Qwen, Llama and Mistral, the tanh-approximated GELU
for Gemma and Gemma 2.

One room: the configuration, the input checks, the plain-PyTorch reference (the CPU path and the test oracle),
the autograd Function shared by both paths and the public function. The Triton kernels and their launch code
are in ``fastrank.kernels.gated_activation``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F

from fastrank.ops.base import FLOAT_DTYPES, Implementation, compiling, dtype_name, require_tensor
from fastrank.utils import select_backend

ACTIVATIONS = ("silu", "gelu_tanh")

# HF config names (``hidden_act`` / Gemma 2's ``hidden_activation``, keys of transformers' ACT2FN) whose
# function is exactly one of ours, numerics included. "gelu_new", "gelu_fast" and "gelu_python_tanh" are the tanh
# approximation too, but written as several torch ops in the input dtype, so they round differently in half
# precision: not mapped. Plain "gelu" is the erf GELU (Gemma's config rewrites its legacy "gelu" itself).
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def activation_name(hf_hidden_act: str) -> Optional[str]:
    """Our activation for an HF config's ``hidden_act`` (``"silu"``, ``"swish"`` -> ``"silu"``;
    ``"gelu_pytorch_tanh"`` -> ``"gelu_tanh"``), or None where gated_activation cannot reproduce it exactly."""
    if not isinstance(hf_hidden_act, str):
        return None
    return HF_ACTIVATIONS.get(hf_hidden_act)


@dataclass(frozen=True)
class GatedActivationConfig:
    """The static part of a gated_activation call."""

    activation: str  # one of ACTIVATIONS


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------
def check_gated_activation_inputs(gate, up, activation) -> GatedActivationConfig:
    """Validate gated_activation's arguments; a ValueError naming the argument otherwise."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        hint = ""
        if isinstance(activation, str) and activation_name(activation):
            hint = f" (HF's {activation!r} is {activation_name(activation)!r} here: see activation_name)"
        raise ValueError(f"activation: {activation!r} is not supported; choose from {', '.join(ACTIVATIONS)}{hint}")
    require_tensor("gate", gate, "[..., I]")
    require_tensor("up", up, "[..., I]")
    if gate.dim() == 0:
        raise ValueError("gate: must be [..., I] with at least one dimension, got a 0-dim tensor")
    if gate.dtype not in FLOAT_DTYPES:
        raise ValueError(f"gate: must be float16, bfloat16 or float32, got {dtype_name(gate.dtype)}")
    if up.dtype != gate.dtype:
        raise ValueError(
            f"up: dtype {dtype_name(up.dtype)} differs from gate's {dtype_name(gate.dtype)}; both come from the "
            "same layer's projections, cast one of them"
        )
    if up.shape != gate.shape:
        raise ValueError(f"up: shape {tuple(up.shape)} differs from gate's {tuple(gate.shape)}")
    if up.device != gate.device:
        raise ValueError(f"up: is on {up.device} but gate is on {gate.device}; move it with .to({str(gate.device)!r})")
    return GatedActivationConfig(activation=activation)


# ------------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------------
def _act(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """The HF activation itself: ``nn.functional.silu`` / ``nn.functional.gelu(approximate="tanh")``."""
    if activation == "silu":
        return F.silu(gate)
    return F.gelu(gate, approximate="tanh")


def gated_activation_forward_reference(gate, up, config: GatedActivationConfig, needs_grad: bool):
    """The reference of ``fastrank.kernels.gated_activation.gated_activation_forward``: HF's
    ``act_fn(gate) * up``, returned as ``(out, act)``. With ``needs_grad`` it keeps ``act(gate)`` for backward,
    as autograd does for the unfused formula (on CPU time matters more than that tensor); otherwise the product
    is written in place into the activation's fresh tensor (the same bits, one temporary fewer) and ``act`` is
    None."""
    act = _act(gate, config.activation)
    if needs_grad or (act.dtype == torch.bfloat16 and act.is_cpu):
        # (torch's in-place bf16 multiply on CPU is slower than its out-of-place one, by 40% at 256 x 4864)
        return act * up, (act if needs_grad else None)
    return act.mul_(up), None


def gated_activation_backward_reference(grad_out, gate, up, act, config: GatedActivationConfig):
    """The reference of ``fastrank.kernels.gated_activation.gated_activation_backward``: ``(d_gate, d_up)``
    through torch's own backward ops (``act`` as saved, recomputed when None): the ops autograd runs for HF's
    unfused formula, so the gradients are HF's bit for bit (each op in fp32 internally, rounded to the inputs'
    dtype between ops, as autograd does)."""
    if act is None:
        act = _act(gate, config.activation)
    d_up = grad_out * act
    d_act = grad_out * up
    if config.activation == "silu":
        d_gate = torch.ops.aten.silu_backward(d_act, gate)
    else:
        d_gate = torch.ops.aten.gelu_backward(d_act, gate, approximate="tanh")
    return d_gate, d_up


# ------------------------------------------------------------------------------------------------
# the Triton path as custom ops, for torch.compile (see fastrank.ops.base.compiling)
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("fastrank::gated_activation_forward", mutates_args=())
def _forward_op(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    from fastrank.kernels import gated_activation as kernel

    out, _ = kernel.gated_activation_forward(gate, up, GatedActivationConfig(activation=activation))
    return out


@_forward_op.register_fake
def _(gate, up, activation):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("fastrank::gated_activation_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str) -> List[torch.Tensor]:
    from fastrank.kernels import gated_activation as kernel

    config = GatedActivationConfig(activation=activation)
    return list(kernel.gated_activation_backward(grad_out, gate, up, None, config))


@_backward_op.register_fake
def _(grad_out, gate, up, activation):
    return [gate.new_empty(gate.shape), up.new_empty(up.shape)]


def _forward_compiled(gate, up, config: GatedActivationConfig, needs_grad: bool = False):
    return _forward_op(gate, up, config.activation), None


def _backward_compiled(grad_out, gate, up, act, config: GatedActivationConfig):
    d_gate, d_up = _backward_op(grad_out, gate, up, config.activation)
    return d_gate, d_up


# ------------------------------------------------------------------------------------------------
# autograd and the public function
# ------------------------------------------------------------------------------------------------
def _implementation(backend: str) -> Implementation:
    if backend == "triton":
        if compiling():
            return Implementation(_forward_compiled, _backward_compiled)
        from fastrank.kernels import gated_activation as kernel

        return Implementation(kernel.gated_activation_forward, kernel.gated_activation_backward)
    return Implementation(gated_activation_forward_reference, gated_activation_backward_reference)


class GatedActivationFunction(torch.autograd.Function):
    """gated_activation's autograd, shared by both paths.

    Inputs: gate, up, a ``GatedActivationConfig`` and the backend name. Output: ``act(gate) * up``. Saves gate
    and up (which the projections produced anyway) and, where the implementation returns it, ``act(gate)``:
    the Triton kernels recompute the activation in registers and keep nothing of the output's size; the
    reference keeps it, as the unfused formula does, to run no slower than that on CPU.
    """

    @staticmethod
    def forward(ctx, gate, up, config, backend):
        impl = _implementation(backend)
        needs_grad = any(ctx.needs_input_grad[:2])
        out, act = impl.forward(gate, up, config, needs_grad=needs_grad)
        ctx.config = config
        ctx.backward_impl = impl.backward
        if needs_grad:
            ctx.save_for_backward(gate, up, act)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, act = ctx.saved_tensors
        d_gate, d_up = ctx.backward_impl(grad_out, gate, up, act, ctx.config)
        return (d_gate if ctx.needs_input_grad[0] else None), (d_up if ctx.needs_input_grad[1] else None), None, None


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``act(gate) * up``, the gated MLP's middle (``down_proj(act_fn(gate_proj(x)) * up_proj(x))``), with HF's
    numerics: ``act(gate)`` is rounded to gate's dtype, then multiplied by ``up`` and rounded.

    Args:
        gate: ``[..., I]`` output of ``gate_proj``, float16, bfloat16 or float32 (any leading dims, any strides;
            float64 runs the reference path).
        up: ``[..., I]`` output of ``up_proj``, gate's shape, dtype and device.
        activation: ``"silu"`` (Qwen, Llama, Mistral: ``hidden_act="silu"``) or ``"gelu_tanh"`` (Gemma, Gemma 2:
            ``gelu_pytorch_tanh``, ``F.gelu(x, approximate="tanh")``). ``activation_name`` maps an HF config's
            ``hidden_act`` to these.

    Returns:
        ``[..., I]`` in gate's dtype. Differentiable in gate and up (the Triton path computes the gradients in
        fp32 and rounds once; the reference runs torch's own backward ops).

    Raises:
        ValueError: naming the argument, for an unsupported activation or a shape, dtype or device mismatch.
    """
    config = check_gated_activation_inputs(gate, up, activation)
    backend = "torch" if gate.dtype == torch.float64 else select_backend(gate)
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return _implementation(backend).forward(gate, up, config, needs_grad=False)[0]
    if backend == "torch" and gate.dtype != torch.float64:
        # The CPU path in training is HF's formula under torch's own autograd: the same ops, saved tensors and
        # backward as the unfused model, so neither time nor memory is spent on a Function around them
        # (GatedActivationFunction's reference path computes the same gradients; the tests check both).
        return _act(gate, config.activation) * up
    return GatedActivationFunction.apply(gate, up, config, backend)
