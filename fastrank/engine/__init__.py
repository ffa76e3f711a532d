"""Packed, shared-prefix execution of Hugging Face backbones (see ``attention`` and ``packing``)."""

from fastrank.engine.attention import (
    ATTENTION_NAME,
    SUPPORTED_MODEL_TYPES,
    attention_dropout,
    disable_packing,
    enable_packing,
    packed_call,
    packing_enabled,
    packing_unsupported_reason,
    register,
    sliding_window,
    unwrap_model,
    warn_once,
)
from fastrank.engine.compile import compile_layers, uncompile_layers
from fastrank.engine.forward import packed_forward

__all__ = [
    "ATTENTION_NAME",
    "SUPPORTED_MODEL_TYPES",
    "attention_dropout",
    "compile_layers",
    "disable_packing",
    "enable_packing",
    "packed_call",
    "packed_forward",
    "packing_enabled",
    "packing_unsupported_reason",
    "register",
    "sliding_window",
    "uncompile_layers",
    "unwrap_model",
    "warn_once",
]
