"""What ``fastrank train-reranker`` and ``fastrank train-embedder`` do, callable from Python.

    from fastrank.training import TrainingOptions, train_reranker
    report = train_reranker("/tmp/tiny-reranker", TrainingOptions(output="/tmp/rr-run", data=["train.jsonl"],
                            eval="eval.jsonl", train_group_size=3, batch_size=2, max_steps=4, lr=1e-4))
    report["after_training"]["mrr@10"]

Each runs the Hugging Face Trainer on fastrank's training model (the fused score head or the fused contrastive
loss): checkpoints every ``save_steps`` in ``output`` (each written whole or not at all; the newest
``save_total_limit`` kept), ``resume`` from the newest complete one, the final model saved to ``output``, and
with ``eval`` the held-out metrics before and after training (also written to ``output/eval_results.json``).
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from fastrank.data.embedder import EmbedderCollator, EmbedderTrainDataset, read_retrieval_jsonl
from fastrank.data.reranker import RerankCollator, RerankTrainDataset
from fastrank.data.templates import FlagLLMTemplate
from fastrank.engine import attention_dropout, enable_packing
from fastrank.evaluation import reranking_metrics, retrieval_metrics
from fastrank.heads import yes_logit
from fastrank.inference import Embedder, Reranker
from fastrank.integrations.fsdp import check_fsdp_mode, is_sharded
from fastrank.integrations.trainer import EmbedderTrainer, RerankerTrainer, last_complete_checkpoint
from fastrank.models.embedder import BiEncoder, LlaraEncoder
from fastrank.models.llm_reranker import LLMRerankerModel
from fastrank.models.loading import check_model_source, resolve_dtype
from fastrank.presets import Preset, save_preset
from fastrank.utils import positive_int

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "up_proj", "gate_proj")


@dataclass
class TrainingOptions:
    """What both training runs share: the data, the length budget and the Trainer's options.

    ``data`` is one or more JSONL files or folders (``query``, ``pos``, ``neg``, optional ``pos_scores`` /
    ``neg_scores``); ``eval`` a held-out JSONL for the metrics before and after; ``train_group_size`` passages per
    query (1 positive + G-1 negatives); ``batch_size`` queries per device and step; ``warmup_ratio`` the
    linear warm-up fraction; ``query_max_len`` / ``passage_max_len`` the token budgets; ``save_total_limit``
    how many checkpoints to keep (None: all); ``fsdp`` shards the model over the processes of a ``torchrun`` /
    ``accelerate launch`` run with FSDP2 (``"full_shard"`` or ``"shard_grad_op"``; None: each process holds
    the whole model, DDP when there are several); ``progress`` the Trainer's progress bar.
    """

    output: str
    data: Sequence[str]
    eval: Optional[str] = None
    train_group_size: int = 8
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-5
    epochs: float = 1.0
    max_steps: int = -1
    warmup_ratio: float = 0.1
    query_max_len: int = 64
    passage_max_len: int = 256
    query_instruction: Optional[str] = None
    passage_instruction: Optional[str] = None
    max_examples_per_dataset: Optional[int] = None
    save_steps: int = 500
    save_total_limit: Optional[int] = None
    logging_steps: int = 10
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False
    fsdp: Optional[str] = None
    packed: bool = True
    resume: bool = False
    seed: int = 42
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.output, str) or not self.output:
            raise ValueError(f"output: give the folder for checkpoints and the final model, got {self.output!r}")
        self.data = [self.data] if isinstance(self.data, (str, os.PathLike)) else list(self.data)
        if not self.data:
            raise ValueError("data: give at least one training JSONL file or folder")
        for name in (
            "train_group_size",
            "batch_size",
            "grad_accum",
            "query_max_len",
            "passage_max_len",
            "save_steps",
            "logging_steps",
        ):
            positive_int(name, getattr(self, name))
        positive_int("max_examples_per_dataset", self.max_examples_per_dataset, none_ok=True)
        positive_int("save_total_limit", self.save_total_limit, none_ok=True)
        if self.fsdp is not None:
            check_fsdp_mode(self.fsdp)
        if not self.lr > 0:
            raise ValueError(f"lr: must be positive, got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio!r}")

    def trainer_arguments(self):
        """``transformers.TrainingArguments`` under the names this transformers takes: a warm-up fraction is
        ``warmup_ratio`` up to about 5.18 and a float ``warmup_steps`` after; checkpointing is
        ``activation_checkpointing`` from 5.23 (``gradient_checkpointing`` there warns that it is deprecated)."""
        from transformers import TrainingArguments

        names = inspect.signature(TrainingArguments.__init__).parameters
        warmup = {"warmup_ratio": self.warmup_ratio} if "warmup_ratio" in names else {"warmup_steps": self.warmup_ratio}
        prefix = "activation" if "activation_checkpointing" in names else "gradient"
        checkpointing = {
            f"{prefix}_checkpointing": self.gradient_checkpointing,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if self.gradient_checkpointing else None,
        }
        return TrainingArguments(
            output_dir=self.output,
            per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.grad_accum,
            learning_rate=self.lr,
            num_train_epochs=self.epochs,
            max_steps=self.max_steps,
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            logging_steps=self.logging_steps,
            bf16=self.bf16,
            fp16=self.fp16,
            seed=self.seed,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            remove_unused_columns=False,
            disable_tqdm=not self.progress,
            **warmup,
            **checkpointing,
        )


Report = Callable[[str, dict], None]
Log = Callable[[str], None]


def _train_and_report(
    trainer,
    options: TrainingOptions,
    evaluate: Callable[[], dict],
    what: str,
    report: Optional[Report],
    log: Optional[Log],
) -> dict:
    """Train (from the newest complete checkpoint with ``resume``), save to ``output``, and with ``eval``
    measure the held-out metrics before and after (``evaluate()`` gives them for the model as it is). With
    several processes only the first evaluates (every one holds the same model, or after FSDP a shard of it)."""
    result = {"output": options.output}
    evaluating = options.eval and trainer.is_world_process_zero()
    if evaluating:
        result["before_training"] = evaluate()
        if report:
            report("before_training", result["before_training"])
    resume = None
    if options.resume:
        resume = last_complete_checkpoint(options.output)
        if resume is None and log:
            log(f"resume: no complete checkpoint in {options.output}; starting from the beginning")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(options.output)
    if log:
        log(f"saved the trained {what} to {options.output}")
    if evaluating:
        result["after_training"] = evaluate()
        with open(os.path.join(options.output, "eval_results.json"), "w") as f:
            json.dump({k: result[k] for k in ("before_training", "after_training")}, f, indent=2)
        if report:
            report("after_training", result["after_training"])
    return result


def train_embedder(
    model: str,
    options: TrainingOptions,
    *,
    kind: str = "bi",
    pooling: Optional[str] = None,
    normalize: Optional[bool] = None,
    temperature: float = 0.02,
    in_batch_negatives: bool = True,
    negatives_cross_device: bool = False,
    sub_batch_size: int = -1,
    report: Optional[Report] = None,
    log: Optional[Log] = None,
) -> dict:
    """Fine-tune a bi-encoder (``kind="bi"``, any ``AutoModel``) or LLARA (``kind="llara"``, a causal LM) on
    fastrank's contrastive loss. ``pooling`` / ``normalize`` default to the folder's settings (else ``cls``,
    or ``last`` for a causal LM, and normalised). Returns ``{"output", "before_training", "after_training"}``
    (the metrics only with ``options.eval``); ``report(name, metrics)`` and ``log(line)`` see them as they
    come."""
    if kind not in ("bi", "llara"):
        raise ValueError(f"kind: must be 'bi' or 'llara', got {kind!r}")
    model_path = check_model_source(model, "model")
    # First: under torchrun this sets up torch.distributed, which negatives_cross_device needs at construction.
    training_args = options.trainer_arguments()
    if training_args.process_index != 0:
        report = log = None  # one process reports
    common = dict(
        temperature=temperature,
        negatives_cross_device=negatives_cross_device,
        sub_batch_size=sub_batch_size,
        use_inbatch_neg=in_batch_negatives,
    )
    if normalize is not None:
        common["normalize"] = normalize
    if kind == "llara":
        encoder = LlaraEncoder.from_pretrained(
            model_path, query_max_len=options.query_max_len, passage_max_len=options.passage_max_len, **common
        )
    else:
        encoder = BiEncoder.from_pretrained(
            model_path,
            pooling=pooling,
            query_instruction=options.query_instruction,
            passage_instruction=options.passage_instruction,
            **common,
        )
    train = EmbedderTrainDataset(
        options.data,
        train_group_size=options.train_group_size,
        query_instruction=options.query_instruction,
        passage_instruction=options.passage_instruction,
        max_examples_per_dataset=options.max_examples_per_dataset,
        seed=options.seed,
    )
    eval_rows = read_retrieval_jsonl(options.eval, need_negatives=False) if options.eval else None
    encoder.to(training_args.device)
    trainer = EmbedderTrainer(
        model=encoder.train(),
        args=training_args,
        train_dataset=train,
        data_collator=EmbedderCollator(
            encoder, options.query_max_len, options.passage_max_len, packed=_train_packed(encoder.model, options, log)
        ),
        fsdp=options.fsdp,
    )

    def evaluate():
        if is_sharded(encoder):  # this process holds a shard of the trained model: score the saved one
            return retrieval_metrics(Embedder.from_pretrained(options.output, device=training_args.device), eval_rows)
        return retrieval_metrics(Embedder(encoder.eval()), eval_rows)

    return _train_and_report(
        trainer,
        options,
        evaluate,
        f"{encoder.kind} embedder",
        report,
        log,
    )


def _train_packed(model, options: TrainingOptions, log) -> bool:
    """Whether training runs packed (fastrank's engine: no pad tokens, each query's prefix once): on by
    default where the model supports it and applies no attention dropout in training, which the packed op
    does not implement."""
    if not options.packed:
        return False
    dropout = attention_dropout(model)
    if dropout:
        if log:
            log(f"training on padded batches: the model's attention dropout is {dropout} and the packed op has none")
        return False
    return enable_packing(model)


def train_reranker(
    model: str,
    options: TrainingOptions,
    *,
    layout: str = "research",
    answer: str = "Yes",
    prompt: Optional[str] = None,
    knowledge_distillation: Optional[bool] = None,
    padding_side: Optional[str] = None,
    lora_rank: int = 0,
    lora_alpha: int = 16,
    lora_dropout: float = 0.1,
    lora_targets: Sequence[str] = LORA_TARGETS,
    dtype="auto",
    report: Optional[Report] = None,
    log: Optional[Log] = None,
) -> dict:
    """Fine-tune a causal LM as a reranker on the logit of ``answer`` (FlagEmbedding's LLM reranker recipe:
    groups of 1 positive + G-1 negatives, cross-entropy, optional distillation) through the fused score head.

    ``layout="research"`` appends the answer and labels it (the seeds' recipe); ``"package"`` appends nothing
    (FlagEmbedding's package). ``prompt`` defaults to FlagEmbedding's; ``options.query_instruction`` /
    ``passage_instruction`` to ``"A: "`` / ``"B: "`` when None. ``lora_rank > 0`` trains a LoRA adapter.
    The output folder holds the model (or adapter), the tokenizer and the scoring preset of the run
    (``fastrank_reranker.json``), so ``Reranker.from_pretrained(output)`` scores as trained. Returns as
    ``train_embedder`` does.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if layout not in ("research", "package"):
        raise ValueError(f"layout: must be 'research' or 'package', got {layout!r}")
    if lora_rank != 0:
        positive_int("lora_rank", lora_rank)
    model_path = check_model_source(model, "model")
    training_args = options.trainer_arguments()  # under torchrun, sets up torch.distributed
    if training_args.process_index != 0:
        report = log = None  # one process reports
    query_instruction = "A: " if options.query_instruction is None else options.query_instruction
    passage_instruction = "B: " if options.passage_instruction is None else options.passage_instruction
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if padding_side:
        tokenizer.padding_side = padding_side
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=resolve_dtype(dtype))
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(
            lm,
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=list(lora_targets),
                task_type="CAUSAL_LM",
            ),
        )
    reranker = LLMRerankerModel(lm, tokenizer, train_group_size=options.train_group_size, answer=answer)
    prompt = FlagLLMTemplate.prompt if prompt is None else prompt
    train = RerankTrainDataset(
        options.data,
        tokenizer,
        train_group_size=options.train_group_size,
        query_max_len=options.query_max_len,
        passage_max_len=options.passage_max_len,
        query_instruction=query_instruction,
        passage_instruction=passage_instruction,
        prompt=prompt,
        answer=answer if layout == "research" else None,
        knowledge_distillation=knowledge_distillation,
        max_examples_per_dataset=options.max_examples_per_dataset,
        seed=options.seed,
    )
    eval_rows = read_retrieval_jsonl(options.eval, need_negatives=False) if options.eval else None
    # Evaluation scores pairs the way inference will: the same instructions, separator and prompt, the score
    # read at the prompt's last token. The preset is saved with the model, so Reranker.from_pretrained(output)
    # scores that way too.
    preset = Preset(
        "trained",
        yes_logit(answer),
        FlagLLMTemplate(
            prompt=prompt,
            query_instruction=query_instruction,
            passage_instruction=passage_instruction,
            query_max_length=options.query_max_len,
        ),
        max_length=options.query_max_len + options.passage_max_len,
        description=f"trained by fastrank from {model}",
    )
    if options.gradient_checkpointing and lora_rank:
        reranker.enable_input_require_grads()
    lm.to(training_args.device)
    trainer = RerankerTrainer(
        model=reranker.train(),
        args=training_args,
        train_dataset=train,
        data_collator=RerankCollator(
            tokenizer,
            padding_side=padding_side,
            share_prefix=_train_packed(lm, options, log),
        ),
        fsdp=options.fsdp,
    )

    def evaluate():
        if is_sharded(reranker):  # this process holds a shard of the trained model: score the saved one
            saved = Reranker.from_pretrained(options.output, preset, device=training_args.device)
            return reranking_metrics(saved, eval_rows)
        return reranking_metrics(Reranker(lm.eval(), tokenizer, preset), eval_rows)

    result = _train_and_report(
        trainer,
        options,
        evaluate,
        "reranker's " + ("LoRA adapter" if lora_rank else "model") + " and tokenizer",
        report,
        log,
    )
    if trainer.is_world_process_zero():
        save_preset(preset, options.output)
    return result
