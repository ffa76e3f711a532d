"""FlagEmbedding's lightweight reranker (BAAI/bge-reranker-v2.5-gemma2-lightweight) on transformers 5: Gemma 2 with
passage-token compression and per-layer heads, run only as deep as the deepest requested layer.

The checkpoint is ``CostWiseGemmaForCausalLM`` (``layer_wise=True``; FlagEmbedding's own modelling file, which
runs on transformers 4.x only). Its decoder is transformers' Gemma 2, built here from transformers 5's Gemma 2
blocks. What FlagEmbedding adds, reproduced as its inference computes it:

- heads: one ``Linear(hidden, 1)`` (``lm_head[i].linear_head``) per layer of ``range(start_layer,
  num_hidden_layers + 1, layer_sep)``; the score of a layer is its head on the final-normed hidden state of the
  last real token, soft-capped by ``final_logit_softcapping``. As in the package, the i-th requested layer (in
  ascending order) goes through ``lm_head[i]``, whatever layer that head belongs to (``cutoff_layers=[28]``
  alone reads layer 28 through the first head);
- compression: before running layer ``c`` of ``compress_layers`` (c > 0), each sequence's passage tokens (between
  its query part, ``[BOS] + query + sep``, and its prompt part, ``sep + prompt``) are replaced by the means of
  consecutive groups of ``compress_ratio`` (the last group the mean of what is left), the query and prompt kept,
  positions renumbered from 0; later compress layers compress the compressed passage again;
- attention: FlagEmbedding loads the model with transformers 4.46's default ``sdpa``, whose Gemma 2 attention
  applies no ``attn_logit_softcapping``; the scores here do the same (the soft-capping is left out whatever
  attention implementation runs).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import nn

import fastrank.functional as F
from fastrank.models.layerwise import LayerWiseHead, cutoff_layer_list, load_checkpoint
from fastrank.ops.score_head import score_head_rows

ARCHITECTURE = "CostWiseGemmaForCausalLM"
COMPRESS_RATIOS = (1, 2, 4, 8)


def _gemma2_config(cfg: dict, attn_implementation: str):
    from transformers import Gemma2Config

    heads = int(cfg["num_attention_heads"])
    config = Gemma2Config(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        hidden_activation=cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
        max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))},
        attention_bias=bool(cfg.get("attention_bias", False)),
        attention_dropout=0.0,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
        sliding_window=cfg.get("sliding_window", 4096),
        final_logit_softcapping=cfg.get("final_logit_softcapping"),
        attn_logit_softcapping=None,  # FlagEmbedding's default (sdpa) attention applies none
        pad_token_id=cfg.get("pad_token_id"),
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    return config


class Gemma2Backbone(nn.Module):
    """``embed_tokens``, ``layers`` and the final ``norm`` (the checkpoint's ``model.*``)."""

    def __init__(self, config):
        from transformers.models.gemma2.modeling_gemma2 import (
            Gemma2DecoderLayer,
            Gemma2RMSNorm,
            Gemma2RotaryEmbedding,
        )

        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([Gemma2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Gemma2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Gemma2RotaryEmbedding(config)


class LightweightGemma2(nn.Module):
    """FlagEmbedding's ``CostWiseGemmaForCausalLM`` (``layer_wise=True``), scored with early exit.

    ``forward(input_ids, attention_mask, query_lengths, prompt_lengths, cutoff_layers, compress_layers,
    compress_ratio)`` gives fp32 scores ``[N, len(cutoff_layers)]`` (columns in the order asked) of right-padded
    batches. ``query_lengths``/``prompt_lengths``: ``[N]`` ints, the lengths of each sequence's ``[BOS] + query +
    sep`` head and ``sep + prompt`` tail (the passage is what lies between).
    """

    def __init__(self, config: dict, attn_implementation: str = "sdpa"):
        super().__init__()
        if not config.get("layer_wise", False):
            raise ValueError(
                "config: layer_wise is not set; fastrank's lightweight reranker reads the layer-wise heads of "
                "bge-reranker-v2.5-gemma2-lightweight (layer_wise=True)"
            )
        self.costwise_config = dict(config)
        self.config = _gemma2_config(config, attn_implementation)
        self.num_layers = self.config.num_hidden_layers
        self.start_layer = int(config.get("start_layer", 28))
        self.layer_sep = int(config.get("layer_sep", 28))
        self.head_layers = list(range(self.start_layer, self.num_layers + 1, self.layer_sep))
        self.model = Gemma2Backbone(self.config)
        self.lm_head = nn.ModuleList([LayerWiseHead(self.config.hidden_size) for _ in self.head_layers])

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @classmethod
    def empty(cls, config: dict, *, device=None, attn_implementation: Optional[str] = None) -> "LightweightGemma2":
        """The model of ``config`` on ``device`` with uninitialised fp32 weights (rotary tables computed)."""
        from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding

        with torch.device("meta"):
            model = cls(config, attn_implementation or "sdpa")
        model = model.to_empty(device=device or "cpu")
        with torch.device(device or "cpu"):
            model.model.rotary_emb = Gemma2RotaryEmbedding(model.config)
        return model

    @classmethod
    def from_pretrained(cls, folder: str, *, dtype=None, device=None, attn_implementation=None):
        """Load a ``CostWiseGemmaForCausalLM`` checkpoint folder (``config.json`` and safetensors)."""
        import json
        import os

        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        model = cls.empty(config, device=device, attn_implementation=attn_implementation)
        return load_checkpoint(model, folder, config, dtype, ARCHITECTURE)

    def check_cutoff_layers(self, cutoff_layers: Union[int, Sequence[int], None]) -> List[int]:
        """The requested layers as a list (None: the last layer), each one with a head."""

        def problem(k):
            if k in self.head_layers:
                return None
            return (
                f"layer {k} has no head; this model scores at layers {self.head_layers} (config "
                f"start_layer={self.start_layer}, layer_sep={self.layer_sep})"
            )

        hint = f"give at least one of the layers {self.head_layers}"
        return cutoff_layer_list(cutoff_layers, self.num_layers, hint, problem)

    def check_compression(self, compress_layers, compress_ratio) -> tuple:
        """``(layers, ratio)`` checked; ratio 1 (or no layers) is no compression."""
        if compress_ratio not in COMPRESS_RATIOS or isinstance(compress_ratio, bool):
            raise ValueError(f"compress_ratio: {compress_ratio!r}; FlagEmbedding's model supports {COMPRESS_RATIOS}")
        if compress_layers is None:
            compress_layers = []
        if isinstance(compress_layers, int) and not isinstance(compress_layers, bool):
            compress_layers = [compress_layers]
        layers = list(compress_layers)
        for c in layers:
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise ValueError(f"compress_layers: {c!r} is not a layer number")
        return layers, int(compress_ratio)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_lengths,
        prompt_lengths,
        cutoff_layers: Union[int, Sequence[int], None] = None,
        compress_layers: Union[int, Sequence[int], None] = (8,),
        compress_ratio: int = 1,
        *,
        normalize: bool = False,
    ) -> torch.Tensor:
        """fp32 scores ``[N, len(cutoff_layers)]`` of right-padded ``input_ids`` ``[N, T]``."""
        layers = self.check_cutoff_layers(cutoff_layers)
        compress, ratio = self.check_compression(compress_layers, compress_ratio)
        if bool((attention_mask[:, 0] == 0).any()):
            raise ValueError("attention_mask: the lightweight reranker needs right padding (as FlagEmbedding)")
        device = input_ids.device
        qls = torch.as_tensor(list(query_lengths), dtype=torch.long, device=device)
        pls = torch.as_tensor(list(prompt_lengths), dtype=torch.long, device=device)
        # The package's head quirk: the i-th requested layer (ascending) reads lm_head[i].
        head_of = {k: i for i, k in enumerate(sorted(layers))}
        column = {k: j for j, k in enumerate(layers)}
        backbone = self.model
        hidden = backbone.embed_tokens(input_ids)
        hidden = hidden * torch.tensor(self.config.hidden_size**0.5, dtype=hidden.dtype)
        mask = attention_mask
        masks, rope = self._masks(hidden, mask)
        out = torch.empty(input_ids.shape[0], len(layers), dtype=torch.float32, device=device)
        deepest = max(layers)
        for idx in range(deepest + 1):
            if idx in column:
                out[:, column[idx]] = self._scores(hidden, mask, head_of[idx])
            if idx == deepest:
                break
            if ratio > 1 and idx in compress and idx != 0:
                hidden, mask = compress_passages(hidden, mask, qls, pls, ratio)
                masks, rope = self._masks(hidden, mask)
            layer = backbone.layers[idx]
            hidden = layer(hidden, position_embeddings=rope, attention_mask=masks[self.config.layer_types[idx]])
        return torch.sigmoid(out) if normalize else out

    def _masks(self, hidden, mask):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        kw = dict(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=mask,
            past_key_values=None,
            position_ids=positions,
        )
        masks = {
            "full_attention": create_causal_mask(**kw),
            "sliding_attention": create_sliding_window_causal_mask(**kw),
        }
        return masks, self.model.rotary_emb(hidden, position_ids=positions)

    def _scores(self, hidden, mask, head: int) -> torch.Tensor:
        rows = score_head_rows(hidden, mask, None, None)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), rows]
        normed = self.model.norm(last)[:, None, :]
        logits = F.score_head(normed, self.lm_head[head].linear_head.weight, [0])[:, 0]
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits


