"""Training that survives faults: checkpoints are written whole or not at all (a run killed while saving leaves
no checkpoint-N that resume would take), resume passes over an incomplete newest checkpoint to the newest complete
one with a warning naming both, and ends with the weights of an uninterrupted run of the same seed, bit for bit
on CPU; --save-total-limit keeps the newest N. Tiny models, 6 steps, a checkpoint every 2."""

from __future__ import annotations

import datetime
import gc
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_causal_lm, tiny_tokenizer

from fastrank.cli import main
from fastrank.integrations.trainer import _prune_checkpoints, checkpoint_problem, last_complete_checkpoint
from fastrank.training import TrainingOptions


def _write_rows(path, n=16, seed=0):
    rng = random.Random(seed)
    words = "alpha beta gamma delta report notes river stone paper light".split()
    with open(path, "w") as f:
        for i in range(n):
            row = {
                "query": f"what is item {i} " + " ".join(rng.choices(words, k=rng.randint(1, 4))),
                "pos": [f"item {i} is " + " ".join(rng.choices(words, k=rng.randint(3, 12)))],
                "neg": [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(3)],
            }
            f.write(json.dumps(row) + "\n")


def _train_args(command, data, out):
    """Six steps of 2 queries (less than an epoch of 16), a checkpoint every 2 steps."""
    return [
        command,
        "--model",
        str(data / "model"),
        "--data",
        str(data / "train.jsonl"),
        "--output",
        str(out),
        "--group-size",
        "3",
        "--batch-size",
        "2",
        "--query-max-len",
        "16",
        "--passage-max-len",
        "24",
        "--lr",
        "1e-3",
        "--max-steps",
        "6",
        "--save-steps",
        "2",
        "--logging-steps",
        "100",
        "--no-progress",
    ]


