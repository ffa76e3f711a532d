"""Ray Data integration: fastrank models as ``Dataset.map_batches`` workers, and resumable jobs over files.

``EmbedBatch`` and ``ScoreBatch`` are callable classes for ``ray.data.Dataset.map_batches``: Ray builds one per
actor from ``fn_constructor_kwargs``, so each actor loads the model once (in ``__init__``), then calls it on every
batch. ``encode_files`` and ``rerank_files`` run a whole job over JSONL, Parquet or text files on a Ray cluster (a
local one when none is running) and write numbered Parquet shards that a rerun keeps when complete;
``fastrank encode --ray`` and ``fastrank rerank --ray`` call them. ``encode_texts`` encodes a list in memory.

Needs Ray Data: ``pip install "fastrank-llm[ray]"``. The two classes import nothing from Ray (they run in a plain
process too); the job functions import it when called. On a cluster, every node needs fastrank installed (or
``runtime_env={"pip": [...]}`` in ``ray.init``) and must see the model, the input files and the output folder at the
same paths (a shared file system).

A job's shards. The inputs are cut into fixed row ranges of ``shard_rows`` rows, file by file in input order:
shard ``i`` of ``n`` is always the same rows, so a rerun knows which exist. Each shard is written as
``.shard-0000i-of-0000n.parquet.<pid>.tmp`` and renamed to ``shard-0000i-of-0000n.parquet`` once written and
flushed to disk, so a killed job leaves no half shard under a final name; a rerun deletes leftover temporary files
and keeps a shard only if its Parquet footer reads back with this job's id and row counts (its metadata key
``fastrank``). ``_fastrank_job.json`` in the folder records the inputs (path, size, modification time) and the
options that change results; a rerun with other inputs or options is refused rather than mixing two jobs'
shards. Files starting with ``.`` or ``_`` are skipped by Parquet readers, so ``pandas.read_parquet(folder)``
reads the shards only, in input order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

from fastrank.inference import DEFAULT_BATCH_SIZE, DEFAULT_MAX_TOKENS

RAY_MISSING = 'fastrank.integrations.ray needs Ray Data: pip install "fastrank-llm[ray]"'
DEFAULT_SHARD_ROWS = 50_000
MANIFEST = "_fastrank_job.json"
# Input files by suffix under format="auto" (a folder takes these files only).
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet", ".txt": "text"}
_META_KEY = b"fastrank"
_MANIFEST_VERSION = 1


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError(f"{RAY_MISSING} ({e})") from None
    return ray


# ---------------------------------------------------------------------------------------------------------------
# Batches: Ray's three formats
# ---------------------------------------------------------------------------------------------------------------
def _batch_format(batch) -> str:
    pa = sys.modules.get("pyarrow")
    pd = sys.modules.get("pandas")
    if pa is not None and isinstance(batch, pa.Table):
        return "pyarrow"
    if pd is not None and isinstance(batch, pd.DataFrame):
        return "pandas"
    if isinstance(batch, dict):
        return "numpy"
    raise ValueError(
        "batch: expected a dict of numpy arrays, a pandas DataFrame or a pyarrow Table (map_batches' batch_format "
        f"'numpy', 'pandas' or 'pyarrow'), got {type(batch).__name__}"
    )


def _column_names(batch, fmt: str) -> List[str]:
    return list(batch.column_names if fmt == "pyarrow" else batch.columns if fmt == "pandas" else batch)


def _num_rows(batch, fmt: str) -> int:
    if fmt == "pyarrow":
        return batch.num_rows
    if fmt == "pandas":
        return len(batch)
    return len(next(iter(batch.values()))) if batch else 0


def _strings(batch, fmt: str, column: str, owner: str, option: str, output: str):
    """(the column's values as str, a boolean mask of its nulls); a missing column or a non-string is an error."""
    names = _column_names(batch, fmt)
    if column not in names:
        raise ValueError(
            f"{owner}: the batch has no column {column!r} (its columns: {', '.join(map(repr, names)) or 'none'}); "
            f"rename the column, or pass {option}=... in fn_constructor_kwargs"
        )
    if fmt == "pyarrow":
        values = batch.column(column).to_pylist()
    elif fmt == "pandas":
        values = batch[column].tolist()
    else:
        values = list(batch[column])
    null = np.zeros(len(values), dtype=bool)
    texts = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            null[i] = True
            texts.append("")
        elif isinstance(v, str):
            texts.append(str(v))  # numpy's str_ is a str subclass; tokenizers get the plain type
        else:
            raise ValueError(
                f"{owner}: {column}[{i}] must be a string (or null, which gives a null {output}), "
                f"got {type(v).__name__}"
            )
    return texts, null


def _with_column(batch, fmt: str, name: str, values: np.ndarray, null: np.ndarray):
    """``batch`` with column ``name`` set to ``values`` (``[N]`` or ``[N, H]`` float32): null rows are Arrow nulls
    in a pyarrow Table and NaN elsewhere (numpy and pandas have no null vector)."""
    if fmt == "pyarrow":
        import pyarrow as pa

        if values.ndim == 2:
            flat = pa.array(values.reshape(-1), type=pa.float32())
            column = pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=pa.array(null, type=pa.bool_()))
        else:
            column = pa.array(values, type=pa.float32(), mask=null)  # pyarrow takes a numpy mask here
        if name in batch.column_names:
            return batch.set_column(batch.column_names.index(name), name, column)
        return batch.append_column(name, column)
    values = values.copy()
    values[null] = np.nan
    if fmt == "pandas":
        return batch.assign(**{name: list(values) if values.ndim == 2 else values})
    out = dict(batch)
    out[name] = values
    return out


