"""A causal LM as a reranker: its backbone's last hidden state through score_head, never full logits."""

from __future__ import annotations

from typing import Optional

import torch

from fastrank.data.packing import PackedBatch
from fastrank.engine import packed_forward, unwrap_model
from fastrank.engine.fusion import maybe_fuse
from fastrank.heads import Convention, convention_scores

# Architectures whose LM head output is rescaled by a config value fastrank does not reproduce.
_UNSUPPORTED_LOGIT_SCALING = ("logit_scale", "logits_scaling", "output_logits_scale", "scale_width")


def enable_checkpointing(model, **kwargs) -> None:
    """Turn on activation (gradient) checkpointing in ``model``'s backbone, under the name its transformers
    knows: ``activation_checkpointing_enable`` from 5.23 (``gradient_checkpointing_enable`` there is a
    deprecated alias that warns), ``gradient_checkpointing_enable`` before. Either spelling of the keyword
    arguments is accepted."""
    inner = unwrap_model(model)
    enable = getattr(inner, "activation_checkpointing_enable", None)
    if enable is not None:
        if "gradient_checkpointing_kwargs" in kwargs:
            kwargs["activation_checkpointing_kwargs"] = kwargs.pop("gradient_checkpointing_kwargs")
        enable(**kwargs)
        return
    if "activation_checkpointing_kwargs" in kwargs:
        kwargs["gradient_checkpointing_kwargs"] = kwargs.pop("activation_checkpointing_kwargs")
    inner.gradient_checkpointing_enable(**kwargs)


def backbone_of(model):
    """The decoder stack of an ``AutoModelForCausalLM`` (``model.model`` for Llama, Qwen, Gemma, Mistral)."""
    model = unwrap_model(model)
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        if decoder is not None and decoder is not model:
            return decoder
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or base is model:
        raise ValueError(
            f"model: cannot find the decoder of {type(model).__name__}; pass an AutoModelForCausalLM "
            "(a model with an LM head on top of a base model)"
        )
    return base


def lm_head_of(model):
    head = unwrap_model(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model: {type(unwrap_model(model)).__name__} has no LM head (get_output_embeddings())")
    return head


def logit_softcap_of(model) -> Optional[float]:
    config = unwrap_model(model).config
    for name in _UNSUPPORTED_LOGIT_SCALING:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"model: its config rescales the LM head output ({name}={value}); fastrank's score head does "
                "not reproduce that scaling yet"
            )
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


class CausalLMScorer(torch.nn.Module):
    """Scores sequences with a causal LM under a scoring convention.

    ``forward(input_ids, attention_mask)`` runs only the backbone (no ``[N, T, V]`` logits, no cache, no
    list of hidden states) and reads the convention's tokens at each sequence's last real token through
    ``fastrank.score_head``. Packed input: ``input_ids`` ``[1, M]`` with ``cu_seqlens`` (positions restart
    per sequence, ``use_cache=False``, no attention mask), for attention backends that honour it.
    """

    def __init__(self, model, convention: Convention, token_ids):
        super().__init__()
        self.model = model
        self.convention = convention
        self.token_ids = tuple(int(t) for t in token_ids)
        self.softcap = logit_softcap_of(model)
        backbone_of(model)  # fail now, not at the first batch, if the model has no decoder to call
        maybe_fuse(model)  # the decoder's norms, RoPE and gated activation through fastrank's fused ops

    @property
    def backbone(self):
        # Looked up rather than stored: a second reference would register the decoder twice in state_dict.
        return backbone_of(self.model)

    def hidden_states(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        cu_seqlens=None,
        **backbone_kwargs,
    ) -> torch.Tensor:
        if cu_seqlens is not None:
            if attention_mask is not None:
                raise ValueError("attention_mask: packed input (cu_seqlens) must not carry an attention mask")
            if position_ids is None:
                position_ids = packed_position_ids(cu_seqlens, input_ids if input_ids is not None else inputs_embeds)
        elif position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **backbone_kwargs,
        )
        return out.last_hidden_state

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        cu_seqlens=None,
        positions=None,
        normalize: bool = False,
        **backbone_kwargs,
    ) -> torch.Tensor:
        """Scores ``[N]`` in fp32."""
        hidden = self.hidden_states(
            input_ids, attention_mask, position_ids, inputs_embeds, cu_seqlens, **backbone_kwargs
        )
        head = lm_head_of(self.model)
        return convention_scores(
            self.convention,
            self.token_ids,
            hidden,
            head.weight,
            bias=getattr(head, "bias", None),
            attention_mask=attention_mask if cu_seqlens is None else None,
            positions=positions,
            cu_seqlens=cu_seqlens,
            normalize=normalize,
            softcap=self.softcap,
        )

    def packed_scores(self, batch: PackedBatch, normalize: bool = False, **backbone_kwargs) -> torch.Tensor:
        """Scores ``[N]`` (fp32) of the items of a packed, shared-prefix batch (``fastrank.engine.pack``), in
        the batch's item order. The model must have the engine enabled (``fastrank.engine.enable_packing``)."""
        hidden = packed_forward(self.backbone, batch, **backbone_kwargs)
        head = lm_head_of(self.model)
        # Each item's last row, as a one-position sequence: score_head reads position 0 of each.
        rows = hidden.index_select(0, batch.rows())[:, None, :]
        return convention_scores(
            self.convention,
            self.token_ids,
            rows,
            head.weight,
            bias=getattr(head, "bias", None),
            normalize=normalize,
            softcap=self.softcap,
        )


def packed_position_ids(cu_seqlens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[1, M]`` positions restarting at 0 at each packed sequence."""
    total = like.shape[1] if like.dim() >= 2 else like.shape[0]
    cu = cu_seqlens.long().to(like.device)
    steps = torch.arange(total, device=like.device)
    starts = cu[:-1].repeat_interleave(cu[1:] - cu[:-1])
    return (steps - starts)[None, :]
