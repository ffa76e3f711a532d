"""Hugging Face ``Trainer`` subclasses for fastrank's training models.

``EmbedderTrainer`` (``BiEncoder``, ``LlaraEncoder``) and ``RerankerTrainer`` (``LLMRerankerModel``) compute
the loss by calling the wrapped model's training forward (the fused contrastive loss, or the grouped "Yes"
logit cross-entropy through the fused score head) and save checkpoints with the model's own ``save`` (a
PEFT model writes its adapter), which ``resume_from_checkpoint`` loads back.

    trainer = EmbedderTrainer(model=encoder, args=TrainingArguments(...),
                              train_dataset=EmbedderTrainDataset(...), data_collator=EmbedderCollator(encoder))
    trainer = RerankerTrainer(model=LLMRerankerModel(lm, tokenizer, train_group_size=8), args=TrainingArguments(...),
                              train_dataset=RerankTrainDataset(..., tokenizer), data_collator=RerankCollator(tokenizer))
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
import zipfile
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

from fastrank.integrations.fsdp import (
    check_fsdp_mode,
    full_optimizer_state_dict,
    full_state_dict,
    is_sharded,
    load_full_optimizer_state_dict,
    shard_model,
)
from fastrank.models.reranker import unwrap_model

# A save writes tmp-checkpoint-N/checkpoint-N and renames it to checkpoint-N when every file is written: neither
# get_last_checkpoint nor the Trainer's rotation matches the tmp- name, so a save cut short is never resumed from.
_STAGING = "tmp-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class _EpochSetter(TrainerCallback):
    """Resample each query's group every epoch (``EmbedderTrainDataset.set_epoch``)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(state.epoch or 0))


