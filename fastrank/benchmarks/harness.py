"""Timing and peak-memory measurement, the same way for every provider of a benchmark case.

GPU: time from ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs; median and the 20th
and 80th percentiles), peak memory from ``torch.cuda.max_memory_allocated`` above what was allocated
before the call (inputs are not counted, outputs and everything transient are).

CPU: wall-clock median over repeats, and peak resident memory above the level before the call, read
from ``/proc/self/status`` (VmHWM, reset through ``/proc/self/clear_refs``). glibc's malloc thresholds are
fixed, so every provider runs under the same allocator whatever ran before it: during the peak call every
allocation over 64 KiB is served with mmap, so freed tensors leave the resident set at once and each call's peak
is its own; during the timed calls the thresholds are those glibc reaches by itself in a long-running process
(32 MiB), since a 64 KiB threshold makes every larger tensor a fresh mmap whose pages fault in zeroed, which cost
as much as the model in the serve benchmark (11.5 against 18 requests/s).
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Callable, Dict, List, Optional, Union

import torch

from fastrank.utils import first_line

# Peaks below these are not resolved: CPU resident memory moves in pages and malloc arenas absorb small
# allocations; the CUDA caching allocator rounds to 512 bytes. A ratio against a smaller peak is
# reported as a lower bound against the floor.
MEMORY_FLOOR = {"cpu": 1 << 20, "cuda": 512}
# Timed calls per provider on CPU at most (they stop once min_seconds passed).
CPU_MAX_CALLS = 2000


@dataclass
class Measurement:
    provider: str
    time_ms: Optional[float]  # median
    time_ms_p20: Optional[float]
    time_ms_p80: Optional[float]
    peak_bytes: Optional[int]  # above the memory in use before the call
    # CUDA only: median of the call captured in a CUDA graph and replayed, i.e. device time without the
    # host's launch and Python overhead (None where the call cannot be captured).
    graph_time_ms: Optional[float] = None
    error: Optional[str] = None  # "out of memory", ...
    extra: dict = field(default_factory=dict)

    def to_dict(self):
        return asdict(self)


@dataclass(frozen=True)
class Unavailable:
    """Stands in a ``providers()`` dict for a baseline that could not be built; ``reason`` says why, on one line."""

    reason: str


class MissingInput(Exception):
    """What every provider of a case needs (e.g. model weights shipped as a package) cannot be loaded, so the
    case is reported as not run."""


INSTALL_HINT = "pip install -c constraints.txt -e '.[bench]' installs the baselines"


def one_line(error: BaseException, limit: int = 160) -> str:
    """``Type: message`` of an exception: the message's first line, cut to ``limit`` characters."""
    text = f"{type(error).__name__}: {first_line(error)}" if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require_input(module: str, what: str) -> ModuleType:
    """Import a package every provider of a case needs, or raise :class:`MissingInput` saying which and why."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - as in reference_baseline: any failure while importing it
        raise MissingInput(f"{what} needs {module}: {one_line(e)} ({INSTALL_HINT})") from e


def _source_paths(module: str) -> list:
    """The directories of a package (with a trailing separator), or the file of a plain module."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [os.path.join(os.path.abspath(d), "") for d in spec.submodule_search_locations]
    return [os.path.abspath(spec.origin)] if spec.origin else []


def _raised_in(error: BaseException, package: str) -> bool:
    """Whether the innermost frame ``error`` passed through that is either fastrank's (fastrank.kernels
    included) or ``package``'s is ``package``'s: the reference package failed, not fastrank's code."""
    theirs = _source_paths(package)
    ours = _source_paths("fastrank") + _source_paths("fastrank.kernels")
    owner = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        filename = os.path.abspath(frame.f_code.co_filename)
        if any(filename.startswith(d) for d in theirs):
            owner = package
        elif any(filename.startswith(d) for d in ours):
            owner = "fastrank"
    return owner == package


def reference_baseline(
    module: str, build: Callable[[ModuleType], Callable[[], object]]
) -> Union[Callable[[], object], Unavailable]:
    """A baseline that runs a third-party reference (FlagEmbedding, sentence-transformers, ...).

    Imports ``module`` and returns ``build(module)``, the baseline's closure, or :class:`Unavailable` with
    the reason when importing ``module`` raises anything (not only ImportError: a package written for
    another transformers fails on import with ModuleNotFoundError for a moved module, AttributeError, ...)
    or when ``build`` fails inside the reference package's own code. Whatever is raised in fastrank's code,
    this benchmark's included, propagates: that is a bug to see, not a missing baseline.
    """
    package = module.split(".")[0]
    try:
        imported = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - see the docstring
        if isinstance(e, ModuleNotFoundError) and e.name == package:
            return Unavailable(f"{package} is not installed ({INSTALL_HINT})")
        return Unavailable(f"{module} does not import: {one_line(e)}")
    try:
        return build(imported)
    except Exception as e:  # noqa: BLE001 - re-raised unless the reference package raised it
        if _raised_in(e, package):
            return Unavailable(f"{package} fails to build this baseline: {one_line(e)}")
        raise


