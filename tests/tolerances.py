"""Tolerances that scale with the reduction length, and a readable comparison against float64.

A fp32-accumulated dot product of length n has error about sqrt(n) * u * sum_i |a_i b_i| (u = 2^-24, the
unit roundoff of fp32; random rounding errors add like a random walk). Outputs stored in half precision
add one rounding of their own: 2^-8 relative for bfloat16 (2^-7 under the interpreter, which truncates
instead of rounding), 2^-11 for float16.
"""

from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
STORE_RTOL = {torch.float32: 0.0, torch.float64: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
SAFETY = 8.0


def dot_atol(reduce_len: int, abs_dot, acc_dtype=torch.float32):
    """Absolute error allowed for fp32-accumulated dot products of length ``reduce_len`` whose
    absolute-value dot products are ``abs_dot`` (a tensor, or a float bound)."""
    return SAFETY * math.sqrt(reduce_len) * UNIT_ROUNDOFF[acc_dtype] * abs_dot + 1e-30


def assert_close(actual, expected, *, atol, rtol=0.0, what="value"):
    """|actual - expected| <= atol + rtol * |expected| elementwise, with a report of the worst offenders."""
    actual64 = actual.detach().double().cpu()
    expected64 = expected.detach().double().cpu()
    assert actual64.shape == expected64.shape, f"{what}: shape {tuple(actual64.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(actual64).all() == torch.isfinite(expected64).all(), f"{what}: NaN/inf pattern differs"
    atol64 = atol.detach().double().cpu() if isinstance(atol, torch.Tensor) else torch.tensor(float(atol), dtype=torch.float64)
    allowed = atol64 + rtol * expected64.abs()
    err = (actual64 - expected64).abs()
    bad = err > allowed
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        lines = [
            f"  at {tuple(i)}: got {actual64[tuple(i)].item():.8g}, want {expected64[tuple(i)].item():.8g}, "
            f"err {err[tuple(i)].item():.3g} > allowed {allowed.expand_as(err)[tuple(i)].item():.3g}"
            for i in idx
        ]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements off\n" + "\n".join(lines))
