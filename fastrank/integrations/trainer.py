"""The Hugging Face ``Trainer`` for fastrank's embedders (``BiEncoder``, ``LlaraEncoder``).

``EmbedderTrainer`` computes the loss by calling the wrapped model's training forward (the fused
contrastive loss, optional distillation and cross-device negatives) and saves checkpoints with the
model's own ``save`` (for a ``BiEncoder`` a folder that sentence-transformers loads).

    trainer = EmbedderTrainer(model=encoder, args=TrainingArguments(..., remove_unused_columns=False),
                              train_dataset=EmbedderTrainDataset(...), data_collator=EmbedderCollator(encoder))
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer, TrainerCallback


class _EpochSetter(TrainerCallback):
    """Resample each query's group every epoch (``EmbedderTrainDataset.set_epoch``)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(int(state.epoch or 0))


class EmbedderTrainer(Trainer):
    """A ``transformers.Trainer`` whose model is a fastrank embedder.

    Batches are the ``EmbedderCollator``'s ``{"query", "passage", "teacher_score"}``; set
    ``remove_unused_columns=False`` in the arguments (the default is forced off here). Everything else
    (gradient accumulation, bf16, gradient checkpointing, DDP, checkpoints and ``resume_from_checkpoint``)
    is the Trainer's own.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False
        if self.train_dataset is not None:
            self.add_callback(_EpochSetter(self.train_dataset))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(query=inputs["query"], passage=inputs["passage"], teacher_score=inputs.get("teacher_score"))
        return (out.loss, out) if return_outputs else out.loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Checkpoints hold the backbone as saved by the embedder's ``save`` (no ``model.`` prefix), or a
        PEFT adapter; load them into the wrapped model."""
        model = model if model is not None else self.model
        model = model.module if hasattr(model, "module") else model
        load_embedder_weights(model, resume_from_checkpoint)

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.model.module if hasattr(self.model, "module") else self.model
        model.save(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))


def load_embedder_weights(encoder, folder: str) -> None:
    """Load a checkpoint written by ``BiEncoder.save`` / ``LlaraEncoder.save`` into ``encoder`` in place."""
    from safetensors.torch import load_file

    inner = encoder.model
    adapter = os.path.join(folder, "adapter_model.safetensors")
    if os.path.exists(adapter):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(inner, load_file(adapter))
        return
    from fastrank.models.reranker import unwrap_model

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
        raise ValueError(f"resume_from_checkpoint: {folder} does not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