def attention_switched(
    model,
    fn: Callable[[], object],
    packed: bool,
    fused: Optional[bool] = None,
    graphs: bool = True,
    compiled: bool = False,
    kernels: str = "fastrank",
) -> Callable[[], object]:
    """``fn`` run with ``model`` set up as a provider needs it, for providers that share one model instance:
    ``packed=True`` switches fastrank's engine on (``fastrank.engine.enable_packing``; packed batches need it),
    ``packed=False`` gives the model back its own attention (sdpa), so that plain-transformers baselines and
    fastrank's padded path run the model as it was loaded. ``fused=True`` / ``False`` switches the decoder's
    fused elementwise ops (``fastrank.engine.fusion``, calling ``kernels``' kernels) on / off (baselines run
    the model as HF wrote it; None leaves it as it is); ``graphs=False`` hides the backbone's CUDA graphs from
    ``fn``; ``compiled=True`` runs the model's layers through torch.compile (``fastrank.engine.compile``,
    Inductor), ``False`` eagerly.
    The switches cost something only on a provider's first call (the harness's warm-up or peak-memory call),
    never on the timed ones."""
    from fastrank.engine import disable_packing, enable_packing
    from fastrank.engine.compile import compile_layers, uncompile_layers
    from fastrank.engine.fusion import fuse, unfuse

    def call():
        if packed:
            if not enable_packing(model, warn=False):
                raise RuntimeError(f"{type(model).__name__}: fastrank's engine cannot run this model packed")
        else:
            disable_packing(model)
        if fused is True:
            fuse(model, warn=False, kernels=kernels)
        elif fused is False:
            unfuse(model)
        if compiled:
            compile_layers(model)
        else:
            uncompile_layers(model)
        if graphs:
            return fn()
        holders = [m for m in model.modules() if "_fastrank_graphs" in m.__dict__]
        runners = [m.__dict__.pop("_fastrank_graphs") for m in holders]
        try:
            return fn()
        finally:
            for m, runner in zip(holders, runners):
                m.__dict__["_fastrank_graphs"] = runner

    return call


def compiled_baseline(fn: Callable[[], object], device: torch.device) -> Union[Callable[[], object], Unavailable]:
    """``fn`` through ``torch.compile`` (Inductor fuses elementwise chains itself): the alternative to a
    hand-written kernel that vLLM takes. Compared on CUDA only; compilation happens in the warm-up call."""
    if device.type != "cuda":
        return Unavailable("torch.compile is compared on GPU only (Inductor's CPU code is not the choice at stake)")
    return torch.compile(fn, dynamic=False)


def liger_baseline(
    build: Callable[[], Callable[[], object]], device: torch.device
) -> Union[Callable[[], object], Unavailable]:
    """Liger-Kernel's version of an op (``build()`` imports it and returns the closure), the other well-kept
    alternative: Triton kernels, CUDA only, an optional dependency (``pip install liger-kernel``)."""
    if device.type != "cuda":
        return Unavailable("Liger-Kernel's kernels run on CUDA only")
    try:
        return build()
    except ImportError as e:
        return Unavailable(f"liger-kernel is not installed ({e}); pip install liger-kernel")


ELEMENTWISE_PROVIDERS = ("torch_unfused", "torch_compile", "liger", "fastrank")


def elementwise_providers(unfused, ours, liger, device: torch.device, train: bool, inputs=(), grads=None) -> dict:
    """The providers of an elementwise op's benchmark (rms_norm, rope, gated_activation), named as
    ``ELEMENTWISE_PROVIDERS``: HF's formula ``unfused``, that formula through ``torch.compile``, Liger-Kernel's
    version (``liger`` builds it, see ``liger_baseline``) and fastrank's ``ours``. Forward only (under no_grad)
    unless ``train``: then each call is the forward and ``torch.autograd.grad`` of its outputs into ``inputs``
    with output gradients ``grads``."""
    fns = {
        "torch_unfused": unfused,
        "torch_compile": compiled_baseline(unfused, device),
        "liger": liger_baseline(liger, device),
        "fastrank": ours,
    }

    def timed(fn):
        if isinstance(fn, Unavailable):
            return fn
        if not train:
            return torch.no_grad()(fn)
        return lambda: torch.autograd.grad(fn(), inputs, grad_outputs=grads)

    return {name: timed(fn) for name, fn in fns.items()}


