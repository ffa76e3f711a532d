"""How close is close enough: tolerances derived from the reduction length for the op-level tests, a named
table for the model-level tests, and the one comparison both use.

Op level (test_score_head, test_pool, test_contrastive). A fp32-accumulated dot product of length n has error
about sqrt(n) * u * sum_i |a_i b_i| (u = 2^-24, the unit roundoff of fp32; random rounding errors add like a
random walk). Outputs stored in half precision add one rounding of their own: 2^-8 relative for bfloat16
(2^-7 under the interpreter, which truncates instead of rounding), 2^-11 for float16. Attention
(test_varlen_attention) builds on the same terms: see attention_atol.

Model level (every other test file). A whole model has too many reductions to add up one by one, so each kind of
comparison gets one named entry of the table below, with the reason for its size. The models are the tiny ones
of tiny_models.py (2 decoder layers, hidden 64, fp32; embeddings a 2-layer BERT of hidden 32-48) and the real
all-MiniLM-L6-v2 (6 layers, hidden 384). Sizes to keep in mind: fp32's unit roundoff is u = 6e-8, so an O(1)
value is exact to about 1e-7; a length-n fp32 sum is off by ~sqrt(n) * u relative (8 * u = 5e-7 for n = 64,
20 * u = 1.2e-6 for n = 384). No comparison runs in TF32 (the kernels give fp32 operands the exact dot, and
torch leaves TF32 off for matmuls by default), but a GPU sums in other orders than a CPU: "measured" in an entry
is the worst |err| / allowed seen on CPU (reference and interpreted Triton backends), and the rest is margin.

One helper, ``assert_close``, compares for both levels: a table entry, or the op level's atol/rtol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
STORE_RTOL = {torch.float32: 0.0, torch.float64: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
SAFETY = 8.0


def dot_atol(reduce_len: int, abs_dot, acc_dtype=torch.float32):
    """Absolute error allowed for fp32-accumulated dot products of length ``reduce_len`` whose
    absolute-value dot products are ``abs_dot`` (a tensor, or a float bound)."""
    return SAFETY * math.sqrt(reduce_len) * UNIT_ROUNDOFF[acc_dtype] * abs_dot + 1e-30


# Attention (test_varlen_attention). A score s = scale * q.k is an fp32 dot of length D, off by ~sqrt(D) * u *
# scale * sum_d |q_d k_d| (plus one rounding of the scale and of the base-2 exponent: u * |s| more); a softcap's
# tanh has slope <= 1, so it never widens that. A softmax moves by p_j * (ds_j - mean ds): the output by at most
# 2 * max|ds| * max|v|, and the P @ V sum of n_keys terms adds its own dot error. Half-precision outputs add the
# rounding of the stored value and, where the probabilities are themselves rounded to the input dtype (tensor-core
# P @ V on a GPU, PyTorch's sdpa computing in the input dtype), one rounding of each p_j: STORE_RTOL * max|v|.
# Gradients: each sums ~n_keys + D products of such terms; half inputs round the saved output (delta = rowsum(dO * O)
# uses it), each probability, and the stored gradient: ATTENTION_GRAD_HALF roundings relative to the tensor's
# largest gradient (measured on CPU, both backends: worst 0.73 (float16) and 1.2 (bfloat16, interpreter truncation)
# roundings of max|g|; fp32 at most 1/4 of its allowance).
ATTENTION_GRAD_HALF = 4.0


def attention_atol(dtype, head_dim: int, n_keys: int, score_abs, v_abs, out_abs=0.0):
    """Absolute error allowed for attention outputs: ``score_abs`` bounds ``scale * sum_d |q_d k_d|`` over the
    keys a row sees, ``v_abs`` bounds ``|v|`` there, ``out_abs`` is ``|out|`` (tensors broadcast)."""
    u = UNIT_ROUNDOFF[torch.float32]
    score_err = SAFETY * (math.sqrt(head_dim) + 1.0) * u * score_abs
    return 2.0 * score_err * v_abs + dot_atol(n_keys, v_abs) + STORE_RTOL[dtype] * (out_abs + v_abs)


def attention_grad_atol(dtype, reduce_len: int, score_abs: float, g_abs: float) -> float:
    """Absolute error allowed for the gradients of attention in q, k or v whose largest element is ``g_abs``:
    ``reduce_len`` ~ keys + head_dim terms per element, scores bounded by ``score_abs`` (see attention_atol)."""
    u = UNIT_ROUNDOFF[torch.float32]
    return (SAFETY * math.sqrt(reduce_len) * u * (1.0 + score_abs) + ATTENTION_GRAD_HALF * STORE_RTOL[dtype]) * g_abs


# ---------------------------------------------------------------------------------------------------------------
# The model-level table
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """|actual - expected| <= atol + rtol * |expected|, elementwise; ``why`` says where the size comes from."""

    name: str
    atol: float
    rtol: float
    why: str

    def __str__(self):
        return f"{self.name} (atol={self.atol:g}, rtol={self.rtol:g}): {self.why}"


# Forward: scores, logits, embeddings.
SAME_COMPUTATION = Tolerance(
    "SAME_COMPUTATION",
    atol=1e-6,
    rtol=0.0,
    why="the same fp32 weights and ops reached two ways (the CLI and the Python API, a checkpoint reloaded from "
    "disk and the model in memory, another batch size or token budget, a folder we saved read back by "
    "sentence-transformers): at most the padding width and the BLAS blocking for another row count reorder a "
    "few sums, a few roundings (u = 6e-8) of O(1) scores and unit-norm embeddings, so a fixed atol and no rtol "
    "(measured: <= 6e-8)",
)
SCORES_SAME_FORWARD = Tolerance(
    "SCORES_SAME_FORWARD",
    atol=1e-6,
    rtol=1e-5,
    why="scores, logits or pooled embeddings against the same quantity formed from the HF model's own output, "
    "the backbone having run on the very same batch (identical hidden states): only the last step differs "
    "(score_head's fp32 dot products over hidden 64 against HF's full-vocabulary GEMM, a convention's "
    "arithmetic, pooling against a float64 formula). One such dot of an RMS-normed hidden state with a head "
    "row (std 0.5) carries ~1e-6 absolute whatever its value, and logits reach |l| ~ 8: atol 1e-6 for scores "
    "near 0, rtol 1e-5 for large ones (measured: worst 1/3 of the allowance, patched logits near 0.2; the "
    "others <= 1/12)",
)
SCORES_OTHER_BATCH = Tolerance(
    "SCORES_OTHER_BATCH",
    atol=1e-5,
    rtol=1e-5,
    why="the same scores or embeddings where the backbone itself ran on another batch layout (each pair alone "
    "against a padded batch, left against right padding, a reference package's own batch size and padding, "
    "packed against padded): padded attention and other GEMM shapes reorder the sums in every layer, and two "
    "decoder layers carry those ~1e-7 relative differences of O(1) activations to ~1e-6 absolute on scores of "
    "a few units, near 0 included: 1e-5 both ways leaves 10x (measured: worst 1/16)",
)
PROBABILITIES = Tolerance(
    "PROBABILITIES",
    atol=1e-7,
    rtol=1e-5,
    why="full-vocabulary softmax probabilities (p ~ 1e-3 for a random tiny model) and expectations of them "
    "(lb-reranker's sum_d d * p(d) ~ 0.03): a logit error d moves p by p * d, so the relative error is the "
    "logits' absolute error (~1e-6, see SCORES_*): rtol 1e-5; atol 1e-7 is only a floor for p near 0 "
    "(measured: worst 1/37)",
)
BF16_LOGITS = Tolerance(
    "BF16_LOGITS",
    atol=2e-2,
    rtol=2.0**-7,
    why="a bf16 model's logits: HF rounds each to bf16 (2^-8 relative at most) where fastrank keeps the fp32 "
    "accumulator, rtol 2^-7 is two such roundings; a bf16 GEMM may also keep partial sums in bf16 (torch "
    "allows reduced-precision reductions on CUDA by default), a few more roundings of O(1) partial sums: "
    "atol 2e-2 (measured on CPU: 1/4 of the allowance)",
)
SCORES_OVER_TEMPERATURE = Tolerance(
    "SCORES_OVER_TEMPERATURE",
    atol=1e-5,
    rtol=1e-6,
    why="cosine similarities divided by a temperature of 0.05, fused against computed in full: a dot of two unit "
    "vectors of length 48 is off by ~sqrt(48) * u = 4e-7 whatever its value, times 1 / 0.05 = 20 is ~8e-6 "
    "absolute on scores up to 20: the atol carries it (measured: 1/16)",
)
EMBEDDINGS_VS_SENTENCE_TRANSFORMERS = Tolerance(
    "EMBEDDINGS_VS_SENTENCE_TRANSFORMERS",
    atol=1e-5,
    rtol=0.0,
    why="unit-norm all-MiniLM-L6-v2 embeddings (|x| <= 1, typically 0.05), their cosines and similarities, from "
    "fastrank against sentence-transformers' own pipeline: six 384-wide layers run in another batch layout "
    "(batch size, length sorting, fastrank's pooling) differ by ~sqrt(384) * u = 1e-6 relative per layer, "
    "~1e-7..1e-6 per element after pooling and normalising: a fixed 1e-5, no rtol as |x| <= 1 "
    "(measured: 2e-7)",
)

# Training: losses and gradients.
LOSS_VS_REFERENCE = Tolerance(
    "LOSS_VS_REFERENCE",
    atol=1e-6,
    rtol=1e-5,
    why="a contrastive or grouped cross-entropy loss (ln of the group size, up to ~30 for scaled random "
    "embeddings) against a reference implementation or layout (FlagEmbedding's training models, "
    "sentence-transformers' MNRL, LLARA's formula, two processes against one, packed against padded): its "
    "logsumexp runs in another order over scores already ~1e-6 apart (SCORES_*): rtol 1e-5, atol 1e-6 for a "
    "loss near 0 (measured: worst 1/20)",
)
LOSS_SAME_FORWARD = Tolerance(
    "LOSS_SAME_FORWARD",
    atol=1e-6,
    rtol=1e-6,
    why="the same loss when only the schedule changes (sub-batches, gradient checkpointing's recompute, an "
    "adapter saved and loaded back): the same ops on the same rows, a few roundings of an O(1) loss "
    "(ulp(2.5) = 2.4e-7) (measured: identical on CPU)",
)
GRADS_SAME_FORWARD = Tolerance(
    "GRADS_SAME_FORWARD",
    atol=1e-6,
    rtol=1e-4,
    why="parameter or embedding gradients where the forward is the same ops on the same batch and only the last "
    "step or the schedule differs (a patched head computing only the scored rows, gradient checkpointing, "
    "sub-batches, the fused MNRL loss against MNRL on the same embeddings): the gradient entering the "
    "backbone is identical or ~u relative apart, so its backward differs by a few roundings; each element "
    "sums many terms that partly cancel, hence rtol 1e-4 (measured: identical, or 1/8 of the allowance for "
    "MNRL's embedding gradients)",
)
GRADS_HEAD_VS_FULL_LOGITS = Tolerance(
    "GRADS_HEAD_VS_FULL_LOGITS",
    atol=1e-5,
    rtol=1e-4,
    why="backbone gradients from score_head's own backward against autograd through HF's full logits, same "
    "forward: score_head sums the scored rows' contributions to the hidden state's gradient in another order, "
    "and that ~u relative difference runs back through both layers into gradients reaching |g| ~ 200 (4 "
    "tokens weighted up to 3, llama's widened head); an element that cancels keeps ~u * max|g| ~ 1e-5 "
    "absolute (measured: 1/2 of the allowance)",
)
GRADS_VS_REFERENCE = Tolerance(
    "GRADS_VS_REFERENCE",
    atol=1e-5,
    rtol=1e-3,
    why="parameter gradients against a reference that runs its own forward and loss (FlagEmbedding's embedder "
    "training model, LLARA's formula from the full model's hidden states, two processes' all-reduced "
    "gradients): the loss gradients start ~u relative apart, temperature 0.02 multiplies them by 50, and each "
    "parameter's gradient sums all batch x token positions with heavy cancellation, so an element 1e-3 of its "
    "tensor's max keeps the absolute error of the large terms: rtol 1e-3, atol 1e-5 for |g| up to ~10 "
    "(measured: worst 2/3 of the allowance, FlagEmbedding with mean pooling and distillation)",
)

PARAMS_AFTER_ONE_STEP = Tolerance(
    "PARAMS_AFTER_ONE_STEP",
    atol=1e-5,
    rtol=1e-4,
    why="parameters after one AdamW step (lr 1e-3) of two DDP processes against one process: Adam's first step "
    "moves each parameter by ~lr * g / (|g| + eps), blind to the gradients' last bits except where a gradient "
    "cancels to near eps = 1e-8; atol 1e-5 is 1% of the step (measured: 9e-9)",
)

PARAMS_AFTER_STEPS = Tolerance(
    "PARAMS_AFTER_STEPS",
    atol=2e-4,
    rtol=0.0,
    why="parameters after 4 AdamW steps (lr 1e-3, linear decay: 2.5e-3 of learning rate in all) of two processes "
    "(DDP, FSDP) against one on the same global batch: each step moves an element by lr * m / (sqrt(v) + eps), "
    "blind to the gradient's last bits except where the element's gradient cancels to about eps = 1e-8; there "
    "the ~u * max|g| rounding of another summation order (~2e-9) changes that step by tens of percent of lr, "
    "and later steps carry it. atol 2e-4 is 8% of the summed lr; a missing or wrong step, or weights saved "
    "from the wrong shard, move elements by ~lr = 1e-3. Adam does not see a gradient's scale: the tests check "
    "it through the logged gradient norms (measured: 5.7e-5 to 6.4e-5 over runs, one element of a reranker's "
    "down_proj whose first-step gradient was -8.5e-9 against -1.07e-8; every other element <= 7e-6)",
)

MODEL_TOLERANCES = {
    t.name: t
    for t in (
        SAME_COMPUTATION,
        SCORES_SAME_FORWARD,
        SCORES_OTHER_BATCH,
        PROBABILITIES,
        BF16_LOGITS,
        SCORES_OVER_TEMPERATURE,
        EMBEDDINGS_VS_SENTENCE_TRANSFORMERS,
        LOSS_VS_REFERENCE,
        LOSS_SAME_FORWARD,
        GRADS_SAME_FORWARD,
        GRADS_HEAD_VS_FULL_LOGITS,
        GRADS_VS_REFERENCE,
        PARAMS_AFTER_ONE_STEP,
        PARAMS_AFTER_STEPS,
    )
}


# ---------------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------------
def _float64(x) -> torch.Tensor:
    """A float64 CPU tensor from a tensor, a numpy array, a python number, or a (nested) list of them."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    if isinstance(x, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in x):
        return torch.stack([_float64(v) for v in x])
    return torch.from_numpy(np.array(x, dtype=np.float64))


