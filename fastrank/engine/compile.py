"""Decoder layers through ``torch.compile``, switched on per model instance: the compiler's route to fusing the
layer's elementwise work (vLLM's), against which fastrank's own fused kernels (``fastrank.engine.fusion``) are
measured.

``compile_layers(model)`` calls ``nn.Module.compile`` on each of the model's transformer layers (the modules
transformers 5 builds as ``GradientCheckpointingLayer``: decoder layers, BERT's layers): the compiled callable
is an attribute of that instance, the class and every other model are untouched, and ``uncompile_layers``
removes it. What runs inside a compiled layer is whatever the layer's forward is at the time:

- HF's own forward (the model unfused): Inductor generates the kernels of RMSNorm, RoPE, the gated activation
  and the residual adds, fusing neighbours where it can;
- fastrank's fused forwards: the fused ops are ``torch.library`` custom ops while Dynamo traces (see
  ``fastrank.ops.base.compiling``), each one opaque node of the graph, with Inductor fusing what lies between.

Either way the packed attention (``fastrank.ops.varlen_attention``) is a custom op, so a layer compiles to one
graph without breaks (``fullgraph=True`` by default, so a break is an error, not a silent slowdown), and the
layers of one kind share their compiled graphs: they differ in their weights, which are the graph's inputs.

``FASTRANK_COMPILE=1`` makes ``fastrank.Reranker`` and ``fastrank.Embedder`` compile their models' layers
(``maybe_compile``); it is off by default until the GPU measurement of this route against fastrank's fused
kernels (``fastrank bench --op rerank``, providers ``fastrank_compiled`` and ``fastrank_fused_compiled``)
decides.

Compilation happens on a layer's first call, and once more at the first batch of another size: Dynamo then
compiles a graph with symbolic sizes (its "automatic dynamic" shapes), which serves every later token count
(all layers of one kind share both graphs). CUDA graphs of fastrank's packed forward
(``fastrank.engine.graphs``) capture the compiled kernels as they capture eager ones. Inductor generates code
for the device the model is on; on a CPU it needs a C++ compiler. Training compiles too, gradient
checkpointing included (the compiled call wraps the layer's forward and transformers' checkpointing wrapper
alike: tests/test_torch_compile.py checks the gradients); the measured case is inference.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional

import torch

from fastrank.engine.attention import unwrap_model

_MARK = "_fastrank_compiled"
COMPILE_VARIABLE = "FASTRANK_COMPILE"
_OFF = ("", "0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


def compile_requested() -> Optional[str]:
    """The torch.compile backend fastrank's inference classes compile the layers with (``FASTRANK_COMPILE``),
    or None: off by default (unset, ``0``, ``false``, ``no``, ``off``); ``1`` (``true``, ``yes``, ``on``) means
    ``inductor``; any other value names a backend (``aot_eager`` traces without generating code)."""
    value = os.environ.get(COMPILE_VARIABLE, "").strip()
    if value.lower() in _OFF:
        return None
    if value.lower() in _ON:
        return "inductor"
    backends = torch._dynamo.list_backends(exclude_tags=())
    if value not in backends:
        raise ValueError(
            f"{COMPILE_VARIABLE}={value!r}: not a torch.compile backend; use 1 (inductor), 0 (off) or one of "
            f"{', '.join(backends)}"
        )
    return value


def transformer_layers(model) -> Iterator[torch.nn.Module]:
    """The modules of ``model`` that transformers 5 builds as ``GradientCheckpointingLayer`` (its decoder and
    encoder layers), in module order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in unwrap_model(model).modules():
        if isinstance(module, GradientCheckpointingLayer):
            yield module


def compile_layers(model, *, backend: str = "inductor", fullgraph: bool = True, **options: Any) -> int:
    """Compile each transformer layer of ``model`` (this instance; a PEFT wrapper's base model is used) with
    ``torch.compile(backend=backend, fullgraph=fullgraph, **options)`` (``mode``, ``dynamic``, ``options``
    are torch.compile's own; ``dynamic=True`` would make the layers' float attributes symbolic too, which
    fastrank's argument checks refuse: leave it to torch's automatic choice). Layers already compiled by this
    function are left as they are.

    Returns the number of layers compiled by this call. Raises ``ValueError`` when ``model`` has no layer that
    transformers builds as a ``GradientCheckpointingLayer`` (a model from transformers < 5 or outside it)."""
    layers = list(transformer_layers(model))
    if not layers:
        raise ValueError(
            f"model: {type(unwrap_model(model)).__name__} has no transformers GradientCheckpointingLayer to compile; "
            "compile_layers takes a transformers 5 model (or a PEFT wrapper of one)"
        )
    count = 0
    for layer in layers:
        if layer.__dict__.get(_MARK):
            continue
        layer.compile(backend=backend, fullgraph=fullgraph, **options)
        layer.__dict__[_MARK] = True
        count += 1
    return count


def maybe_compile(model) -> int:
    """What fastrank's inference classes call: ``compile_layers`` with the backend ``FASTRANK_COMPILE`` names,
    nothing when it is off (the default). Returns the number of layers compiled."""
    backend = compile_requested()
    return 0 if backend is None else compile_layers(model, backend=backend)


def uncompile_layers(model) -> None:
    """Give every layer ``compile_layers`` compiled its eager call back."""
    for layer in transformer_layers(model):
        if layer.__dict__.pop(_MARK, False):
            layer._compiled_call_impl = None


def compiled_layers(model) -> int:
    """How many layers of ``model`` ``compile_layers`` compiled."""
    return sum(1 for layer in transformer_layers(model) if layer.__dict__.get(_MARK))