def _checkpoints(out):
    names = [p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", "tmp-"))]
    return sorted(names, key=lambda name: (len(name), name))


def _assert_same_weights(a, b, resumed_from):
    """Equal to the bit: the Trainer's resume restores the RNG, optimizer and scheduler states and skips the
    batches already seen, so on CPU the resumed run computes exactly what the uninterrupted one did. (And the
    steps after ``resumed_from`` changed the weights: equal is not trivially so.)"""
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different[:5]
    start = load_file(os.path.join(resumed_from, "model.safetensors"))
    assert any(not torch.equal(start[k], wa[k]) for k in wa)


def _truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny Qwen2 model, 16 training queries, and an uninterrupted reranker run (``data / "full"``)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    assert main(["demo-model", str(folder / "model")]) == 0
    _write_rows(folder / "train.jsonl")
    assert main(_train_args("train-reranker", folder, folder / "full")) == 0
    assert _checkpoints(folder / "full") == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return folder


# ---------------------------------------------------------------------------------------------------
# what a complete checkpoint is
# ---------------------------------------------------------------------------------------------------
def _as_adapter(folder):
    os.remove(folder / "model.safetensors")
    save_file({"lora_A": torch.ones(4, 8), "lora_B": torch.zeros(8, 4)}, str(folder / "adapter_model.safetensors"))


def _sharded(folder):
    os.replace(folder / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "damage,problem",
    [
        (lambda f: None, None),
        (lambda f: _truncate(f / "model.safetensors"), "model.safetensors is damaged or truncated"),
        (lambda f: _truncate(f / "model.safetensors", keep=0.999), "model.safetensors is damaged or truncated"),
        (lambda f: os.remove(f / "trainer_state.json"), "trainer_state.json is missing"),
        (lambda f: _truncate(f / "trainer_state.json"), "trainer_state.json does not parse"),
        (lambda f: _truncate(f / "optimizer.pt", keep=0.99), "optimizer.pt is truncated"),
        (lambda f: _truncate(f / "rng_state.pth"), "rng_state.pth is truncated"),
        (lambda f: os.remove(f / "model.safetensors"), "no adapter_model.safetensors, model.safetensors"),
        (_as_adapter, None),
        (lambda f: (_as_adapter(f), _truncate(f / "adapter_model.safetensors")), "adapter_model.safetensors is dam"),
        (_sharded, "lists model-00002-of-00002.safetensors, which is missing"),
    ],
    ids=[
        "complete",
        "truncated-model",
        "model-short-by-bytes",
        "no-trainer-state",
        "truncated-trainer-state",
        "truncated-optimizer",
        "truncated-rng",
        "no-weights",
        "adapter",
        "truncated-adapter",
        "missing-shard",
    ],
)
def test_checkpoint_problem(data, tmp_path, damage, problem):
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(data / "full" / "checkpoint-2", folder)
    damage(folder)
    found = checkpoint_problem(str(folder))
    assert found is None if problem is None else problem in (found or ""), found


def test_last_complete_checkpoint_warns_naming_both(data, tmp_path):
    """Checkpoints are ordered by number (10 after 4), and each one passed over is named with its fault."""
    assert last_complete_checkpoint(str(tmp_path / "missing")) is None
    for n in (2, 4, 10):
        shutil.copytree(data / "full" / "checkpoint-2", tmp_path / f"checkpoint-{n}")
    os.remove(tmp_path / "checkpoint-10" / "trainer_state.json")
    _truncate(tmp_path / "checkpoint-4" / "model.safetensors")
    with pytest.warns(UserWarning) as caught:
        assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(f"resume: passing over {tmp_path / 'checkpoint-10'} (trainer_state.json is missing)")
    assert f"{tmp_path / 'checkpoint-4'} (model.safetensors is damaged" in message
    assert message.endswith(f"resuming from {tmp_path / 'checkpoint-2'}")
    _truncate(tmp_path / "checkpoint-2" / "optimizer.pt")
    with pytest.warns(UserWarning, match="no complete checkpoint is left"):
        assert last_complete_checkpoint(str(tmp_path)) is None


@pytest.mark.parametrize(
    "limit,best,left",
    [
        (None, None, ["checkpoint-2", "checkpoint-4", "checkpoint-6"]),
        (1, None, ["checkpoint-4"]),
        (2, None, ["checkpoint-2", "checkpoint-4"]),
        (1, "checkpoint-2", ["checkpoint-2", "checkpoint-4"]),
    ],
)
def test_prune_keeps_the_checkpoint_just_written(tmp_path, limit, best, left):
    """checkpoint-4 was just written by a run that resumed from checkpoint-2, passing over an incomplete
    checkpoint-6: that one goes first, then the oldest; never checkpoint-4 nor the best."""
    for n in (2, 4, 6):
        os.makedirs(tmp_path / f"checkpoint-{n}")
    _prune_checkpoints(str(tmp_path), 4, limit, best and str(tmp_path / best))
    assert _checkpoints(tmp_path) == left


# ---------------------------------------------------------------------------------------------------
# resuming
# ---------------------------------------------------------------------------------------------------
def test_resume_passes_over_incomplete_checkpoints(data, tmp_path):
    """The two newest checkpoints are incomplete (checkpoint-6 lost its trainer_state.json, checkpoint-4's
    weights are cut in half, as a kill or a full disk during a save leaves them with a non-atomic save): --resume
    warns, naming them and checkpoint-2, trains from step 2, replaces both, and ends with the uninterrupted run's
    weights. With --save-total-limit 2, the stale checkpoint-6 is the first deleted, then the oldest."""
    out = tmp_path / "run"
    shutil.copytree(data / "full", out)
    os.remove(out / "model.safetensors")  # the final model must be the resumed run's
    os.remove(out / "checkpoint-6" / "trainer_state.json")
    _truncate(out / "checkpoint-4" / "model.safetensors")
    args = _train_args("train-reranker", data, out) + ["--resume", "--save-total-limit", "2"]
    with pytest.warns(UserWarning, match="resume: passing over") as caught:
        assert main(args) == 0
    (message,) = [str(w.message) for w in caught if "passing over" in str(w.message)]
    assert str(out / "checkpoint-6") in message and str(out / "checkpoint-4") in message
    assert message.endswith(f"resuming from {out / 'checkpoint-2'}")
    _assert_same_weights(data / "full", out, resumed_from=data / "full" / "checkpoint-2")
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-6"]
    assert [checkpoint_problem(str(out / c)) for c in _checkpoints(out)] == [None, None]
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


# Runs train-reranker and kills itself while saving checkpoint-4: the model, optimizer and scheduler are written,
# the RNG state and trainer_state.json are not.
_KILLED_WHILE_SAVING = """
import os, signal, sys
from transformers import Trainer
from fastrank.cli import main

save_rng_state = Trainer._save_rng_state

def save_rng_state_or_die(self, output_dir):
    if self.state.global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    save_rng_state(self, output_dir)

Trainer._save_rng_state = save_rng_state_or_die
sys.exit(main(sys.argv[1:]))
"""


def test_run_killed_while_saving_resumes(data, tmp_path):
    """A run SIGKILLed in the middle of saving checkpoint-4 leaves checkpoint-2 and the unfinished save under a
    name resume does not take; --resume removes it with a warning, trains from step 2, and ends with the
    uninterrupted run's weights."""
    out = tmp_path / "run"
    args = _train_args("train-reranker", data, out)
    killed = subprocess.run([sys.executable, "-c", _KILLED_WHILE_SAVING, *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _checkpoints(out) == ["checkpoint-2", "tmp-checkpoint-4"]
    assert (out / "tmp-checkpoint-4" / "checkpoint-4" / "optimizer.pt").exists()  # killed mid-save, not before
    with pytest.warns(UserWarning, match="removing .*tmp-checkpoint-4: a checkpoint save that never finished"):
        assert main(args + ["--resume"]) == 0
    _assert_same_weights(data / "full", out, resumed_from=out / "checkpoint-2")
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_embedder_saves_atomically_keeps_limit_and_resumes(data, tmp_path):
    """train-embedder: --save-total-limit 2 keeps checkpoint-4 and checkpoint-6; with checkpoint-6's weights
    truncated, --resume passes over it to checkpoint-4, replaces it, and ends with the same weights."""
    full, out = tmp_path / "full", tmp_path / "run"
    args = _train_args("train-embedder", data, full) + ["--save-total-limit", "2"]
    assert main(args) == 0
    assert _checkpoints(full) == ["checkpoint-4", "checkpoint-6"]
    shutil.copytree(full, out)
    os.remove(out / "model.safetensors")
    _truncate(out / "checkpoint-6" / "model.safetensors", keep=0.9)
    args[args.index("--output") + 1] = str(out)
    with pytest.warns(UserWarning, match=f"passing over {out / 'checkpoint-6'} .*resuming from {out / 'checkpoint-4'}"):
        assert main(args + ["--resume"]) == 0
    _assert_same_weights(full, out, resumed_from=out / "checkpoint-4")
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-6"]
    assert checkpoint_problem(str(out / "checkpoint-6")) is None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir, data_path):
    from transformers import TrainingArguments

    import fastrank
    from fastrank.integrations.trainer import RerankerTrainer

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        FASTRANK_BACKEND="torch",
    )
    # A barrier one process misses fails in a minute instead of hanging the suite.
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    tok = tiny_tokenizer("qwen2", "left")
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        max_steps=3,
        save_steps=1,
        save_total_limit=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        ddp_backend="gloo",
        disable_tqdm=True,
    )
    trainer = RerankerTrainer(
        model=fastrank.LLMRerankerModel(tiny_causal_lm("qwen2"), tok, train_group_size=3).train(),
        args=args,
        train_dataset=fastrank.RerankTrainDataset(data_path, tok, train_group_size=3, query_max_len=16),
        data_collator=fastrank.RerankCollator(tok),
    )
    trainer.train()
    # Free the DDP wrapper (its reducer holds the process group) while the group lives: freed at exit instead,
    # gloo's teardown can hang.
    del trainer
    gc.collect()
    torch.distributed.destroy_process_group()


