"""The decoder's elementwise work through fastrank's fused ops, switched on per model instance.

``fuse(model)`` walks one model's modules and gives three kinds of module a ``forward`` of their own (an
instance attribute; the class and every other model are untouched):

- RMSNorm modules (``input_layernorm``, ``post_attention_layernorm``, the final norm, Qwen3's ``q_norm`` /
  ``k_norm``, Gemma 2's four norms per layer): ``fastrank.ops.rms_norm`` with the family's rounding order
  (Llama-style: the normalised value is rounded to the input's dtype, then scaled by the weight; Gemma-style:
  scaled by ``1 + weight`` in fp32, then rounded);
- gated MLPs (``down_proj(act(gate_proj(x)) * up_proj(x))``): ``fastrank.ops.gated_activation`` for the middle,
  SiLU or tanh-GELU, the projections called as they are (LoRA layers included);
- attention modules: the same projections, norms, cache update and attention function lookup as the model's
  own forward, with ``fastrank.ops.rope`` rotating q and k in one kernel instead of HF's four elementwise
  products and two concatenations.

- decoder layers (Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma 2): the residual add after attention fused into the
  norm that follows it (``post_attention_layernorm``; Gemma 2's ``pre_feedforward_layernorm``, after its
  ``post_attention_layernorm`` of the attention's output), ``rms_norm(h, residual=...)``, one pass over the
  hidden states instead of two. The add after the MLP stays as it is: fusing it into the next layer's norm
  would need the model's forward.

transformers 5 checkpoints a layer by wrapping its class's ``forward``, so the layer's fused forward hands every
call made under gradient checkpointing in training to that class forward (which checkpoints, with the fused
norms, MLP and attention inside it), and so it does when the norm carries hooks of its own (the fused layer
would not call the norm as a module).

Each op runs its Triton kernel on CUDA tensors and its PyTorch reference elsewhere, the reference being the HF
formula itself, so a fused model on CPU computes what the unfused one does. Only classes whose numerics were
checked against the unfused model are fused (``tests/test_fusion.py``); anything else keeps its own forward.
``FASTRANK_FUSE=0`` turns fusion off for the loaders; ``unfuse(model)`` removes it.

``fuse(model, kernels="liger")`` makes the same fused forwards call Liger-Kernel's functions instead on CUDA
tensors (its RMSNorm, fused add + RMSNorm, RoPE and SiLU/GELU-times-up), the well-kept alternative the GPU
benchmark measures fastrank's kernels against (``fastrank bench --op rerank``, provider ``fastrank_liger``);
the third, Inductor's code, is ``fastrank.engine.compile``.
"""

from __future__ import annotations

import sys
import types
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from fastrank.engine.attention import unwrap_model, warn_once
from fastrank.utils import env_switch

# model type -> the keyword arguments its attention forward passes the attention function beyond the common ones,
# read from the attention module (values fixed at construction).
_ATTENTION_EXTRAS = {
    "llama": lambda m: {},
    "gemma": lambda m: {},
    "qwen2": lambda m: {"sliding_window": m.sliding_window},
    "qwen3": lambda m: {"sliding_window": m.sliding_window},
    "mistral": lambda m: {"sliding_window": getattr(m.config, "sliding_window", None)},
    "gemma2": lambda m: {"sliding_window": m.sliding_window, "softcap": m.attn_logit_softcapping},
}
FUSABLE_MODEL_TYPES = tuple(_ATTENTION_EXTRAS)

# RMSNorm classes by rounding order (see the module docstring); both compute in fp32.
_LLAMA_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
_GEMMA_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm")
_ATTENTIONS = (
    "LlamaAttention",
    "Qwen2Attention",
    "Qwen3Attention",
    "MistralAttention",
    "GemmaAttention",
    "Gemma2Attention",
)
_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "GemmaMLP", "Gemma2MLP")
# Decoder layers whose residual add after attention is fused into the norm that follows it, by form:
# pre-norm, residual + attn(input_layernorm(x)), then residual + mlp(post_attention_layernorm(.)); and Gemma 2's
# "sandwich", residual + post_attention_layernorm(attn(...)), then the sum's pre_feedforward_layernorm, the MLP,
# post_feedforward_layernorm and the second add.
_PRENORM_LAYERS = (
    "LlamaDecoderLayer",
    "Qwen2DecoderLayer",
    "Qwen3DecoderLayer",
    "MistralDecoderLayer",
    "GemmaDecoderLayer",
)
_SANDWICH_LAYERS = ("Gemma2DecoderLayer",)

