"""Input checks shared by the Triton and reference paths.

Every error names the argument at fault and says how to fix it. Shape, dtype and device checks are free
(metadata only). Checks on values that live on the device (a row with no real token, a position outside
its sequence, an inconsistent ``cu_seqlens``) are computed by the op itself as status codes in its
resolved rows and read back once per call; ``FASTRANK_CHECKS=0`` skips that read.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastrank.reference import ROW_BAD_CU_SEQLENS, ROW_EMPTY, ROW_OUTSIDE, ScoreHeadConfig

MAX_SCORE_TOKENS = 16
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _require_tensor(name: str, value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor {what}, got {type(value).__name__}")
    return value


def _same_device(name: str, tensor: torch.Tensor, ref: torch.Tensor, ref_name: str = "hidden") -> None:
    if tensor.device != ref.device:
        raise ValueError(
            f"{name}: is on {tensor.device} but {ref_name} is on {ref.device}; move it with .to({str(ref.device)!r})"
        )


def _integer_tensor(name: str, value, device: torch.device, shape_desc: str) -> torch.Tensor:
    if isinstance(value, (list, tuple)):
        value = torch.tensor(value, dtype=torch.long, device=device)
    _require_tensor(name, value, shape_desc)
    if value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{name}: must hold integers, got dtype {_dtype_name(value.dtype)}")
    return value


def normalize_token_ids(token_ids, vocab: int) -> tuple:
    """Token ids as a tuple of Python ints, checked against the vocabulary size."""
    if isinstance(token_ids, int) and not isinstance(token_ids, bool):
        token_ids = (token_ids,)
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise ValueError(f"token_ids: must hold integers, got dtype {_dtype_name(token_ids.dtype)}")
        if token_ids.dim() > 1:
            raise ValueError(f"token_ids: must be 1-D [K], got shape {tuple(token_ids.shape)}")
        token_ids = token_ids.reshape(-1).tolist()
    if not isinstance(token_ids, Sequence) or isinstance(token_ids, str):
        raise ValueError(f"token_ids: expected an int, a list of ints or a 1-D integer tensor, got {type(token_ids).__name__}")
    ids = []
    for i, t in enumerate(token_ids):
        if isinstance(t, bool) or not isinstance(t, int):
            if hasattr(t, "__index__") and not isinstance(t, bool):
                t = int(t.__index__())
            else:
                raise ValueError(f"token_ids[{i}]: expected an int, got {type(t).__name__}")
        if not 0 <= t < vocab:
            raise ValueError(
                f"token_ids[{i}]={t} is out of range for a weight with V={vocab} rows; "
                "look the id up with the model's own tokenizer"
            )
        ids.append(t)
    if not ids:
        raise ValueError("token_ids: is empty (K=0); give at least one vocabulary id to score")
    if len(ids) > MAX_SCORE_TOKENS:
        raise ValueError(
            f"token_ids: {len(ids)} ids given, score_head takes at most {MAX_SCORE_TOKENS}; "
            "for more rows the full LM head is the right tool"
        )
    return tuple(ids)


def normalize_combine(combine, k: int) -> Optional[tuple]:
    """A ``[C, K]`` combination matrix as a tuple of tuples of floats (a 1-D ``[K]`` is one row)."""
    if combine is None:
        return None
    mix = combine.detach().cpu().double() if isinstance(combine, torch.Tensor) else torch.tensor(combine, dtype=torch.float64)
    if mix.dim() == 1:
        mix = mix[None, :]
    if mix.dim() != 2 or mix.shape[1] != k:
        raise ValueError(
            f"combine: must be [C, K] with K={k} (one column per token id), got shape {tuple(mix.shape)}; "
            "e.g. [[1, -1]] for yes minus no"
        )
    if not 1 <= mix.shape[0] <= MAX_SCORE_TOKENS:
        raise ValueError(f"combine: must have 1 to {MAX_SCORE_TOKENS} rows, got {mix.shape[0]}")
    if not torch.isfinite(mix).all():
        raise ValueError("combine: holds a NaN or infinite coefficient")
    return tuple(tuple(float(v) for v in row) for row in mix.tolist())


def check_score_head_inputs(
    hidden, weight, token_ids, attention_mask, positions, cu_seqlens, bias, combine, return_lse
):
    """Validate and normalise score_head's arguments.

    Returns ``(config, hidden, attention_mask, positions, cu_seqlens)`` where hidden is ``[N, T, H]`` or,
    for packed input, ``[M, H]`` (a ``[1, M, H]`` batch is viewed as ``[M, H]``).
    """
    _require_tensor("hidden", hidden, "[N, T, H] or packed [M, H]")
    _require_tensor("weight", weight, "[V, H]")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden: must be float16, bfloat16 or float32, got {_dtype_name(hidden.dtype)}")
    if weight.dim() != 2:
        raise ValueError(f"weight: must be the LM head's [V, H] matrix, got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight: dtype {_dtype_name(weight.dtype)} differs from hidden's {_dtype_name(hidden.dtype)}; "
            f"cast one of them, e.g. hidden.to({_dtype_name(weight.dtype)!r}) or run the model in one dtype"
        )
    _same_device("weight", weight, hidden)
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse: must be True or False, got {return_lse!r}")

    packed = cu_seqlens is not None
    if packed:
        if hidden.dim() == 3 and hidden.shape[0] == 1:
            hidden = hidden[0]
        if hidden.dim() != 2:
            raise ValueError(
                f"hidden: packed input (cu_seqlens given) must be [M, H] or [1, M, H], got shape {tuple(hidden.shape)}"
            )
        if attention_mask is not None:
            raise ValueError(
                "attention_mask: cannot be combined with cu_seqlens; packed sequences are delimited by cu_seqlens alone"
            )
        cu_seqlens = _integer_tensor("cu_seqlens", cu_seqlens, hidden.device, "[N + 1]")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(
                f"cu_seqlens: must be 1-D [N + 1] with N >= 1 (offsets 0, len0, len0+len1, ..., M), "
                f"got shape {tuple(cu_seqlens.shape)}"
            )
        _same_device("cu_seqlens", cu_seqlens, hidden)
        n = cu_seqlens.shape[0] - 1
    else:
        if hidden.dim() == 2:
            raise ValueError(
                "hidden: a 2-D tensor needs cu_seqlens (packed [M, H] input); padded input is [N, T, H]"
            )
        if hidden.dim() != 3:
            raise ValueError(f"hidden: must be [N, T, H] (or packed [M, H] with cu_seqlens), got shape {tuple(hidden.shape)}")
        n, t = hidden.shape[0], hidden.shape[1]
        if t == 0:
            raise ValueError("hidden: has T=0 positions; every sequence needs at least one token")
        if attention_mask is not None:
            _require_tensor("attention_mask", attention_mask, "[N, T]")
            if tuple(attention_mask.shape) != (n, t):
                raise ValueError(
                    f"attention_mask: shape {tuple(attention_mask.shape)} does not match hidden's [N, T] = {(n, t)}"
                )
            _same_device("attention_mask", attention_mask, hidden)

    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight: has H={weight.shape[1]} columns but hidden has H={hidden.shape[-1]}; "
            "pass the LM head of the model that produced hidden"
        )

    if positions is not None:
        positions = _integer_tensor("positions", positions, hidden.device, "[N]")
        if positions.dim() != 1 or positions.shape[0] != n:
            raise ValueError(f"positions: must be 1-D [N] with N={n}, got shape {tuple(positions.shape)}")
        _same_device("positions", positions, hidden)

    if bias is not None:
        _require_tensor("bias", bias, "[V]")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: must be [V] with V={weight.shape[0]}, got shape {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias: dtype {_dtype_name(bias.dtype)} differs from weight's {_dtype_name(weight.dtype)}")
        _same_device("bias", bias, hidden)

    ids = normalize_token_ids(token_ids, weight.shape[0])
    config = ScoreHeadConfig(
        token_ids=ids, combine=normalize_combine(combine, len(ids)), return_lse=return_lse, packed=packed
    )
    return config, hidden, attention_mask, positions, cu_seqlens


def raise_on_invalid_rows(rows: torch.Tensor, config: ScoreHeadConfig, attention_mask, positions, cu_seqlens) -> None:
    """Read the op's status codes back (one small device-to-host copy) and raise on the first problem."""
    if rows.numel() == 0:
        return
    codes = rows.cpu()  # one device-to-host copy; cheaper on the host than a min() kernel and a read
    if int(codes.min()) >= 0:
        return
    bad_cu = (codes == ROW_BAD_CU_SEQLENS).nonzero().flatten().tolist()
    if bad_cu:
        cu = cu_seqlens.cpu().tolist()
        raise ValueError(
            f"cu_seqlens: {cu[:12]}{'...' if len(cu) > 12 else ''} is not a partition of the packed rows "
            f"(it must start at 0, never decrease and end at M); sequences {bad_cu[:8]} fall outside"
        )
    empty = (codes == ROW_EMPTY).nonzero().flatten().tolist()
    if empty:
        arg = "cu_seqlens" if config.packed else "attention_mask"
        raise ValueError(
            f"{arg}: sequence(s) {empty[:8]}{'...' if len(empty) > 8 else ''} have no real token; "
            "every row needs at least one token to score (drop empty rows before the call)"
        )
    outside = (codes == ROW_OUTSIDE).nonzero().flatten().tolist()
    if outside:
        i = outside[0]
        where = "its sequence" if config.packed else (
            "the row's real tokens (attention_mask is 0 there or it is past T)" if attention_mask is not None else "[0, T)"
        )
        raise ValueError(
            f"positions: positions[{i}]={int(positions[i])} is outside {where}; "
            f"{len(outside)} sequence(s) affected, first {outside[:8]}"
        )


