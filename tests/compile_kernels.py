"""Compile every Triton kernel variant fastrank launches for a Hopper GPU (sm_90), without a GPU.

The interpreter runs kernels as numpy code, so it cannot catch what only the compiler rejects (types of
loop bounds, layouts, unsupported ops). ``triton.compile`` lowers to PTX and assembles it with the
``ptxas`` bundled in the Triton wheel, which needs no driver. Run as a script (it must not inherit
``TRITON_INTERPRET=1``); prints one line per variant and exits 1 if any fails.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastrank.kernels import contrastive as C  # noqa: E402
from fastrank.kernels import gated_activation as G  # noqa: E402
from fastrank.kernels import pool as P  # noqa: E402
from fastrank.kernels import rms_norm as R  # noqa: E402
from fastrank.kernels import rope as Ro  # noqa: E402
from fastrank.kernels import score_head as S  # noqa: E402
from fastrank.kernels import varlen_attention as A  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def signature(fn, types, constexprs):
    """Types of every argument: given ones, else ``*fp32`` for pointers and ``i32`` for integers."""
    out = {}
    for name in fn.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        else:
            out[name] = types.get(name, "*fp32" if name.endswith("_ptr") else "i32")
    return out


def variants():
    for dtype in ("bf16", "fp32"):
        for has_mask, has_positions, packed in [
            (True, False, False),
            (True, True, False),
            (False, True, True),
            (False, False, False),
        ]:
            for combine in (False, True):
                yield (
                    S._score_head_fwd_kernel,
                    dict(
                        hidden_ptr=f"*{dtype}",
                        weight_ptr=f"*{dtype}",
                        bias_ptr=f"*{dtype}",
                        ids_ptr="*i64",
                        mask_ptr="*i64",
                        positions_ptr="*i64",
                        cu_seqlens_ptr="*i32",
                        rows_ptr="*i64",
                        gathered_ptr=f"*{dtype}",
                    ),
                    dict(
                        HAS_BIAS=True,
                        HAS_COMBINE=combine,
                        HAS_MASK=has_mask,
                        HAS_POSITIONS=has_positions,
                        PACKED=packed,
                        STORE_GATHERED=True,
                        BLOCK_T=1024,
                        BLOCK_H=512,
                        BLOCK_K=2,
                        BLOCK_C=2,
                    ),
                )
        for block in [(16, 64, 128), (64, 128, 64), (128, 256, 64)] if dtype == "bf16" else [(64, 64, 32)]:
            cfg = dict(
                HAS_BIAS=False,
                DOT_FP32=dtype == "fp32",
                TRANS_W=False,
                BLOCK_N=block[0],
                BLOCK_V=block[1],
                BLOCK_H=block[2],
            )
            yield (
                S._score_head_lse_kernel,
                dict(gathered_ptr=f"*{dtype}", weight_ptr=f"*{dtype}", bias_ptr=f"*{dtype}"),
                cfg,
            )
            yield (
                S._score_head_lse_prob_kernel,
                dict(
                    gathered_ptr=f"*{dtype}",
                    weight_ptr=f"*{dtype}",
                    bias_ptr=f"*{dtype}",
                    prob_ptr=f"*{dtype}",
                    ids_ptr="*i64",
                ),
                dict(cfg, BLOCK_K=8),
            )
        yield (
            S._score_head_bwd_hidden_kernel,
            dict(ids_ptr="*i64", rows_ptr="*i64", weight_ptr=f"*{dtype}", grad_hidden_ptr=f"*{dtype}"),
            dict(HAS_GRAD_K=True, HAS_EXTRA=True, BLOCK_H=512, BLOCK_K=16),
        )
        for scatter in (False, True):
            yield (
                S._score_head_bwd_weight_kernel,
                dict(gathered_ptr=f"*{dtype}", ids_ptr="*i64", out_ptr=f"*{dtype}" if scatter else "*fp32"),
                dict(SCATTER=scatter, BLOCK_N=32, BLOCK_H=64, BLOCK_K=16),
            )
        pool_types = dict(
            hidden_ptr=f"*{dtype}",
            mask_ptr="*i64",
            input_ids_ptr="*i64",
            ids_ptr="*i64",
            cu_seqlens_ptr="*i32",
            status_ptr="*i32",
            grad_hidden_ptr=f"*{dtype}",
        )
        for mode in range(5):
            for has_mask, packed in [(True, False), (False, True), (False, False)]:
                cfg = dict(MODE=mode, HAS_MASK=has_mask, PACKED=packed, BLOCK_T=32, BLOCK_H=128, BLOCK_K=2)
                yield P._pool_fwd_kernel, pool_types, cfg
                yield P._pool_bwd_kernel, pool_types, cfg
        block = (128, 128, 64) if dtype == "bf16" else (64, 64, 32)
        types = dict(q_ptr=f"*{dtype}", p_ptr=f"*{dtype}", targets_ptr="*i64", inv_tau="fp32")
        for teacher in (True, False):
            for in_batch in (True, False):
                yield (
                    C._contrastive_fwd_kernel,
                    types,
                    dict(
                        IN_BATCH=in_batch,
                        HAS_TEACHER=teacher,
                        DOT_FP32=dtype == "fp32",
                        FP32_PRECISION="ieee",
                        BLOCK_M=block[0],
                        BLOCK_N=block[1],
                        BLOCK_D=block[2],
                    ),
                )
            yield (
                C._contrastive_coef_kernel,
                dict(types, c_ptr=f"*{dtype}"),
                dict(
                    HAS_TEACHER=teacher,
                    DOT_FP32=dtype == "fp32",
                    FP32_PRECISION="ieee",
                    BLOCK_M=block[0],
                    BLOCK_N=block[1],
                    BLOCK_D=block[2],
                ),
            )
            for fn in (C._contrastive_dq_kernel, C._contrastive_dp_kernel):
                yield (
                    fn,
                    types,
                    dict(
                        IN_BATCH=False,
                        HAS_TEACHER=teacher,
                        DOT_FP32=dtype == "fp32",
                        FP32_PRECISION="ieee",
                        BLOCK_M=block[0],
                        BLOCK_N=block[1],
                        BLOCK_D=block[2],
                    ),
                )
        if dtype == "fp32":  # under torch.set_float32_matmul_precision("high" or "medium"): TF32 dots
            for teacher in (True, False):
                for fn, extra in [
                    (C._contrastive_fwd_kernel, dict(IN_BATCH=True)),
                    (C._contrastive_coef_kernel, {}),
                    (C._contrastive_dq_kernel, dict(IN_BATCH=False)),
                    (C._contrastive_dp_kernel, dict(IN_BATCH=False)),
                ]:
                    flags = dict(extra, HAS_TEACHER=teacher, DOT_FP32=True, FP32_PRECISION="tf32")
                    flags.update(BLOCK_M=block[0], BLOCK_N=block[1], BLOCK_D=block[2])
                    yield fn, dict(types, c_ptr="*fp32"), flags
        yield from attention_variants(dtype)
    yield S._score_head_lse_merge_kernel, {}, dict(BLOCK_S=512)
    yield P._pool_normalize_kernel, {}, dict(BLOCK_H=1024)
    for dtype in ("bf16", "fp32"):
        yield A._varlen_attn_delta_kernel, dict(o_ptr=f"*{dtype}", do_ptr=f"*{dtype}"), dict(BLOCK_M=32, BLOCK_D=128)


def attention_variants(dtype):
    """varlen_attention's three kernels with the blocks the driver picks on a GPU: bf16 for small, mid and large
    head_dim, with and without a prefix, causal or not, softcap or not; fp32 (slow to compile) once."""
    types = dict(
        q_ptr=f"*{dtype}",
        k_ptr=f"*{dtype}",
        v_ptr=f"*{dtype}",
        o_ptr=f"*{dtype}",
        do_ptr=f"*{dtype}",
        dq_ptr=f"*{dtype}",
        dk_ptr=f"*{dtype}",
        dv_ptr=f"*{dtype}",
        cu_seqlens_ptr="*i32",
        prefix_ptr="*i64",
        readers_ptr="*i32",
        readers_idx_ptr="*i32",
        scale="fp32",
        softcap="fp32",
    )
    kernels = (
        ("fwd", A._varlen_attn_fwd_kernel),
        ("dq", A._varlen_attn_dq_kernel),
        ("dkdv", A._varlen_attn_dkdv_kernel),
    )
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    for head_dim in (64, 128, 256) if dtype == "bf16" else (72,):
        for kind, fn in kernels:
            block_m, block_n, block_d, _ = A._blocks(head_dim, kind, torch_dtype)
            flags = [(True, True, False), (False, False, True)] if dtype == "bf16" else [(True, True, True)]
            for causal, has_prefix, softcap in flags:
                yield (
                    fn,
                    types,
                    dict(
                        CAUSAL=causal,
                        HAS_PREFIX=has_prefix,
                        HAS_SOFTCAP=softcap,
                        DOT_FP32=dtype == "fp32",
                        BLOCK_M=block_m,
                        BLOCK_N=block_n,
                        BLOCK_D=block_d,
                    ),
                )


def decoder_variants():
    """The fused decoder ops (rms_norm, gated_activation, rope) at the shapes fastrank's fusion launches them."""
    import triton.language as tl

    for x, w, o in [("bf16", "bf16", "bf16"), ("fp16", "fp32", "fp32"), ("fp32", "fp32", "fp32")]:
        for h in (64, 896, 4096):
            bm, bh, _ = R._fwd_blocks(h)
            for unit_offset, residual in [(False, False), (False, True), (True, True)]:
                types = dict(x_ptr=f"*{x}", residual_ptr=f"*{x}", weight_ptr=f"*{w}", out_ptr=f"*{o}", s_ptr=f"*{x}")
                flags = dict(UNIT_OFFSET=unit_offset, HAS_RESIDUAL=residual, STORE_RSTD=True)
                yield R._rms_norm_fwd_kernel, dict(types, eps="fp32"), dict(flags, BLOCK_M=bm, BLOCK_H=bh)
            bm, bh, _ = R._bwd_blocks(h)
            for unit_offset, grad_s in [(False, False), (True, True)]:
                types = dict(
                    grad_out_ptr=f"*{o}", grad_s_ptr=f"*{x}", x_ptr=f"*{x}", weight_ptr=f"*{w}", dx_ptr=f"*{x}"
                )
                flags = dict(UNIT_OFFSET=unit_offset, HAS_GRAD_S=grad_s, COMPUTE_DW=True, BLOCK_M=bm, BLOCK_H=bh)
                yield R._rms_norm_bwd_kernel, types, flags
    for d in ("bf16", "fp16", "fp32"):
        for act in (0, 1):
            for m, n in [(1, 8192 * 4864), (8192, 4864)]:
                bm, bn, _ = G._blocks(m, n)
                flags = dict(ACT=act, BLOCK_M=bm, BLOCK_N=bn)
                yield G._gated_fwd_kernel, dict(gate_ptr=f"*{d}", up_ptr=f"*{d}", out_ptr=f"*{d}"), flags
                types = dict(grad_ptr=f"*{d}", gate_ptr=f"*{d}", up_ptr=f"*{d}", dgate_ptr=f"*{d}", dup_ptr=f"*{d}")
                yield G._gated_bwd_kernel, types, flags
    for d in ("bf16", "fp32"):
        for backward in (False, True):
            for t, hq, hk, half in [(8192, 14, 2, 32), (4096, 16, 8, 64), (1, 32, 8, 64)]:
                bt, bq, bk, bh = Ro._blocks(t, hq, hk, half)
                types = {n: f"*{d}" for n in Ro._rope_kernel.arg_names if n.endswith("_ptr")}
                flags = dict(BACKWARD=backward, COMPUTE=tl.float32, BLOCK_T=bt, BLOCK_HQ=bq, BLOCK_HK=bk, BLOCK_HALF=bh)
                yield Ro._rope_kernel, types, flags


def main() -> int:
    failures = 0
    for fn, types, constexprs in [*variants(), *decoder_variants()]:
        flags = {k: v for k, v in constexprs.items() if not k.startswith("BLOCK")}
        try:
            triton.compile(
                ASTSource(fn=fn, signature=signature(fn, types, constexprs), constexprs=constexprs), target=TARGET
            )
            print(
                f"ok   {fn.__name__} "
                f"{types.get('hidden_ptr', types.get('gathered_ptr', types.get('q_ptr', '')))} {flags}"
            )
        except Exception as e:  # noqa: BLE001 - report every failing variant
            failures += 1
            print(f"FAIL {fn.__name__} {flags}: {type(e).__name__}: {str(e)[:1500]}")
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
