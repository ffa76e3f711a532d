"""Layer-wise early exit: FlagEmbedding's MiniCPM layer-wise reranker (BAAI/bge-reranker-v2-minicpm-layerwise)
on transformers 5, running the decoder only as deep as the deepest requested layer.

The checkpoint is ``LayerWiseMiniCPMForCausalLM`` (FlagEmbedding's own modelling file, which runs on
transformers 4.x only). Its architecture is Llama's decoder layer with MiniCPM's scalings, built here from
transformers' Llama blocks (attention, MLP, RMSNorm, rotary embedding) so the attention backends stay
transformers' own:

- input embeddings times ``config.scale_emb``;
- each residual branch (attention and MLP) times ``config.scale_depth / sqrt(num_hidden_layers)``;
- "layer k" is the shared final RMSNorm applied to the residual stream after k layers (the last layer's state
  is the usual final-norm output);
- one head per layer from ``config.start_layer`` to ``num_hidden_layers`` (``head_type='simple'``,
  ``head_multi=True``): ``lm_head[k - start_layer].linear_head``, a ``Linear(hidden, 1, bias=False)``, applied
  to the normed state as FlagEmbedding's inference path does (no ``dim_model_base`` division: that path of
  the package's simple head has none).

The score at layer k is read at each sequence's last real token only: that row of the residual stream is
normed and sent through the layer's head with ``fastrank.score_head`` (fp32), so neither every layer's hidden
states nor ``[N, T, *]`` head outputs are ever built, and no layer beyond ``max(cutoff_layers)`` runs.
"""

from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

import fastrank.functional as F
from fastrank.ops.score_head import score_head_rows

ARCHITECTURE = "LayerWiseMiniCPMForCausalLM"


def _llama_config(cfg: dict, attn_implementation: str):
    """The transformers-5 ``LlamaConfig`` whose blocks equal MiniCPM's (everything but the scalings)."""
    from transformers import LlamaConfig

    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling:
        raise ValueError(
            f"config: rope_scaling={rope_scaling} is not supported by fastrank's layer-wise MiniCPM (the released "
            "bge-reranker-v2-minicpm-layerwise has none)"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config: hidden_act={cfg.get('hidden_act')!r}; MiniCPM's MLP is silu-gated")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    config = LlamaConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=hidden // heads,
        hidden_act="silu",
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))},
        attention_bias=bool(cfg.get("attention_bias", False)),
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=cfg.get("pad_token_id"),
    )
    config._attn_implementation = attn_implementation
    return config


class MiniCPMDecoderLayer(nn.Module):
    """Llama's decoder layer with MiniCPM's residual depth scaling: ``h + branch(norm(h)) * scale_depth /
    sqrt(num_hidden_layers)`` for the attention and the MLP branch."""

    def __init__(self, config, layer_idx: int, residual_scale: float):
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm

        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.residual_scale = residual_scale

    def forward(self, hidden, position_embeddings, attention_mask):
        branch, _ = self.self_attn(
            self.input_layernorm(hidden), position_embeddings=position_embeddings, attention_mask=attention_mask
        )
        hidden = hidden + branch * self.residual_scale
        branch = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + branch * self.residual_scale


class MiniCPMBackbone(nn.Module):
    """``embed_tokens``, ``layers`` and the shared final ``norm`` (the checkpoint's ``model.*``)."""

    def __init__(self, config, scale_emb: float, residual_scale: float):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

        super().__init__()
        self.config = config
        self.scale_emb = scale_emb
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            [MiniCPMDecoderLayer(config, i, residual_scale) for i in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)


