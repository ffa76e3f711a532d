"""What every loader checks before it hands a name to Hugging Face: the device, the dtype and the model folder."""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """CUDA when torch sees a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device=None) -> torch.device:
    """``device`` as a ``torch.device``: None or ``"auto"`` is ``default_device()``; a CUDA device on a machine
    where torch sees none is an error, not a late CUDA assertion."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: {device!r} is not a device; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asks for CUDA, but torch sees no CUDA device on this machine; use 'cpu'")
    return resolved


def resolve_dtype(dtype):
    """A torch dtype, ``"auto"`` or None from a dtype or its name (``"bfloat16"``, ``"float16"``, ...)."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype: {dtype!r} is not a torch dtype; use e.g. 'bfloat16', 'float16', 'float32' or 'auto'")


def check_model_source(source: str, name: str = "path_or_model") -> str:
    """``source`` if it is a local model folder or could be a hub name (``"model"`` or ``"org/model"``).

    A string that can only be a local path (absolute, starting with ``.`` or ``~``, or with more than one
    ``/``) but is no folder is an error naming the path, rather than Hugging Face's "Repo id must be in the
    form 'repo_name' or 'namespace/repo_name'"; so is a file where a folder is needed.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"{name}: expected a model folder, a hub name or a model, got {source!r}")
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{name}: {source} is a file; give the folder that holds the model's config.json")
    if source.startswith(("/", ".", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source:
        raise ValueError(
            f"{name}: there is no folder {source}; give a local model folder (as written by save_pretrained) "
            "or a hub name such as 'org/model'"
        )
    return source


def model_skeleton(loader, source: str, dtype="auto", **kwargs):
    """What ``loader.from_pretrained(source)`` gives, without the weights: the config, the modules and every
    parameter's shape, on the meta device (nothing read, nothing allocated). For a process that tokenizes
    and plans batches for models that run elsewhere (a device pool's parent). ``kwargs`` are
    ``from_pretrained``'s (``attn_implementation``, ``trust_remote_code``); a PEFT adapter folder gives its
    base model's skeleton."""
    import json

    from transformers import AutoConfig

    adapter = os.path.join(source, "adapter_config.json")
    if os.path.isfile(adapter) and not os.path.isfile(os.path.join(source, "config.json")):
        with open(adapter) as f:
            source = json.load(f)["base_model_name_or_path"]
    config = AutoConfig.from_pretrained(source, trust_remote_code=kwargs.get("trust_remote_code", False))
    options = {k: v for k, v in kwargs.items() if k in ("attn_implementation", "trust_remote_code")}
    dtype = resolve_dtype(dtype)
    if isinstance(dtype, torch.dtype):
        options["dtype"] = dtype
    with torch.device("meta"):
        return loader.from_config(config, **options)