def compress_passages(hidden, mask, query_lengths, prompt_lengths, ratio: int):
    """FlagEmbedding's ``token_compress``: each row's passage (between its query part and its prompt part) cut into
    groups of ``ratio`` tokens, each group replaced by its mean; rows right-padded with zeros again. Returns the
    new ``(hidden [N, T', H], mask [N, T'])``."""
    lengths = mask.sum(dim=1).tolist()
    qls, pls = query_lengths.tolist(), prompt_lengths.tolist()
    rows = []
    for b, n in enumerate(lengths):
        ql, pl = qls[b], pls[b]
        plen = n - ql - pl
        if plen < 0:
            raise ValueError(f"query_lengths, prompt_lengths: row {b} has {n} tokens, fewer than its query and prompt")
        groups = (plen + ratio - 1) // ratio
        passage = hidden[b, ql : ql + plen]
        if plen % ratio:
            passage = torch.cat([passage, passage.new_zeros(groups * ratio - plen, passage.shape[-1])])
        counts = torch.full((groups,), ratio, dtype=hidden.dtype, device=hidden.device)
        if plen % ratio:
            counts[-1] = plen % ratio
        weights = (1.0 / counts).repeat_interleave(ratio)
        weights[plen:] = 0
        pooled = (passage * weights[:, None]).view(groups, ratio, -1).sum(dim=1)
        rows.append(torch.cat([hidden[b, :ql], pooled, hidden[b, ql + plen : n]]))
    width = max(r.shape[0] for r in rows)
    new_hidden = hidden.new_zeros(len(rows), width, hidden.shape[-1])
    new_mask = torch.zeros(len(rows), width, dtype=mask.dtype, device=mask.device)
    for b, r in enumerate(rows):
        new_hidden[b, : r.shape[0]] = r
        new_mask[b, : r.shape[0]] = 1
    return new_hidden, new_mask