def cuda_required(script: str) -> str:
    """The one line a GPU-only script in bench/ exits with where CUDA is missing."""
    return f"bench/{os.path.basename(script)} needs a CUDA GPU; on a CPU run `fastrank bench`"


_MALLOC_SET = False
# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The peak call: allocations over 64 KiB mmapped, returned to the OS when freed.
_PEAK_MMAP_THRESHOLD = 64 << 10
# The timed calls: DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, where glibc's dynamic threshold ends once a process has
# freed large blocks, with the trim threshold at twice it, as glibc's dynamic rule sets it.
_TIMING_MMAP_THRESHOLD = 32 << 20


def _set_malloc_thresholds(mmap_threshold: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    return ok and libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold) == 1


def _prepare_cpu_memory_tracking() -> bool:
    """Fix glibc's thresholds at their timing values (once); False where peak memory cannot be read."""
    global _MALLOC_SET
    if not sys.platform.startswith("linux"):
        return False
    if not _MALLOC_SET:
        if not _set_malloc_thresholds(_TIMING_MMAP_THRESHOLD):
            return False
        _MALLOC_SET = True
    return True


def status_bytes(key: str, pid="self") -> Optional[int]:
    """A memory figure of process ``pid`` (``VmRSS``, ``VmHWM``) from ``/proc/<pid>/status``, in bytes; None
    where /proc cannot tell (not Linux, the process gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss(pid="self") -> bool:
    """Reset process ``pid``'s resident-set high-water mark (VmHWM) to its current resident set (Linux >= 4.0);
    False where that is not possible."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _cpu_peak(fn: Callable[[], object]) -> Optional[int]:
    if not _prepare_cpu_memory_tracking():
        return None
    gc.collect()
    try:  # hand freed heap pages back first, so memory an earlier call left cached counts as this call's
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if not reset_peak_rss():
        return None
    _set_malloc_thresholds(_PEAK_MMAP_THRESHOLD)
    try:
        before = status_bytes("VmRSS")
        out = fn()
        peak = status_bytes("VmHWM")
        del out
    finally:
        _set_malloc_thresholds(_TIMING_MMAP_THRESHOLD)
    return None if peak is None or before is None else max(0, peak - before)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Memory one call of ``fn`` allocates above what was in use before it (its inputs excluded)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    _prepare_cpu_memory_tracking()
    return _cpu_peak(fn)


def _graph_time(fn: Callable[[], object]) -> Optional[float]:
    import triton.testing

    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    except Exception:  # noqa: BLE001 - not capturable (host syncs, allocations the graph cannot hold)
        torch.cuda.synchronize()
        return None


