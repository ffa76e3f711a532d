"""Sweep launch configurations of the score_head kernels on a GPU and print a table.

    python bench/tune_score_head.py

Prints, at the Qwen2.5-0.5B head shape (H=896, V=151936, bf16):
- the forward row kernel for several num_warps / BLOCK_H, against torch's gather + sliced matmul, with
  and without the status read-back (FASTRANK_CHECKS);
- the log-sum-exp kernel for several tile shapes against torch (chunked cuBLAS and one full matmul),
  with the achieved bandwidth on the weight and the FLOP rate.
Used to choose the defaults in kernels/score_head.py; not part of the test suite.
"""

from __future__ import annotations

import itertools
import os
import sys

import torch

from fastrank.benchmarks.harness import cuda_required

if not torch.cuda.is_available():
    sys.exit(cuda_required(__file__))

import triton  # noqa: E402 - after the check: on a CPU the script says why it stops and nothing else
import triton.testing  # noqa: E402

import fastrank  # noqa: E402
from fastrank.common import cdiv  # noqa: E402
from fastrank.kernels import score_head as sh  # noqa: E402
from fastrank.ops.score_head import lse_forward_chunked  # noqa: E402

H, V = 896, 151936
DEV = torch.device("cuda")


def bench(fn, rep=100):
    """Median time in ms (CUDA events)."""
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def row_kernel(n, t):
    hidden = torch.randn(n, t, H, device=DEV, dtype=torch.bfloat16)
    weight = torch.randn(V, H, device=DEV, dtype=torch.bfloat16) / H**0.5
    lengths = torch.randint(t // 2, t + 1, (n,), device=DEV)
    mask = (torch.arange(t, device=DEV)[None] >= t - lengths[:, None]).long()
    ids = [9454]
    ids_t = torch.tensor(ids, device=DEV)
    rows = torch.arange(n, device=DEV)

    def torch_sliced():
        pos = torch.where(mask != 0, torch.arange(t, device=DEV), -1).amax(1)
        return (hidden[rows, pos] @ weight[ids_t].t()).float()

    print(f"\nforward row kernel, N={n} T={t}: torch_sliced {bench(torch_sliced) * 1e3:.1f} us")
    for checks in ("1", "0"):
        os.environ["FASTRANK_CHECKS"] = checks
        us = bench(lambda: fastrank.score_head(hidden, weight, ids, attention_mask=mask)) * 1e3
        print(f"  fastrank.score_head (checks={checks}): {us:.1f} us")
    os.environ["FASTRANK_CHECKS"] = "1"
    out = torch.empty(n, 1, device=DEV)
    rows_out = torch.empty(n, dtype=torch.int64, device=DEV)
    for warps, block_h, block_t in itertools.product((2, 4), (512, 1024), (1024,)):

        def launch():
            sh._score_head_fwd_kernel[(n,)](
                hidden,
                weight,
                None,
                ids_t,
                None,
                mask,
                None,
                None,
                out,
                rows_out,
                None,
                n,
                t,
                H,
                1,
                0,
                *hidden.stride(),
                *weight.stride(),
                *mask.stride(),
                out.stride(0),
                0,
                HAS_BIAS=False,
                HAS_COMBINE=False,
                HAS_MASK=True,
                HAS_POSITIONS=False,
                PACKED=False,
                STORE_GATHERED=False,
                BLOCK_T=min(block_t, triton.next_power_of_2(t)),
                BLOCK_H=block_h,
                BLOCK_K=2,
                BLOCK_C=2,
                num_warps=warps,
            )

        print(f"  kernel only warps={warps} BLOCK_H={block_h} BLOCK_T={block_t}: {bench(launch) * 1e3:.1f} us")


def lse_kernel(n):
    gathered = torch.randn(n, H, device=DEV, dtype=torch.bfloat16)
    weight = torch.randn(V, H, device=DEV, dtype=torch.bfloat16) / H**0.5
    flops = 2 * n * V * H
    wbytes = V * H * 2
    t_chunk = bench(lambda: lse_forward_chunked(gathered, weight, None))
    t_full = bench(lambda: torch.logsumexp((gathered @ weight.t()).float(), 1))
    t_default = bench(lambda: sh._lse_forward(gathered, weight, None))
    print(
        f"\nlse N={n}: torch chunked {t_chunk * 1e3:.0f} us, torch full matmul {t_full * 1e3:.0f} us, "
        f"kernel default {t_default * 1e3:.0f} us ({wbytes / (t_default * 1e-3) / 1e12:.2f} TB/s on W, "
        f"{flops / (t_default * 1e-3) / 1e12:.0f} TFLOP/s)"
    )
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    ref = torch.logsumexp((gathered.float() @ weight.float().t()), 1)
    block_n, block_v, block_h, warps, stages = sh._lse_config(n, H, torch.bfloat16)
    for trans_w, waves in itertools.product((False, True), (2, 4, 8)):
        n_blocks = cdiv(n, block_n)
        unit = 256
        v_units = cdiv(V, unit)
        splits = max(1, min(v_units, cdiv(waves * sms, n_blocks)))
        v_per_split = cdiv(v_units, splits) * unit
        splits = cdiv(V, v_per_split)
        partial = torch.empty(n, splits, device=DEV)

        def launch():
            sh._score_head_lse_kernel[(n_blocks, splits)](
                gathered,
                weight,
                None,
                partial,
                n,
                H,
                V,
                v_per_split,
                gathered.stride(0),
                *weight.stride(),
                partial.stride(0),
                HAS_BIAS=False,
                DOT_FP32=False,
                TRANS_W=trans_w,
                BLOCK_N=block_n,
                BLOCK_V=block_v,
                BLOCK_H=block_h,
                num_warps=warps,
                num_stages=stages,
            )
            return torch.logsumexp(partial, 1)

        err = (launch() - ref).abs().max().item()
        print(f"  TRANS_W={trans_w} waves={waves}: {bench(launch) * 1e3:.0f} us (max err {err:.1e})")
    g = torch.randn(n, device=DEV)
    gk = torch.randn(n, 7, device=DEV)
    lse = sh._lse_forward(gathered, weight, None)
    t_bwd = bench(lambda: sh._lse_backward(gathered, weight, None, lse, g, tuple(range(7)), gk, True, False))
    print(f"  lse backward (prob kernel + 2 GEMMs, dh and dW): {t_bwd * 1e3:.0f} us")


def train_profile():
    from torch.profiler import ProfilerActivity, profile

    from fastrank.benchmarks.score_head import Case, providers

    for mode in ("train", "lse_train", "lse"):
        case = Case(mode=mode, sequences=64, seq_len=512, hidden_size=H, vocab_size=V, dtype="bfloat16")
        fns = providers(case, DEV)
        line = []
        for name in ("logits_to_keep", "torch_sliced", "fastrank"):
            if name in fns:
                line.append(f"{name} {bench(fns[name]) * 1e3:.0f} us")
        os.environ["FASTRANK_CHECKS"] = "0"
        line.append(f"fastrank checks=0 {bench(fns['fastrank']) * 1e3:.0f} us")
        os.environ["FASTRANK_CHECKS"] = "1"
        print(f"\n{mode} N=64 T=512: " + ", ".join(line))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fns["fastrank"]()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=50))


if __name__ == "__main__":
    print(torch.cuda.get_device_name(DEV), "torch", torch.__version__, "triton", triton.__version__)
    a = torch.randn(64, 896, device=DEV, dtype=torch.bfloat16)
    try:
        torch.mm(a, a.t(), out_dtype=torch.float32)
        print("torch.mm(out_dtype=float32) on bf16: available")
    except Exception as e:  # noqa: BLE001
        print("torch.mm(out_dtype=float32) on bf16: NOT available:", type(e).__name__, str(e)[:100])
    for n, t in ((64, 512), (1024, 512)):
        row_kernel(n, t)
    for n in (1, 16, 64, 256, 1024):
        lse_kernel(n)
    train_profile()
