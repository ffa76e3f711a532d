"""The ``fastrank`` command line."""

from __future__ import annotations

import argparse
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
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