class EmbedBatch:
    """Embeds a batch's ``text`` column into an added ``embedding`` column, with one ``fastrank.Embedder``: a
    callable class for Ray Data's ``Dataset.map_batches`` (one model per actor).

    Ray builds one instance per actor with ``fn_constructor_kwargs``, so the model loads once per actor, in
    ``__init__``; each call encodes one batch (``Embedder.encode_corpus``, or ``encode_queries`` with
    ``queries=True``) and returns it with the embeddings added, one row per row, in order. Every batch format of
    ``map_batches`` works: ``batch_format="numpy"`` (Ray's default; ``embedding`` is a ``[N, H]`` float32 array),
    ``"pandas"`` (a column of ``[H]`` float32 arrays) or ``"pyarrow"`` (a ``fixed_size_list<float32>[H]`` column).
    A null text (None or NaN) gives a null embedding (NaN in numpy and pandas); any other non-string is an error.
    Instances work outside Ray too: ``EmbedBatch(model)(batch)``.

    Args:
        model: a local model folder or hub name (``Embedder.from_pretrained``); on a cluster, a path every node has.
        device: where each actor runs: None picks CUDA when the actor sees a GPU (give ``map_batches`` the
            ``num_gpus=1``), else the CPU. Under Ray an actor's GPU is always ``"cuda"`` (Ray sets
            ``CUDA_VISIBLE_DEVICES``).
        kind: the embedder kind, ``"auto"`` (the folder's), ``"bi"`` or ``"llara"``.
        queries: encode as queries (the query instruction, LLARA's query suffix); passages by default.
        batch_size, max_tokens: texts and tokens per forward pass, at most (``Embedder.encode``'s).
        max_length: tokens per text (default: the folder's).
        dtype: ``"auto"`` (the checkpoint's), ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        text_column, output_column: the column read, and the column added (replaced if present).
        **embedder_kwargs: passed to ``Embedder.from_pretrained`` (``pooling``, ``normalize``,
            ``query_instruction``, ``passage_instruction``, ``attn_implementation``, ``packed``).

    Example::

        import ray
        from fastrank.integrations.ray import EmbedBatch

        ds = ray.data.read_parquet("corpus/")  # a "text" column
        ds = ds.map_batches(
            EmbedBatch,
            fn_constructor_kwargs={"model": "BAAI/bge-small-en-v1.5"},
            compute=ray.data.ActorPoolStrategy(size=4),  # 4 actors, one model each
            num_gpus=1,  # one GPU per actor
            batch_size=1024,
        )
        ds.write_parquet("embeddings/")
    """

    def __init__(
        self,
        model: str,
        *,
        device=None,
        kind: str = "auto",
        queries: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_length: Optional[int] = None,
        dtype="auto",
        text_column: str = "text",
        output_column: str = "embedding",
        **embedder_kwargs,
    ):
        from fastrank.inference import Embedder

        _check_sizes(batch_size, max_tokens, max_length)

        self.embedder = Embedder.from_pretrained(
            model, kind=kind, device=device, max_length=max_length, dtype=dtype, **embedder_kwargs
        )
        self.queries = bool(queries)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.text_column = text_column
        self.output_column = output_column

    def __call__(self, batch):
        fmt = _batch_format(batch)
        texts, null = _strings(batch, fmt, self.text_column, "EmbedBatch", "text_column", self.output_column)
        out = np.full((len(texts), self.embedder.dim), np.nan, dtype=np.float32)
        good = np.flatnonzero(~null)
        if len(good):
            encode = self.embedder.encode_queries if self.queries else self.embedder.encode_corpus
            out[good] = encode(
                [texts[i] for i in good], batch_size=self.batch_size, max_tokens=self.max_tokens, show_progress=False
            )
        return _with_column(batch, fmt, self.output_column, out, null)


class ScoreBatch:
    """Scores a batch's ``query`` and ``document`` columns into an added ``score`` column, with one
    ``fastrank.Reranker``: a callable class for Ray Data's ``Dataset.map_batches`` (one model per actor).

    Ray builds one instance per actor with ``fn_constructor_kwargs``, so the model loads once per actor, in
    ``__init__``; each call scores one batch's pairs (``Reranker.score``) and returns the batch with a float32
    ``score`` per row, in order. Every batch format of ``map_batches`` works (``"numpy"``, Ray's default,
    ``"pandas"``, ``"pyarrow"``). A row whose query or document is null gets a null score (NaN in numpy and
    pandas); any other non-string is an error. Instances work outside Ray too: ``ScoreBatch(model, preset)(batch)``.

    Args:
        model: a local model folder or hub name (``Reranker.from_pretrained``); on a cluster, a path every node has.
        preset: a name from ``fastrank.presets()`` or a ``fastrank.Preset``; None reads it from the folder (a
            fastrank-trained model) or recognises a public reranker by name.
        device: where each actor runs: None picks CUDA when the actor sees a GPU (``map_batches(num_gpus=1)``),
            else the CPU; under Ray an actor's GPU is always ``"cuda"``.
        normalize: scores in [0, 1] (the preset's mapping, a sigmoid for logit conventions).
        batch_size, max_tokens: pairs and tokens per forward pass, at most (``Reranker.score``'s).
        max_length: tokens per pair (default: the preset's).
        dtype: ``"auto"`` (the checkpoint's), ``"bfloat16"``, ``"float16"`` or ``"float32"``.
        query_column, document_column, output_column: the columns read, and the column added (replaced if present).
        **reranker_kwargs: passed to ``Reranker.from_pretrained`` (``attn_implementation``, ``packed``,
            ``share_prefix``).

    Example::

        import ray
        from fastrank.integrations.ray import ScoreBatch

        ds = ray.data.read_parquet("pairs/")  # "query" and "document" columns
        ds = ds.map_batches(
            ScoreBatch,
            fn_constructor_kwargs={"model": "Qwen/Qwen3-Reranker-0.6B", "normalize": True},
            compute=ray.data.ActorPoolStrategy(size=2),
            num_gpus=1,
            batch_size=512,
        )
        ds.write_parquet("scores/")
    """

    def __init__(
        self,
        model: str,
        preset=None,
        *,
        device=None,
        normalize: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_length: Optional[int] = None,
        dtype="auto",
        query_column: str = "query",
        document_column: str = "document",
        output_column: str = "score",
        **reranker_kwargs,
    ):
        from fastrank.inference import Reranker

        _check_sizes(batch_size, max_tokens, max_length)

        self.reranker = Reranker.from_pretrained(model, preset, device=device, dtype=dtype, **reranker_kwargs)
        self.normalize = bool(normalize)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.max_length = max_length
        self.query_column = query_column
        self.document_column = document_column
        self.output_column = output_column

    def __call__(self, batch):
        fmt = _batch_format(batch)
        out_name = self.output_column
        queries, null_q = _strings(batch, fmt, self.query_column, "ScoreBatch", "query_column", out_name)
        documents, null_d = _strings(batch, fmt, self.document_column, "ScoreBatch", "document_column", out_name)
        null = null_q | null_d
        scores = np.full(len(queries), np.nan, dtype=np.float32)
        good = np.flatnonzero(~null)
        if len(good):
            scores[good] = self.reranker.score(
                [(queries[i], documents[i]) for i in good],
                batch_size=self.batch_size,
                max_length=self.max_length,
                max_tokens=self.max_tokens,
                normalize=self.normalize,
                show_progress=False,
            )
        return _with_column(batch, fmt, out_name, scores, null)


# The jobs' model steps return the batch without its input text: Ray would run a separate column-dropping step
# as tasks of 1 CPU each, which wait for CPUs the actors hold until the last shard is done (on a cluster whose
# CPUs the actors fill), so nothing would reach the driver to be written before the end. progress=False turns
# off the actor's "Loading weights" bar, as --no-progress does in the driver.
class _EmbedRows(EmbedBatch):
    def __init__(self, *args, progress: bool = True, **kwargs):
        _loading_bars(progress)
        super().__init__(*args, **kwargs)

    def __call__(self, batch):
        return super().__call__(batch).drop_columns([self.text_column])