class _WrappedModelTrainer(Trainer):
    """What both trainers share: batches are dicts of dicts (``remove_unused_columns`` is forced off),
    groups are resampled each epoch, and checkpoints are the wrapped model's own ``save``, written atomically:
    a ``checkpoint-N`` folder exists only once everything resume reads is in it (``_save_checkpoint``).
    ``resume_from_checkpoint=True`` takes the newest complete checkpoint (``last_complete_checkpoint``), and
    ``save_total_limit`` never deletes the checkpoint just written (``_prune_checkpoints``).

    ``fsdp="full_shard"`` or ``"shard_grad_op"`` trains the model sharded with FSDP2 over the processes of a
    ``torchrun`` / ``accelerate launch`` run (``fastrank.integrations.fsdp``): the trainer shards it when
    ``train`` builds the optimizer, saves the full weights gathered on process 0 (every process takes part)
    and the full optimizer state, and resumes from them."""

    def __init__(self, *args, fsdp: Optional[str] = None, **kwargs):
        self._staging = None
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False
        if self.train_dataset is not None:
            self.add_callback(_EpochSetter(self.train_dataset))
        self.fsdp = self._check_fsdp(fsdp)

    def _check_fsdp(self, fsdp: Optional[str]) -> Optional[str]:
        """``fsdp`` if this run can shard with it (None: no sharding), else a ValueError that says why."""
        accelerate_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if self.args.fsdp or accelerate_fsdp or self.is_fsdp_enabled:
            # accelerate would shard the wrapper its own way on GPUs (and not at all on CPUs), and its save
            # path passes fastrank's save a state dict that this class has never been tested with.
            raise ValueError(
                "accelerate's FSDP (TrainingArguments(fsdp=...), or an accelerate config with distributed_type: "
                "FSDP) does not run fastrank's models: fastrank shards them itself. Launch without it (accelerate "
                "launch --multi_gpu --num_processes N, which runs on CPUs too, or torchrun) and pass "
                "fsdp='full_shard' (--fsdp full_shard)"
            )
        if is_sharded(self.model):
            raise ValueError(
                "model: is already sharded (fully_shard); pass the unsharded model and fsdp='full_shard', and the "
                "trainer shards it once the model is on its device"
            )
        if fsdp is None:
            return None
        check_fsdp_mode(fsdp)
        if self.args.world_size < 2:
            raise ValueError(
                f"fsdp={fsdp!r}: shards the model across processes, but this run has one; launch it with torchrun "
                "--nproc_per_node N (or accelerate launch --num_processes N)"
            )
        if self.is_deepspeed_enabled:
            raise ValueError(f"fsdp={fsdp!r}: DeepSpeed shards the model too; use one of them")
        if self.optimizer is not None:
            raise ValueError(
                f"optimizers: with fsdp={fsdp!r} the trainer builds the optimizer after sharding, over the shards; "
                "pass no optimizer"
            )
        if not hasattr(self, "is_distributed_loading_by_transformers"):
            import transformers

            raise ValueError(
                f"fsdp={fsdp!r}: this transformers ({transformers.__version__}) has no Trainer path for a model that "
                "reduces its own gradients (is_distributed_loading_by_transformers); fastrank's FSDP is tested "
                "with transformers 5.23"
            )
        return fsdp

    def create_optimizer(self, model=None):
        """Shard the model first with ``fsdp`` (the optimizer must hold the shards that replace the
        parameters), then the Trainer's optimizer."""
        if self.fsdp and not is_sharded(self.model):
            # By now the Trainer has moved the model to its device, turned on checkpointing and loaded the
            # weights of a checkpoint being resumed (unsharded, as saved).
            shard_model(self.model, self.fsdp)
            # The Trainer's name for a model that reduces its own gradients: accelerate then prepares it for
            # autocast only, with no DDP wrapper (DDP refuses DTensor parameters).
            self.is_distributed_loading_by_transformers = True
        return super().create_optimizer(model)

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):
        """The Trainer's wait for the last micro-batch of an accumulation window before reducing gradients,
        for a model this trainer sharded: the Trainer's own reads the replication layout from
        ``config.distributed_config``, which only transformers' load-time sharding sets."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def _save_optimizer_and_scheduler(self, output_dir):
        if not is_sharded(self.model):
            return super()._save_optimizer_and_scheduler(output_dir)
        # The full state, keyed by parameter name: a collective (every process sends its shards to process 0),
        # and loadable by any number of processes.
        state = full_optimizer_state_dict(self.model, self.optimizer)
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or not is_sharded(self.model):
            return super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, OPTIMIZER_NAME)
        load_full_optimizer_state_dict(
            self.model, self.optimizer, torch.load(path, map_location="cpu", weights_only=True)
        )
        self.lr_scheduler.load_state_dict(
            torch.load(os.path.join(checkpoint, SCHEDULER_NAME), map_location="cpu", weights_only=True)
        )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Checkpoints hold the backbone as saved by the model's ``save`` (no wrapper prefix), or a PEFT
        adapter; load them into the wrapped model."""
        model = model if model is not None else self.model
        model = model.module if hasattr(model, "module") else model
        load_wrapped_weights(model, resume_from_checkpoint)

    def _load_best_model(self):
        """``load_best_model_at_end``: the best checkpoint, as the wrapped model's ``save`` wrote it, loaded back
        into the wrapped model (the Trainer's own loader expects the wrapper's keys: it loaded nothing, then
        failed on ``_keys_to_ignore_on_save``)."""
        if is_sharded(self.model):
            raise ValueError(
                "load_best_model_at_end: not supported with fsdp; load trainer.state.best_model_checkpoint after "
                "training instead"
            )
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """The Trainer's ``train``; first the saving process removes what a save cut short left in
        ``output_dir``, and ``resume_from_checkpoint=True`` means the newest complete checkpoint."""
        if self.args.should_save:
            _remove_partial_saves(self.args.output_dir)
        self.accelerator.wait_for_everyone()
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"resume_from_checkpoint=True: no complete checkpoint in {self.args.output_dir}; "
                    "pass None to train from the beginning"
                )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _get_output_dir(self, trial):
        # While _save_checkpoint runs, the Trainer's save writes into the staging folder.
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """The Trainer's save into ``tmp-checkpoint-N/checkpoint-N``; once every process has written its files
        the saving process renames it ``checkpoint-N`` and rotates. A kill or a full disk before the rename
        leaves only the ``tmp-`` folder, which resume ignores and the next ``train`` removes."""
        run_dir = super()._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(run_dir, _STAGING + name)
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        final = os.path.join(run_dir, name)
        if self.state.best_model_checkpoint == os.path.join(staging, name):
            # The Trainer recorded the best checkpoint where it wrote it; record where it will be.
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staging, name, "trainer_state.json"))
        self.accelerator.wait_for_everyone()  # every process has written its files (each its RNG state)
        if self.args.should_save:
            _publish(os.path.join(staging, name), final)
            _prune_checkpoints(
                run_dir, self.state.global_step, self.args.save_total_limit, self.state.best_model_checkpoint
            )
        self.accelerator.wait_for_everyone()  # on every process, checkpoint-N exists when the save returns

    def _save(self, output_dir=None, state_dict=None):
        model = self.model.module if hasattr(self.model, "module") else self.model
        if state_dict is not None:
            # Weights the Trainer gathered for the whole wrapper (DeepSpeed ZeRO-3): the backbone's are saved.
            state_dict = {k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")}
        elif is_sharded(model):
            # A collective, so before the non-saving processes leave: each sends its shards, process 0 saves.
            state_dict = full_state_dict(model.model)
        if not self.args.should_save:  # one writer per folder: the model is the same on every process
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save(output_dir, state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))


