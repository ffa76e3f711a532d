"""CUDA graphs of the packed inference forward: padding a batch up to its bucket changes no real row (CPU, both
attention paths), and on a GPU the replayed graphs give the eager forward's hidden states and scores."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_causal_lm, tiny_tokenizer
from tolerances import SCORES_OTHER_BATCH, assert_close

import fastrank
from fastrank.data.packing import pack
from fastrank.engine import enable_packing
from fastrank.engine.forward import eager_packed_forward, packed_forward
from fastrank.engine.graphs import (
    CudaGraphRunner,
    attach_graphs,
    bucket_batch,
    bucket_key,
    detach_graphs,
    token_bucket,
)
from fastrank.models.reranker import backbone_of


def test_token_buckets_hold_the_batch_with_bounded_padding():
    previous = 0
    for n in list(range(1, 5000, 7)) + [8191, 8192, 8193, 16384, 20000, 65537]:
        b = token_bucket(n)
        assert b >= n and b % 256 == 0 and b >= previous
        previous = b
        if n > 2048:
            assert (b - n) / n <= 0.125, (n, b)
    assert token_bucket(1) == 256 and token_bucket(257) == 512 and token_bucket(4097) == 4608
    with pytest.raises(ValueError, match="num_tokens"):
        token_bucket(0)


def _batch(shared: bool, device="cpu"):
    docs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [21], [22, 23, 24]]
    if shared:
        return pack(docs, prefixes=[[1, 2, 3, 4], [30, 31]], prefix_of=[0, 0, 1, None, 1], device=device)
    return pack(docs, device=device)


@pytest.mark.parametrize("shared", [True, False], ids=["prefixes", "plain"])
def test_bucketed_batch_layout(shared):
    batch = _batch(shared)
    key = bucket_key(batch)
    padded = bucket_batch(batch, key)
    m, s = batch.num_tokens, batch.segments.cu_seqlens.shape[0] - 1
    assert key[0] == 256 and padded.num_tokens == 256 and padded.input_ids.shape == (1, 256)
    cu = padded.segments.cu_seqlens.tolist()
    assert cu[: s + 1] == batch.segments.cu_seqlens.tolist()
    assert cu[-1] == 256 and len(cu) == key[1] + 1 and all(a <= b for a, b in zip(cu, cu[1:]))
    assert max(b - a for a, b in zip(cu, cu[1:])) <= key[2] == padded.segments.max_seqlen
    assert torch.equal(padded.input_ids[:, :m], batch.input_ids)
    assert torch.equal(padded.position_ids[:, :m], batch.position_ids)
    assert padded.last_rows is batch.last_rows
    if shared:
        assert padded.segments.prefix[s:].eq(-1).all() and torch.equal(
            padded.segments.prefix[:s], batch.segments.prefix
        )
    else:
        assert padded.segments.prefix is None


def test_a_batch_that_does_not_fit_its_bucket_is_refused():
    batch = _batch(True)
    with pytest.raises(ValueError, match="does not fit bucket"):
        bucket_batch(batch, (256, 4, 16, True))


@pytest.mark.attention_kernel
@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_padding_to_the_bucket_changes_no_real_row(backend, device, arch):
    """The real rows' hidden states of a bucket-padded batch equal the unpadded batch's (the attention kernel
    on the triton backend: padding segments, empty segments and the bucket's longer max_seqlen)."""
    model = tiny_causal_lm(arch, attn_implementation="eager" if arch == "gemma2" else "sdpa").to(device)
    assert enable_packing(model)
    backbone = backbone_of(model)
    for shared in (True, False):
        batch = _batch(shared, device)
        with torch.no_grad():
            want = eager_packed_forward(backbone, batch)
            got = eager_packed_forward(backbone, bucket_batch(batch))[: batch.num_tokens]
        assert_close(got, want, SCORES_OTHER_BATCH, what=f"{arch} bucketed hidden states (shared={shared})")


def test_bert_padding_to_the_bucket_changes_no_real_row(device):
    from test_embedder import _tiny_bert

    model = _tiny_bert(device, "bert")
    assert enable_packing(model)
    batch = _batch(False, device)
    with torch.no_grad():
        want = eager_packed_forward(model, batch)
        got = eager_packed_forward(model, bucket_batch(batch))[: batch.num_tokens]
    assert_close(got, want, SCORES_OTHER_BATCH, what="bert bucketed hidden states")


def test_runner_runs_eagerly_off_cuda_and_under_grad():
    model = tiny_causal_lm("qwen2")
    enable_packing(model)
    backbone = backbone_of(model)
    runner = attach_graphs(backbone)
    assert attach_graphs(backbone) is runner
    batch = _batch(True)
    with torch.no_grad():
        out = packed_forward(backbone, batch)
    assert out.shape[0] == batch.num_tokens and not runner.graphs and runner.replays == 0
    detach_graphs(backbone)
    assert "_fastrank_graphs" not in backbone.__dict__
    with pytest.raises(ValueError, match="max_graphs"):
        CudaGraphRunner(backbone, max_graphs=-1)


def test_graphs_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("FASTRANK_CUDA_GRAPHS", "0")
    assert attach_graphs(backbone_of(tiny_causal_lm("qwen2"))) is None


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_replayed_graphs_equal_the_eager_forward(arch):
    model = tiny_causal_lm(arch, attn_implementation="eager" if arch == "gemma2" else "sdpa").cuda()
    enable_packing(model)
    backbone = backbone_of(model)
    runner = attach_graphs(backbone, max_graphs=4)
    with torch.no_grad():
        for shared in (True, False, True):
            batch = _batch(shared, "cuda")
            want = eager_packed_forward(backbone, batch).clone()
            got = packed_forward(backbone, batch).clone()
            assert_close(got, want, SCORES_OTHER_BATCH, what=f"{arch} graph replay (shared={shared})")
    assert runner.failed is None and len(runner.graphs) == 2 and runner.replays == 3
    detach_graphs(backbone)


@pytest.mark.gpu
def test_reranker_scores_with_graphs_equal_without(monkeypatch):
    from fastrank.benchmarks.synthetic import synthetic_pairs

    model = tiny_causal_lm("qwen2").cuda()
    tokenizer = tiny_tokenizer("qwen2")
    pairs = [("what is the river made of", p) for _, p in synthetic_pairs(24, seed=3, passage_words=(1, 60))]
    monkeypatch.setenv("FASTRANK_CUDA_GRAPHS", "0")
    want = fastrank.Reranker(model, tokenizer, "qwen3-reranker").score(pairs)
    monkeypatch.setenv("FASTRANK_CUDA_GRAPHS", "1")
    reranker = fastrank.Reranker(model, tokenizer, "qwen3-reranker")
    got = reranker.score(pairs, batch_size=8)
    assert_close(got, want, SCORES_OTHER_BATCH, what="scores with CUDA graphs")
    runner = backbone_of(model).__dict__["_fastrank_graphs"]
    assert runner.failed is None and runner.replays > 0