class _ScoreRows(ScoreBatch):
    def __init__(self, *args, progress: bool = True, **kwargs):
        _loading_bars(progress)
        super().__init__(*args, **kwargs)

    def __call__(self, batch):
        return super().__call__(batch).drop_columns([self.query_column, self.document_column])


def _loading_bars(on: bool) -> None:
    if not on:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------
# Ray: start-up, actors, quiet mode
# ---------------------------------------------------------------------------------------------------------------
def _start_ray(address: Optional[str]):
    """(ray, seconds spent starting or joining it): the running Ray if this process has one, else ``ray.init``
    (``address`` None joins ``RAY_ADDRESS`` when set, else starts a local Ray that stays up for later calls)."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray, 0.0
    start = time.perf_counter()
    ray.init(address=address)
    return ray, time.perf_counter() - start


def _actor_device(device) -> Optional[str]:
    """``device`` as a string for every actor (None or "auto": decided from the cluster), checked."""
    if device is None or str(device) == "auto":
        return None
    device = str(device)
    if device.startswith("cuda:"):
        raise ValueError(
            f"device: under Ray each actor sees the GPU it was given as 'cuda' (Ray sets CUDA_VISIBLE_DEVICES); "
            f"give device='cuda', not {device!r}"
        )
    return device


def _actor_resources(ray, device, num_actors, num_cpus, num_gpus):
    """(device for every actor, num_actors, {"num_cpus", "num_gpus"} per actor), checked."""
    device = _actor_device(device)
    gpus = ray.cluster_resources().get("GPU", 0)
    if device is None:
        device = "cuda" if (num_gpus or gpus) else "cpu"
    if num_gpus is None:
        num_gpus = 1 if device == "cuda" else 0
    if device == "cuda" and not num_gpus:
        raise ValueError(
            "num_gpus: device='cuda' needs a GPU per actor; give num_gpus > 0 (0.5 puts two actors on one GPU)"
        )
    if num_actors is None:
        num_actors = max(1, int(gpus // num_gpus)) if device == "cuda" else 1
    if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
        raise ValueError(f"num_actors: expected a positive integer, got {num_actors!r}")
    num_cpus = 1 if num_cpus is None else num_cpus
    if not num_cpus > 0:
        raise ValueError(f"num_cpus: expected a positive number of CPUs per actor, got {num_cpus!r}")
    return device, num_actors, {"num_cpus": num_cpus, "num_gpus": num_gpus}


def _warn_if_unschedulable(ray, num_actors, resources, log):
    have = ray.cluster_resources()
    for key, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        want = num_actors * resources[key]
        if want > have.get(name, 0):
            log(
                f"warning: {num_actors} actors of {resources[key]:g} {name} need {want:g} {name}s, and the cluster has "
                f"{have.get(name, 0):g} now: Ray waits until it has them (an autoscaling cluster adds nodes; a fixed "
                "one never will: lower num_actors, or the CPUs/GPUs per actor)"
            )


@contextmanager
def _ray_data_job(ray, show_progress: bool):
    """Ray Data's settings for one job, restored afterwards: progress bars and INFO lines on or off, and the
    error an actor's call raises re-raised as itself, not as "UDF failed to process a data block"; a Ray error
    leaves as the error that caused it (see _raise_cause)."""
    context = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    # An older Ray without raise_original_map_exception: _raise_cause reads the error's text instead.
    names = [n for n in ("enable_progress_bars", "raise_original_map_exception") if hasattr(context, n)]
    saved, level = {n: getattr(context, n) for n in names}, logger.level
    if "raise_original_map_exception" in saved:
        context.raise_original_map_exception = True
    if not show_progress:
        context.enable_progress_bars = False
        logger.setLevel(logging.ERROR)
    try:
        yield
    except ray.exceptions.RayError as e:
        _raise_cause(e)
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
        logger.setLevel(level)


def _raise_cause(error) -> None:
    """Raise what made a Ray task or actor fail: the worker's own exception when Ray carries it (a ValueError of
    EmbedBatch's checks stays a ValueError), else, as for an actor whose model did not load, a RuntimeError
    with the last "SomeError: message" line of the worker's traceback (Ray keeps only its text)."""
    import ray.exceptions

    cause = getattr(error, "cause", None)
    if isinstance(cause, Exception) and not type(cause).__module__.startswith("ray."):
        raise cause from error
    pattern = re.compile(r"\s*[A-Za-z_][\w.]*(Error|Exception): ")
    lines = [line.strip() for line in str(error).splitlines() if pattern.match(line)]
    what = "a Ray actor could not start" if isinstance(error, ray.exceptions.RayActorError) else "a Ray worker failed"
    raise RuntimeError(f"{what}: {lines[-1] if lines else str(error).splitlines()[0]}") from error


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _embedding_matrix(column) -> np.ndarray:
    """A ``fixed_size_list<float32>[H]`` column (chunked or not) as a ``[N, H]`` array."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        size = chunk.type.list_size
        values = chunk.values.slice(chunk.offset * size, len(chunk) * size)
        parts.append(values.to_numpy(zero_copy_only=False).reshape(len(chunk), size))
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# encode_texts: a list in memory, for the benchmark and notebooks
# ---------------------------------------------------------------------------------------------------------------
def encode_texts(
    texts: Sequence[str],
    model: str,
    *,
    num_actors: Optional[int] = 2,
    device=None,
    num_cpus: Optional[float] = None,
    num_gpus: Optional[float] = None,
    rows_per_call: Optional[int] = None,
    address: Optional[str] = None,
    show_progress: bool = False,
    return_timings: bool = False,
    **embed_kwargs,
):
    """Embeddings of ``texts`` computed by ``num_actors`` Ray actors (``EmbedBatch``), as a ``[N, H]`` float32
    array in input order.

    The texts are cut into blocks of ``rows_per_call`` texts (default: a quarter of an even share per actor, at
    most 1024), one ``EmbedBatch`` call each, handed to whichever actor is free: several blocks per actor so that
    none waits on another's last block, each large enough to sort its texts by length. Each actor reserves
    ``num_cpus`` CPUs (default 1; a CPU actor's torch runs that many threads, as Ray sets ``OMP_NUM_THREADS``) and
    ``num_gpus`` GPUs (default 1 with ``device="cuda"``, which None picks when the cluster has GPUs). Ray is joined
    or started as ``encode_files`` does, and left running.

    With ``return_timings=True`` the result is ``(embeddings, timings)``, ``timings`` holding ``ray_init_s`` (starting
    or joining Ray; 0 when this process already had it), ``first_result_s`` (from submitting the job to the
    first block of embeddings back: actor start-up, model loads and one block's work), ``total_s`` (submitting to
    the last block, ``ray_init_s`` not included) and ``texts_per_s`` (``N / total_s``). Other keywords go to
    ``EmbedBatch`` (``kind``, ``queries``, ``batch_size``, ``max_tokens``, ``max_length``, ``dtype``, ``pooling``, ...).

    Example::

        from fastrank.integrations.ray import encode_texts

        vectors, timings = encode_texts(texts, "sentence-transformers/all-MiniLM-L6-v2", num_actors=2,
                                        device="cpu", return_timings=True)
    """
    import pyarrow as pa

    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise ValueError(f"texts: expected a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"texts[{i}]: expected a string, got {type(t).__name__}")
    if not texts:
        raise ValueError("texts: the list is empty; give at least one text")
    _check_sizes(*(embed_kwargs.get(k) for k in ("batch_size", "max_tokens", "max_length")))
    model = _model_source(model)
    _actor_device(device)
    ray, init_s = _start_ray(address)
    device, num_actors, resources = _actor_resources(ray, device, num_actors, num_cpus, num_gpus)
    if rows_per_call is None:
        rows_per_call = max(1, min(1024, math.ceil(len(texts) / (4 * num_actors))))
    if isinstance(rows_per_call, bool) or not isinstance(rows_per_call, int) or rows_per_call < 1:
        raise ValueError(f"rows_per_call: expected a positive integer, got {rows_per_call!r}")
    blocks = []
    for start in range(0, len(texts), rows_per_call):
        stop = min(start + rows_per_call, len(texts))
        blocks.append(pa.table({"row": pa.array(range(start, stop), pa.int64()), "text": list(texts[start:stop])}))
    num_actors = min(num_actors, len(blocks))  # an actor beyond one per block would load its model for nothing
    with _ray_data_job(ray, show_progress):
        ds = ray.data.from_arrow(blocks).map_batches(
            _EmbedRows,
            fn_constructor_kwargs={"model": model, "device": device, "progress": show_progress, **embed_kwargs},
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            batch_size=None,  # one call per block: the blocks are cut above
            batch_format="pyarrow",
            **resources,
        )
        out = None
        start = time.perf_counter()
        first = None
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if first is None:
                first = time.perf_counter() - start
            vectors = _embedding_matrix(table.column("embedding"))
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[table.column("row").to_numpy()] = vectors
        total = time.perf_counter() - start
    if not return_timings:
        return out
    return out, {"ray_init_s": init_s, "first_result_s": first, "total_s": total, "texts_per_s": len(texts) / total}


# ---------------------------------------------------------------------------------------------------------------
# Jobs over files: plan, resume, read, write
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class JobSummary:
    """What one ``encode_files`` / ``rerank_files`` run did.

    ``written`` and ``skipped`` are shard file names (``skipped``: complete from an earlier run, kept); ``rows`` the
    input rows this run read, ``outputs`` the rows it wrote (pairs for rerank), ``errors`` how many of those carry
    an ``error`` instead of a result. ``seconds`` is the whole run, ``ray_init_s`` the part spent starting or
    joining Ray and ``first_result_s`` the time from submitting the work to the first results back (actor
    start-up, model loads and a shard's work); ``rows_per_s`` is ``rows / seconds``."""

    output_dir: str
    shards: int
    written: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    rows: int = 0
    outputs: int = 0
    errors: int = 0
    seconds: float = 0.0
    ray_init_s: float = 0.0
    first_result_s: Optional[float] = None

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _check_sizes(batch_size, max_tokens, max_length) -> None:
    from fastrank.utils import positive_int

    positive_int("batch_size", batch_size, none_ok=True)
    positive_int("max_tokens", max_tokens, none_ok=True)
    positive_int("max_length", max_length, none_ok=True)


def _model_source(model) -> str:
    """A local folder as an absolute path (actors may run in another working directory), a hub name as given."""
    from fastrank.models.loading import check_model_source

    source = check_model_source(model, "model")
    return os.path.abspath(source) if os.path.isdir(source) else source


def _input_files(inputs, task: str) -> List[str]:
    """The input files, in order: ``inputs`` is a path or a list of paths, a folder standing for its files with a
    known suffix (sorted by name, hidden ones left out)."""
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not paths:
        raise ValueError("inputs: no input given; give a file, a folder or a list of them")
    files = []
    for path in map(os.fspath, paths):
        if path == "-":
            raise ValueError(
                "inputs: a Ray job reads files, not stdin (it cuts them into shards it can resume); "
                "give a file or a folder"
            )
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if not name.startswith((".", "_")) and os.path.splitext(name)[1].lower() in SUFFIXES
            )
            if not found:
                raise ValueError(f"inputs: the folder {path} has no {', '.join(SUFFIXES)} files")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"inputs: there is no file or folder {path}")
    return files


