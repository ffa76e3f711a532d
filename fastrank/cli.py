"""The ``fastrank`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys


def cmd_bench(args) -> int:
    from fastrank.benchmarks.runner import OPS, format_table, read_json, run, write_json

    if args.plot:  # checked before a run of minutes rather than after it
        from fastrank.benchmarks.plot import MATPLOTLIB_MISSING, check_output

        try:
            check_output(args.plot)
        except ImportError:
            raise ValueError(f"--plot {MATPLOTLIB_MISSING}") from None
        except ValueError as e:
            raise ValueError(f"--plot {e}") from None
    if args.from_json:
        flags = (("--op", args.op), ("--provider", args.provider), ("--full", args.full), ("--json", args.json))
        given = [flag for flag, value in flags if value]
        if given:
            raise ValueError(f"--from-json shows saved results; {', '.join(given)} only apply to a new run: drop them")
        try:
            all_results = [read_json(path) for path in args.from_json]
        except ValueError as e:
            raise ValueError(f"--from-json {e}") from None
    else:
        from fastrank.models.loading import resolve_device

        device = resolve_device(args.device)
        log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
        all_results = [run(args.op or list(OPS), device, full=args.full, log=log, providers=args.provider)]
    print("\n\n".join(format_table(results) for results in all_results))
    if args.json:
        write_json(all_results[0], args.json)
        print(f"\nwrote {args.json}", file=sys.stderr)
    if args.plot:
        from fastrank.benchmarks.plot import plot

        try:
            plot(all_results, args.plot)
        except ValueError as e:
            raise ValueError(f"--plot {args.plot}: {e}") from None
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _input_lines(path: str):
    """(where, lines) of ``path`` ("-" is stdin), for messages of the form ``where:line: ...``."""
    if path == "-":
        return "<stdin>", sys.stdin.read().splitlines()
    if not os.path.isfile(path):
        raise ValueError(f"--input: there is no file {path}")
    with open(path) as f:
        return path, f.read().splitlines()


def _open_output(path: str):
    return sys.stdout if path == "-" else open(path, "w")


def _layerwise_options(args) -> dict:
    """``cutoff_layers``, ``compress_layers``, ``compress_ratio`` for ``Reranker.from_pretrained``, where given."""
    options = {}
    for name in ("cutoff_layers", "compress_layers", "compress_ratio"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options


def _layer_list(text: str):
    """argparse type: a comma-separated list of layer numbers (``8`` or ``24,40``)."""
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None
    if not layers or any(k < 0 for k in layers):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}")
    return layers


def cmd_rerank(args) -> int:
    if _ray_requested(args) and _layerwise_options(args):
        raise ValueError(
            "--cutoff-layers, --compress-layers, --compress-ratio: not supported with --ray yet; run the layer-wise "
            "reranker without --ray"
        )
    if _ray_requested(args):  # Parquet shards on Ray Data: fastrank.integrations.ray
        return _ray_integration().rerank_command(args)
    from fastrank.inference import Reranker, best_first
    from fastrank.inference.reranker import parse_rerank_line

    where, lines = _input_lines(args.input)
    parsed, errors = [], 0
    for number, text in enumerate(lines, start=1):
        try:
            parsed.append((number, *parse_rerank_line(text)))
        except ValueError as e:
            parsed.append((number, None, str(e), "error"))
            errors += 1
            print(f"{where}:{number}: {e}", file=sys.stderr)

    pairs = [pair for _, _, p, kind in parsed if kind != "error" for pair in p]
    scores = []
    if pairs:
        reranker = Reranker.from_pretrained(
            args.model,
            args.preset,
            dtype=args.dtype,
            attn_implementation=args.attn_implementation,
            **_device_options(args),
            **_layerwise_options(args),
        )
        with contextlib.closing(reranker) if args.devices else contextlib.nullcontext():
            scores = reranker.score(
                pairs,
                batch_size=args.batch_size,
                max_length=args.max_length,
                max_tokens=args.max_tokens,
                normalize=args.normalize,
                show_progress=False if args.no_progress else None,
            )
    out = _open_output(args.output)
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
                    result["results"] = [{"index": i, "relevance_score": mine[i]} for i in best_first(mine, args.top_k)]
            out.write(json.dumps(result) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    if errors:
        print(
            f'{errors} of {len(parsed)} lines could not be scored (see above; each has an "error" record); '
            f"the other {len(parsed) - errors} were scored",
            file=sys.stderr,
        )
    return 1 if errors else 0


def _read_texts(path: str, fmt: str):
    """(line number, text or None, id or None, error or None) for every input line, blank ones included (an
    error: the output keeps one row per input line)."""
    where, lines = _input_lines(path)
    if fmt == "auto":
        fmt = "jsonl" if path.endswith((".jsonl", ".json")) else "text"
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            out.append((number, None, None, "empty line: nothing to encode (remove it, or put the text on it)"))
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
    return where, out


def cmd_encode(args) -> int:
    if _ray_requested(args):  # Parquet shards on Ray Data: fastrank.integrations.ray
        return _ray_integration().encode_command(args)
    import numpy as np

    from fastrank.inference import Embedder

    where, items = _read_texts(args.input, args.format)
    errors = [(n, err) for n, _, _, err in items if err]
    for n, err in errors:
        print(f"{where}:{n}: {err}", file=sys.stderr)
    good = [(i, text) for i, (_, text, _, err) in enumerate(items) if not err]
    normalize = None if args.normalize is None else args.normalize == "yes"
    embedder = Embedder.from_pretrained(
        args.model,
        kind=args.kind,
        pooling=args.pooling,
        normalize=normalize,
        max_length=args.max_length,
        dtype=args.dtype,
        **_device_options(args),
    )
    method = embedder.encode_queries if args.queries else embedder.encode_corpus
    # One row per input line: a line that could not be encoded is a row of NaN, so row i is always line i + 1.
    vectors = np.full((len(items), embedder.dim), np.nan, dtype="float32")
    with contextlib.closing(embedder) if args.devices else contextlib.nullcontext():
        if good:
            vectors[[i for i, _ in good]] = method(
                [t for _, t in good],
                batch_size=args.batch_size,
                max_tokens=args.max_tokens,
                show_progress=False if args.no_progress else None,
            )
    if args.output.endswith(".npy"):
        np.save(args.output, vectors)
    else:
        out = _open_output(args.output)
        try:
            for (n, _, rid, err), row in zip(items, vectors):
                record = {"line": n}
                if rid is not None:
                    record["id"] = rid
                if err:
                    record["error"] = err
                else:
                    record["embedding"] = [round(float(x), 7) for x in row]
                out.write(json.dumps(record) + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
    if errors:
        rows = f"; their rows in {args.output} are NaN" if args.output.endswith(".npy") else ""
        print(
            f"{len(errors)} of {len(items)} lines could not be encoded (see above){rows}; the other "
            f"{len(items) - len(errors)} were encoded",
            file=sys.stderr,
        )
    return 1 if errors else 0


def _training_options(args):
    """The shared train flags as ``fastrank.training.TrainingOptions``."""
    import dataclasses

    from fastrank.training import TrainingOptions

    fields = {f.name for f in dataclasses.fields(TrainingOptions)} - {"progress", "packed"}
    return TrainingOptions(
        progress=not args.no_progress, packed=not args.no_packing, **{name: getattr(args, name) for name in fields}
    )


def _report(name: str, metrics: dict) -> None:
    print(json.dumps({name: metrics}), flush=True)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_train_embedder(args) -> int:
    from fastrank.training import train_embedder

    train_embedder(
        args.model,
        _training_options(args),
        kind=args.kind,
        pooling=args.pooling,
        normalize=None if args.normalize is None else args.normalize == "yes",
        temperature=args.temperature,
        in_batch_negatives=not args.no_in_batch_neg,
        negatives_cross_device=args.negatives_cross_device,
        sub_batch_size=args.sub_batch_size,
        report=_report,
        log=_log,
    )
    return 0


def cmd_train_reranker(args) -> int:
    from fastrank.training import LORA_TARGETS, train_reranker

    train_reranker(
        args.model,
        _training_options(args),
        layout=args.layout,
        answer=args.answer,
        prompt=args.prompt,
        knowledge_distillation={"auto": None, "yes": True, "no": False}[args.knowledge_distillation],
        padding_side=args.padding_side,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets.split(",") if args.lora_targets else LORA_TARGETS,
        dtype=args.dtype,
        report=_report,
        log=_log,
    )
    return 0


def cmd_demo_model(args) -> int:
    from fastrank.benchmarks.synthetic import build_causal_lm, build_tokenizer, qwen25_config

    overrides = {}
    if args.size == "tiny":
        overrides = dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
            max_position_embeddings=8192,
        )
    config = qwen25_config(num_layers=args.layers, pad_token_id=0, eos_token_id=0, **overrides)
    tokenizer = build_tokenizer()
    model = build_causal_lm(config)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote a random-weight {args.size} Qwen2-architecture causal LM ({params / 1e6:.1f}M parameters, "
        f"{args.layers} layers) and a byte-level BPE tokenizer built in code to {args.output}"
    )
    return 0


def cmd_serve(args) -> int:
    from fastrank.serve import serve

    if not args.reranker and not args.embedder:
        raise ValueError("give --reranker PATH, --embedder PATH or both")
    serve(
        args.reranker,
        args.embedder,
        preset=args.preset,
        host=args.host,
        port=args.port,
        **_device_options(args),
        dtype=args.dtype,
        **_layerwise_options(args),
        api_key=args.api_key,
        max_batch_tokens=args.max_batch_tokens,
        max_wait_ms=args.max_wait_ms,
        max_queue_tokens=args.max_queue_tokens,
        batching=not args.no_batching,
        max_documents=args.max_documents,
        max_texts=args.max_texts,
        max_text_chars=args.max_text_chars,
        max_request_tokens=args.max_request_tokens,
        log_level=args.log_level,
    )
    return 0


def _positive(text: str) -> int:
    """argparse type: a positive int (0 and negatives are refused, never taken as "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _device_list(text: str):
    devices = [d.strip() for d in text.split(",")]
    if not all(devices):
        raise argparse.ArgumentTypeError(f"expected devices separated by commas, e.g. cuda:0,cuda:1; got {text!r}")
    return devices


def _add_device_flags(p) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument(
        "--devices",
        type=_device_list,
        default=None,
        help="several devices, e.g. cuda:0,cuda:1 (or cpu,cpu): one worker process per device, each loading the "
        "model, the batches shared out among them; same results as one device",
    )


def _add_layerwise_flags(p) -> None:
    """The layer-wise and lightweight rerankers' options (``fastrank.inference.layerwise``)."""
    p.add_argument(
        "--cutoff-layers",
        type=_positive,
        default=None,
        help="layer-wise rerankers (bge-reranker-v2-minicpm-layerwise, bge-reranker-v2.5-gemma2-lightweight) only: "
        "the layer to score at, the decoder run only that deep (default: the last layer; the cards use 28)",
    )
    p.add_argument(
        "--compress-layers",
        type=_layer_list,
        default=None,
        help="bge-reranker-v2.5-gemma2-lightweight only: layers at which the passage is compressed, e.g. 24,40 "
        "(default 8)",
    )
    p.add_argument(
        "--compress-ratio",
        type=int,
        choices=(1, 2, 4, 8),
        default=None,
        help="bge-reranker-v2.5-gemma2-lightweight only: passage tokens mean-pooled per group (default 1: none)",
    )


def _device_options(args) -> dict:
    """``device=`` or ``devices=`` for from_pretrained; both given is an error naming the flags."""
    if args.devices and args.device:
        raise ValueError("--device, --devices: give one (--devices starts one worker per device)")
    return {"devices": args.devices} if args.devices else {"device": args.device}


def _ray_integration():
    import fastrank.integrations.ray as module  # imports no Ray until a job runs

    return module


def _ray_requested(args) -> bool:
    """--ray, or a --ray-* flag (which the integration refuses without --ray, rather than ignoring it)."""
    return args.ray or any(getattr(args, name) is not None for name in _ray_integration().RAY_FLAGS)


def _add_ray_flags(p, inputs: str) -> None:
    """``--ray`` and its options, for encode and rerank: the job runs in fastrank.integrations.ray."""
    p.add_argument(
        "--ray",
        action="store_true",
        help=f"run on Ray Data actors (pip install 'fastrank-llm[ray]'): --input is a file or folder ({inputs}), "
        "--output a folder of Parquet shards, and a rerun writes only the shards missing or incomplete",
    )
    p.add_argument(
        "--ray-actors",
        type=_positive,
        default=None,
        help="model replicas, each loading the model once (default: one per GPU with --device cuda, else 1)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster to join, e.g. auto or HOST:6379 (default: RAY_ADDRESS, else a local Ray for this run)",
    )
    p.add_argument("--ray-shard-rows", type=_positive, default=None, help="input rows per output shard (default 50000)")
    p.add_argument(
        "--ray-cpus-per-actor",
        type=float,
        default=None,
        help="CPUs each actor reserves; a CPU actor's torch runs that many threads (default 1)",
    )


def _add_training_flags(
    p, *, batch_size, lr, lr_note, query_max_len, passage_max_len, query_instruction, passage_instruction
) -> None:
    """The flags both train commands take (data, budget, Trainer options), with each command's defaults."""
    p.add_argument("--model", required=True, help="local path or hub name of the model to fine-tune")
    p.add_argument("--data", required=True, nargs="+", help="training JSONL file(s) or folder(s)")
    p.add_argument("--output", required=True, help="folder for checkpoints and the final model")
    p.add_argument("--eval", default=None, help="held-out JSONL (query, pos, neg) for metrics before and after")
    p.add_argument(
        "--group-size",
        dest="train_group_size",
        type=_positive,
        default=8,
        help="passages per query: 1 positive + G-1 negatives (default 8)",
    )
    p.add_argument(
        "--batch-size", type=_positive, default=batch_size, help=f"queries per device and step (default {batch_size})"
    )
    p.add_argument("--grad-accum", type=_positive, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr:g}{lr_note})")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs (default 1)")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: the epochs)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warm-up fraction (default 0.1)")
    p.add_argument(
        "--query-max-len", type=_positive, default=query_max_len, help=f"query token budget (default {query_max_len})"
    )
    p.add_argument(
        "--passage-max-len",
        type=_positive,
        default=passage_max_len,
        help=f"passage token budget (default {passage_max_len})",
    )
    p.add_argument(
        "--query-instruction", default=query_instruction, help=f"before every query (default {query_instruction!r})"
    )
    p.add_argument(
        "--passage-instruction",
        default=passage_instruction,
        help=f"before every passage (default {passage_instruction!r})",
    )
    p.add_argument(
        "--max-examples-per-dataset", type=_positive, default=None, help="use at most this many lines per file"
    )
    p.add_argument("--save-steps", type=_positive, default=500, help="checkpoint every N steps (default 500)")
    p.add_argument(
        "--save-total-limit",
        type=_positive,
        default=None,
        help="keep only the newest N checkpoints, never deleting the one just written (default: keep all)",
    )
    p.add_argument("--logging-steps", type=_positive, default=10, help="log the loss every N steps (default 10)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    p.add_argument("--fp16", action="store_true", help="fp16 mixed precision")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument(
        "--fsdp",
        choices=["full_shard", "shard_grad_op"],
        default=None,
        help="shard the model over the processes with FSDP2 (launch with torchrun or accelerate launch): "
        "full_shard gathers each block's weights for its forward and again for its backward, shard_grad_op "
        "keeps them from forward to backward (more memory, less communication); default: no sharding (DDP)",
    )
    p.add_argument(
        "--no-packing",
        action="store_true",
        help="train on padded batches (default: packed, each query's prefix once, where the model supports it)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in --output (an incomplete newer one is passed over "
        "with a warning)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (training, loading and saving weights)")


