"""The ``fastrank`` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible to torch on this machine")
    return torch.device(name)


def cmd_bench(args) -> int:
    from fastrank.benchmarks.runner import OPS, format_table, run, write_json

    device = _device(args.device)
    ops = args.op or list(OPS)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    results = run(ops, device, full=args.full, log=log)
    print(format_table(results))
    if args.json:
        write_json(results, args.json)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


def _parse_rerank_line(text: str):
    """One JSONL line -> (record, [(query, passage)], kind) or raise ValueError with the reason."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    query = record.get("query")
    if not isinstance(query, str):
        raise ValueError("'query' must be a string")
    if "documents" in record:
        from fastrank.inference import document_texts

        return record, [(query, t) for t in document_texts(record["documents"])], "documents"
    if isinstance(record.get("document"), str):
        return record, [(query, record["document"])], "pair"
    raise ValueError("needs 'documents' (a list) or 'document' (a string) next to 'query'")


def cmd_rerank(args) -> int:
    from fastrank.inference import Reranker

    if args.input == "-":
        lines = sys.stdin.read().splitlines()
    else:
        with open(args.input) as f:
            lines = f.read().splitlines()
    parsed, errors = [], 0
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            parsed.append((number, *_parse_rerank_line(text)))
        except ValueError as e:
            parsed.append((number, None, str(e), "error"))
            errors += 1
            print(f"{'<stdin>' if args.input == '-' else args.input}:{number}: {e}", file=sys.stderr)

    pairs = [pair for _, _, p, kind in parsed if kind != "error" for pair in p]
    scores = []
    if pairs:
        reranker = Reranker.from_pretrained(
            args.model, args.preset, dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation
        )
        scores = reranker.score(
            pairs, batch_size=args.batch_size, max_length=args.max_length, max_tokens=args.max_tokens,
            normalize=args.normalize, show_progress=False if args.no_progress else None,
        )
    out = sys.stdout if args.output == "-" else open(args.output, "w")
    try:
        cursor = 0
        for number, record, payload, kind in parsed:
            result = {"line": number}
            if record is not None and "id" in record:
                result["id"] = record["id"]
            if kind == "error":
                result["error"] = payload
            else:
                mine = scores[cursor : cursor + len(payload)]
                cursor += len(payload)
                if kind == "pair":
                    result["score"] = mine[0]
                else:
                    order = sorted(range(len(mine)), key=lambda i: -mine[i])[: args.top_k]
                    result["results"] = [{"index": i, "relevance_score": mine[i]} for i in order]
            out.write(json.dumps(result) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if errors:
        print(f"{errors} of {len(parsed)} lines could not be scored (see above); the others were", file=sys.stderr)
    return 1 if errors else 0


def _read_texts(path: str, fmt: str):
    """(line number, text or None, error or None) per non-empty input line."""
    if path == "-":
        lines = sys.stdin.read().splitlines()
    else:
        with open(path) as f:
            lines = f.read().splitlines()
    if fmt == "auto":
        fmt = "jsonl" if path.endswith((".jsonl", ".json")) else "text"
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if fmt == "text":
            out.append((number, line, None, None))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            out.append((number, None, None, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        text = record.get("text") if isinstance(record, dict) else record
        if not isinstance(text, str):
            out.append((number, None, None, "expected a JSON string or an object with a string 'text'"))
            continue
        out.append((number, text, record.get("id") if isinstance(record, dict) else None, None))
    return out


def cmd_encode(args) -> int:
    import numpy as np

    from fastrank.inference import Embedder

    items = _read_texts(args.input, args.format)
    where = "<stdin>" if args.input == "-" else args.input
    errors = [(n, err) for n, _, _, err in items if err]
    for n, err in errors:
        print(f"{where}:{n}: {err}", file=sys.stderr)
    good = [(n, text, rid) for n, text, rid, err in items if not err]
    normalize = None if args.normalize is None else args.normalize == "yes"
    embedder = Embedder.from_pretrained(
        args.model, kind=args.kind, pooling=args.pooling, normalize=normalize, max_length=args.max_length,
        dtype=args.dtype, device=args.device,
    )
    method = embedder.encode_queries if args.queries else embedder.encode_corpus
    vectors = method([t for _, t, _ in good], batch_size=args.batch_size, max_tokens=args.max_tokens,
                     show_progress=False if args.no_progress else None) if good else np.zeros((0, embedder.dim), "float32")
    if args.output.endswith(".npy"):
        if errors:
            print(f"{len(errors)} bad lines were left out of {args.output}; its rows follow the good lines in order",
                  file=sys.stderr)
        np.save(args.output, vectors)
    else:
        out = sys.stdout if args.output == "-" else open(args.output, "w")
        try:
            rows = {n: v for (n, _, _), v in zip(good, vectors)}
            for n, text, rid, err in items:
                record = {"line": n}
                if rid is not None:
                    record["id"] = rid
                if err:
                    record["error"] = err
                else:
                    record["embedding"] = [round(float(x), 7) for x in rows[n]]
                out.write(json.dumps(record) + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
    if errors:
        print(f"{len(errors)} of {len(items)} lines could not be encoded (see above); the others were", file=sys.stderr)
    return 1 if errors else 0


def _warmup(ratio: float) -> dict:
    """A warm-up fraction for TrainingArguments: ``warmup_ratio`` before transformers 5.18 or so, a float
    ``warmup_steps`` after it was folded in there."""
    import inspect

    from transformers import TrainingArguments

    if "warmup_ratio" in inspect.signature(TrainingArguments.__init__).parameters:
        return {"warmup_ratio": ratio}
    return {"warmup_steps": ratio}


def cmd_train_embedder(args) -> int:
    import os

    import torch
    from transformers import TrainingArguments

    from fastrank.data.embedder import EmbedderCollator, EmbedderTrainDataset, read_retrieval_jsonl
    from fastrank.evaluation import retrieval_metrics
    from fastrank.inference import Embedder
    from fastrank.integrations.trainer import EmbedderTrainer
    from fastrank.models.embedder import BiEncoder, LlaraEncoder

    common = dict(temperature=args.temperature, negatives_cross_device=args.negatives_cross_device,
                  sub_batch_size=args.sub_batch_size, use_inbatch_neg=not args.no_in_batch_neg)
    if args.normalize is not None:
        common["normalize"] = args.normalize == "yes"
    if args.kind == "llara":
        encoder = LlaraEncoder.from_pretrained(args.model, query_max_length=args.query_max_len,
                                               passage_max_length=args.passage_max_len, **common)
    else:
        encoder = BiEncoder.from_pretrained(args.model, pooling=args.pooling, query_instruction=args.query_instruction,
                                            passage_instruction=args.passage_instruction, **common)
    train = EmbedderTrainDataset(args.data, train_group_size=args.group_size, query_instruction=args.query_instruction,
                                 passage_instruction=args.passage_instruction,
                                 max_examples_per_dataset=args.max_examples_per_dataset, seed=args.seed)
    eval_rows = read_retrieval_jsonl(args.eval, need_negatives=False) if args.eval else None
    cuda = torch.cuda.is_available()
    training_args = TrainingArguments(
        output_dir=args.output, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        num_train_epochs=args.epochs, max_steps=args.max_steps, **_warmup(args.warmup_ratio),
        save_steps=args.save_steps, logging_steps=args.logging_steps, bf16=args.bf16, fp16=args.fp16,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, report_to=[], use_cpu=not cuda,
        remove_unused_columns=False, disable_tqdm=args.no_progress,
    )
    before = None
    if eval_rows:
        before = retrieval_metrics(Embedder(encoder.to("cuda" if cuda else "cpu").eval()), eval_rows)
        print(json.dumps({"before_training": before}), flush=True)
    trainer = EmbedderTrainer(
        model=encoder.train(), args=training_args, train_dataset=train,
        data_collator=EmbedderCollator(encoder, args.query_max_len, args.passage_max_len),
    )
    resume = None
    if args.resume:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output) if os.path.isdir(args.output) else None
        if resume is None:
            print(f"--resume: no checkpoint in {args.output}; starting from the beginning", file=sys.stderr)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output)
    print(f"saved the trained {encoder.kind} embedder to {args.output}", file=sys.stderr)
    if eval_rows:
        after = retrieval_metrics(Embedder(encoder.eval()), eval_rows)
        report = {"before_training": before, "after_training": after}
        with open(os.path.join(args.output, "eval_results.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps({"after_training": after}), flush=True)
    return 0


def cmd_train_reranker(args) -> int:
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from fastrank.data.embedder import read_retrieval_jsonl
    from fastrank.data.reranker import RerankCollator, RerankTrainDataset
    from fastrank.data.templates import FlagLLMTemplate
    from fastrank.evaluation import reranking_metrics
    from fastrank.heads import Preset, yes_logit
    from fastrank.inference import Reranker, _resolve_dtype
    from fastrank.integrations.trainer import RerankerTrainer
    from fastrank.models.llm_reranker import LLMRerankerModel

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.padding_side:
        tokenizer.padding_side = args.padding_side
    lm = AutoModelForCausalLM.from_pretrained(args.model, dtype=_resolve_dtype(args.dtype))
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                           target_modules=args.lora_targets.split(","), task_type="CAUSAL_LM"))
    model = LLMRerankerModel(lm, tokenizer, train_group_size=args.group_size, answer=args.answer)
    prompt = args.prompt if args.prompt is not None else FlagLLMTemplate.prompt
    answer = args.answer if args.layout == "research" else None
    train = RerankTrainDataset(
        args.data, tokenizer, train_group_size=args.group_size, query_max_len=args.query_max_len,
        passage_max_len=args.passage_max_len, query_instruction=args.query_instruction,
        passage_instruction=args.passage_instruction, prompt=prompt, answer=answer,
        knowledge_distillation={"auto": None, "yes": True, "no": False}[args.knowledge_distillation],
        max_examples_per_dataset=args.max_examples_per_dataset, seed=args.seed,
    )
    eval_rows = read_retrieval_jsonl(args.eval, need_negatives=False) if args.eval else None
    # Evaluation scores pairs the way inference will: the same instructions, separator and prompt, the score
    # read at the prompt's last token.
    preset = Preset("trained", yes_logit(args.answer), FlagLLMTemplate(
        prompt=prompt, query_instruction=args.query_instruction, passage_instruction=args.passage_instruction,
        query_max_length=args.query_max_len), max_length=args.query_max_len + args.passage_max_len)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    training_args = TrainingArguments(
        output_dir=args.output, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, num_train_epochs=args.epochs, max_steps=args.max_steps, **_warmup(args.warmup_ratio),
        save_steps=args.save_steps, logging_steps=args.logging_steps, bf16=args.bf16, fp16=args.fp16,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        seed=args.seed, report_to=[], use_cpu=not cuda, remove_unused_columns=False, disable_tqdm=args.no_progress,
    )
    if args.gradient_checkpointing and args.lora_rank:
        model.enable_input_require_grads()
    before = None
    if eval_rows:
        before = reranking_metrics(Reranker(lm.to(device), tokenizer, preset), eval_rows)
        print(json.dumps({"before_training": before}), flush=True)
    trainer = RerankerTrainer(
        model=model.train(), args=training_args, train_dataset=train,
        data_collator=RerankCollator(tokenizer, padding_side=args.padding_side),
    )
    resume = None
    if args.resume:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output) if os.path.isdir(args.output) else None
        if resume is None:
            print(f"--resume: no checkpoint in {args.output}; starting from the beginning", file=sys.stderr)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output)
    what = "LoRA adapter" if args.lora_rank else "model"
    print(f"saved the trained reranker's {what} and tokenizer to {args.output}", file=sys.stderr)
    if eval_rows:
        after = reranking_metrics(Reranker(lm.eval(), tokenizer, preset), eval_rows)
        report = {"before_training": before, "after_training": after}
        with open(os.path.join(args.output, "eval_results.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps({"after_training": after}), flush=True)
    return 0


def cmd_demo_model(args) -> int:
    from fastrank.benchmarks.synthetic import build_causal_lm, build_tokenizer, qwen25_config

    overrides = {}
    if args.size == "tiny":
        overrides = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=1024, max_position_embeddings=8192)
    config = qwen25_config(num_layers=args.layers, pad_token_id=0, eos_token_id=0, **overrides)
    tokenizer = build_tokenizer()
    model = build_causal_lm(config)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote a random-weight {args.size} Qwen2-architecture causal LM ({params / 1e6:.1f}M parameters, "
          f"{args.layers} layers) and a byte-level BPE tokenizer built in code to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrank", description="Fused kernels for LLM rerankers and embedders.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser(
        "bench",
        help="run the microbenchmarks on this machine and print speed and memory ratios against the unfused baselines",
        description="Times every op and its unfused baselines on the same inputs, in one run. "
        "Quick shapes by default (seconds on a GPU, about a minute on a CPU); --full runs the sweep.",
    )
    bench.add_argument("--op", action="append", help="benchmark only this op (repeatable); default: all")
    bench.add_argument("--full", action="store_true", help="run the full sweep of shapes instead of the quick set")
    bench.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    bench.add_argument("--json", metavar="PATH", help="also write every measurement, with versions and GPU name, as JSON")
    bench.add_argument("--quiet", action="store_true", help="no per-case progress lines on stderr")
    bench.set_defaults(func=cmd_bench)

    rerank = sub.add_parser(
        "rerank",
        help="score JSONL (query + documents, or query + document) with an LLM reranker",
        description="Reads JSONL lines {\"query\": ..., \"documents\": [...]} (ranked: results best first) or "
        "{\"query\": ..., \"document\": ...} (one score), optionally with an \"id\", and writes one JSONL "
        "line per input line. A bad line is reported (line number on stderr, an \"error\" record in the "
        "output) and the other lines are still scored; the exit status is then 1.",
    )
    rerank.add_argument("--model", required=True, help="local path or hub name of the causal-LM reranker")
    rerank.add_argument("--preset", required=True, help="one of fastrank.presets(): " + ", ".join(_preset_names()))
    rerank.add_argument("--input", default="-", help="JSONL file to read (default: stdin)")
    rerank.add_argument("--output", default="-", help="JSONL file to write (default: stdout)")
    rerank.add_argument("--batch-size", type=int, default=64, help="pairs per forward pass at most (default 64)")
    rerank.add_argument("--max-tokens", type=int, default=32768, help="padded tokens per forward pass at most")
    rerank.add_argument("--max-length", type=int, default=None, help="token budget per pair (default: the preset's)")
    rerank.add_argument("--top-k", type=int, default=None, help="keep the k best documents per query")
    rerank.add_argument("--normalize", action="store_true", help="scores in [0, 1] (sigmoid, or the preset's mapping)")
    rerank.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16 or float32")
    rerank.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    rerank.add_argument("--attn-implementation", default=None, help="sdpa, eager, flash_attention_2, ...")
    rerank.add_argument("--no-progress", action="store_true", help="no progress bar")
    rerank.set_defaults(func=cmd_rerank)

    enc = sub.add_parser(
        "encode",
        help="embed texts (JSONL or one text per line) with a bi-encoder or LLARA into .npy or JSONL",
        description="Reads texts (a .jsonl/.json input is JSONL: strings or {\"text\": ..., \"id\": ...}; anything "
        "else is one text per line) and writes embeddings in input order: a .npy matrix, or JSONL records "
        "{\"line\", \"embedding\"}. A bad JSONL line is reported with its number and the others are still "
        "encoded; the exit status is then 1.",
    )
    enc.add_argument("--model", required=True, help="local path or hub name (sentence-transformers or HF folder)")
    enc.add_argument("--input", default="-", help="input file (default: stdin)")
    enc.add_argument("--format", choices=["auto", "jsonl", "text"], default="auto", help="input format (default: by extension)")
    enc.add_argument("--output", default="-", help="output .npy or JSONL file (default: JSONL on stdout)")
    enc.add_argument("--kind", choices=["auto", "bi", "llara"], default="auto", help="embedder kind (default: from the folder)")
    enc.add_argument("--pooling", choices=["cls", "mean", "last"], default=None, help="override the folder's pooling")
    enc.add_argument("--normalize", choices=["yes", "no"], default=None, help="override the folder's normalisation")
    enc.add_argument("--queries", action="store_true", help="encode as queries (query instruction / LLARA query suffix)")
    enc.add_argument("--batch-size", type=int, default=64, help="texts per forward pass at most (default 64)")
    enc.add_argument("--max-tokens", type=int, default=32768, help="padded tokens per forward pass at most")
    enc.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the folder's)")
    enc.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    enc.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    enc.add_argument("--no-progress", action="store_true", help="no progress bar")
    enc.set_defaults(func=cmd_encode)

    te = sub.add_parser(
        "train-embedder",
        help="fine-tune a bi-encoder or LLARA on JSONL (query, pos, neg[, pos_scores, neg_scores]) with the fused loss",
        description="Runs the Hugging Face Trainer with fastrank's contrastive loss: progress bar, checkpoints every "
        "--save-steps in --output, --resume from the last one, and with --eval a held-out recall@1/@10, MRR@10 and "
        "NDCG@10 before and after training (printed and written to OUTPUT/eval_results.json).",
    )
    te.add_argument("--model", required=True, help="local path or hub name of the model to fine-tune")
    te.add_argument("--data", required=True, nargs="+", help="training JSONL file(s) or folder(s)")
    te.add_argument("--output", required=True, help="folder for checkpoints and the final model")
    te.add_argument("--eval", default=None, help="held-out JSONL (query, pos, neg) for the final metrics")
    te.add_argument("--kind", choices=["bi", "llara"], default="bi", help="bi-encoder (default) or LLARA")
    te.add_argument("--pooling", choices=["cls", "mean", "last"], default=None, help="bi-encoder pooling (default: the folder's, else cls)")
    te.add_argument("--normalize", choices=["yes", "no"], default=None, help="L2-normalise embeddings (default: the folder's, else yes)")
    te.add_argument("--temperature", type=float, default=0.02, help="similarity temperature (default 0.02; 1.0 without normalisation)")
    te.add_argument("--group-size", type=int, default=8, help="passages per query: 1 positive + G-1 negatives (default 8)")
    te.add_argument("--batch-size", type=int, default=8, help="queries per device and step (default 8)")
    te.add_argument("--lr", type=float, default=1e-5, help="learning rate (default 1e-5)")
    te.add_argument("--epochs", type=float, default=1.0, help="epochs (default 1)")
    te.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: the epochs)")
    te.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warm-up fraction (default 0.1)")
    te.add_argument("--query-max-len", type=int, default=64, help="query tokens (default 64)")
    te.add_argument("--passage-max-len", type=int, default=256, help="passage tokens (default 256)")
    te.add_argument("--query-instruction", default=None, help="prepended to every query")
    te.add_argument("--passage-instruction", default=None, help="prepended to every passage")
    te.add_argument("--max-examples-per-dataset", type=int, default=None, help="use at most this many lines per file")
    te.add_argument("--no-in-batch-neg", action="store_true", help="score each query against its own group only")
    te.add_argument("--negatives-cross-device", action="store_true", help="negatives from every process (torchrun)")
    te.add_argument("--sub-batch-size", type=int, default=-1, help="encode in chunks of this many texts")
    te.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (default 500)")
    te.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps (default 10)")
    te.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    te.add_argument("--fp16", action="store_true", help="fp16 mixed precision")
    te.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    te.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    te.add_argument("--seed", type=int, default=42)
    te.add_argument("--no-progress", action="store_true", help="no progress bar")
    te.set_defaults(func=cmd_train_embedder)

    tr = sub.add_parser(
        "train-reranker",
        help="fine-tune a causal LM as a 'Yes'-logit reranker on JSONL (query, pos, neg[, pos_scores, neg_scores])",
        description="Runs the Hugging Face Trainer on FlagEmbedding's LLM reranker recipe (groups of 1 positive + "
        "G-1 negatives, cross-entropy over the 'Yes' logits) through fastrank's score head, so no step holds "
        "full-vocabulary logits: progress bar, checkpoints every --save-steps in --output, --resume from the last "
        "one, and with --eval the held-out MRR@10, NDCG@10 and recall before and after training (printed and "
        "written to OUTPUT/eval_results.json). The result loads with fastrank.Reranker.",
    )
    tr.add_argument("--model", required=True, help="local path or hub name of the causal LM to fine-tune")
    tr.add_argument("--data", required=True, nargs="+", help="training JSONL file(s) or folder(s)")
    tr.add_argument("--output", required=True, help="folder for checkpoints and the final model")
    tr.add_argument("--eval", default=None, help="held-out JSONL (query, pos, neg) for the final metrics")
    tr.add_argument("--layout", choices=["research", "package"], default="research",
                    help="research: the answer is appended and labelled (the seeds' recipe); package: nothing appended")
    tr.add_argument("--answer", default="Yes", help="the answer whose last token's logit is the score (default Yes)")
    tr.add_argument("--prompt", default=None, help="the trailing prompt (default: FlagEmbedding's)")
    tr.add_argument("--query-instruction", default="A: ", help="before every query (default 'A: ')")
    tr.add_argument("--passage-instruction", default="B: ", help="before every passage (default 'B: ')")
    tr.add_argument("--group-size", type=int, default=8, help="pairs per query: 1 positive + G-1 negatives (default 8)")
    tr.add_argument("--batch-size", type=int, default=1, help="queries per device and step (default 1)")
    tr.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    tr.add_argument("--lr", type=float, default=2e-4, help="learning rate (default 2e-4, for LoRA; use ~1e-5 in full)")
    tr.add_argument("--epochs", type=float, default=1.0, help="epochs (default 1)")
    tr.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: the epochs)")
    tr.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warm-up fraction (default 0.1)")
    tr.add_argument("--query-max-len", type=int, default=32, help="query token budget (default 32)")
    tr.add_argument("--passage-max-len", type=int, default=128, help="passage token budget (default 128)")
    tr.add_argument("--knowledge-distillation", choices=["auto", "yes", "no"], default="auto",
                    help="add the teacher-score term: auto when every line has pos_scores/neg_scores")
    tr.add_argument("--max-examples-per-dataset", type=int, default=None, help="use at most this many lines per file")
    tr.add_argument("--padding-side", choices=["left", "right"], default=None, help="default: the tokenizer's")
    tr.add_argument("--lora-rank", type=int, default=0, help="train a LoRA adapter of this rank (0: full fine-tune)")
    tr.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default 16)")
    tr.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout (default 0.1)")
    tr.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,down_proj,up_proj,gate_proj",
                    help="comma-separated module names for LoRA")
    tr.add_argument("--dtype", default="auto", help="weights as loaded: auto (the checkpoint's), float32, bfloat16")
    tr.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (default 500)")
    tr.add_argument("--logging-steps", type=int, default=10, help="log the loss every N steps (default 10)")
    tr.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    tr.add_argument("--fp16", action="store_true", help="fp16 mixed precision")
    tr.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    tr.add_argument("--seed", type=int, default=42)
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train_reranker)

    demo = sub.add_parser(
        "demo-model",
        help="save a random-weight Qwen2-architecture model and a tokenizer built in code (no download)",
        description="For trying the CLI and API offline: the scores of a random model mean nothing.",
    )
    demo.add_argument("output", help="folder to write (save_pretrained layout)")
    demo.add_argument("--size", choices=["tiny", "qwen2.5-0.5b"], default="tiny",
                      help="tiny (hidden 64) or the Qwen2.5-0.5B shape (hidden 896, vocab 151936)")
    demo.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    demo.set_defaults(func=cmd_demo_model)
    return parser


def _preset_names():
    from fastrank.heads import presets

    return list(presets())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