def _file_format(path: str, fmt: str, task: str) -> str:
    formats = ("jsonl", "parquet", "text") if task == "encode" else ("jsonl", "parquet")
    if fmt not in ("auto", *formats):
        raise ValueError(f"format: must be 'auto' or one of {', '.join(map(repr, formats))}, got {fmt!r}")
    with open(path, "rb") as f:
        is_parquet = f.read(4) == b"PAR1"
    if fmt == "auto":
        suffix = os.path.splitext(path)[1].lower()
        fmt = SUFFIXES.get(suffix, "parquet" if is_parquet else "text" if task == "encode" else None)
        if fmt is None or fmt not in formats:
            raise ValueError(
                f"format: cannot read {path} for rerank: name it .jsonl (one JSON object per line) or .parquet, or "
                "give format='jsonl' or 'parquet'"
            )
    if is_parquet and fmt != "parquet":
        raise ValueError(f"format: {path} is a Parquet file, read as {fmt}; give format='auto' or 'parquet'")
    if fmt == "parquet" and not is_parquet:
        raise ValueError(f"format: {path} is not a Parquet file (no PAR1 header); give its format, or 'auto'")
    return fmt


def _check_parquet_columns(path: str, task: str) -> None:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    need = [["text"]] if task == "encode" else [["query"], ["document", "documents"]]
    for options in need:
        if not any(name in names for name in options):
            wanted = " or ".join(repr(n) for n in options)
            layout = (
                "a 'text' column (and 'id' when present)"
                if task == "encode"
                else "'query' with 'document' (one pair a row) or 'documents' (a list a row), and 'id' when present"
            )
            raise ValueError(
                f"{path}: no column {wanted} (its columns: {', '.join(names) or 'none'}); the job reads {layout}"
            )