# ------------------------------------------------------------------------------------------------
# pool
# ------------------------------------------------------------------------------------------------
def check_pool_inputs(hidden, attention_mask, mode, normalize, token_ids, input_ids, last_k, cu_seqlens):
    """Validate and normalise pool's arguments. Returns ``(config, hidden, attention_mask, input_ids,
    cu_seqlens)`` with packed ``[1, M, H]`` viewed as ``[M, H]`` and packed input_ids as ``[M]``."""
    from fastrank.reference import POOL_MODES, PoolConfig

    _require_tensor("hidden", hidden, "[N, T, H] or packed [M, H]")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden: must be float16, bfloat16 or float32, got {_dtype_name(hidden.dtype)}")
    if mode not in POOL_MODES:
        raise ValueError(f"mode: {mode!r} is not a pooling mode; choose from {', '.join(POOL_MODES)}")
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize: must be True or False, got {normalize!r}")
    if mode != "special" and (token_ids is not None or last_k is not None):
        raise ValueError(f"token_ids/last_k: only mode='special' uses them (mode is {mode!r})")
    ids = ()
    if mode == "special":
        if (token_ids is None) == (last_k is None):
            raise ValueError(
                "token_ids: mode='special' pools either the positions of token_ids (with input_ids) or the last_k "
                "real tokens; give exactly one of token_ids and last_k"
            )
        if last_k is not None and (isinstance(last_k, bool) or not isinstance(last_k, int) or last_k < 1):
            raise ValueError(f"last_k: must be a positive int, got {last_k!r}")
        if token_ids is not None:
            ids = normalize_token_ids(token_ids, vocab=1 << 62)
            if input_ids is None:
                raise ValueError("input_ids: mode='special' with token_ids needs the input_ids to find them in")

    packed = cu_seqlens is not None
    if packed:
        if hidden.dim() == 3 and hidden.shape[0] == 1:
            hidden = hidden[0]
        if hidden.dim() != 2:
            raise ValueError(f"hidden: packed input (cu_seqlens given) must be [M, H] or [1, M, H], got shape {tuple(hidden.shape)}")
        if attention_mask is not None:
            raise ValueError("attention_mask: cannot be combined with cu_seqlens; packed sequences are delimited by cu_seqlens")
        cu_seqlens = _integer_tensor("cu_seqlens", cu_seqlens, hidden.device, "[N + 1]")
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens: must be 1-D [N + 1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
        _same_device("cu_seqlens", cu_seqlens, hidden)
        shape_ids = (hidden.shape[0],)
    else:
        if hidden.dim() != 3:
            raise ValueError(
                f"hidden: must be [N, T, H] (or packed [M, H] with cu_seqlens), got shape {tuple(hidden.shape)}"
            )
        if attention_mask is not None:
            _require_tensor("attention_mask", attention_mask, "[N, T]")
            if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
                raise ValueError(
                    f"attention_mask: shape {tuple(attention_mask.shape)} does not match hidden's [N, T] = {tuple(hidden.shape[:2])}"
                )
            _same_device("attention_mask", attention_mask, hidden)
        shape_ids = tuple(hidden.shape[:2])
    if input_ids is not None:
        input_ids = _integer_tensor("input_ids", input_ids, hidden.device, "[N, T] or packed [M]")
        if packed and input_ids.dim() == 2 and input_ids.shape[0] == 1:
            input_ids = input_ids[0]
        if tuple(input_ids.shape) != shape_ids:
            raise ValueError(f"input_ids: shape {tuple(input_ids.shape)} does not match hidden's {shape_ids}")
        _same_device("input_ids", input_ids, hidden)
    config = PoolConfig(mode=mode, normalize=normalize, token_ids=ids, last_k=last_k)
    return config, hidden, attention_mask, input_ids, cu_seqlens


def raise_on_pool_status(status: torch.Tensor, config, cu_seqlens) -> None:
    """Read pool's per-sequence status back (one small copy) and raise on the first problem."""
    if status.numel() == 0:
        return
    codes = status.cpu()
    if int(codes.min()) >= 0:
        return

    def rows(code):
        found = (codes == code).nonzero().flatten().tolist()
        return found, f"{found[:8]}{'...' if len(found) > 8 else ''}"

    bad_cu, text = rows(-4)
    if bad_cu:
        raise ValueError(f"cu_seqlens: is not a partition of the packed rows (it must start at 0, never decrease "
                         f"and end at M); sequences {text} fall outside")
    empty, text = rows(-1)
    if empty:
        arg = "cu_seqlens" if cu_seqlens is not None else "attention_mask"
        raise ValueError(f"{arg}: sequence(s) {text} have no real token; every row needs at least one to pool")
    absent, text = rows(-2)
    if absent:
        raise ValueError(
            f"token_ids: none of {list(config.token_ids)} occurs among the real tokens of sequence(s) {text}; "
            "add the special tokens to every input (and check truncation did not cut them)"
        )
    short, text = rows(-3)
    if short:
        raise ValueError(f"last_k: sequence(s) {text} have fewer than last_k={config.last_k} real tokens to pool")


# ------------------------------------------------------------------------------------------------
# contrastive loss
# ------------------------------------------------------------------------------------------------
def check_contrastive_inputs(q, p, temperature, group_size, in_batch, targets, teacher_scores, return_lse):
    """Validate contrastive_loss's arguments. Returns ``(config, targets int64 [B], teacher fp32 probs or None)``."""
    from fastrank.reference import ContrastiveConfig

    _require_tensor("q", q, "[B, D]")
    _require_tensor("p", p, "[P, D]")
    for name, t in (("q", q), ("p", p)):
        if t.dim() != 2:
            raise ValueError(f"{name}: must be 2-D ({'[B, D]' if name == 'q' else '[P, D]'}), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: must be float16, bfloat16 or float32, got {_dtype_name(t.dtype)}")
    if p.dtype != q.dtype:
        raise ValueError(f"p: dtype {_dtype_name(p.dtype)} differs from q's {_dtype_name(q.dtype)}; cast one of them")
    _same_device("p", p, q, "q")
    b, d = q.shape
    n = p.shape[0]
    if p.shape[1] != d:
        raise ValueError(f"p: has D={p.shape[1]} but q has D={d}; both must come from the same encoder")
    if b == 0:
        raise ValueError("q: the batch is empty (B=0)")
    if n == 0:
        raise ValueError("p: there are no passages (P=0)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature: must be a positive number, got {temperature!r}")
    if not isinstance(in_batch, bool) or not isinstance(return_lse, bool):
        raise ValueError("in_batch / return_lse: must be True or False")
    if group_size is None:
        if n % b:
            raise ValueError(
                f"group_size: P={n} passages are not a multiple of B={b} queries; pass group_size (and targets)"
            )
        group_size = n // b
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: must be a positive int, got {group_size!r}")
    if n % group_size:
        raise ValueError(f"p: P={n} passages are not divisible by group_size={group_size}")
    if targets is None:
        if b * group_size > n:
            raise ValueError(
                f"targets: the default targets i*G need P >= B*G = {b * group_size}, but P={n}; pass targets"
            )
        targets = torch.arange(b, device=q.device, dtype=torch.long) * group_size
    else:
        targets = _integer_tensor("targets", targets, q.device, "[B]")
        if targets.dim() != 1 or targets.shape[0] != b:
            raise ValueError(f"targets: must be 1-D [B] with B={b}, got shape {tuple(targets.shape)}")
        _same_device("targets", targets, q, "q")
        targets = targets.long().contiguous()
        lo, hi = (int(v) for v in torch.stack([targets.min(), targets.max()]).tolist())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise ValueError(f"targets: {bad} is out of range for P={n} passages (each target indexes a row of p)")
    teacher = None
    if teacher_scores is not None:
        if isinstance(teacher_scores, (list, tuple)):
            teacher_scores = torch.tensor(teacher_scores, dtype=torch.float32, device=q.device)
        _require_tensor("teacher_scores", teacher_scores, "[B, G]")
        if teacher_scores.numel() == b * group_size and teacher_scores.dim() == 1:
            teacher_scores = teacher_scores.view(b, group_size)
        if tuple(teacher_scores.shape) != (b, group_size):
            raise ValueError(
                f"teacher_scores: must be [B, G] = {(b, group_size)} (one score per passage of each query's group), "
                f"got shape {tuple(teacher_scores.shape)}"
            )
        _same_device("teacher_scores", teacher_scores, q, "q")
        # FlagEmbedding's distillation target: softmax of the raw teacher scores, no temperature.
        teacher = torch.softmax(teacher_scores.detach().float(), dim=-1).contiguous()
    config = ContrastiveConfig(temperature=float(temperature), group_size=group_size, in_batch=in_batch,
                               return_lse=return_lse)
    return config, targets, teacher
