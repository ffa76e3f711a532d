"""The decoder's elementwise work through fastrank's fused ops (fastrank.engine.fusion): applied per module
instance, the fused model computes what HF's own modules compute (bit for bit on the reference path, which is
the CPU path; within the interpreter's rounding on the Triton path), padded, packed, in training with
gradient checkpointing and LoRA, and in generation with a cache."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_models import tiny_causal_lm, tiny_tokenizer
from tolerances import GRADS_VS_REFERENCE, SCORES_OTHER_BATCH, assert_close

import fastrank
from fastrank.data.batching import collate
from fastrank.engine.fusion import FUSABLE_MODEL_TYPES, fuse, fused, unfuse
from fastrank.models.reranker import enable_checkpointing

ARCHS = ["qwen2", "llama", "mistral", "gemma", "qwen3", "gemma2"]
TEXTS = ["river water history", "music", "protein 2019 science network university city of lights"]


def _model(arch, dtype=torch.float32):
    return tiny_causal_lm(arch, dtype=dtype, attn_implementation="eager" if arch == "gemma2" else "sdpa")


def _batch(arch, side, device):
    tokenizer = tiny_tokenizer("qwen2" if arch.startswith("qwen") else "llama")
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    b = collate(seqs, tokenizer.pad_token_id, side, device=device)
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask}


def _expected_counts(model):
    config = model.config
    layers = config.num_hidden_layers
    norms_per_layer = {"gemma2": 4, "qwen3": 4}.get(config.model_type, 2)  # Qwen3: q_norm and k_norm too
    return {
        "rms_norm": norms_per_layer * layers + 1,
        "gated_activation": layers,
        "rope": layers,
        "residual_add": layers,
    }


NONE = {"rms_norm": 0, "gated_activation": 0, "rope": 0, "residual_add": 0}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_decoder_module_is_fused_and_unfuse_restores_the_class_forward(arch):
    model = _model(arch)
    counts = fuse(model)
    assert counts == _expected_counts(model) and fused(model)
    assert fuse(model) == NONE  # idempotent
    layer = model.model.layers[0]
    assert "forward" in layer.__dict__  # the residual add fused into the norm
    assert "forward" in layer.mlp.__dict__ and "forward" in layer.self_attn.__dict__
    assert type(layer.mlp).forward is not layer.mlp.forward
    unfuse(model)
    assert not fused(model) and "forward" not in layer.mlp.__dict__ and "forward" not in layer.input_layernorm.__dict__
    assert "forward" not in layer.__dict__
    # Another instance of the same classes was never touched.
    assert not fused(_model(arch))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_logits_equal_hf_bit_for_bit_on_the_reference_path(device, arch, side):
    """The reference path runs HF's formulas in HF's order: the fused model's logits are HF's exactly."""
    model = _model(arch).to(device)
    batch = _batch(arch, side, device)
    with torch.no_grad():
        want = model(**batch).logits
        fuse(model)
        got = model(**batch).logits
    if device.type == "cpu":
        assert torch.equal(got, want)
    else:
        assert_close(got, want, SCORES_OTHER_BATCH, what=f"{arch} fused logits")


@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_fused_bf16_logits_equal_hf_bit_for_bit_on_the_reference_path(arch):
    model = _model(arch, dtype=torch.bfloat16)
    batch = _batch(arch, "left", torch.device("cpu"))
    with torch.no_grad():
        want = model(**batch).logits
        fuse(model)
        got = model(**batch).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["qwen3", "gemma2"])
def test_fused_logits_through_the_triton_kernels(device, monkeypatch, arch):
    """The kernels (interpreted on CPU): within one rounding of each fused op per layer."""
    monkeypatch.setenv("FASTRANK_BACKEND", "triton")
    model = _model(arch).to(device)
    batch = _batch(arch, "right", device)
    with torch.no_grad():
        want = model(**batch).logits
        fuse(model)
        got = model(**batch).logits
    assert_close(got, want, SCORES_OTHER_BATCH, what=f"{arch} fused logits (triton)")


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_packed_reranker_scores_equal_with_and_without_fusion(device, monkeypatch, arch):
    from fastrank.benchmarks.synthetic import synthetic_pairs

    tokenizer = tiny_tokenizer("qwen2" if arch == "qwen2" else "llama")
    pairs = [(q, p) for (q, _), (_, p) in zip(synthetic_pairs(6, seed=2), synthetic_pairs(6, seed=3))]
    monkeypatch.setenv("FASTRANK_FUSE", "0")
    plain = _model(arch).to(device)
    want = fastrank.Reranker(plain, tokenizer, "bge-reranker-v2-gemma").score(pairs)
    assert not fused(plain)
    monkeypatch.delenv("FASTRANK_FUSE")
    model = _model(arch).to(device)
    reranker = fastrank.Reranker(model, tokenizer, "bge-reranker-v2-gemma")
    assert reranker.packed and fused(model)
    got = reranker.score(pairs)
    if device.type == "cpu":
        assert got == want
    else:
        assert_close(got, want, SCORES_OTHER_BATCH, what=f"{arch} fused packed scores")


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_gradients_equal_with_checkpointing_and_lora(device, checkpointing, arch):
    """Gradients through the fused ops equal HF's, gradient checkpointing still recomputes the layers (the
    fused modules run twice per step), and LoRA layers inside the fused attention and MLP get gradients."""
    peft = pytest.importorskip("peft")
    batch = _batch(arch, "right", device)
    grads = []
    calls = []
    for fuse_it in (False, True):
        model = _model(arch).to(device).train()
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], lora_dropout=0.0
        )
        model = peft.get_peft_model(model, config)
        if checkpointing:
            enable_checkpointing(model, gradient_checkpointing_kwargs={"use_reentrant": False})
        if fuse_it:
            counts = fuse(model)
            assert counts["gated_activation"] == 2 and counts["rope"] == 2
        mlp = model.get_base_model().model.layers[0].mlp
        seen = []
        mlp.register_forward_hook(lambda *_: seen.append(1))
        # Without early stopping, checkpointing's recomputation runs each layer whole, MLP included.
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            loss = model(**batch).logits.float().pow(2).mean()
            loss.backward()
        calls.append(len(seen))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert calls == ([2, 2] if checkpointing else [1, 1]), calls
    assert grads[0].keys() == grads[1].keys() and grads[0] and all("lora_" in n for n in grads[0])
    # RoPE's backward is its own formula (dq = g cos + rotate_half^T(g sin)), summed in another order than
    # autograd's through HF's products and concatenation: equal up to fp32 rounding, not bit for bit.
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], GRADS_VS_REFERENCE, what=name)


def test_generation_with_a_cache_is_unchanged():
    model = _model("qwen2")
    batch = _batch("qwen2", "left", torch.device("cpu"))
    with torch.no_grad():
        want = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        fuse(model)
        got = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


def test_patch_fuses_and_unpatch_restores():
    model = _model("llama")
    tokenizer = tiny_tokenizer("llama")
    fastrank.patch(model, "bge-reranker-v2-gemma", tokenizer=tokenizer)
    assert fused(model)
    fastrank.unpatch(model)
    assert not fused(model)


def test_unsupported_models_are_left_alone_with_a_reason():
    from test_embedder import _tiny_bert

    model = _tiny_bert(torch.device("cpu"), "bert")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = fuse(model)
    assert counts == NONE and not fused(model)
    assert any("left unfused" in str(w.message) and "'bert'" in str(w.message) for w in caught)
    assert "bert" not in FUSABLE_MODEL_TYPES


def test_fusion_can_be_switched_off_for_the_loaders(monkeypatch):
    monkeypatch.setenv("FASTRANK_FUSE", "0")
    model = _model("qwen2")
    fastrank.Reranker(model, tiny_tokenizer("qwen2"), "bge-reranker-v2-gemma")
    assert not fused(model)


def test_an_activation_that_is_not_exactly_silu_or_gelu_tanh_keeps_its_forward():
    model = _model("qwen2")
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()  # exact GELU: no fused kernel computes it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = fuse(copy.deepcopy(model))
    assert counts["gated_activation"] == 0 and counts["rms_norm"] == 5
    assert any("neither SiLU nor tanh-GELU" in str(w.message) for w in caught)


def test_autocast_keeps_hf_type_promotion():
    """Under autocast over fp32 weights q and k are bf16 while cos and sin stay fp32: HF's products promote to
    fp32, and so does the fused model (it hands such calls to the model's own function)."""
    model = _model("qwen2")
    batch = _batch("qwen2", "right", torch.device("cpu"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(**batch).logits
        fuse(model)
        got = model(**batch).logits
    assert torch.equal(got, want)


def test_fused_layers_hand_checkpointed_training_and_hooked_norms_to_their_class_forward(monkeypatch):
    """The layer's fused forward (the post-attention add inside the norm) runs in inference and plain training;
    under gradient checkpointing in training, and when the norm has hooks, the class's forward runs instead (it
    checkpoints, and calls the norm as a module)."""
    import importlib

    rms_norm_module = importlib.import_module("fastrank.ops.rms_norm")  # the attribute is the function
    model = _model("qwen2")
    fuse(model)
    layers = model.config.num_hidden_layers
    batch = _batch("qwen2", "right", torch.device("cpu"))
    fused_adds = []
    original = rms_norm_module.rms_norm

    def spy(*args, residual=None, **kwargs):
        if residual is not None:
            fused_adds.append(1)
        return original(*args, residual=residual, **kwargs)

    monkeypatch.setattr(rms_norm_module, "rms_norm", spy)
    with torch.no_grad():
        want = model(**batch).logits
    assert len(fused_adds) == layers  # inference: every layer's add fused
    fused_adds.clear()
    model.train()
    model(**batch).logits.sum().backward()
    assert len(fused_adds) == layers  # plain training too
    fused_adds.clear()
    enable_checkpointing(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    mlp_calls = []
    hook = model.model.layers[0].mlp.register_forward_hook(lambda *_: mlp_calls.append(1))
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        model(**batch).logits.sum().backward()
    hook.remove()
    assert fused_adds == [] and mlp_calls == [1, 1]  # the class's forward, checkpointed: recomputed once
    model.eval()
    norm_calls = []
    hook = model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda *_: norm_calls.append(1))
    with torch.no_grad():
        got = model(**batch).logits
    hook.remove()
    assert len(fused_adds) == layers - 1 and norm_calls == [1] and torch.equal(got, want)


# ------------------------------------------------------------------------------------------------
# kernels="liger": Liger-Kernel's functions behind the same fused forwards
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen3", "gemma"])
def test_liger_kernels_fall_back_to_fastranks_reference_off_cuda(arch):
    """On CPU the fused forwards run fastrank's ops whatever ``kernels`` says: HF's logits bit for bit, padded and
    through the gradients."""
    model = _model(arch)
    batch = _batch(arch, "left", torch.device("cpu"))
    with torch.no_grad():
        want = model(**batch).logits
    assert fuse(model, kernels="liger") == _expected_counts(model)
    norm = model.model.layers[0].input_layernorm
    assert norm._fastrank_kernels == "liger"
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, want)
    unfuse(model)
    assert not hasattr(norm, "_fastrank_kernels")


def test_fused_kernels_switch_in_place_and_are_checked():
    model = _model("qwen2")
    fuse(model)
    counts = fuse(model, kernels="liger")  # switched: the same fused forwards, the other kernels
    assert counts == {**_expected_counts(model), "residual_add": 0}  # layers read their norm's choice
    assert all(m._fastrank_kernels == "liger" for m in model.modules() if hasattr(m, "_fastrank_kernels"))
    assert fuse(model, kernels="liger") == NONE
    with pytest.raises(ValueError, match="^kernels: must be one of 'fastrank', 'liger', got 'triton'$"):
        fuse(model, kernels="triton")


def test_liger_kernels_without_liger_kernel_installed_say_how_to_get_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "liger_kernel.ops.rms_norm", None)
    with pytest.raises(ValueError, match="kernels: 'liger' needs Liger-Kernel, which does not import .*pip install"):
        fuse(_model("qwen2"), kernels="liger")


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen2", "gemma"])
def test_liger_kernels_on_cuda_score_as_fastranks(arch):
    from fastrank.benchmarks.synthetic import synthetic_pairs

    tokenizer = tiny_tokenizer("qwen2" if arch == "qwen2" else "llama")
    pairs = [(q, p) for (q, _), (_, p) in zip(synthetic_pairs(12, seed=2), synthetic_pairs(12, seed=3))]
    model = _model(arch).cuda()
    reranker = fastrank.Reranker(model, tokenizer, "bge-reranker-v2-gemma")
    want = reranker.score(pairs)
    fuse(model, kernels="liger")
    assert_close(reranker.score(pairs), want, SCORES_OTHER_BATCH, what=f"{arch} scores, Liger's kernels")