def _scan_lines(path: str, shard_rows: int):
    """(lines, byte offset of the first line of every shard): lines end at b"\\n" (a last line without one counts)."""
    offsets, rows, position = [], 0, 0
    with open(path, "rb") as f:
        for line in f:
            if rows % shard_rows == 0:
                offsets.append(position)
            rows += 1
            position += len(line)
    return rows, offsets


# What identifies an input file for resuming: the same path, format, size and modification time.
_SOURCE_KEYS = ("abspath", "format", "size", "mtime_ns")


def _plan(task: str, inputs, output_dir: str, fmt: str, shard_rows: int, options: dict, resume: bool):
    """(manifest, shards): the job's identity and its shards, the manifest read back when it matches (no rescan)."""
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise ValueError(f"shard_rows: expected a positive integer, got {shard_rows!r}")
    sources = []
    for path in _input_files(inputs, task):
        stat = os.stat(path)
        sources.append(
            {
                "path": path,
                "abspath": os.path.abspath(path),
                "format": _file_format(path, fmt, task),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            }
        )
    identity = {
        "version": _MANIFEST_VERSION,
        "task": task,
        "shard_rows": shard_rows,
        "options": options,
        "sources": [{k: s[k] for k in _SOURCE_KEYS} for s in sources],
    }
    job = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    manifest_path = os.path.join(output_dir, MANIFEST)
    manifest = None
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
        if old.get("job") == job:
            manifest = old
        elif resume:
            old_sources = [{k: s.get(k) for k in _SOURCE_KEYS} for s in old.get("sources", [])]
            old_identity = {**old, "sources": old_sources}
            differ = [k for k in ("task", "shard_rows", "options", "sources") if old_identity.get(k) != identity[k]]
            differ = differ or ["version"]
            detail = ""
            if "options" in differ and isinstance(old.get("options"), dict):
                keys = sorted(k for k in set(old["options"]) | set(options) if old["options"].get(k) != options.get(k))
                detail = f" ({', '.join(keys)})"
            raise ValueError(
                f"output_dir: {output_dir} holds shards of another job: it differs in {', '.join(differ)}{detail} "
                f"(see {MANIFEST}). A rerun resumes only the same inputs and options: give another output folder, "
                "delete this one, or pass resume=False to start over in it"
            )
    if manifest is None:
        for s in sources:
            if s["format"] == "parquet":
                import pyarrow.parquet as pq

                _check_parquet_columns(s["path"], task)
                s["rows"] = pq.read_metadata(s["path"]).num_rows
                s["offsets"] = None
            else:
                s["rows"], s["offsets"] = _scan_lines(s["path"], shard_rows)
        manifest = {**identity, "job": job, "sources": sources}
    shards = []
    for s in manifest["sources"]:
        for k, start in enumerate(range(0, s["rows"], shard_rows)):
            shards.append(
                {
                    "source": s["path"],
                    "abspath": s["abspath"],
                    "format": s["format"],
                    "start": start,
                    "stop": min(start + shard_rows, s["rows"]),
                    "offset": s["offsets"][k] if s["offsets"] is not None else None,
                }
            )
    width = max(5, len(str(len(shards))))
    for i, shard in enumerate(shards):
        shard["shard"] = i
        shard["name"] = f"shard-{i:0{width}d}-of-{len(shards):0{width}d}.parquet"
    return manifest, shards


def _shard_complete(path: str, job: str, shard: dict) -> bool:
    """True when ``path`` is a whole shard of this job: its Parquet footer reads back (a cut file has none) and
    names this job, this shard, its input rows and as many rows as the file holds."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(path)
        info = json.loads((metadata.metadata or {})[_META_KEY])
    except Exception:  # noqa: BLE001 -- unreadable in any way: not complete, so rewritten
        return False
    return (
        info.get("job") == job
        and info.get("shard") == shard["shard"]
        and info.get("rows_in") == shard["stop"] - shard["start"]
        and info.get("rows_out") == metadata.num_rows
    )


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:  # a platform that cannot open folders (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_shard(table, output_dir: str, shard: dict, job: str) -> None:
    """Write ``table`` as the shard: to a temporary name, flushed to disk, then renamed (atomic on one file system)."""
    import pyarrow.parquet as pq

    info = {"job": job, "shard": shard["shard"], "rows_in": shard["stop"] - shard["start"], "rows_out": table.num_rows}
    table = table.replace_schema_metadata({_META_KEY: json.dumps(info).encode()})
    final = os.path.join(output_dir, shard["name"])
    temp = os.path.join(output_dir, f".{shard['name']}.{os.getpid()}.tmp")
    pq.write_table(table, temp)
    _fsync(temp)
    os.replace(temp, final)
    _fsync(output_dir, directory=True)


def _is_temp(name: str) -> bool:
    return name.startswith(".shard-") and name.endswith(".tmp")


def _is_shard(name: str) -> bool:
    return name.startswith("shard-") and "-of-" in name and name.endswith(".parquet")


def _ranges(indices: List[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


# Reading one shard, on a Ray worker. The rows carry the shard's number and its expected output row count, so the
# driver can tell a shard complete whatever blocks Ray cut its rows into.
def _parse_text_line(raw: bytes, fmt: str):
    """(text, id, error) of one line of a JSONL or text input: the rules of ``fastrank encode``."""
    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    if not line.strip():
        return None, None, "empty line: nothing to encode (remove it, or put the text on it)"
    if fmt == "text":
        return line, None, None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, None, f"not valid JSON ({e.msg} at column {e.colno})"
    text = record.get("text") if isinstance(record, dict) else record
    if not isinstance(text, str):
        return None, None, "expected a JSON string or an object with a string 'text'"
    return text, _json_id(record), None


def _json_id(record):
    """A JSONL record's "id" as a string (ids of one Parquet column need one type): strings as they are, other
    values as JSON (7 -> "7")."""
    if not isinstance(record, dict) or record.get("id") is None:
        return None
    rid = record["id"]
    return rid if isinstance(rid, str) else json.dumps(rid)


def _lines(shard: dict) -> List[bytes]:
    with open(shard["abspath"], "rb") as f:
        f.seek(shard["offset"])
        return [f.readline() for _ in range(shard["stop"] - shard["start"])]


def _parquet_rows(shard: dict, columns: List[str]):
    """The shard's rows of ``columns`` (those the file has) as a pyarrow Table."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard["abspath"])
    columns = [c for c in columns if c in pf.schema_arrow.names]
    groups, first, position = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if position < shard["stop"] and position + n > shard["start"]:
            groups.append(g)
            first = position if first is None else first
        position += n
    table = pf.read_row_groups(groups, columns=columns)
    return table.slice(shard["start"] - first, shard["stop"] - shard["start"])