class EmbedderTrainer(_WrappedModelTrainer):
    """A ``transformers.Trainer`` whose model is a fastrank embedder.

    Batches are the ``EmbedderCollator``'s ``{"query", "passage", "teacher_scores"}``. Everything else
    (gradient accumulation, bf16, gradient checkpointing, DDP, checkpoints and ``resume_from_checkpoint``)
    is the Trainer's own.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(query=inputs["query"], passage=inputs["passage"], teacher_score=inputs.get("teacher_scores"))
        return (out.loss, out) if return_outputs else out.loss


class RerankerTrainer(_WrappedModelTrainer):
    """A ``transformers.Trainer`` whose model is a ``fastrank.LLMRerankerModel``.

    Batches are the ``RerankCollator``'s ``{"pair", "teacher_scores"}``; ``per_device_train_batch_size``
    counts queries (each brings its ``train_group_size`` pairs). Everything else (gradient accumulation,
    bf16, gradient checkpointing, LoRA, DDP, checkpoints and ``resume_from_checkpoint``) is the Trainer's own.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(pair=inputs["pair"], teacher_scores=inputs.get("teacher_scores"))
        return (out.loss, out) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            scores = model(pair=inputs["pair"]).scores
            loss = (
                model.module.compute_loss(scores, inputs.get("teacher_scores"))
                if hasattr(model, "module")
                else model.compute_loss(scores, inputs.get("teacher_scores"))
            )
        return (loss.detach(), None, None) if prediction_loss_only else (loss.detach(), scores.detach(), None)


