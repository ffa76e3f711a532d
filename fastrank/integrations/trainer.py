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

import os

import torch
from transformers import Trainer, TrainerCallback

from fastrank.models.reranker import unwrap_model


class _EpochSetter(TrainerCallback):
    """Resample each query's group every epoch (``EmbedderTrainDataset.set_epoch``)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(state.epoch or 0))


class _WrappedModelTrainer(Trainer):
    """What both trainers share: batches are dicts of dicts (``remove_unused_columns`` is forced off),
    groups are resampled each epoch, and checkpoints are the wrapped model's own ``save``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False
        if self.train_dataset is not None:
            self.add_callback(_EpochSetter(self.train_dataset))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Checkpoints hold the backbone as saved by the model's ``save`` (no wrapper prefix), or a PEFT
        adapter; load them into the wrapped model."""
        model = model if model is not None else self.model
        model = model.module if hasattr(model, "module") else model
        load_wrapped_weights(model, resume_from_checkpoint)

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.model.module if hasattr(self.model, "module") else self.model
        model.save(output_dir)
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