def _read_encode_shard(shard: dict):
    import pyarrow as pa

    n = shard["stop"] - shard["start"]
    if shard["format"] == "parquet":
        table = _parquet_rows(shard, ["text", "id"])
        texts, errors = [], []
        for v in table.column("text").to_pylist():
            ok = isinstance(v, str)
            texts.append(v if ok else None)
            errors.append(None if ok else "'text' is null" if v is None else f"'text' must be a string, got {v!r}")
        ids = table.column("id") if "id" in table.column_names else pa.nulls(n, pa.string())
    else:
        parsed = [_parse_text_line(raw, shard["format"]) for raw in _lines(shard)]
        texts = [p[0] for p in parsed]
        ids = pa.array([p[1] for p in parsed], pa.string())
        errors = [p[2] for p in parsed]
    return pa.table(
        {
            "_shard": pa.array([shard["shard"]] * n, pa.int64()),
            "_expect": pa.array([n] * n, pa.int64()),
            "source": pa.array([shard["source"]] * n, pa.string()),
            "row": pa.array(range(shard["start"], shard["stop"]), pa.int64()),
            "id": ids,
            "text": pa.array(texts, pa.string()),
            "error": pa.array(errors, pa.string()),
        }
    )


def _rerank_records(shard: dict):
    """(id, pairs, kind, error) per input row; kind "pair" (one document) or "documents" (a list)."""
    from fastrank.inference import document_texts

    if shard["format"] == "parquet":
        table = _parquet_rows(shard, ["query", "document", "documents", "id"])
        names = table.column_names
        queries = table.column("query").to_pylist()
        single = "document" in names
        documents = table.column("document" if single else "documents").to_pylist()
        out = []
        for q, d in zip(queries, documents):
            if not isinstance(q, str):
                out.append((None, "pair", "'query' must be a string"))
            elif single:
                ok = isinstance(d, str)
                out.append(([(q, d)] if ok else None, "pair", None if ok else "'document' must be a string"))
            else:
                try:
                    out.append(([(q, t) for t in document_texts(d)], "documents", None))
                except ValueError as e:
                    out.append((None, "documents", str(e)))
        return table.column("id") if "id" in names else None, out
    from fastrank.inference.reranker import parse_rerank_line

    ids, out = [], []
    for raw in _lines(shard):
        try:
            record, pairs, kind = parse_rerank_line(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
            ids.append(_json_id(record))
            out.append((pairs, kind, None))
        except ValueError as e:
            ids.append(None)
            out.append((None, "pair", str(e)))
    return ids, out


def _read_rerank_shard(shard: dict):
    import pyarrow as pa

    ids, records = _rerank_records(shard)
    rows, index, queries, documents, errors, take = [], [], [], [], [], []
    for local, (pairs, kind, error) in enumerate(records):
        row = shard["start"] + local
        if error is not None:
            rows.append(row), index.append(None), queries.append(None), documents.append(None), errors.append(error)
            take.append(local)
            continue
        for k, (q, d) in enumerate(pairs):
            rows.append(row), index.append(k if kind == "documents" else None), queries.append(q), documents.append(d)
            errors.append(None), take.append(local)
    m = len(rows)
    if ids is None:
        id_column = pa.nulls(m, pa.string())
    elif isinstance(ids, list):
        id_column = pa.array([ids[i] for i in take], pa.string())
    else:  # a Parquet column, of its own type
        id_column = ids.take(pa.array(take, pa.int64()))
    return pa.table(
        {
            "_shard": pa.array([shard["shard"]] * m, pa.int64()),
            "_expect": pa.array([m] * m, pa.int64()),
            "source": pa.array([shard["source"]] * m, pa.string()),
            "row": pa.array(rows, pa.int64()),
            "index": pa.array(index, pa.int32()),
            "id": id_column,
            "query": pa.array(queries, pa.string()),
            "document": pa.array(documents, pa.string()),
            "error": pa.array(errors, pa.string()),
        }
    )


def _read_shards(batch, task: str):
    """A ``map_batches`` function: one block of shard descriptions in, their rows out."""
    import pyarrow as pa

    read = _read_encode_shard if task == "encode" else _read_rerank_shard
    return pa.concat_tables([read(shard) for shard in batch.to_pylist()])


_OUTPUT_COLUMNS = {
    "encode": ["source", "row", "id", "embedding", "error"],
    "rerank": ["source", "row", "index", "id", "score", "error"],
}
_SORT = {"encode": [("row", "ascending")], "rerank": [("row", "ascending"), ("index", "ascending")]}


def _run_job(
    task: str,
    inputs,
    output_dir,
    model_class,
    model_kwargs: dict,
    options: dict,
    *,
    num_actors,
    device,
    num_cpus,
    num_gpus,
    fmt: str,
    shard_rows: int,
    resume: bool,
    address,
    show_progress: bool,
    log,
) -> JobSummary:
    import pyarrow as pa
    import pyarrow.compute as pc

    log = log or _stderr
    started = time.perf_counter()
    output_dir = os.fspath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir: {output_dir} is a file; a Ray job writes a folder of Parquet shards")
    _actor_device(device)  # a bad device fails before any file is read or Ray starts
    manifest, shards = _plan(task, inputs, output_dir, fmt, shard_rows, options, resume)
    os.makedirs(output_dir, exist_ok=True)
    removed = 0
    for name in os.listdir(output_dir):
        # A temporary shard is a write cut short (or another run's, if two share the folder: not supported).
        if _is_temp(name) or (not resume and (_is_shard(name) or name == MANIFEST)):
            os.remove(os.path.join(output_dir, name))
            removed += _is_temp(name)
    if removed:
        log(f"{task}: removed {removed} temporary shard files left by a run that did not finish")
    _write_manifest(manifest, output_dir)
    job = manifest["job"]
    done = [s for s in shards if _shard_complete(os.path.join(output_dir, s["name"]), job, s)]
    done_ids = {s["shard"] for s in done}
    pending = [s for s in shards if s["shard"] not in done_ids]
    summary = JobSummary(output_dir=output_dir, shards=len(shards), skipped=[s["name"] for s in done])
    rows_total = sum(s["stop"] - s["start"] for s in shards)
    log(
        f"{task}: {rows_total} rows in {len(shards)} shards of up to {shard_rows} rows, in {output_dir}: "
        + (f"{len(done)} complete, skipped (shards {_ranges(sorted(done_ids))}); " if done else "")
        + (f"{len(pending)} to write" if pending else "nothing to write")
    )
    if not pending:
        summary.seconds = time.perf_counter() - started
        return summary
    ray, summary.ray_init_s = _start_ray(address)
    device, num_actors, resources = _actor_resources(ray, device, num_actors, num_cpus, num_gpus)
    num_actors = min(num_actors, len(pending))  # an actor beyond one per shard would load its model for nothing
    _warn_if_unschedulable(ray, num_actors, resources, log)
    log(f"{task}: {num_actors} actors on {device}, each {resources['num_cpus']:g} CPU, {resources['num_gpus']:g} GPU")
    items = [{k: s[k] for k in ("shard", "source", "abspath", "format", "start", "stop", "offset")} for s in pending]
    by_id = {s["shard"]: s for s in pending}
    with _ray_data_job(ray, show_progress):
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_read_shards, fn_kwargs={"task": task}, batch_size=1, batch_format="pyarrow")
        ds = ds.map_batches(
            model_class,
            fn_constructor_kwargs={**model_kwargs, "device": device, "progress": show_progress},
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            # One call per block, that is per shard when Ray fuses the read into the actors (it does): the model
            # batches inside (length-sorted under its token budget), and a shard is the unit actors share.
            batch_size=None,
            batch_format="pyarrow",
            **resources,
        )
        parts, counts = {}, {}
        submitted = time.perf_counter()
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if summary.first_result_s is None:
                summary.first_result_s = time.perf_counter() - submitted
            in_table = set(table.column("_shard").to_pylist())
            for shard_id in sorted(in_table):
                part = table if len(in_table) == 1 else table.filter(pc.equal(table["_shard"], shard_id))
                parts.setdefault(shard_id, []).append(part)
                counts[shard_id] = counts.get(shard_id, 0) + part.num_rows
                if counts[shard_id] == part.column("_expect")[0].as_py():
                    shard = by_id[shard_id]
                    whole = pa.concat_tables(parts.pop(shard_id)).sort_by(_SORT[task]).select(_OUTPUT_COLUMNS[task])
                    _write_shard(whole, output_dir, shard, job)
                    summary.written.append(shard["name"])
                    summary.rows += shard["stop"] - shard["start"]
                    summary.outputs += whole.num_rows
                    summary.errors += whole.num_rows - whole.column("error").null_count
                    elapsed = time.perf_counter() - started
                    log(
                        f"{task}: wrote {shard['name']} ({shard['stop'] - shard['start']} rows"
                        + (f", {whole.num_rows} pairs" if task == "rerank" else "")
                        + f"; {len(summary.written)} of {len(pending)}; {summary.rows / elapsed:.1f} rows/s so far)"
                    )
    missing = [s["name"] for s in pending if s["name"] not in set(summary.written)]
    if missing:  # Ray returned fewer rows than were read: never seen, but a silent gap would be worse
        names = ", ".join(missing)
        raise RuntimeError(
            f"Ray returned only part of the rows of {names}; rerun to write them (complete shards are kept)"
        )
    summary.seconds = time.perf_counter() - started
    log(
        f"{task}: wrote {len(summary.written)} shards ({summary.rows} rows"
        + (f", {summary.outputs} pairs" if task == "rerank" else "")
        + f", {summary.errors} with an error) in {summary.seconds:.1f} s, {summary.rows_per_s:.1f} rows/s; "
        f"Ray start-up {summary.ray_init_s:.1f} s, first results {summary.first_result_s:.1f} s after submitting"
    )
    return summary