def _time_end_to_end(fn: Callable[[], object], device: torch.device, repeats: int):
    """Wall-clock median of whole runs (each long: seconds), synchronising the device around each."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def measure_cpu(
    fns: Dict[str, Callable[[], object]], *, warmup: int = 1, min_seconds: float = 1.0, block_seconds: float = 0.05
) -> List[Measurement]:
    """The providers of one case on CPU: each one's warm-up and peak-memory call, then timed calls in turns of
    about ``block_seconds`` per provider, until each has been timed for ``min_seconds`` (at least 3 calls, at
    most ``CPU_MAX_CALLS``). Taking turns puts a drift of the machine's speed (other load, clock) on every
    provider alike, where timing one provider after the other put it on whichever ran during it; a call of a
    millisecond is timed a thousand times, since on a shared machine a handful of such calls is mostly noise."""
    cpu = torch.device("cpu")
    _prepare_cpu_memory_tracking()  # before the first allocation we measure, see the module docstring
    peaks = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        peaks[name] = peak_bytes(fn, cpu)
    times: Dict[str, List[float]] = {name: [] for name in fns}
    pending = list(fns)
    while pending:
        for name in list(pending):
            fn, own = fns[name], times[name]
            turn_ends = time.perf_counter() + block_seconds
            while True:
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                own.append((t1 - t0) * 1e3)
                if t1 >= turn_ends or len(own) >= CPU_MAX_CALLS:
                    break
            if len(own) >= CPU_MAX_CALLS or (len(own) >= 3 and sum(own) >= min_seconds * 1e3):
                pending.remove(name)
    out = []
    for name, own in times.items():
        own.sort()
        q = statistics.quantiles(own, n=5) if len(own) >= 5 else [own[0], own[-1]]
        out.append(Measurement(name, statistics.median(own), q[0], q[-1], peaks[name]))
    return out


def measure(
    provider: str,
    fn: Callable[[], object],
    device: torch.device,
    *,
    repeats: int = 20,
    warmup: int = 1,
    min_seconds: float = 1.0,
    end_to_end: bool = False,
) -> Measurement:
    """Run ``fn`` (which must do all the work of one call, backward included) and measure it.

    On CPU it is ``measure_cpu`` of this one provider.
    ``end_to_end``: ``fn`` is a whole job (seconds long, host work included): one warm-up, one run for the
    peak (through ``fn.peak_bytes()`` when ``fn`` has it: its memory is another process's), then ``repeats``
    wall-clock runs; no CUDA-graph timing.
    """
    try:
        if end_to_end:
            for _ in range(warmup):
                fn()
            # a provider whose memory lives elsewhere (a server process) measures its own peak
            own = getattr(fn, "peak_bytes", None)
            peak = own() if callable(own) else peak_bytes(fn, device)
            p50, lo, hi = _time_end_to_end(fn, device, repeats)
            return Measurement(provider, p50, lo, hi, peak)
        if device.type == "cuda":
            import triton.testing

            fn()  # warm-up: compilation stays out of the numbers
            peak = peak_bytes(fn, device)
            p50, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
            return Measurement(provider, p50, p20, p80, peak, graph_time_ms=_graph_time(fn))
        return measure_cpu({provider: fn}, warmup=warmup, min_seconds=min_seconds)[0]
    except torch.cuda.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return Measurement(provider, None, None, None, None, error="out of memory")


def environment(device: torch.device) -> dict:
    """Versions and hardware, written next to every result."""
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import fastrank

        info["fastrank"] = fastrank.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["cpu_threads"] = torch.get_num_threads()
    return info


def format_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def ratio(baseline: Optional[float], ours: Optional[float], floor: float = 1e-12) -> Optional[float]:
    """baseline / ours: above 1 means fastrank is faster or smaller. Values below ``floor`` count as
    ``floor`` (so the ratio is then a lower bound)."""
    if baseline is None or ours is None:
        return None
    return max(baseline, floor) / max(ours, floor)


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s, by a substring of
# torch.cuda.get_device_name; the first match wins, so the more specific names come first.
GPU_BF16_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("H20", 148e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 125e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
)


def gpu_bf16_peak_flops(device: torch.device) -> Optional[float]:
    """The dense bf16 peak of ``device``'s GPU from ``GPU_BF16_PEAK_FLOPS``, or None (CPU, or a GPU not listed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_BF16_PEAK_FLOPS:
        if key in name:
            return flops
    return None


def gpu_slug() -> str:
    """A short lower-case name of this machine's GPU for result file names ("h100", "h200", "a100"), or "none"."""
    if not torch.cuda.is_available():
        return "none"
    name = torch.cuda.get_device_name()
    for key, _ in GPU_BF16_PEAK_FLOPS:
        if key in name:
            return key.lower().replace(" ", "-")
    return name.split()[-1].lower()


def throughput(work: dict, time_ms: float, peak_flops: Optional[float]) -> dict:
    """Tokens/s, model TFLOP/s and, when the peak is known, model FLOPs utilisation (MFU: the fraction of the
    GPU's dense bf16 peak) of a call that processed ``work`` (``{"tokens", "flops"}``) in ``time_ms``."""
    seconds = time_ms / 1e3
    out = {
        "tokens": int(work["tokens"]),
        "tokens_per_second": work["tokens"] / seconds,
        "model_tflops_per_second": work["flops"] / seconds / 1e12,
    }
    if peak_flops:
        out["mfu"] = work["flops"] / seconds / peak_flops
        out["peak_bf16_tflops"] = peak_flops / 1e12
    return out


def decoder_flops(config, lengths) -> float:
    """Model FLOPs of a decoder's forward over sequences of ``lengths`` tokens, each computed alone (no prefix
    sharing, no padding: the work any implementation must do): 2 per multiply-add of the projections and the
    gated MLP in every layer, plus causal attention's ``q k^T`` and ``p v`` (2 x 2 x heads x head_dim x
    context, the context of token i being i + 1). Embedding lookups, norms and the one LM-head row count
    nothing."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    layers = config.num_hidden_layers
    per_token = 2 * (hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter)
    tokens = sum(lengths)
    contexts = sum(n * (n + 1) // 2 for n in lengths)
    return float(layers * (per_token * tokens + 4 * heads * head_dim * contexts))
