"""Scoring conventions against the value computed from the unpatched HF model's full logits."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, tiny_causal_lm, tiny_tokenizer
from tolerances import SCORES_SAME_FORWARD, assert_close, dot_atol

import fastrank
from fastrank.data.batching import collate
from fastrank.heads import convention_scores, single_token_id
from fastrank.models import CausalLMScorer

PAIRS_TEXT = [
    "river water history of the city",
    "music album",
    "protein 2019 science network university",
    "Yes",
]


def _batch(tokenizer, side, device):
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PAIRS_TEXT]
    return collate(seqs, tokenizer.pad_token_id, side, device=device)


def _full_logits(model, batch):
    """What reference code computes: the HF model's own logits at each row's last real token."""
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits.float()
    last = torch.where(
        batch.attention_mask != 0, torch.arange(batch.input_ids.shape[1], device=logits.device), -1
    ).amax(1)
    return logits[torch.arange(logits.shape[0], device=logits.device), last].double()


CONVENTIONS = {
    "yes_logit": (fastrank.yes_logit("Yes"), lambda logits, ids: logits[:, ids[0]], lambda s: torch.sigmoid(s)),
    "yes_no": (
        fastrank.yes_no("yes", "no"),
        lambda logits, ids: logits[:, ids[0]] - logits[:, ids[1]],
        lambda s: torch.sigmoid(s),
    ),
    "token_diff": (
        fastrank.token_diff("1", "0"),
        lambda logits, ids: logits[:, ids[0]] - logits[:, ids[1]],
        lambda s: torch.sigmoid(s),
    ),
    "digit_ev": (
        fastrank.digit_ev(),
        lambda logits, ids: (
            torch.softmax(logits, -1)[:, list(ids)] * torch.arange(1, 8, dtype=logits.dtype, device=logits.device)
        ).sum(1),
        None,
    ),
    "digit_ev_renorm": (
        fastrank.digit_ev(renormalize=True),
        lambda logits, ids: (
            torch.softmax(logits[:, list(ids)], -1) * torch.arange(1, 8, dtype=logits.dtype, device=logits.device)
        ).sum(1),
        None,
    ),
}


@pytest.mark.parametrize("name", list(CONVENTIONS))
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("arch", ARCHS)
def test_convention_equals_full_logits(backend, device, arch, side, name):
    model = tiny_causal_lm(arch).to(device)
    tokenizer = tiny_tokenizer(arch)
    convention, reference, _ = CONVENTIONS[name]
    ids = convention.token_ids(tokenizer)
    batch = _batch(tokenizer, side, device)
    scorer = CausalLMScorer(model, convention, ids)
    with torch.no_grad():
        got = scorer(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    want = reference(_full_logits(model, batch), ids)
    assert got.dtype == torch.float32
    assert_close(got, want, SCORES_SAME_FORWARD, what=f"{arch} {name}")


@pytest.mark.parametrize("name", ["yes_logit", "yes_no", "digit_ev"])
def test_normalize(backend, device, name):
    model = tiny_causal_lm("llama").to(device)
    tokenizer = tiny_tokenizer("llama")
    convention, reference, squash = CONVENTIONS[name]
    ids = convention.token_ids(tokenizer)
    batch = _batch(tokenizer, "left", device)
    scorer = CausalLMScorer(model, convention, ids)
    with torch.no_grad():
        got = scorer(input_ids=batch.input_ids, attention_mask=batch.attention_mask, normalize=True)
    logits = _full_logits(model, batch)
    if squash is not None:
        want = squash(reference(logits, ids))
    else:  # digit_ev: renormalised expected value, rescaled from [1, 7] to [0, 1]
        want = (CONVENTIONS["digit_ev_renorm"][1](logits, ids) - 1) / 6
    assert_close(got, want, SCORES_SAME_FORWARD, what=f"{name} normalized")
    assert ((got >= 0) & (got <= 1)).all()


def test_softcapped_model(backend, device):
    """Gemma 2 soft-caps its final logits; the conventions must read the capped values."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=1031,
        pad_token_id=0,
        bos_token_id=3,
        eos_token_id=0,
        final_logit_softcapping=3.0,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().to(device)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits well beyond the cap, so capping matters
    tokenizer = tiny_tokenizer("gemma")
    batch = _batch(tokenizer, "left", device)
    logits = _full_logits(model, batch)
    for name in ("yes_logit", "yes_no"):
        convention, reference, _ = CONVENTIONS[name]
        ids = convention.token_ids(tokenizer)
        with torch.no_grad():
            got = CausalLMScorer(model, convention, ids)(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        assert_close(got, reference(logits, ids), SCORES_SAME_FORWARD, what=name)
    with pytest.raises(ValueError, match="soft-capping"):
        CausalLMScorer(model, fastrank.digit_ev(), fastrank.digit_ev().token_ids(tokenizer))(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        )


def test_single_token_check():
    tokenizer = tiny_tokenizer("qwen2")
    assert single_token_id(tokenizer, "Yes") == tokenizer.convert_tokens_to_ids("Yes")
    with pytest.raises(ValueError, match=r"^tokens: 'Yes please' is \d tokens"):
        single_token_id(tokenizer, "Yes please")
    with pytest.raises(ValueError, match="^tokens: yes_no reads 2"):
        fastrank.Convention("yes_no", ("yes",))
    with pytest.raises(ValueError, match="^kind:"):
        fastrank.Convention("max_logit", ("yes",))


def test_yes_no_is_one_fp32_row():
    """The difference is formed from fp32 accumulators, not from two logits rounded to bf16 first."""
    torch.manual_seed(0)
    h = 64
    hidden = torch.randn(3, 2, h).bfloat16()
    weight = (torch.randn(10, h) * 8).bfloat16()
    got = convention_scores(fastrank.yes_no(), (1, 2), hidden, weight)
    exact = hidden[:, -1].double() @ (weight[1].double() - weight[2].double())
    rounded = hidden[:, -1] @ weight.t()  # what a bf16 forward returns
    bf16_way = rounded[:, 1].double() - rounded[:, 2].double()
    # one fp32-accumulated dot product of length h per row (the op-level rule of tolerances.py)
    abs_dot = hidden[:, -1].double().abs() @ (weight[1].double().abs() + weight[2].double().abs())
    assert_close(got, exact, atol=dot_atol(h, abs_dot), what="yes minus no")
    ours_err = (got.double() - exact).abs().max()
    assert ours_err * 100 < (bf16_way - exact).abs().max()