def _write_manifest(manifest: dict, output_dir: str) -> None:
    path = os.path.join(output_dir, MANIFEST)
    if os.path.exists(path):
        return
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w") as f:
        json.dump(manifest, f, indent=1)
    _fsync(temp)
    os.replace(temp, path)


def encode_files(
    inputs,
    output_dir,
    model: str,
    *,
    num_actors: Optional[int] = None,
    device=None,
    num_cpus: Optional[float] = None,
    num_gpus: Optional[float] = None,
    format: str = "auto",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    resume: bool = True,
    address: Optional[str] = None,
    show_progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    kind: str = "auto",
    queries: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_length: Optional[int] = None,
    dtype="auto",
    **embedder_kwargs,
) -> JobSummary:
    """Embed every text of ``inputs`` with Ray Data actors (``EmbedBatch``) into Parquet shards in ``output_dir``;
    a rerun writes only the shards that are missing or incomplete.

    Inputs: a file, a folder (its ``.jsonl``, ``.json``, ``.parquet``, ``.txt`` files, by name) or a list of them.
    JSONL lines are a JSON string or an object with a string ``"text"`` (and an optional ``"id"``, kept as a string);
    Parquet files need a ``text`` column (an ``id`` column is kept as it is); other files are one text per line.
    ``format`` ("auto", by suffix, else text; or "jsonl", "parquet", "text") applies to every file.

    Output: ``shard-00000-of-000NN.parquet`` files (see the module's notes), each ``shard_rows`` input rows at most,
    rows in input order with columns ``source`` (the input file), ``row`` (0-based within it: JSONL line ``row + 1``),
    ``id``, ``embedding`` (``fixed_size_list<float32>[H]``) and ``error``: a row that cannot be encoded (an empty
    line, bad JSON, a null text) keeps its place with a null embedding and the reason.

    Ray: ``address`` joins a cluster (None: the one this process is connected to, else ``RAY_ADDRESS``, else a
    local Ray started here and left running). ``num_actors`` model replicas (default: one per GPU with
    ``device="cuda"``, else 1), each reserving ``num_cpus`` CPUs (default 1; a CPU actor's torch uses that many
    threads) and ``num_gpus`` GPUs (default 1 on ``"cuda"``, which ``device=None`` picks when the cluster has GPUs).
    ``resume=False`` deletes this folder's shards first. Progress goes to ``log`` (default: stderr) as lines: what
    was skipped, each shard written with the rows/s so far, a summary; ``show_progress`` turns Ray Data's own
    progress bars and INFO lines on or off.

    The other arguments are ``EmbedBatch``'s (``kind``, ``queries``, ``batch_size``, ``max_tokens``, ``max_length``,
    ``dtype``, and ``**embedder_kwargs`` for ``Embedder.from_pretrained``). Returns a ``JobSummary``.

    Example::

        from fastrank.integrations.ray import encode_files

        summary = encode_files("corpus.jsonl", "corpus-embeddings/", "BAAI/bge-small-en-v1.5", num_actors=4)
        import pandas as pd
        table = pd.read_parquet("corpus-embeddings/")  # source, row, id, embedding, error
    """
    _check_sizes(batch_size, max_tokens, max_length)  # here, not in every actor after Ray starts
    model = _model_source(model)
    options = {
        "model": model,
        "kind": kind,
        "queries": bool(queries),
        "max_length": max_length,
        "dtype": str(dtype),
        **{k: _jsonable(v) for k, v in embedder_kwargs.items()},
    }
    model_kwargs = dict(
        model=model,
        kind=kind,
        queries=queries,
        batch_size=batch_size,
        max_tokens=max_tokens,
        max_length=max_length,
        dtype=dtype,
        **embedder_kwargs,
    )
    return _run_job(
        "encode",
        inputs,
        output_dir,
        _EmbedRows,
        model_kwargs,
        options,
        num_actors=num_actors,
        device=device,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        fmt=format,
        shard_rows=shard_rows,
        resume=resume,
        address=address,
        show_progress=show_progress,
        log=log,
    )