def _where(index) -> str:
    return str(tuple(index))


def assert_close(actual, expected, tol: Tolerance | None = None, *, atol=None, rtol=None, what="value"):
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise, or fail with what differed, how much
    and where (the worst elements first).

    ``tol`` is an entry of the table above (the model-level tests); the op-level tests pass ``atol`` (a number or
    a tensor that broadcasts) and ``rtol`` instead. ``actual`` and ``expected`` may be tensors, numpy arrays,
    python numbers or (nested) lists of either; their shapes must match, and so must their NaN and infinity
    positions (NaN equals NaN there, as in numpy's assert_allclose).
    """
    if tol is not None:
        if not isinstance(tol, Tolerance):
            raise TypeError(
                f"assert_close: tol must be an entry of the table (a Tolerance), got {tol!r}; "
                "pass atol=/rtol= by keyword"
            )
        if atol is not None or rtol is not None:
            raise TypeError("assert_close: give a table entry (tol) or atol/rtol, not both")
        atol, rtol, rule = tol.atol, tol.rtol, str(tol)
    else:
        if atol is None:
            raise TypeError("assert_close: give a table entry (tol) or atol")
        rtol = 0.0 if rtol is None else rtol
        if isinstance(atol, torch.Tensor) and atol.numel() > 1:
            rule = f"atol=elementwise (from {atol.min().item():.3g} to {atol.max().item():.3g}), rtol={rtol:g}"
        else:
            rule = f"atol={float(atol):.3g}, rtol={rtol:g}"
    a, e = _float64(actual), _float64(expected)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    finite = torch.isfinite(a) & torch.isfinite(e)
    same_special = (a == e) | (torch.isnan(a) & torch.isnan(e))
    special_off = ~finite & ~same_special
    if special_off.any():
        lines = [
            f"  at {_where(i)}: got {a[tuple(i)].item():.8g}, want {e[tuple(i)].item():.8g}"
            for i in special_off.nonzero()[:5].tolist()
        ]
        raise AssertionError(
            f"{what}: NaN/inf pattern differs at {int(special_off.sum())} of {a.numel()} elements\n" + "\n".join(lines)
        )
    atol64 = _float64(atol) if isinstance(atol, torch.Tensor) else torch.tensor(float(atol), dtype=torch.float64)
    err = torch.where(finite, (a - e).abs(), 0.0)
    allowed = (atol64 + rtol * e.abs()).expand_as(err)
    bad = finite & (err > allowed)
    if bad.any():

        def at(flat):
            return tuple(int(i) for i in np.unravel_index(flat, a.shape)) if a.dim() else ()

        ratio = torch.where(bad, err / allowed, 0.0)
        worst = ratio.flatten().argsort(descending=True)[: min(5, int(bad.sum()))]
        rel = torch.where(finite & (e != 0), err / e.abs(), 0.0)
        lines = []
        for i in (at(flat) for flat in worst.tolist()):
            lines.append(
                f"  at {_where(i)}: got {a[i].item():.8g}, want {e[i].item():.8g}, "
                f"|err| {err[i].item():.3g} > allowed {allowed[i].item():.3g}"
            )
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off (worst first below); max |err| "
            f"{err.max().item():.3g} at {_where(at(int(err.flatten().argmax())))}, max |err|/|want| "
            f"{rel.max().item():.3g}; allowed by {rule}\n" + "\n".join(lines)
        )