def build_parser() -> argparse.ArgumentParser:
    from fastrank import __version__

    parser = argparse.ArgumentParser(prog="fastrank", description="Fused kernels for LLM rerankers and embedders.")
    parser.add_argument("--version", action="version", version=f"fastrank {__version__} (distribution fastrank-llm)")
    parser.add_argument(
        "--traceback", action="store_true", help="on an error, show the full Python traceback instead of one line"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser(
        "bench",
        help="run the microbenchmarks on this machine and print speed and memory ratios against the unfused baselines",
        description="Times every op and its unfused baselines on the same inputs, in one run. "
        "Quick shapes by default (a minute or two on a GPU, about 8 minutes on a 2-core CPU); "
        "--full runs the GPU-sized sweep. "
        "A baseline that cannot be built (its package missing or failing to import) gets a row with the reason. "
        "--from-json shows saved results instead of running, e.g. "
        "`fastrank bench --from-json bench/results/*-h100.json --plot h100.png`.",
    )
    bench.add_argument("--op", action="append", help="benchmark only this op (repeatable); default: all")
    bench.add_argument(
        "--provider",
        action="append",
        help="measure only this provider (repeatable; fastrank itself always runs, every ratio is against it), "
        "e.g. --op rerank --provider fastrank_compiled; default: all",
    )
    bench.add_argument("--full", action="store_true", help="run the full sweep of shapes instead of the quick set")
    bench.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    bench.add_argument(
        "--json", metavar="PATH", help="also write every measurement, with versions and GPU name, as JSON"
    )
    bench.add_argument(
        "--plot",
        metavar="PATH.png",
        help="also draw the time and memory ratios per op and case as a bar chart (.png, .svg, .pdf; "
        "needs matplotlib: pip install matplotlib)",
    )
    bench.add_argument(
        "--from-json",
        nargs="+",
        metavar="RESULTS.json",
        help="run nothing: print the tables of these files saved by --json (and plot them with --plot)",
    )
    bench.add_argument("--quiet", action="store_true", help="no per-case and per-provider progress lines on stderr")
    bench.set_defaults(func=cmd_bench)

    rerank = sub.add_parser(
        "rerank",
        help="score JSONL (query + documents, or query + document) with an LLM reranker",
        description='Reads JSONL lines {"query": ..., "documents": [...]} (ranked: results best first) or '
        '{"query": ..., "document": ...} (one score), optionally with an "id", and writes one JSONL '
        'line per input line. A bad or empty line is reported (line number on stderr, an "error" record in '
        "the output) and the other lines are still scored; the exit status is then 1.",
    )
    rerank.add_argument("--model", required=True, help="local path or hub name of the causal-LM reranker")
    rerank.add_argument(
        "--preset",
        default=None,
        help="one of " + ", ".join(_preset_names()) + " (default: the one the model folder names, or "
        "recognised from the checkpoint's name; an error when neither tells)",
    )
    rerank.add_argument("--input", default="-", help="JSONL file to read (default: stdin)")
    rerank.add_argument("--output", default="-", help="JSONL file to write (default: stdout)")
    rerank.add_argument("--batch-size", type=_positive, default=64, help="pairs per forward pass at most (default 64)")
    rerank.add_argument("--max-tokens", type=_positive, default=32768, help="padded tokens per forward pass at most")
    rerank.add_argument(
        "--max-length", type=_positive, default=None, help="token budget per pair (default: the preset's)"
    )
    rerank.add_argument("--top-k", type=_positive, default=None, help="keep the k best documents per query")
    rerank.add_argument("--normalize", action="store_true", help="scores in [0, 1] (sigmoid, or the preset's mapping)")
    rerank.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16 or float32")
    _add_device_flags(rerank)
    rerank.add_argument("--attn-implementation", default=None, help="sdpa, eager, flash_attention_2, ...")
    _add_layerwise_flags(rerank)
    rerank.add_argument("--no-progress", action="store_true", help="no progress bars (scoring, loading weights)")
    _add_ray_flags(rerank, ".jsonl, .parquet: query + document, or query + documents")
    rerank.set_defaults(func=cmd_rerank)

    enc = sub.add_parser(
        "encode",
        help="embed texts (JSONL or one text per line) with a bi-encoder or LLARA into .npy or JSONL",
        description='Reads texts (a .jsonl/.json input is JSONL: strings or {"text": ..., "id": ...}; anything '
        "else is one text per line) and writes one embedding per input line, in order: a .npy matrix, or JSONL "
        'records {"line", "embedding"}. A bad or empty line is reported with its number (an "error" record, '
        "or a row of NaN in the .npy, so rows stay aligned with lines) and the others are still encoded; the exit "
        "status is then 1. A causal LM without pooling settings is pooled at its last token.",
    )
    enc.add_argument("--model", required=True, help="local path or hub name (sentence-transformers or HF folder)")
    enc.add_argument("--input", default="-", help="input file (default: stdin)")
    enc.add_argument(
        "--format", choices=["auto", "jsonl", "text"], default="auto", help="input format (default: by extension)"
    )
    enc.add_argument("--output", default="-", help="output .npy or JSONL file (default: JSONL on stdout)")
    enc.add_argument(
        "--kind", choices=["auto", "bi", "llara"], default="auto", help="embedder kind (default: from the folder)"
    )
    enc.add_argument(
        "--pooling",
        choices=["cls", "mean", "last"],
        default=None,
        help="override the folder's pooling (default: the folder's, else cls, or last for a causal LM)",
    )
    enc.add_argument("--normalize", choices=["yes", "no"], default=None, help="override the folder's normalisation")
    enc.add_argument(
        "--queries", action="store_true", help="encode as queries (query instruction / LLARA query suffix)"
    )
    enc.add_argument("--batch-size", type=_positive, default=64, help="texts per forward pass at most (default 64)")
    enc.add_argument("--max-tokens", type=_positive, default=32768, help="padded tokens per forward pass at most")
    enc.add_argument("--max-length", type=_positive, default=None, help="tokens per text (default: the folder's)")
    enc.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    _add_device_flags(enc)
    enc.add_argument("--no-progress", action="store_true", help="no progress bars (encoding, loading weights)")
    _add_ray_flags(enc, ".jsonl, .parquet with a text column, or text")
    enc.set_defaults(func=cmd_encode)

    te = sub.add_parser(
        "train-embedder",
        help="fine-tune a bi-encoder or LLARA on JSONL (query, pos, neg[, pos_scores, neg_scores]) with the fused loss",
        description="Runs the Hugging Face Trainer with fastrank's contrastive loss: progress bar, checkpoints every "
        "--save-steps in --output, --resume from the last one, and with --eval a held-out recall@1/@10, MRR@10 and "
        "NDCG@10 before and after training (printed and written to OUTPUT/eval_results.json).",
    )
    _add_training_flags(
        te,
        batch_size=8,
        lr=1e-5,
        lr_note="",
        query_max_len=64,
        passage_max_len=256,
        query_instruction=None,
        passage_instruction=None,
    )
    te.add_argument("--kind", choices=["bi", "llara"], default="bi", help="bi-encoder (default) or LLARA")
    te.add_argument(
        "--pooling",
        choices=["cls", "mean", "last"],
        default=None,
        help="bi-encoder pooling (default: the folder's, else cls, or last for a causal LM)",
    )
    te.add_argument(
        "--normalize",
        choices=["yes", "no"],
        default=None,
        help="L2-normalise embeddings (default: the folder's, else yes)",
    )
    te.add_argument(
        "--temperature",
        type=float,
        default=0.02,
        help="similarity temperature (default 0.02; 1.0 without normalisation)",
    )
    te.add_argument("--no-in-batch-neg", action="store_true", help="score each query against its own group only")
    te.add_argument("--negatives-cross-device", action="store_true", help="negatives from every process (torchrun)")
    te.add_argument("--sub-batch-size", type=int, default=-1, help="encode in chunks of this many texts")
    te.set_defaults(func=cmd_train_embedder)

    tr = sub.add_parser(
        "train-reranker",
        help="fine-tune a causal LM as a 'Yes'-logit reranker on JSONL (query, pos, neg[, pos_scores, neg_scores])",
        description="Runs the Hugging Face Trainer on FlagEmbedding's LLM reranker recipe (groups of 1 positive + "
        "G-1 negatives, cross-entropy over the 'Yes' logits) through fastrank's score head, so no step holds "
        "full-vocabulary logits: progress bar, checkpoints every --save-steps in --output, --resume from the last "
        "one, and with --eval the held-out MRR@10, NDCG@10 and recall before and after training (printed and "
        "written to OUTPUT/eval_results.json). The output folder holds the scoring preset too, so "
        "fastrank.Reranker.from_pretrained(OUTPUT) and `fastrank rerank --model OUTPUT` score as trained.",
    )
    _add_training_flags(
        tr,
        batch_size=1,
        lr=2e-4,
        lr_note=", for LoRA; use ~1e-5 in full",
        query_max_len=32,
        passage_max_len=128,
        query_instruction="A: ",
        passage_instruction="B: ",
    )
    tr.add_argument(
        "--layout",
        choices=["research", "package"],
        default="research",
        help="research: the answer is appended and labelled (the seeds' recipe); package: nothing appended",
    )
    tr.add_argument(
        "--answer", default="Yes", help="the answer token whose logit is the score (default Yes; one token)"
    )
    tr.add_argument("--prompt", default=None, help="the trailing prompt (default: FlagEmbedding's)")
    tr.add_argument(
        "--knowledge-distillation",
        choices=["auto", "yes", "no"],
        default="auto",
        help="add the teacher-score term: auto when every line has pos_scores/neg_scores",
    )
    tr.add_argument("--padding-side", choices=["left", "right"], default=None, help="default: the tokenizer's")
    tr.add_argument("--lora-rank", type=int, default=0, help="train a LoRA adapter of this rank (0: full fine-tune)")
    tr.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default 16)")
    tr.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout (default 0.1)")
    tr.add_argument(
        "--lora-targets",
        default=None,
        help="comma-separated module names for LoRA (default: q_proj,k_proj,v_proj,o_proj,down_proj,up_proj,gate_proj)",
    )
    tr.add_argument("--dtype", default="auto", help="weights as loaded: auto (the checkpoint's), float32, bfloat16")
    tr.set_defaults(func=cmd_train_reranker)

    demo = sub.add_parser(
        "demo-model",
        help="save a random-weight Qwen2-architecture model and a tokenizer built in code (no download)",
        description="For trying the CLI and API offline: the scores of a random model mean nothing.",
    )
    demo.add_argument("output", help="folder to write (save_pretrained layout)")
    demo.add_argument(
        "--size",
        choices=["tiny", "qwen2.5-0.5b"],
        default="tiny",
        help="tiny (hidden 64) or the Qwen2.5-0.5B shape (hidden 896, vocab 151936)",
    )
    demo.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    demo.set_defaults(func=cmd_demo_model)

    srv = sub.add_parser(
        "serve",
        help="serve a reranker and/or an embedder over HTTP (Cohere, Jina, TEI and OpenAI APIs), batching requests",
        description="Starts an HTTP server (FastAPI + uvicorn; pip install 'fastrank-llm[serve]'): Cohere "
        "POST /v1/rerank and /v2/rerank, Jina POST /rerank, TEI POST /tei/rerank and /embed, OpenAI "
        "POST /v1/embeddings, GET /health, /info, /metrics; /docs describes them. Concurrent requests are merged "
        "into token-budget batches. SIGTERM or Ctrl-C stops taking requests and finishes those in flight.",
    )
    srv.add_argument("--reranker", default=None, help="local path or hub name of the causal-LM reranker")
    srv.add_argument("--preset", default=None, help="the reranker's preset (default: recognised from the folder)")
    srv.add_argument("--embedder", default=None, help="local path or hub name of the embedder")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    _add_device_flags(srv)
    srv.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float16 or float32")
    _add_layerwise_flags(srv)
    srv.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every endpoint but /health and the docs "
        "(default: the FASTRANK_API_KEY environment variable; none: open)",
    )
    srv.add_argument("--max-batch-tokens", type=_positive, default=16384, help="tokens per model call (default 16384)")
    srv.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="once the model is free, wait this long for more requests to batch (default 0: run what queued while "
        "it was busy at once)",
    )
    srv.add_argument(
        "--max-queue-tokens",
        type=_positive,
        default=262144,
        help="tokens queued per model before requests get 503 + Retry-After (default 262144)",
    )
    srv.add_argument("--no-batching", action="store_true", help="run every request alone (a baseline)")
    srv.add_argument("--max-documents", type=_positive, default=1000, help="documents per rerank request")
    srv.add_argument("--max-texts", type=_positive, default=2048, help="texts per embedding request")
    srv.add_argument("--max-text-chars", type=_positive, default=100_000, help="characters per query/document/text")
    srv.add_argument("--max-request-tokens", type=_positive, default=131072, help="tokens per request")
    srv.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    srv.set_defaults(func=cmd_serve)
    return parser


def _preset_names():
    from fastrank.presets import presets

    return list(presets())


def main(argv=None) -> int:
    """Run one ``fastrank`` command. An error is one line on stderr and exit status 1; ``--traceback`` (or
    ``FASTRANK_TRACEBACK=1``) shows the full trace instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "no_progress", False) or getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights", "Writing model shards" and the hub's bars
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"fastrank {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- every failure reaches the user as one line, the trace on request
        if args.traceback or os.environ.get("FASTRANK_TRACEBACK", "0") not in ("", "0"):
            raise
        from fastrank.utils import first_line

        print(f"fastrank {args.command}: error: {first_line(e)} (--traceback shows where)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