def rerank_files(
    inputs,
    output_dir,
    model: str,
    preset=None,
    *,
    num_actors: Optional[int] = None,
    device=None,
    num_cpus: Optional[float] = None,
    num_gpus: Optional[float] = None,
    format: str = "auto",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    resume: bool = True,
    address: Optional[str] = None,
    show_progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    normalize: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    max_length: Optional[int] = None,
    dtype="auto",
    **reranker_kwargs,
) -> JobSummary:
    """Score every (query, document) pair of ``inputs`` with Ray Data actors (``ScoreBatch``) into Parquet shards
    in ``output_dir``; a rerun writes only the shards that are missing or incomplete.

    Inputs: a file, a folder (its ``.jsonl``, ``.json``, ``.parquet`` files, by name) or a list of them, in the
    format of ``fastrank rerank``: JSONL lines ``{"query": ..., "document": ...}`` (one pair) or
    ``{"query": ..., "documents": [...]}`` (strings or ``{"text": ...}``; one pair per document), with an optional
    ``"id"``; Parquet files with ``query`` and ``document`` columns, or ``query`` and ``documents`` (a list).

    Output: shards as ``encode_files`` writes them, ``shard_rows`` input rows each, one row per pair in input order
    with columns ``source``, ``row`` (the input row, 0-based: JSONL line ``row + 1``), ``index`` (the document's place
    in ``documents``; null for a ``document`` row), ``id``, ``score`` (float32) and ``error`` (a line that cannot be
    scored is one row with a null score and the reason). Nothing is ranked: sort by ``row`` and ``score``, or use
    ``Reranker.rank`` for a few queries.

    ``preset``, ``normalize``, ``batch_size``, ``max_tokens``, ``max_length``, ``dtype`` and ``**reranker_kwargs``
    are ``ScoreBatch``'s; the Ray and job arguments are ``encode_files``'s. The preset is checked here, before any
    actor starts (None: read from the folder or recognised by name, else an error). Returns a ``JobSummary``.

    Example::

        from fastrank.integrations.ray import rerank_files

        rerank_files("candidates.jsonl", "scores/", "Qwen/Qwen3-Reranker-0.6B", num_actors=2, normalize=True)
    """
    from fastrank.presets import detect_preset, get_preset, preset_to_dict

    _check_sizes(batch_size, max_tokens, max_length)  # here, not in every actor after Ray starts
    model = _model_source(model)
    resolved = get_preset(preset) if preset is not None else detect_preset(model)
    options = {
        "model": model,
        "preset": preset_to_dict(resolved),
        "normalize": bool(normalize),
        "max_length": max_length,
        "dtype": str(dtype),
        **{k: _jsonable(v) for k, v in reranker_kwargs.items()},
    }
    model_kwargs = dict(
        model=model,
        preset=preset,  # None: each actor detects the same preset from the same folder or name
        normalize=normalize,
        batch_size=batch_size,
        max_tokens=max_tokens,
        max_length=max_length,
        dtype=dtype,
        **reranker_kwargs,
    )
    return _run_job(
        "rerank",
        inputs,
        output_dir,
        _ScoreRows,
        model_kwargs,
        options,
        num_actors=num_actors,
        device=device,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        fmt=format,
        shard_rows=shard_rows,
        resume=resume,
        address=address,
        show_progress=show_progress,
        log=log,
    )


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


# ---------------------------------------------------------------------------------------------------------------
# `fastrank encode --ray` / `fastrank rerank --ray`
# ---------------------------------------------------------------------------------------------------------------
RAY_FLAGS = ("ray_actors", "ray_address", "ray_shard_rows", "ray_cpus_per_actor")


def _check_cli(args, command: str) -> None:
    given = [f"--{name.replace('_', '-')}" for name in RAY_FLAGS if getattr(args, name, None) is not None]
    if not args.ray:
        raise ValueError(f"{', '.join(given)} only apply with --ray: add --ray, or drop them")
    if args.input == "-":
        raise ValueError(
            "--ray reads files, not stdin (it cuts them into shards it can resume): give --input FILE or FOLDER "
            "(.jsonl, .parquet" + (", or text" if command == "encode" else "") + ")"
        )
    if args.output == "-" or os.path.splitext(args.output)[1].lower() in (".npy", ".jsonl", ".json", ".parquet"):
        raise ValueError(
            f"--ray writes a folder of Parquet shards, not {'stdout' if args.output == '-' else args.output}: "
            "give --output DIR"
        )
    if getattr(args, "devices", None):
        raise ValueError("--devices runs a device pool in this process; with --ray give --ray-actors N instead")


def encode_command(args) -> int:
    """``fastrank encode --ray``: ``encode_files`` with the command's flags; exit status 1 when a row has an error."""
    _check_cli(args, "encode")
    summary = encode_files(
        args.input,
        args.output,
        args.model,
        num_actors=args.ray_actors,
        device=args.device,
        num_cpus=args.ray_cpus_per_actor,
        format=args.format,
        shard_rows=args.ray_shard_rows or DEFAULT_SHARD_ROWS,
        address=args.ray_address,
        show_progress=not args.no_progress,
        kind=args.kind,
        queries=args.queries,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        dtype=args.dtype,
        **({"pooling": args.pooling} if args.pooling else {}),
        **({"normalize": args.normalize == "yes"} if args.normalize else {}),
    )
    if summary.errors:
        _stderr(f"{summary.errors} rows could not be encoded: their 'error' column says why (embedding null)")
    return 1 if summary.errors else 0


def rerank_command(args) -> int:
    """``fastrank rerank --ray``: ``rerank_files`` with the command's flags; exit status 1 when a row has an error."""
    _check_cli(args, "rerank")
    if args.top_k is not None:
        raise ValueError("--top-k does not apply with --ray (it writes one score per pair): sort by row and score")
    summary = rerank_files(
        args.input,
        args.output,
        args.model,
        args.preset,
        num_actors=args.ray_actors,
        device=args.device,
        num_cpus=args.ray_cpus_per_actor,
        shard_rows=args.ray_shard_rows or DEFAULT_SHARD_ROWS,
        address=args.ray_address,
        show_progress=not args.no_progress,
        normalize=args.normalize,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        max_length=args.max_length,
        dtype=args.dtype,
        **({"attn_implementation": args.attn_implementation} if args.attn_implementation else {}),
    )
    if summary.errors:
        _stderr(f"{summary.errors} rows could not be scored: their 'error' column says why (score null)")
    return 1 if summary.errors else 0


__all__ = ["EmbedBatch", "JobSummary", "ScoreBatch", "encode_files", "encode_texts", "rerank_files"]