def load_wrapped_weights(wrapper, folder: str) -> None:
    """Load a checkpoint written by a fastrank model's ``save`` (``BiEncoder``, ``LlaraEncoder``,
    ``LLMRerankerModel``) into ``wrapper.model`` in place: a PEFT adapter, or full (possibly sharded) weights."""
    from safetensors.torch import load_file

    inner = wrapper.model
    adapter = os.path.join(folder, "adapter_model.safetensors")
    if os.path.exists(adapter):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(inner, load_file(adapter))
        return
    target = unwrap_model(inner)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        from transformers.modeling_utils import load_sharded_checkpoint

        load_sharded_checkpoint(target, folder, strict=False)
        return
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.exists(weights):
        raise ValueError(f"resume_from_checkpoint: {folder} holds no model.safetensors or adapter to resume from")
    missing, unexpected = target.load_state_dict(load_file(weights), strict=False)
    tied = set(getattr(target, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]:
        raise ValueError(
            f"resume_from_checkpoint: {folder} does not match the model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )


def checkpoint_problem(folder: str) -> Optional[str]:
    """What makes ``folder`` unfit to resume from, or None when it is complete. Complete is what resume
    reads: ``trainer_state.json`` (written last) parses; the weights ``load_wrapped_weights`` loads are
    there (``adapter_model.safetensors``, ``model.safetensors``, or an index and every shard it lists); every
    ``.safetensors`` file has a whole header and is as long as the header says; every ``.pt`` / ``.pth``
    file (optimizer, scheduler, scaler, RNG states from ``torch.save``) ends in its zip directory, which a
    truncated file has lost. Reads headers and file ends, never the tensors."""
    from safetensors import safe_open

    try:
        names = set(os.listdir(folder))
    except OSError as e:
        return f"cannot be listed ({e})"
    if "trainer_state.json" not in names:
        return "trainer_state.json is missing"
    try:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"trainer_state.json does not parse ({e})"
    index = "model.safetensors.index.json"
    if index in names:
        try:
            with open(os.path.join(folder, index)) as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{index} does not parse ({e!r})"
        if shards - names:
            return f"{index} lists {sorted(shards - names)[0]}, which is missing"
    elif not names & {"adapter_model.safetensors", "model.safetensors"}:
        return "no adapter_model.safetensors, model.safetensors or model.safetensors.index.json"
    for name in sorted(names):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt"):
                    pass
            except Exception as e:  # safetensors raises its own SafetensorError for every kind of damage
                return f"{name} is damaged or truncated ({e})"
        elif name.endswith((".pt", ".pth")) and not zipfile.is_zipfile(path):
            return f"{name} is truncated (no zip directory at its end)"
    return None


def _checkpoints(output_dir: str) -> list:
    """``(N, path)`` for each ``checkpoint-N`` folder in ``output_dir``."""
    if not os.path.isdir(output_dir):
        return []
    found = [(_CHECKPOINT.match(name), os.path.join(output_dir, name)) for name in os.listdir(output_dir)]
    return [(int(m.group(1)), path) for m, path in found if m and os.path.isdir(path)]


def last_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The newest ``checkpoint-N`` in ``output_dir`` that ``checkpoint_problem`` finds complete, or None (also
    when ``output_dir`` does not exist). Newer ones it passes over are named in a warning, with what is wrong
    with each and the checkpoint taken instead."""
    passed = []
    for _, path in sorted(_checkpoints(output_dir), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            if passed:
                warnings.warn(f"resume: passing over {'; '.join(passed)}; resuming from {path}", stacklevel=2)
            return path
        passed.append(f"{path} ({problem})")
    if passed:
        warnings.warn(f"resume: passing over {'; '.join(passed)}; no complete checkpoint is left", stacklevel=2)
    return None


def _prune_checkpoints(output_dir: str, newest: int, limit: Optional[int], best: Optional[str] = None) -> None:
    """Keep ``limit`` checkpoints (None: all): delete first those numbered after ``checkpoint-{newest}`` (an
    earlier run's, which resume passed over as incomplete), then the oldest; never ``checkpoint-{newest}`` (just
    written, so complete, and newer than the one this run resumed from) nor ``best``. Not the Trainer's own
    rotation: when mtimes are under a second apart it orders by number and keeps the highest-numbered folder,
    which after such a resume is the incomplete one, and can delete every complete one."""
    if not limit or limit < 1:
        return
    keep = {os.path.normpath(os.path.join(output_dir, f"checkpoint-{newest}"))}
    if best:
        keep.add(os.path.normpath(best))
    ordered = sorted(_checkpoints(output_dir), key=lambda c: (c[0] <= newest, c[0]))
    for _, path in ordered[: max(0, len(ordered) - limit)]:
        if os.path.normpath(path) not in keep:
            shutil.rmtree(path, ignore_errors=True)


def _remove_partial_saves(output_dir: str) -> None:
    """Remove the ``tmp-checkpoint-N`` folders of saves that never finished (the run was killed, or the disk
    filled, while saving), with a warning naming each."""
    if not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name.startswith(_STAGING) and _CHECKPOINT.match(name[len(_STAGING) :]) and os.path.isdir(path):
            warnings.warn(f"removing {path}: a checkpoint save that never finished", stacklevel=2)
            shutil.rmtree(path, ignore_errors=True)


def _publish(built: str, final: str) -> None:
    """Flush ``built`` to disk, then rename it ``final``, replacing a folder of that name left by an earlier
    run, and remove the staging folder around ``built``. The flush comes first so that after a crash of the
    machine the name never points at files whose data was not written."""
    staging = os.path.dirname(built)
    for root, _, files in os.walk(built):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)
    if os.path.exists(final):
        os.replace(final, os.path.join(staging, "replaced"))
    os.replace(built, final)
    _fsync(os.path.dirname(final))
    shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: str) -> None:
    if os.name == "nt" and os.path.isdir(path):
        return  # Windows cannot open a folder to flush it
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