_MARK = "_fastrank_fused"


def fusion_requested() -> bool:
    """Whether the loaders fuse (``FASTRANK_FUSE``, default on)."""
    return env_switch("FASTRANK_FUSE")


def fusion_unsupported_reason(model) -> Optional[str]:
    """Why ``model`` cannot be fused, or None when it can."""
    config = getattr(unwrap_model(model), "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FUSABLE_MODEL_TYPES:
        return f"model type {model_type!r} has no checked fusion (checked: {', '.join(FUSABLE_MODEL_TYPES)})"
    return None


# ------------------------------------------------------------------------------------------------
# the instance forwards
# ------------------------------------------------------------------------------------------------
KERNELS = ("fastrank", "liger")


def _liger():
    """Liger-Kernel's functions fastrank's fused forwards call with ``kernels="liger"`` (CUDA tensors only)."""
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    from liger_kernel.ops.geglu import LigerGELUMulFunction
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    return types.SimpleNamespace(
        rms_norm=LigerRMSNormFunction.apply,
        add_rms_norm=LigerFusedAddRMSNormFunction.apply,
        gated={"silu": LigerSiLUMulFunction.apply, "gelu_tanh": LigerGELUMulFunction.apply},
        rope=liger_rotary_pos_emb,
    )


def _uses_liger(module, x: torch.Tensor) -> bool:
    # Liger's kernels run on CUDA only; elsewhere the module runs fastrank's op, whose CPU path is HF's formula.
    return module._fastrank_kernels == "liger" and x.is_cuda


def _liger_norm_modes(module):
    """(offset, casting mode) of Liger's RMSNorm for this norm: Gemma's ``1 + weight`` in fp32, else Llama's
    normalised value rounded to the input's dtype before the weight."""
    return (1.0, "gemma") if module._fastrank_unit_offset else (0.0, "llama")


def _norm_forward(self, hidden_states):
    if _uses_liger(self, hidden_states):
        offset, casting = _liger_norm_modes(self)
        return _liger().rms_norm(hidden_states, self.weight, self._fastrank_eps, offset, casting, False)
    from fastrank.ops.rms_norm import rms_norm

    return rms_norm(hidden_states, self.weight, self._fastrank_eps, unit_offset=self._fastrank_unit_offset)


def _mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    if _uses_liger(self, gate):
        return self.down_proj(_liger().gated[self._fastrank_activation](gate, up))
    from fastrank.ops.gated_activation import gated_activation

    return self.down_proj(gated_activation(gate, up, activation=self._fastrank_activation))


def _layer_forward(self, hidden_states, *args, **kwargs):
    norm = getattr(self, self._fastrank_add_norm)  # the norm the attention's residual add feeds
    if args or (self.gradient_checkpointing and self.training) or norm._forward_hooks or norm._forward_pre_hooks:
        # The class's forward: it checkpoints (transformers 5 wraps it), calls the norm as a module (its hooks
        # run) and binds positional arguments its own way.
        return type(self).forward(self, hidden_states, *args, **kwargs)
    from fastrank.ops.rms_norm import rms_norm

    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
    if self._fastrank_sandwich:  # Gemma 2 normalises the attention's output before adding it
        hidden_states = self.post_attention_layernorm(hidden_states)
    if hidden_states.dtype == residual.dtype and _uses_liger(norm, hidden_states):
        offset, casting = _liger_norm_modes(norm)
        hidden_states, residual = _liger().add_rms_norm(
            hidden_states, residual, norm.weight, norm._fastrank_eps, offset, casting, False
        )
    elif hidden_states.dtype == residual.dtype:
        # HF: hidden_states = residual + hidden_states; norm(hidden_states): the same two steps, the sum rounded
        # to the hidden states' dtype before it is normalised, in one kernel on CUDA.
        hidden_states, residual = rms_norm(
            hidden_states, norm.weight, norm._fastrank_eps, residual=residual, unit_offset=norm._fastrank_unit_offset
        )
    else:  # autocast over fp32 weights: a bf16 attention output joins the fp32 stream, promoted as HF's add does
        residual = residual + hidden_states
        hidden_states = norm(residual)
    hidden_states = self.mlp(hidden_states)
    if self._fastrank_sandwich:
        hidden_states = self.post_feedforward_layernorm(hidden_states)
    return residual + hidden_states


def _attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs
):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from fastrank.ops.rope import rope

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query_states = self.q_proj(hidden_states).view(hidden_shape)
    key_states = self.k_proj(hidden_states).view(hidden_shape)
    if self._fastrank_qk_norm:  # Qwen3 normalises each head before the rotation
        query_states = self.q_norm(query_states)
        key_states = self.k_norm(key_states)
    query_states = query_states.transpose(1, 2)
    key_states = key_states.transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    if cos.dtype == query_states.dtype == key_states.dtype and _uses_liger(self, query_states):
        query_states, key_states = _liger().rope(query_states, key_states, cos, sin)
    elif cos.dtype == query_states.dtype == key_states.dtype:
        query_states, key_states = rope(query_states, key_states, cos, sin)
    else:
        # Autocast over fp32 weights: bf16 q and k against fp32 cos and sin, which HF's products promote to fp32.
        # The model's own function keeps that promotion.
        apply = sys.modules[type(self).__module__].apply_rotary_pos_emb
        query_states, key_states = apply(query_states, key_states, cos, sin)

    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

    eager = getattr(sys.modules.get(type(self).__module__), "eager_attention_forward", None)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=self.attention_dropout if self.training else 0.0,
        scaling=self.scaling,
        **self._fastrank_extras,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


