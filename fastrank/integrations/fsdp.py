"""Sharded training of fastrank's training models with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

``shard_model(model, "full_shard")`` shards a ``BiEncoder``, ``LlaraEncoder`` or ``LLMRerankerModel`` over the
processes of the default process group: each transformer block of the backbone (the classes its
``_no_split_modules`` names: ``Qwen2DecoderLayer``, ``BertLayer``, ...) is one FSDP unit, and everything else
(embeddings, final norm, LM head, pooler) is the root unit on the wrapper, gathered for the wrapper's whole
forward. The LM head must stay in the root unit: the score head reads ``lm_head.weight`` without calling the
head's ``forward``, so a unit of its own would never be gathered.

fastrank shards the model itself rather than through accelerate's FSDP plugin (``TrainingArguments(fsdp=...)``
or an ``accelerate launch`` FSDP config): accelerate 1.15 turns FSDP on only when the processes run on GPUs
(``AcceleratorState`` keeps ``MULTI_CPU`` and drops the plugin otherwise, and the Trainer then trains plain DDP
without a word), so its FSDP path cannot run on the CPU machines the tests run on. Sharding here runs the same
``fully_shard`` calls on gloo (CPU) and NCCL (GPU).

The state-dict helpers below are collectives: every process must call them, in the same order.
"""

from __future__ import annotations

import warnings

import torch

from fastrank.models.reranker import unwrap_model

# --fsdp choice -> FSDP2's reshard_after_forward: full_shard frees each block's gathered weights after its
# forward and gathers them again for the backward (ZeRO-3); shard_grad_op keeps them from forward to backward
# (ZeRO-2: more memory, one all-gather per block and step fewer).
FSDP_MODES = {"full_shard": True, "shard_grad_op": False}


def check_fsdp_mode(mode) -> str:
    """``mode`` if it is one of ``FSDP_MODES``, else a ValueError naming the choices."""
    if mode not in FSDP_MODES:
        raise ValueError(f"fsdp: must be one of {', '.join(FSDP_MODES)}, got {mode!r}")
    return mode


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ValueError(
            f"fsdp: needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); this torch is {torch.__version__}"
        ) from None
    return fully_shard


def is_sharded(model) -> bool:
    """True when ``model`` (or a module inside it) has been sharded by FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def transformer_blocks(model) -> list:
    """The modules of ``model`` whose class the backbone names in ``_no_split_modules`` (its transformer
    blocks), in order."""
    names = set(getattr(unwrap_model(model.model), "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model, mode: str = "full_shard"):
    """Shard ``model`` (a fastrank training model with the backbone as ``model.model``) in place with FSDP2
    over every process of the default group (on its GPU, else its CPU), and return it.

    ``mode``: ``"full_shard"`` (ZeRO-3: block weights gathered for each forward and backward) or
    ``"shard_grad_op"`` (gathered once per step). Call it after the model is on its device, gradient
    checkpointing enabled and any LoRA adapter attached, and before the optimizer takes the parameters
    (they become ``DTensor`` shards). Each block is one unit; the rest of the model is the root unit.
    """
    fully_shard = _fully_shard()
    check_fsdp_mode(mode)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(
            "fsdp: torch.distributed is not initialised; launch with torchrun --nproc_per_node N (or accelerate "
            "launch), where the Trainer sets up the process group"
        )
    if is_sharded(model):
        raise ValueError("model: is already sharded (fully_shard was applied to it or a module inside it)")
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(
            f"model: {type(unwrap_model(model.model)).__name__} names no transformer block class in "
            "_no_split_modules, so there is nothing to shard block by block"
        )
    # FSDP2 warns when a root returns a view (an in-place op on it would skip the backward all-gather). The
    # wrappers' outputs are read, never written in place: the Trainer backpropagates the loss, and scores and
    # embeddings are returned for reading.
    warnings.filterwarnings(
        "ignore",
        message=rf"FSDP2-wrapped module \((FSDP)?{type(model).__name__}\) returned a view tensor",
        category=UserWarning,
    )
    for block in blocks:
        fully_shard(block, reshard_after_forward=FSDP_MODES[mode])
    # The root keeps FSDP2's default for a root (gathered from its forward to the end of the backward): the
    # embeddings and LM head are needed again first thing in the backward.
    fully_shard(model)
    return model


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state_dict(module) -> dict:
    """The full (unsharded) state dict of ``module`` (a sharded model, or a module inside one such as a
    wrapper's backbone, keyed as ``module.state_dict()`` keys it), on the CPU of process 0 and empty on the
    other processes. A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(module, options=_options(cpu_offload=True))
    # A parameter under two names (an LM head tied to the input embeddings) comes back as two gathered
    # copies; make them one tensor again, as in module.state_dict(), so that save_pretrained recognises the
    # tie and writes the weight once, as it does for an unsharded model.
    first = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name and owner in state and name in state:
            state[name] = state[owner]
    return state


def full_optimizer_state_dict(model, optimizer) -> dict:
    """The full optimizer state of a sharded ``model`` (keyed by parameter name, so any number of processes
    can load it), on the CPU of process 0 and empty elsewhere. A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, _plain_optimizer(optimizer), options=_options(cpu_offload=True))


def load_full_optimizer_state_dict(model, optimizer, state: dict) -> None:
    """Load ``state`` (``full_optimizer_state_dict``'s, read on every process) into the shards of ``optimizer``.
    A collective."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, _plain_optimizer(optimizer), state, options=_options())


def _plain_optimizer(optimizer):
    # accelerate's AcceleratedOptimizer wraps the torch optimizer that the state-dict functions inspect.
    return getattr(optimizer, "optimizer", optimizer)
