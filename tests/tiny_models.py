"""Tiny Hugging Face models built from configs in code (no download), for parity tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    vocab_size=503,  # odd: no tile of the vocabulary is full
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

CONFIGS = {
    "qwen2": lambda: Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**_COMMON, tie_word_embeddings=False, sliding_window=None),
    "gemma": lambda: GemmaConfig(**_COMMON, head_dim=16, tie_word_embeddings=True),
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
