"""fastrank's varlen attention as a transformers attention backend, switched on per model instance.

``enable_packing(model)`` registers the backend ``"fastrank"`` with transformers' ``AttentionInterface`` (the
attention function) and ``AttentionMaskInterface`` (its mask function), and sets that model's config to it.
No decoder layer is replaced: HF's attention modules look their attention function up by that name at every
call, and pass it the model's extra forward kwargs, which is how the segment metadata reaches it.

Dispatch is by those kwargs, so the switch is safe for every other call of the model:
- a forward that carries ``fastrank_segments`` (built by ``fastrank.data.packing.pack``) runs the packed,
  shared-prefix op on the flat token stream;
- any other forward (padded batches, generation, a user's own call) runs the implementation the model had
  before (``sdpa``, ``eager``, ``flash_attention_2``, ...) with the mask that implementation builds, exactly
  as without fastrank.
The mask function builds no mask while a packed forward is running (``packed_call``): the segments replace
it, and without that transformers would build a dense ``[M, M]`` block mask from the position ids. Gradient
checkpointing recomputes layers in backward, outside ``packed_call``; that is fine because masks are made
once per forward, before the layers, and the attention function dispatches on the kwargs it is recomputed
with.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import warnings
import weakref
from typing import Optional

import torch

ATTENTION_NAME = "fastrank"

# Model types whose packed forward was checked against their own padded forward (tests/test_engine.py).
SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "bert", "xlm-roberta")

_PACKED = contextvars.ContextVar("fastrank_packed_call", default=False)
# config id -> (weak reference to the config, the implementation it had before "fastrank"). Kept outside
# the config, whose attributes save_pretrained would write to config.json.
_FALLBACK: dict = {}
_WARNED: set = set()


def _fallback_name(config) -> str:
    entry = _FALLBACK.get(id(config))
    if entry is not None and entry[0]() is config:
        return entry[1]
    return "sdpa"


def _remember_fallback(config, name: str) -> None:
    _FALLBACK[id(config)] = (weakref.ref(config, lambda _ref, key=id(config): _FALLBACK.pop(key, None)), name)


def _fallback_attention(module, name: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name in ALL_ATTENTION_FUNCTIONS._global_mapping:
        return ALL_ATTENTION_FUNCTIONS[name]
    # "eager" is each modelling file's own function.
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(
            f"{type(module).__name__}: cannot find the {name!r} attention this model ran before fastrank's packing "
            "was enabled; call fastrank.engine.disable_packing(model)"
        )
    return eager


def fastrank_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function. HF passes ``query`` ``[B, Hq, L, D]``, ``key``/``value`` ``[B, Hkv,
    L, D]`` and expects ``([B, L, Hq, D], weights or None)``."""
    segments = kwargs.pop("fastrank_segments", None)
    if segments is None:
        impl = _fallback_attention(module, _fallback_name(module.config))
        return impl(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    from fastrank.ops.varlen_attention import varlen_attention
    from fastrank.utils import value_checks

    if query.shape[0] != 1:
        raise ValueError(f"fastrank_segments: packed input must be one row [1, M], got a batch of {query.shape[0]}")
    if dropout:
        raise ValueError(
            f"fastrank_segments: attention dropout ({dropout}) is not implemented by the packed op; the engine "
            "runs such models padded (set the config's attention dropout to 0 to pack them)"
        )
    window = kwargs.get("sliding_window")
    if window is not None and segments.max_context > window:
        raise ValueError(
            f"fastrank_segments: a segment sees {segments.max_context} tokens, more than this layer's sliding "
            f"window ({window}); the engine runs such batches padded"
        )
    # Under autocast (the Trainer's bf16/fp16 over fp32 weights) RoPE leaves q and k in fp32 while v is the
    # projection's half precision. torch's sdpa is on autocast's lower-precision list and casts all three to the
    # autocast dtype; so does this.
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    # The segments come from fastrank.data.packing.pack, which builds them valid: no value checks, whose
    # read-back would cost a device sync in every layer.
    with value_checks(False):
        out = varlen_attention(
            query[0].transpose(0, 1),
            key[0].transpose(0, 1),
            value[0].transpose(0, 1),
            segments.cu_seqlens,
            prefix=segments.prefix,
            max_seqlen=segments.max_seqlen,
            causal=bool(getattr(module, "is_causal", True)),
            scale=scaling,
            softcap=kwargs.get("softcap"),
        )
    return out.unsqueeze(0), None


def fastrank_mask(*args, config=None, **kwargs):
    """The registered mask function: no mask inside a packed forward, else the previous implementation's."""
    if _PACKED.get():
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = _fallback_name(config)
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        return kwargs.get("attention_mask")
    return ALL_MASK_ATTENTION_FUNCTIONS[name](*args, config=config, **kwargs)


@contextlib.contextmanager
def packed_call():
    """Marks a packed forward: the model's mask creation returns no mask while it runs."""
    token = _PACKED.set(True)
    try:
        yield
    finally:
        _PACKED.reset(token)


def register() -> None:
    """Register ``"fastrank"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, fastrank_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, fastrank_mask)


def unwrap_model(model):
    """The Hugging Face model inside a PEFT wrapper (LoRA layers stay active), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def packing_unsupported_reason(model) -> Optional[str]:
    """Why ``model`` cannot run packed, or None when it can."""
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        return f"{type(model).__name__} is not a transformers model with a config"
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (
            f"model type {model_type!r} has not been checked with the packed engine "
            f"(checked: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        return "cross-attention is not supported by the packed engine"
    current = config._attn_implementation
    if current != ATTENTION_NAME and current not in ("sdpa", "eager") and not str(current).startswith("flash_"):
        return f"its attention implementation {current!r} is not one the engine can fall back to"
    return None


def warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


def enable_packing(model, warn: bool = True) -> bool:
    """Switch ``model`` (this instance only) to fastrank's attention backend. Returns whether packed forwards
    are possible; when not, the reason is warned once and the model is left unchanged."""
    reason = packing_unsupported_reason(model)
    if reason is not None:
        if warn:
            warn_once(reason, f"fastrank: running padded, not packed: {reason}")
        return False
    inner = unwrap_model(model)
    config = inner.config
    if config._attn_implementation != ATTENTION_NAME:
        register()
        _remember_fallback(config, config._attn_implementation)
        inner.set_attn_implementation(ATTENTION_NAME)
    return True


def disable_packing(model) -> None:
    """Give ``model`` back the attention implementation it had before ``enable_packing``."""
    inner = unwrap_model(model)
    if inner.config._attn_implementation == ATTENTION_NAME:
        inner.set_attn_implementation(_fallback_name(inner.config))


def packing_enabled(model) -> bool:
    config = getattr(unwrap_model(model), "config", None)
    return getattr(config, "_attn_implementation", None) == ATTENTION_NAME


def attention_dropout(model) -> float:
    """The attention dropout the model applies in training (0 in eval)."""
    config = unwrap_model(model).config
    for name in ("attention_dropout", "attention_probs_dropout_prob"):
        value = getattr(config, name, None)
        if value:
            return float(value)
    return 0.0


def sliding_window(model) -> Optional[int]:
    """The shortest sliding window any layer of the model uses, or None."""
    config = unwrap_model(model).config
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)
