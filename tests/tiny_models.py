"""Tiny Hugging Face models and tokenizers built in code (no download), for parity tests."""

from __future__ import annotations

import functools

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from fastrank.benchmarks.synthetic import build_tokenizer

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    vocab_size=1031,  # odd: no tile of the vocabulary is full; above the tiny tokenizer's 1000 ids
    pad_token_id=0,
    bos_token_id=3,
    eos_token_id=0,
)
ARCHS = ("qwen2", "llama", "gemma", "mistral")
# Qwen has no BOS token; the others do (and it differs from pad), as in the real checkpoints.
USES_BOS = {"qwen2": False, "llama": True, "gemma": True, "mistral": True}

CONFIGS = {
    "qwen2": lambda: Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**_COMMON, tie_word_embeddings=False, sliding_window=None),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=16, tie_word_embeddings=True),
    # Beyond ARCHS, for the packed engine's tests. Gemma 2: attention logit soft-capping and a sliding window
    # (longer than the tiny texts); it runs HF's eager attention, as its checkpoints default to.
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16, tie_word_embeddings=True),
    "gemma2": lambda: Gemma2Config(**_COMMON, head_dim=16, tie_word_embeddings=True, sliding_window=256),
}


def tiny_causal_lm(arch: str, dtype=torch.float32, attn_implementation="sdpa", seed=0):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    # Random init gives near-zero logits; widen the LM head so scores differ by whole units.
    with torch.no_grad():
        if not config.tie_word_embeddings:
            model.lm_head.weight.normal_(0.0, 0.5)
    return model.eval()


@functools.lru_cache(maxsize=None)
def _tokenizer(bos: bool, padding_side: str):
    return build_tokenizer(bos_token="<s>" if bos else None, padding_side=padding_side)


def tiny_tokenizer(arch: str = "qwen2", padding_side: str = "left"):
    """A byte-level BPE tokenizer with this family's BOS convention (a fresh copy: tests may mutate it)."""
    import copy

    return copy.deepcopy(_tokenizer(USES_BOS[arch], padding_side))