class LayerWiseHead(nn.Module):
    """One layer's head: ``linear_head``, a ``Linear(hidden, 1, bias=False)`` (the checkpoint's name)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear_head = nn.Linear(hidden_size, 1, bias=False)


class LayerwiseMiniCPM(nn.Module):
    """FlagEmbedding's ``LayerWiseMiniCPMForCausalLM`` (simple multi-head layout), scored with early exit.

    ``forward(input_ids, attention_mask, cutoff_layers)`` gives fp32 scores ``[N, len(cutoff_layers)]``: column
    j is the raw score at layer ``cutoff_layers[j]`` (sigmoid with ``normalize=True``), read at each sequence's
    last real token. Layers are counted from 1 (layer k = the state after k decoder layers); a layer needs a
    head, so ``start_layer <= k <= num_hidden_layers``. Load with ``LayerwiseMiniCPM.from_pretrained(folder)``.
    """

    def __init__(self, config: dict, attn_implementation: str = "sdpa"):
        super().__init__()
        head_type = config.get("head_type", "simple")
        if head_type != "simple" or not config.get("head_multi", True):
            raise ValueError(
                f"config: head_type={head_type!r}, head_multi={config.get('head_multi')!r}; fastrank's layer-wise "
                "reranker reads the released layout (head_type='simple', head_multi=True: one 1-output head per "
                "layer), the only one FlagEmbedding's inference scores"
            )
        self.minicpm_config = dict(config)
        self.config = _llama_config(config, attn_implementation)
        self.num_layers = self.config.num_hidden_layers
        self.start_layer = int(config.get("start_layer", 8))
        if not 0 <= self.start_layer <= self.num_layers:
            raise ValueError(f"config: start_layer={self.start_layer} outside [0, {self.num_layers}]")
        residual_scale = float(config.get("scale_depth", 1.0)) / math.sqrt(self.num_layers)
        self.model = MiniCPMBackbone(self.config, float(config.get("scale_emb", 1.0)), residual_scale)
        self.lm_head = nn.ModuleList(
            [LayerWiseHead(self.config.hidden_size) for _ in range(self.start_layer, self.num_layers + 1)]
        )

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @classmethod
    def from_pretrained(
        cls, folder: str, *, dtype=None, device=None, attn_implementation: Optional[str] = None
    ) -> "LayerwiseMiniCPM":
        """Load a ``LayerWiseMiniCPMForCausalLM`` checkpoint folder (``config.json`` and safetensors weights,
        one file or an index). ``dtype`` None or ``"auto"``: the checkpoint's ``torch_dtype``."""
        config = read_config(folder)
        model = cls.empty(config, device=device, attn_implementation=attn_implementation)
        return load_checkpoint(model, folder, config, dtype, ARCHITECTURE)

    @classmethod
    def empty(cls, config: dict, *, device=None, attn_implementation: Optional[str] = None) -> "LayerwiseMiniCPM":
        """The model of ``config`` (a MiniCPM ``config.json`` as a dict) on ``device`` with uninitialised fp32
        weights (only the rotary tables computed): load or initialise them next."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        with torch.device("meta"):
            model = cls(config, attn_implementation or "sdpa")
        model = model.to_empty(device=device or "cpu")
        with torch.device(device or "cpu"):
            model.model.rotary_emb = LlamaRotaryEmbedding(model.config)
        return model

    def check_cutoff_layers(self, cutoff_layers: Union[int, Sequence[int], None]) -> List[int]:
        """The requested layers as a list (None: the last layer, FlagEmbedding's default), each checked."""

        def problem(k):
            if k > self.num_layers or k < 1:
                return (
                    f"layer {k} is outside the model's layers 1..{self.num_layers}; the heads cover "
                    f"[{self.start_layer}, {self.num_layers}]"
                )
            if k < self.start_layer:
                return (
                    f"layer {k} has no head (this model's heads start at layer {self.start_layer}, config "
                    f"start_layer); choose layers in [{self.start_layer}, {self.num_layers}]"
                )
            return None

        hint = f"give at least one layer in [{self.start_layer}, {self.num_layers}]"
        return cutoff_layer_list(cutoff_layers, self.num_layers, hint, problem)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        cutoff_layers: Union[int, Sequence[int], None] = None,
        *,
        position_ids: Optional[torch.Tensor] = None,
        normalize: bool = False,
    ) -> torch.Tensor:
        """fp32 scores ``[N, len(cutoff_layers)]`` of padded ``input_ids`` ``[N, T]`` (either padding side).

        Positions default to each row's count of real tokens before it (so left and right padding give the
        same scores). Runs ``max(cutoff_layers)`` decoder layers and no more.
        """
        from transformers.masking_utils import create_causal_mask

        layers = self.check_cutoff_layers(cutoff_layers)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [N, T], got shape {tuple(input_ids.shape)}")
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        rows = score_head_rows(input_ids[..., None], attention_mask, None, None)
        if bool((rows < 0).any()):
            raise ValueError("attention_mask: a row has no real token; every sequence needs at least one")
        backbone = self.model
        hidden = backbone.embed_tokens(input_ids) * backbone.scale_emb
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
        )
        rope = backbone.rotary_emb(hidden, position_ids=position_ids)
        want = {k: j for j, k in enumerate(layers)}
        out = torch.empty(input_ids.shape[0], len(layers), dtype=torch.float32, device=input_ids.device)
        batch = torch.arange(input_ids.shape[0], device=input_ids.device)
        for k in range(1, max(layers) + 1):
            hidden = backbone.layers[k - 1](hidden, rope, mask)
            j = want.get(k)
            if j is not None:
                out[:, j] = self.layer_scores(k, hidden[batch, rows])
        return torch.sigmoid(out) if normalize else out

    def layer_scores(self, layer: int, last_rows: torch.Tensor) -> torch.Tensor:
        """fp32 ``[N]`` scores at ``layer`` of the residual-stream rows ``[N, H]`` of each sequence's last real
        token: the shared final norm, then the layer's head through ``score_head``."""
        normed = self.model.norm(last_rows)[:, None, :]
        head = self.lm_head[layer - self.start_layer].linear_head.weight
        return F.score_head(normed, head, [0])[:, 0]


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{folder}: no config.json; expected a {ARCHITECTURE} checkpoint folder")
    with open(path) as f:
        config = json.load(f)
    if not is_layerwise_config(config):
        raise ValueError(
            f"{folder}: config.json describes {config.get('architectures')} ({config.get('model_type')}), not "
            f"FlagEmbedding's {ARCHITECTURE}"
        )
    return config


