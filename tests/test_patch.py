"""fastrank.patch: the same model object, its forward computing only the scoring position's logits."""

from __future__ import annotations

import pytest
import torch
from references import require
from tiny_models import tiny_causal_lm, tiny_tokenizer
from tolerances import GRADS_SAME_FORWARD, PROBABILITIES, SCORES_SAME_FORWARD, assert_close

import fastrank
from fastrank.data.batching import collate
from fastrank.engine.fusion import fuse

TEXTS = ["river water history", "music", "protein 2019 science network university city"]


def _batch(tokenizer, side, device):
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    b = collate(seqs, tokenizer.pad_token_id, side, device=device)
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask}


def _last(mask):
    return torch.where(mask != 0, torch.arange(mask.shape[1], device=mask.device), -1).amax(1)


@pytest.mark.parametrize("preset", ["bge-reranker-v2-gemma", "qwen3-reranker"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_patched_logits_equal_unpatched(backend, device, preset, side):
    model = tiny_causal_lm("llama").to(device)
    tokenizer = tiny_tokenizer("llama")
    batch = _batch(tokenizer, side, device)
    ids = fastrank.get_preset(preset).convention.token_ids(tokenizer)
    with torch.no_grad():
        full = model(**batch).logits.float()
        want = full[torch.arange(3, device=device), _last(batch["attention_mask"])]
        same = fastrank.patch(model, preset, tokenizer=tokenizer)
        assert same is model
        out = model(**batch)
    assert out.logits.shape == (3, 1, model.config.vocab_size)
    assert_close(out.logits[:, -1, list(ids)], want[:, list(ids)], SCORES_SAME_FORWARD, what="scored logits")
    others = torch.ones(model.config.vocab_size, dtype=torch.bool)
    others[list(ids)] = False
    assert torch.isnan(out.logits[:, -1, others.to(device)]).all(), "uncomputed logits must be NaN, not numbers"
    if side == "left":  # left padding: the HF idiom out.logits[:, -1, yes] reads the same number either way
        assert_close(out.logits[:, -1, ids[0]], full[:, -1, ids[0]], SCORES_SAME_FORWARD, what="logits[:, -1, yes]")
    fastrank.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, full.to(model(**batch).logits.dtype))


def test_patched_softmax_is_exact_for_digit_presets(backend, device):
    model = tiny_causal_lm("qwen2").to(device)
    tokenizer = tiny_tokenizer("qwen2")
    batch = _batch(tokenizer, "left", device)
    digits = list(fastrank.get_preset("lb-reranker").convention.token_ids(tokenizer))
    with torch.no_grad():
        want = torch.softmax(model(**batch).logits[:, -1].double(), -1)[:, digits]
        fastrank.patch(model, "lb-reranker", tokenizer=tokenizer)
        got = torch.softmax(model(**batch).logits[:, -1].double(), -1)[:, digits]
    assert_close(got, want, PROBABILITIES, what="digit probabilities")


def test_patch_errors():
    model = tiny_causal_lm("qwen2")
    tokenizer = tiny_tokenizer("qwen2")
    with pytest.raises(ValueError, match="^model: is not patched"):
        fastrank.unpatch(model)
    with pytest.raises(ValueError, match="^preset: give a preset"):
        fastrank.patch(model)
    with pytest.raises(ValueError, match=r"^token_ids\[0\]=99999"):
        fastrank.patch(model, token_ids=[99999])
    fastrank.patch(model, "qwen3-reranker", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="^model: is already patched"):
        fastrank.patch(model, "qwen3-reranker", tokenizer=tokenizer)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="^labels"):
        model(input_ids=ids, labels=ids)
    with pytest.raises(ValueError, match="^use_cache"):
        model(input_ids=ids, use_cache=True)


def _train_step(model, batch, token, checkpointing):
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.zero_grad()
    out = model(**batch)
    logits = out.logits
    if logits.shape[1] == 1:
        score = logits[:, -1, token]
    else:
        score = logits[torch.arange(logits.shape[0], device=logits.device), _last(batch["attention_mask"]), token]
    (score * torch.tensor([1.0, -2.0, 0.5], device=score.device)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if checkpointing:
        model.gradient_checkpointing_disable()
    return grads


def test_gradient_checkpointing_gives_the_same_gradients(backend, device):
    model = tiny_causal_lm("llama").to(device)
    tokenizer = tiny_tokenizer("llama")
    batch = _batch(tokenizer, "right", device)
    token = tokenizer.convert_tokens_to_ids("Yes")
    # patch() fuses the decoder's elementwise ops (RoPE's backward sums in its own order): fuse the unpatched
    # model too, so that only the head and the checkpointing differ.
    fuse(model)
    want = _train_step(model, batch, token, checkpointing=False)
    fastrank.patch(model, "bge-reranker-v2-gemma", tokenizer=tokenizer)
    calls = []
    mlp = model.model.layers[0].mlp
    original = mlp.forward  # wrapped directly: module hooks do not fire during a checkpoint's recompute

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    mlp.forward = counting
    got = _train_step(model, batch, token, checkpointing=True)
    mlp.forward = original
    assert len(calls) == 2, "the checkpointed layer must run again in backward"
    assert want.keys() == got.keys()
    for name in want:
        assert_close(got[name], want[name], GRADS_SAME_FORWARD, what=name)


def test_lora_adapter(backend, device):
    peft = require("peft")
    model = tiny_causal_lm("qwen2").to(device)
    tokenizer = tiny_tokenizer("qwen2")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    batch = _batch(tokenizer, "left", device)
    token = tokenizer.convert_tokens_to_ids("Yes")
    want = _train_step(lora, batch, token, checkpointing=False)
    fastrank.patch(lora, "bge-reranker-v2-gemma", tokenizer=tokenizer)
    got = _train_step(lora, batch, token, checkpointing=False)
    assert want.keys() == got.keys() and any("lora_" in n for n in got)
    for name in want:
        assert_close(got[name], want[name], GRADS_SAME_FORWARD, what=name)
    fastrank.unpatch(lora)


def test_save_pretrained_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_causal_lm("qwen2")
    tokenizer = tiny_tokenizer("qwen2")
    fastrank.patch(model, "qwen3-reranker", tokenizer=tokenizer)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not fastrank.models.is_patched(loaded)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