# ------------------------------------------------------------------------------------------------
# choosing what to fuse
# ------------------------------------------------------------------------------------------------
def _activation_of(act_fn) -> Optional[str]:
    """``"silu"`` or ``"gelu_tanh"`` when ``act_fn`` computes exactly that (probed on a small fp32 tensor: a
    module's name is not proof of its formula), else None."""
    probe = torch.linspace(-6.0, 6.0, 97)
    try:
        out = act_fn(probe)
    except Exception:  # noqa: BLE001
        return None
    if torch.equal(out, F.silu(probe)):
        return "silu"
    if torch.equal(out, F.gelu(probe, approximate="tanh")):
        return "gelu_tanh"
    return None


# Which count a fused forward falls under (fuse's return value).
_KIND = {_norm_forward: "rms_norm", _mlp_forward: "gated_activation", _attention_forward: "rope"}


def _no_counts() -> Dict[str, int]:
    return {"rms_norm": 0, "gated_activation": 0, "rope": 0, "residual_add": 0}


def _fused_forward_of(module):
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None)


def _set_forward(module, forward, **attributes) -> None:
    for name, value in attributes.items():
        setattr(module, name, value)
    module.forward = types.MethodType(forward, module)
    setattr(module, _MARK, tuple(attributes))


def check_kernels(kernels) -> str:
    """``kernels`` checked to be one of ``KERNELS`` whose library imports; a ValueError naming it otherwise."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels: must be one of {', '.join(map(repr, KERNELS))}, got {kernels!r}")
    if kernels == "liger":
        try:
            _liger()
        except ImportError as e:
            raise ValueError(
                f"kernels: 'liger' needs Liger-Kernel, which does not import ({e}); pip install liger-kernel"
            ) from None
    return kernels


def fuse(model, warn: bool = True, kernels: str = "fastrank") -> Dict[str, int]:
    """Fuse the elementwise work of ``model`` (this instance only; a PEFT wrapper's base model is used).

    ``kernels`` picks whose kernels the fused forwards call on CUDA tensors: ``"fastrank"`` (fastrank's ops)
    or ``"liger"`` (Liger-Kernel's RMSNorm, fused add + RMSNorm, RoPE and SiLU/GELU-times-up functions; ``pip
    install liger-kernel``), the other well-kept set, for measuring one against the other. Elsewhere (CPU) both
    run fastrank's ops, whose CPU path computes HF's formulas.

    Returns the counts of modules this call gave a fused forward (or, on a model fused before, switched to
    other ``kernels``): ``{"rms_norm": n, "gated_activation": n, "rope": n, "residual_add": n}`` (the last:
    decoder layers whose post-attention add is fused into their norm; all zero when the model type is not
    supported, with a warning naming why when ``warn``). Idempotent.
    """
    kernels = check_kernels(kernels)
    counts = _no_counts()
    reason = fusion_unsupported_reason(model)
    if reason is not None:
        if warn:
            warn_once("fuse:" + reason, f"fastrank: decoder elementwise work left unfused: {reason}")
        return counts
    inner = unwrap_model(model)
    model_type = inner.config.model_type
    for module in inner.modules():
        if hasattr(module, _MARK):
            if getattr(module, "_fastrank_kernels", kernels) != kernels:
                module._fastrank_kernels = kernels
                key = _KIND.get(_fused_forward_of(module))
                if key is not None:
                    counts[key] += 1
            continue
        name = type(module).__name__
        if name in _LLAMA_NORMS or name in _GEMMA_NORMS:
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            if eps is None or getattr(module, "weight", None) is None:
                continue
            _set_forward(
                module,
                _norm_forward,
                _fastrank_eps=float(eps),
                _fastrank_unit_offset=name in _GEMMA_NORMS,
                _fastrank_kernels=kernels,
            )
            counts["rms_norm"] += 1
        elif name in _MLPS:
            activation = _activation_of(module.act_fn)
            if activation is None:
                if warn:
                    warn_once(
                        f"fuse-act:{type(module.act_fn).__name__}",
                        f"fastrank: {name} keeps its own forward: its activation {module.act_fn!r} is neither "
                        "SiLU nor tanh-GELU",
                    )
                continue
            _set_forward(module, _mlp_forward, _fastrank_activation=activation, _fastrank_kernels=kernels)
            counts["gated_activation"] += 1
        elif name in _ATTENTIONS:
            _set_forward(
                module,
                _attention_forward,
                _fastrank_qk_norm=hasattr(module, "q_norm") and hasattr(module, "k_norm"),
                _fastrank_extras=_ATTENTION_EXTRAS[model_type](module),
                _fastrank_kernels=kernels,
            )
            counts["rope"] += 1
    # Layers last: their fused forward calls their post-attention norm's fused arithmetic directly.
    for module in inner.modules():
        sandwich = type(module).__name__ in _SANDWICH_LAYERS
        if hasattr(module, _MARK) or not (sandwich or type(module).__name__ in _PRENORM_LAYERS):
            continue
        add_norm = "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"
        names = ["input_layernorm", "self_attn", "mlp", add_norm]
        names += ["post_attention_layernorm", "post_feedforward_layernorm"] if sandwich else []
        parts = [getattr(module, name, None) for name in names]
        if any(part is None for part in parts) or not hasattr(parts[3], "_fastrank_eps"):
            continue
        _set_forward(module, _layer_forward, _fastrank_add_norm=add_norm, _fastrank_sandwich=sandwich)
        counts["residual_add"] += 1
    return counts


def unfuse(model) -> None:
    """Give every module of ``model`` its class's forward back."""
    for module in unwrap_model(model).modules():
        attributes = getattr(module, _MARK, None)
        if attributes is None:
            continue
        del module.forward
        for name in attributes:
            delattr(module, name)
        delattr(module, _MARK)


def fused(model) -> bool:
    """Whether any module of ``model`` runs a fused forward."""
    return any(hasattr(m, _MARK) for m in unwrap_model(model).modules())


def maybe_fuse(model) -> Dict[str, int]:
    """What the loaders call: ``fuse`` unless ``FASTRANK_FUSE=0``; unsupported models stay as they are,
    silently (they already run the padded or unfused path by design)."""
    if not fusion_requested():
        return _no_counts()
    return fuse(model, warn=False)