def is_layerwise_config(config: dict) -> bool:
    """Whether a ``config.json`` (as a dict) is FlagEmbedding's layer-wise MiniCPM reranker."""
    archs = config.get("architectures") or []
    return ARCHITECTURE in archs or (config.get("model_type") == "minicpm" and "start_layer" in config)


def cutoff_layer_list(cutoff_layers, last: int, empty_hint: str, problem) -> List[int]:
    """``cutoff_layers`` (an int, a list of ints, or None: ``[last]``) as a checked list of distinct int layers,
    each one that ``problem(k)`` finds nothing wrong with (it returns None, or what is wrong with layer k);
    ``empty_hint`` says what to give instead of an empty list. Both layer-wise models check their layers here."""
    if cutoff_layers is None:
        return [last]
    if isinstance(cutoff_layers, int) and not isinstance(cutoff_layers, bool):
        cutoff_layers = [cutoff_layers]
    try:
        layers = list(cutoff_layers)
    except TypeError:
        raise ValueError(
            f"cutoff_layers: expected an int or a list of ints, got {type(cutoff_layers).__name__}"
        ) from None
    if not layers:
        raise ValueError(f"cutoff_layers: empty; {empty_hint}")
    for k in layers:
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError(f"cutoff_layers: {k!r} is not an int layer number")
        wrong = problem(k)
        if wrong is not None:
            raise ValueError(f"cutoff_layers: {wrong}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"cutoff_layers: {layers} repeats a layer")
    return layers


def load_checkpoint(model, folder: str, config: dict, dtype, architecture: str):
    """``model`` (built by ``empty``) with ``folder``'s safetensors weights, in ``dtype`` (None or ``"auto"``: the
    config's ``torch_dtype``), in eval mode. FlagEmbedding saves no rotary buffers: they are computed, not loaded;
    any other missing or unexpected key is an error naming the architecture."""
    from safetensors.torch import load_file

    if dtype in (None, "auto"):
        name = config.get("torch_dtype") or config.get("dtype") or "float32"
        dtype = getattr(torch, name) if isinstance(name, str) else name
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    state = {}
    for path in _weight_files(folder):
        state.update(load_file(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(
            f"{folder}: not a {architecture} checkpoint of this config (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]})"
        )
    return model.to(dtype).eval()


def _weight_files(folder: str) -> List[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(folder, n) for n in names]
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise ValueError(
        f"{folder}: no model.safetensors (or index); fastrank loads {ARCHITECTURE} weights from safetensors only "
        "(convert a pytorch_model.bin once with transformers 4.x: model.save_pretrained(folder, "
        "safe_serialization=True))"
    )