def test_two_processes_save_one_checkpoint_each_step(data, tmp_path):
    """Under 2-process gloo DDP, each checkpoint holds both processes' RNG states (the rename waits for both),
    one process removes the unfinished save of an earlier run, and the limit keeps the newest 2."""
    os.makedirs(tmp_path / "tmp-checkpoint-9" / "checkpoint-9")
    args = (2, _free_port(), str(tmp_path), str(data / "train.jsonl"))
    torch.multiprocessing.spawn(_ddp_worker, args=args, nprocs=2)
    assert _checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-3"]
    for name in _checkpoints(tmp_path):
        assert checkpoint_problem(str(tmp_path / name)) is None
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(tmp_path / name))


# ---------------------------------------------------------------------------------------------------
# the option
# ---------------------------------------------------------------------------------------------------
def test_save_total_limit_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="save_total_limit: must be a positive int or None, got 0"):
        TrainingOptions(output=str(tmp_path), data=["train.jsonl"], save_total_limit=0)
    with pytest.raises(SystemExit):
        main(["train-reranker", "--model", "m", "--data", "d", "--output", "o", "--save-total-limit", "0"])
    assert "argument --save-total-limit: expected a positive integer, got 0" in capsys.readouterr().err


def test_load_best_model_at_end_loads_the_best_checkpoint(data, tmp_path):
    """The Trainer's own best-model loader expects the wrapper's keys; the wrapped trainers load the best
    checkpoint as the model's ``save`` wrote it. ``greater_is_better=True`` on the loss makes the best an early
    checkpoint, so loading it is visible."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    import fastrank
    from fastrank.integrations.trainer import RerankerTrainer

    tok = AutoTokenizer.from_pretrained(data / "model")
    lm = AutoModelForCausalLM.from_pretrained(data / "model")
    model = fastrank.LLMRerankerModel(lm, tok, train_group_size=3).train()
    rows = fastrank.RerankTrainDataset(
        str(data / "train.jsonl"), tok, train_group_size=3, query_max_len=16, passage_max_len=24
    )
    args = TrainingArguments(
        str(tmp_path / "run"),
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        max_steps=6,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = RerankerTrainer(
        model=model, args=args, train_dataset=rows, eval_dataset=rows, data_collator=fastrank.RerankCollator(tok)
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")
    saved = load_file(os.path.join(best, "model.safetensors"))
    live = lm.state_dict()
    assert all(torch.equal(live[k], v) for k, v in saved.items())
    last = load_file(os.path.join(tmp_path / "run" / "checkpoint-6", "model.safetensors"))
    assert any(not torch.equal(last[k], v) for k, v in saved.items())
