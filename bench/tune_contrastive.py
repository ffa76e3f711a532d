"""Sweep launch configurations of the contrastive_loss kernels on a GPU and print a table.

    python bench/tune_contrastive.py

At B=4096, G=8 (P=32768), D=1024, bf16, tau=0.02: the forward kernel and the backward's coefficient kernel
for several tile shapes (TFLOP/s of the score GEMM they contain), the backward's chunk size, and the whole
forward + backward against torch's matmul + cross_entropy. Used to choose the defaults in
kernels/contrastive.py; not part of the test suite.
"""

from __future__ import annotations

import itertools
import sys

import torch

from fastrank.benchmarks.harness import cuda_required

if not torch.cuda.is_available():
    sys.exit(cuda_required(__file__))

import triton.testing  # noqa: E402 - after the check: on a CPU the script says why it stops and nothing else

import fastrank  # noqa: E402
from fastrank.kernels import contrastive as ck  # noqa: E402

DEV = torch.device("cuda")
B, G, D, TAU = 4096, 8, 1024, 0.02


def bench(fn, rep=50):
    return triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median")


def tflops(ms, gemms=1):
    return gemms * 2 * B * B * G * D / (ms * 1e-3) / 1e12


def main():
    gen = torch.Generator(device=DEV).manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(B, D, device=DEV, generator=gen), dim=-1).bfloat16()
    p = torch.nn.functional.normalize(torch.randn(B * G, D, device=DEV, generator=gen), dim=-1).bfloat16()
    targets = torch.arange(B, device=DEV) * G
    q.requires_grad_(True)
    p.requires_grad_(True)

    def torch_step():
        loss = torch.nn.functional.cross_entropy((q @ p.t()).float() / TAU, targets)
        return torch.autograd.grad(loss, (q, p))

    def ours_step():
        return torch.autograd.grad(fastrank.contrastive_loss(q, p, temperature=TAU), (q, p))

    t_torch = bench(torch_step)
    t_mm = bench(lambda: q @ p.t())
    print(f"torch step {t_torch:.3f} ms; one bf16 GEMM q @ p.T {t_mm:.3f} ms ({tflops(t_mm):.0f} TFLOP/s)")

    qd, pd = q.detach(), p.detach()
    stats = ck.contrastive_forward(qd, pd, targets, None, TAU, G, True)
    row_grad = torch.full((B,), 1.0 / B, device=DEV)
    print("config (BM, BN, BD, warps, stages): forward ms (TFLOP/s) | backward ms | step ms, ratio torch/ours")
    configs = list(itertools.product((64, 128), (64, 128, 256), (64,), (4, 8), (3, 4)))
    configs += [(128, 128, 32, 8, 4), (128, 128, 128, 8, 3), (128, 256, 32, 8, 3), (256, 128, 64, 8, 3)]
    rows = []
    for cfg in configs:
        ck._config = (lambda c: lambda dtype, d, device=None: c)(cfg)
        try:
            t_f = bench(lambda: ck.contrastive_forward(qd, pd, targets, None, TAU, G, True), rep=20)
            t_b = bench(
                lambda: ck.contrastive_backward(qd, pd, targets, None, stats, row_grad, TAU, G, True, True, True),
                rep=20,
            )
        except Exception as e:  # noqa: BLE001 - out of shared memory etc.: report and go on
            print(f"{cfg}: {type(e).__name__} {str(e)[:80]}")
            continue
        rows.append((t_f + t_b, cfg))
        print(f"{cfg}: fwd {t_f:.3f} ({tflops(t_f):.0f}) | bwd {t_b:.3f} | sum {t_f + t_b:.3f}", flush=True)
    rows.sort()
    best = rows[0][1]
    ck._config = (lambda c: lambda dtype, d, device=None: c)(best)
    for entries in (1 << 22, 1 << 23, 1 << 24, 1 << 25):
        ck.CHUNK_ENTRIES = entries
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = bench(ours_step)
        peak = torch.cuda.max_memory_allocated() - base
        print(
            f"best {best} chunk 2^{entries.bit_length() - 1}: step {t:.3f} ms, torch/ours {t_torch / t:.2f}x, "
            f"peak {peak / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
