"""score_head on a real HF causal LM's last hidden state equals the model's own logits at that position."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_causal_lm
from tolerances import BF16_LOGITS, GRADS_HEAD_VS_FULL_LOGITS, SCORES_OTHER_BATCH, SCORES_SAME_FORWARD, assert_close

import fastrank

LENGTHS = [9, 4, 7, 1, 6]
TOKENS = [5, 17, 1030, 250]  # includes the last vocabulary row


def batch(lengths, side, vocab, device):
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, vocab, (length,), generator=gen) for length in lengths]
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        ids[i, sl] = s
        mask[i, sl] = 1
    return ids.to(device), mask.to(device), seqs


def last_real(mask):
    return torch.where(mask != 0, torch.arange(mask.shape[1], device=mask.device), -1).amax(1)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_equals_hf_logits_fp32(backend, device, arch, side):
    model = tiny_causal_lm(arch).to(device)
    input_ids, mask, _ = batch(LENGTHS, side, model.config.vocab_size, device)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
        hidden = model.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        got = fastrank.score_head(hidden, model.lm_head.weight, TOKENS, attention_mask=mask)
        got_lse = fastrank.score_head(hidden, model.lm_head.weight, TOKENS, attention_mask=mask, return_lse=True)
    pos = last_real(mask)
    want = full[torch.arange(len(LENGTHS), device=device), pos][:, TOKENS]
    assert_close(got, want, SCORES_SAME_FORWARD, what="vs model(...).logits")
    lm = model.lm_head(hidden)[torch.arange(len(LENGTHS), device=device), pos][:, TOKENS]
    assert_close(got, lm, SCORES_SAME_FORWARD, what="vs model.lm_head(hidden)")
    want_logp = torch.log_softmax(full[torch.arange(len(LENGTHS), device=device), pos], -1)[:, TOKENS]
    assert_close(got_lse.logits - got_lse.lse[:, None], want_logp, SCORES_SAME_FORWARD, what="log-probabilities")
    if arch == "qwen2":
        assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied case is really tied


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_equals_hf_logits_bf16(backend, device, arch):
    """bf16 model: HF rounds its logits to bf16; fastrank keeps the fp32 accumulator."""
    model = tiny_causal_lm(arch, dtype=torch.bfloat16).to(device)
    input_ids, mask, _ = batch(LENGTHS, "left", model.config.vocab_size, device)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        hidden = model.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        got = fastrank.score_head(hidden, model.lm_head.weight, TOKENS, attention_mask=mask)
    want = full[torch.arange(len(LENGTHS), device=device), last_real(mask)][:, TOKENS].float()
    assert_close(got, want, BF16_LOGITS, what="bf16 logits")


def test_packed_batch_equals_padded(backend, device):
    """Padding-free input through HF (position_ids, use_cache=False) scores like the padded batch."""
    model = tiny_causal_lm("qwen2").to(device)
    input_ids, mask, seqs = batch(LENGTHS, "right", model.config.vocab_size, device)
    flat = torch.cat(seqs)[None].to(device)
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None].to(device)
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32, device=device)
    with torch.no_grad():
        padded_h = model.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        packed_h = model.model(input_ids=flat, position_ids=position_ids, use_cache=False).last_hidden_state
        padded = fastrank.score_head(padded_h, model.lm_head.weight, TOKENS, attention_mask=mask)
        packed = fastrank.score_head(packed_h, model.lm_head.weight, TOKENS, cu_seqlens=cu)
    assert_close(packed, padded, SCORES_OTHER_BATCH, what="packed vs padded")


def test_research_layout_scores_before_the_answer(backend, device):
    """FlagEmbedding's research trainer appends "Yes" and scores at argmax(labels) - 1."""
    model = tiny_causal_lm("llama").to(device)
    input_ids, mask, _ = batch(LENGTHS, "right", model.config.vocab_size, device)
    labels = torch.full_like(input_ids, -100)
    ends = last_real(mask)
    labels[torch.arange(len(LENGTHS), device=device), ends] = 42
    positions = labels.argmax(1) - 1
    keep = positions >= 0  # a one-token row has no position before its answer
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
        hidden = model.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        got = fastrank.score_head(
            hidden[keep], model.lm_head.weight, [42], attention_mask=mask[keep], positions=positions[keep]
        )
    want = full[keep][torch.arange(int(keep.sum()), device=device), positions[keep]][:, [42]]
    assert_close(got, want, SCORES_SAME_FORWARD, what="logit before the answer")


def test_gradients_through_a_real_model(backend, device):
    """Backbone gradients from score_head equal those from the HF logits path."""
    model = tiny_causal_lm("llama").to(device).train()
    input_ids, mask, _ = batch([6, 3, 5], "left", model.config.vocab_size, device)
    pos = last_real(mask)
    full = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits.float()
    (
        full[torch.arange(3, device=device), pos][:, TOKENS] * torch.tensor([1.0, -2.0, 0.5, 3.0], device=device)
    ).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden = model.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
    got = fastrank.score_head(hidden, model.lm_head.weight, TOKENS, attention_mask=mask)
    (got * torch.tensor([1.0, -2.0, 0.5, 3.0], device=device)).sum().backward()
    for name, p in model.named_parameters():
        assert_close(p.grad, want[name], GRADS_HEAD_VS_FULL_LOGITS, what=name)
