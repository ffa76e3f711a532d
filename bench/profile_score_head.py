"""Host-side cost of each score_head benchmark provider on a GPU: issue time per call, then cProfile.

    python bench/profile_score_head.py

On a slow host every provider of the head stage is launch-bound; this shows where fastrank's host time
goes (checks, Triton launches, torch ops). Not part of the test suite.
"""

import cProfile
import os
import pstats
import sys
import time

import torch

from fastrank.benchmarks.harness import cuda_required
from fastrank.benchmarks.score_head import QWEN25_05B_HEAD, Case, providers

if not torch.cuda.is_available():
    sys.exit(cuda_required(__file__))
DEV = torch.device("cuda")
for mode in ("forward", "lse", "train", "lse_train"):
    fns = providers(Case(mode=mode, sequences=64, seq_len=512, dtype="bfloat16", **QWEN25_05B_HEAD), DEV)
    for name, fn in fns.items():
        if name == "full_logits":
            continue
        for checks in ("1", "0"):
            if name != "fastrank" and checks == "0":
                continue
            os.environ["FASTRANK_CHECKS"] = checks
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                fn()
            cpu = (time.perf_counter() - t) / 50 * 1e6
            torch.cuda.synchronize()
            tot = (time.perf_counter() - t) / 50 * 1e6
            print(
                f"{mode:10s} {name:15s} checks={checks} host issue {cpu:7.0f} us/call, "
                f"with final sync {tot:7.0f} us/call"
            )
    os.environ["FASTRANK_CHECKS"] = "1"
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(50):
        fns["fastrank"]()
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(8)
