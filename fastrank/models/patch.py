"""``fastrank.patch``: make an existing Hugging Face causal LM compute only what a reranker reads.

The patch replaces ``forward`` on the one model instance (never on a class, never on decoder layers, so
gradient checkpointing, PEFT adapters, ``save_pretrained`` and other models are untouched). The patched
forward runs the backbone, then ``score_head`` at each row's last real token, and returns an ordinary
``CausalLMOutputWithPast`` whose ``logits`` are ``[N, 1, V]`` fp32: the real logits in the columns of the
preset's tokens, so ``out.logits[:, -1, yes_id]`` gives the same number as before, and NaN elsewhere
(those logits were never computed, and NaN makes any use of them loud). When the preset reads the
full-vocabulary softmax (``digit_ev``), the other columns instead hold the one value that makes
``softmax(out.logits[:, -1])`` exact for the preset's tokens.
"""

from __future__ import annotations

import math
import types

import torch

import fastrank.functional as F
from fastrank.engine.fusion import fused, maybe_fuse, unfuse
from fastrank.models.reranker import backbone_of, lm_head_of, logit_softcap_of, unwrap_model
from fastrank.presets import get_preset


def patch(model, preset=None, *, tokenizer=None, token_ids=None):
    """Patch ``model`` (an ``AutoModelForCausalLM``, possibly inside a PEFT wrapper) in place and return it.

    Args:
        model: the model to patch.
        preset: a preset name or ``fastrank.Preset``; its convention's tokens are the columns computed.
        tokenizer: the model's tokenizer, to look the preset's tokens up (loaded from
            ``model.name_or_path`` when omitted).
        token_ids: explicit vocabulary ids to compute instead of a preset's.
    """
    hf = unwrap_model(model)
    if getattr(hf, "_fastrank_patch", None) is not None:
        raise ValueError("model: is already patched by fastrank; call fastrank.unpatch(model) first")
    backbone_of(hf)
    head = lm_head_of(hf)
    softcap = logit_softcap_of(hf)
    needs_lse = False
    if token_ids is None:
        if preset is None:
            raise ValueError("preset: give a preset (e.g. 'qwen3-reranker') or explicit token_ids to patch a model")
        preset = get_preset(preset)
        if preset.convention.kind == "classifier":
            raise ValueError(
                f"preset: {preset.name!r} scores a sequence-classification model with its own head, which patch() "
                "(LM-head rows of a causal LM) does not apply to; use fastrank.Reranker.from_pretrained(path, "
                f"{preset.name!r})"
            )
        if tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(hf.name_or_path)
            except Exception as e:  # noqa: BLE001
                raise ValueError(
                    f"tokenizer: none given and none could be loaded from {hf.name_or_path!r} ({e}); pass tokenizer="
                ) from e
        token_ids = preset.convention.token_ids(tokenizer)
        needs_lse = preset.convention.needs_lse
    token_ids = tuple(int(t) for t in (token_ids if not isinstance(token_ids, int) else [token_ids]))
    vocab = head.weight.shape[0]
    for i, t in enumerate(token_ids):
        if not 0 <= t < vocab:
            raise ValueError(f"token_ids[{i}]={t} is out of range for this model's vocabulary of {vocab}")
    if needs_lse and softcap:
        raise ValueError("preset: its convention needs the full softmax, unsupported with final-logit soft-capping")
    hf._fastrank_patch = {"token_ids": token_ids, "needs_lse": needs_lse, "softcap": softcap}
    hf.forward = types.MethodType(_patched_forward, hf)
    # The decoder's norms, RoPE and gated activation through fastrank's fused ops (FASTRANK_FUSE=0: off); like
    # the forward above, per module instance.
    hf._fastrank_patch["fused"] = not fused(hf) and any(maybe_fuse(hf).values())
    return model


def unpatch(model):
    """Restore the model's own forward. Returns the model."""
    hf = unwrap_model(model)
    if getattr(hf, "_fastrank_patch", None) is None:
        raise ValueError("model: is not patched by fastrank")
    del hf.forward
    if hf._fastrank_patch.get("fused"):
        unfuse(hf)
    del hf._fastrank_patch
    return model


def is_patched(model) -> bool:
    return getattr(unwrap_model(model), "_fastrank_patch", None) is not None


def _patched_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    return_dict=None,
    **kwargs,
):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    state = self._fastrank_patch
    if labels is not None:
        raise ValueError(
            "labels: a fastrank-patched model computes logits at the scoring position only, so it has no "
            "language-modelling loss; compute your loss from out.logits[:, -1, token_ids] or fastrank.unpatch(model)"
        )
    if past_key_values is not None or use_cache:
        raise ValueError(
            "use_cache: a fastrank-patched model scores, it does not generate; call fastrank.unpatch(model) first"
        )
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    out = backbone_of(self)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        use_cache=False,
        **kwargs,
    )
    hidden = out.last_hidden_state
    head = lm_head_of(self)
    ids = state["token_ids"]
    common = dict(bias=getattr(head, "bias", None))
    if cu_seqlens is not None:
        common["cu_seqlens"] = cu_seqlens
    else:
        common["attention_mask"] = attention_mask
    vocab = head.weight.shape[0]
    if state["needs_lse"]:
        res = F.score_head(hidden, head.weight, ids, return_lse=True, **common)
        selected = res.logits
        # The one value v for the V - K other columns with sum_k e^(l_k) + (V - K) e^v = e^lse, which makes
        # the full softmax exact for the preset's tokens.
        p_sel = torch.exp(selected - res.lse[:, None]).sum(1, keepdim=True)
        rest = (1.0 - p_sel).clamp_min(torch.finfo(torch.float32).tiny)
        fill = res.lse[:, None] + torch.log(rest) - math.log(vocab - len(set(ids)))
        base = fill.expand(-1, vocab)
    else:
        selected = F.score_head(hidden, head.weight, ids, **common)
        if state["softcap"]:
            selected = state["softcap"] * torch.tanh(selected / state["softcap"])
        base = selected.new_full((selected.shape[0], vocab), float("nan"))
    index = torch.tensor(ids, device=selected.device).expand(selected.shape[0], -1)
    logits = torch.scatter(base, 1, index, selected)[:, None, :]
    return CausalLMOutputWithPast(
        logits=logits,
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )
