"""Sharded and data-parallel training on 2 CPU processes (gloo): ``train_reranker`` / ``train_embedder`` with
``fsdp`` (FSDP2) and without (DDP) must give the loss of every step and the trained weights of one process on
the same global batch, and ``fastrank train-embedder --fsdp`` must run under ``torchrun`` end to end.

The data order is the same by construction: the Trainer's seeded sampler draws one permutation whatever the
number of processes, and with B queries per process, process r takes batch 2t + r of that permutation at step t,
which are the queries one process takes at step t with 2B queries per step (or with B and two accumulated
micro-batches). Which of the two one-process runs is the reference depends on what the loss sees: a reranker's
loss is a mean over queries, the same either way; an embedder's in-batch negatives are the passages of the
micro-batch (2B per step in one process, B per process without ``negatives_cross_device``, 2B gathered from
both processes with it).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest
import torch
from tiny_models import tiny_causal_lm, tiny_tokenizer
from tolerances import GRADS_VS_REFERENCE, LOSS_VS_REFERENCE, PARAMS_AFTER_STEPS, SAME_COMPUTATION, assert_close

WORLD = 2
STEPS = 4
WORDS = "alpha beta gamma delta report notes river stone paper light".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_rows(path, n, seed):
    """n queries, each with a positive that shares its item number and 3 negatives."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):

            def text(k):
                return " ".join(rng.choice(WORDS) for _ in range(rng.randint(k, k + 8)))

            row = {
                "query": f"item {i} {text(1)}",
                "pos": [f"item {i} is {text(3)}"],
                "neg": [text(3) for _ in range(3)],
            }
            f.write(json.dumps(row) + "\n")


def _reranker_folder(path):
    tiny_causal_lm("qwen2").save_pretrained(path)
    tiny_tokenizer("qwen2", "left").save_pretrained(path)


def _bert_folder(path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
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
    BertModel(config).save_pretrained(path)
    tiny_tokenizer("qwen2", "right").save_pretrained(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    _write_rows(root / "train.jsonl", 16, seed=0)
    _reranker_folder(root / "reranker")
    _bert_folder(root / "bert")
    return root


def _options(root, output, **overrides):
    from fastrank.training import TrainingOptions

    settings = dict(
        output=str(output),
        data=[str(root / "train.jsonl")],
        train_group_size=3,
        batch_size=2,
        lr=1e-3,
        max_steps=STEPS,
        warmup_ratio=0.0,
        query_max_len=16,
        passage_max_len=24,
        save_steps=STEPS,
        logging_steps=1,
        progress=False,
        seed=0,
    )
    settings.update(overrides)
    return TrainingOptions(**settings)


# What each run trains: (function, its keyword arguments, TrainingOptions overrides). Run on 2 processes with
# B = 2 queries each, and on one process with the overrides of ONE_PROCESS.
RUNS = {
    "reranker_full_shard": ("train_reranker", {}, {"fsdp": "full_shard"}),
    # B = 1 query per micro-batch and 2 micro-batches per step: the same 2 queries per process and step.
    "reranker_lora_shard_grad_op_checkpointing_accumulation": (
        "train_reranker",
        {"lora_rank": 4, "lora_dropout": 0.0, "lora_targets": ["q_proj", "v_proj"]},
        {"fsdp": "shard_grad_op", "gradient_checkpointing": True, "batch_size": 1, "grad_accum": 2},
    ),
    "embedder_cross_device_full_shard": (
        "train_embedder",
        {"pooling": "mean", "temperature": 0.05, "negatives_cross_device": True},
        {"fsdp": "full_shard"},
    ),
    "embedder_full_shard": ("train_embedder", {"pooling": "mean", "temperature": 0.05}, {"fsdp": "full_shard"}),
    "embedder_cross_device_ddp": (
        "train_embedder",
        {"pooling": "mean", "temperature": 0.05, "negatives_cross_device": True},
        {},
    ),
}
ONE_PROCESS = {
    # The global batch in one step; in-batch negatives over all of it, as cross-device negatives give.
    "reranker_full_shard": {"batch_size": 4},
    "reranker_lora_shard_grad_op_checkpointing_accumulation": {"batch_size": 4, "gradient_checkpointing": True},
    "embedder_cross_device_full_shard": {"batch_size": 4},
    # Each process's negatives are its own B groups': two micro-batches of B, gradients averaged.
    "embedder_full_shard": {"batch_size": 2, "grad_accum": 2},
    "embedder_cross_device_ddp": {"batch_size": 4},
}


def _train(name, root, output, world):
    import fastrank.training as training

    function, kwargs, overrides = RUNS[name]
    model = root / ("reranker" if function == "train_reranker" else "bert")
    if world == 1:  # in-batch negatives over the whole global batch stand for the gathered ones
        overrides = ONE_PROCESS[name]
        kwargs = {k: v for k, v in kwargs.items() if k != "negatives_cross_device"}
    getattr(training, function)(str(model), _options(root, output, **overrides), **kwargs)


def _on_cpu():
    # Every run on the CPU (gloo), on a GPU machine too: two processes would want two GPUs. Set before anything
    # asks torch about CUDA.
    os.environ.update(CUDA_VISIBLE_DEVICES="", FASTRANK_BACKEND="torch")
    torch.set_num_threads(1)  # several processes on a 2-core machine


def _launched(rank, world, port):
    """What torchrun gives each process: the Trainer's first TrainingArguments set up the gloo group."""
    _on_cpu()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )


def _worker(rank, world, port, names, root, out):
    _launched(rank, world, port)
    for name in names:  # one process group (set up by the first Trainer) for every run
        _train(name, root, out / name / "sharded", world)
    torch.distributed.destroy_process_group()


def _reference_key(name):
    """Runs with the same one-process reference (the two cross-device runs) share it."""
    function, kwargs, _ = RUNS[name]
    return json.dumps([function, sorted(kwargs.items()), sorted(ONE_PROCESS[name].items())])


def _reference_worker(_, names, root, out):
    _on_cpu()
    done = set()
    for name in names:
        if _reference_key(name) not in done:
            done.add(_reference_key(name))
            _train(name, root, out / name / "single", 1)


def _trained(output):
    """(the loss of every step, the gradient norm of every step, the saved weights) of a run."""
    from safetensors.torch import load_file

    state = json.loads((output / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    logs = [e for e in state["log_history"] if "loss" in e]
    adapter = (output / "adapter_config.json").exists()
    weights = load_file(output / ("adapter_model.safetensors" if adapter else "model.safetensors"))
    return [e["loss"] for e in logs], [e["grad_norm"] for e in logs], weights


def test_two_processes_train_as_one(setup, tmp_path):
    """Every run of RUNS on 2 processes (B = 2 queries each) logs the loss and the gradient norm of one
    process on the same global batch at every step, and saves its weights after the last AdamW step. (Adam
    does not see a gradient's scale; the gradient norm does.)"""
    names = list(RUNS)
    start = time.perf_counter()
    # The one-process runs alongside the two-process ones, in a process of their own (no WORLD_SIZE).
    references = torch.multiprocessing.spawn(_reference_worker, args=(names, setup, tmp_path), join=False)
    torch.multiprocessing.spawn(_worker, args=(WORLD, _free_port(), names, setup, tmp_path), nprocs=WORLD)
    references.join()
    print(f"\nruns: {time.perf_counter() - start:.1f} s")
    reference = {}
    for name in names:
        reference.setdefault(_reference_key(name), tmp_path / name / "single")
        got_loss, got_norm, got = _trained(tmp_path / name / "sharded")
        want_loss, want_norm, want = _trained(reference[_reference_key(name)])
        assert len(got_loss) == len(want_loss) == STEPS
        print(
            f"{name}: max |loss diff| {max(abs(a - b) for a, b in zip(got_loss, want_loss)):.2g}, "
            f"max |grad norm diff| / norm {max(abs(a - b) / b for a, b in zip(got_norm, want_norm)):.2g}, "
            f"max |weight diff| {max((got[k] - want[k]).abs().max().item() for k in want):.2g}"
        )
        assert_close(got_loss, want_loss, LOSS_VS_REFERENCE, what=f"{name}: losses")
        assert_close(got_norm, want_norm, GRADS_VS_REFERENCE, what=f"{name}: gradient norms")
        assert got.keys() == want.keys()
        for key in want:
            assert_close(got[key], want[key], PARAMS_AFTER_STEPS, what=f"{name}: {key}")


def test_fsdp_resume_continues_as_uninterrupted(setup, tmp_path):
    """Under FSDP a checkpoint holds the full weights and the full optimizer state: a run resumed from its
    step-2 checkpoint logs the same last steps and ends with the same weights as the run that went on."""
    torch.multiprocessing.spawn(_resume_worker, args=(WORLD, _free_port(), setup, tmp_path), nprocs=WORLD)
    whole_loss, whole_norm, whole = _trained(tmp_path / "whole")
    resumed_loss, resumed_norm, resumed = _trained(tmp_path / "resumed")
    assert_close(resumed_loss, whole_loss, SAME_COMPUTATION, what="losses")
    assert_close(resumed_norm, whole_norm, SAME_COMPUTATION, what="gradient norms")
    for key in whole:
        assert_close(resumed[key], whole[key], SAME_COMPUTATION, what=key)


def _resume_worker(rank, world, port, root, out):
    import shutil

    from fastrank.training import train_reranker

    _launched(rank, world, port)
    model = str(root / "reranker")
    train_reranker(model, _options(root, out / "whole", fsdp="full_shard", save_steps=2))
    if rank == 0:  # what a run stopped after its step-2 checkpoint leaves
        shutil.copytree(out / "whole" / "checkpoint-2", out / "resumed" / "checkpoint-2")
    torch.distributed.barrier()
    train_reranker(model, _options(root, out / "resumed", fsdp="full_shard", save_steps=2, resume=True))
    torch.distributed.destroy_process_group()


def test_fsdp_refusals(setup, tmp_path, monkeypatch):
    """fsdp in one process, an unknown fsdp mode, and accelerate's own FSDP are refused, each saying why."""
    from fastrank.training import train_reranker

    monkeypatch.setenv("FASTRANK_BACKEND", "torch")
    with pytest.raises(ValueError, match=r"fsdp='full_shard': shards the model across processes, .*torchrun"):
        train_reranker(str(setup / "reranker"), _options(setup, tmp_path / "out", fsdp="full_shard"))
    with pytest.raises(ValueError, match=r"fsdp: must be one of full_shard, shard_grad_op, got 'hybrid'"):
        _options(setup, tmp_path / "out", fsdp="hybrid")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what an accelerate config with distributed_type FSDP sets
    with pytest.raises(ValueError, match=r"accelerate's FSDP .* fastrank shards them itself"):
        train_reranker(str(setup / "reranker"), _options(setup, tmp_path / "out"))


def test_cli_under_torchrun(setup, tmp_path):
    """``torchrun --nproc_per_node 2 -m fastrank.cli train-embedder --fsdp full_shard --negatives-cross-device
    --eval ...``: trains, evaluates once, and saves a model that loads and encodes."""
    import fastrank

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "run"
    command = [
        torchrun,
        "--nproc_per_node",
        str(WORLD),
        "--master_port",
        str(_free_port()),
        "-m",
        "fastrank.cli",
        "train-embedder",
        "--model",
        str(setup / "bert"),
        "--data",
        str(setup / "train.jsonl"),
        "--eval",
        str(setup / "train.jsonl"),
        "--output",
        str(out),
        "--pooling",
        "mean",
        "--group-size",
        "3",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--save-steps",
        "2",
        "--negatives-cross-device",
        "--fsdp",
        "full_shard",
        "--no-progress",
    ]
    env = dict(os.environ, FASTRANK_BACKEND="torch", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"')]
    assert [next(iter(r)) for r in reports] == ["before_training", "after_training"]  # one process reports
    assert json.loads((out / "eval_results.json").read_text())["after_training"] == reports[1]["after_training"]
    assert (out / "checkpoint-2" / "optimizer.pt").exists()
    embedder = fastrank.Embedder.from_pretrained(str(out), device="cpu")
    vectors = embedder.encode(["item 3 is river stone", "a paper light"])
    assert vectors.shape == (2, 32) and abs(float((vectors[0] ** 2).sum()) - 1) < 1e-5
