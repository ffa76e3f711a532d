"""Run the microbenchmarks of every op and report each baseline as a ratio to fastrank, in one run."""

from __future__ import annotations

import datetime
import gc
import json
import sys
import time
from typing import Callable, Dict, Iterable, Optional

import torch

from fastrank.benchmarks import (
    contrastive,
    cross_encoder,
    embedder_train,
    encode,
    gated_activation,
    layerwise,
    pool,
    rank_shared,
    rerank,
    reranker_train,
    rms_norm,
    rope,
    scale,
    score_head,
    serve,
    varlen_attention,
)
from fastrank.benchmarks.harness import (
    MEMORY_FLOOR,
    MissingInput,
    Unavailable,
    environment,
    format_bytes,
    gpu_bf16_peak_flops,
    measure,
    measure_cpu,
    ratio,
    throughput,
)
from fastrank.benchmarks.protocol import Benchmark

# op name -> its Benchmark, in the order `fastrank bench` runs them
OPS: Dict[str, Benchmark] = {
    benchmark.name: benchmark
    for benchmark in (
        score_head.BENCHMARK,
        pool.BENCHMARK,
        contrastive.BENCHMARK,
        varlen_attention.BENCHMARK,
        rms_norm.BENCHMARK,
        rope.BENCHMARK,
        gated_activation.BENCHMARK,
        rerank.BENCHMARK,
        rank_shared.BENCHMARK,
        layerwise.BENCHMARK,
        cross_encoder.BENCHMARK,
        encode.BENCHMARK,
        embedder_train.BENCHMARK,
        reranker_train.BENCHMARK,
        serve.BENCHMARK,
        scale.BENCHMARK,
    )
}


def check_providers(ops: Iterable[str], providers: Optional[Iterable[str]]) -> Optional[set]:
    """``providers`` as a set, each checked to name a provider of at least one of ``ops`` (benchmark names; a
    ValueError naming the valid providers otherwise); None (every provider) stays None. ``fastrank`` is always
    measured: every ratio is against it."""
    if providers is None:
        return None
    ops = list(ops)
    known = [name for op in ops for name in OPS[op].provider_names]
    chosen = set(providers)
    unknown = sorted(chosen.difference(known))
    if unknown:
        raise ValueError(
            f"--provider {', '.join(unknown)}: not a provider of {', '.join(ops)}; choose from "
            f"{', '.join(dict.fromkeys(known))}"
        )
    return chosen | {"fastrank"}


def run(
    ops: Iterable[str],
    device: torch.device,
    *,
    full: bool = False,
    log: Optional[Callable[[str], None]] = None,
    providers: Optional[Iterable[str]] = None,
) -> dict:
    """Measure every provider of every case (only those named in ``providers``, and ``fastrank``, when given).

    ``log`` receives progress lines: one per case, one per provider as it starts and one with its elapsed
    seconds when it is done, and one per baseline that could not be built, with the reason. Such a baseline
    is listed under the case's ``unavailable`` (name -> reason) and the others are measured; a case whose
    shared inputs cannot be loaded (:class:`MissingInput`) goes to ``skipped``.

    An end-to-end provider closure may carry ``stats(calls) -> dict``: numbers of its own over its last ``calls``
    calls (the timed ones), added to its measurement's ``extra`` (serve: per-request latency percentiles).
    """
    say = log or (lambda line: None)
    ops = list(ops)
    for op in ops:  # all checked before the first case runs
        if op not in OPS:
            raise ValueError(f"--op {op!r} is not a benchmark; choose from {', '.join(OPS)}")
    chosen = check_providers(ops, providers)
    results = {
        "environment": environment(device),
        "command": " ".join(sys.argv),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cases": [],
    }
    for op in ops:
        benchmark = OPS[op]
        cases = benchmark.full_cases(device) if full else benchmark.quick_cases(device)
        for i, case in enumerate(cases):
            say(f"[{op} {i + 1}/{len(cases)}] {case.label()}")
            start = time.perf_counter()
            try:
                fns = benchmark.providers_of(case, device)
                if chosen is not None:
                    fns = {name: fn for name, fn in fns.items() if name in chosen}
            except MissingInput as e:
                say(f"  not run: {e}")
                skipped = {"op": op, "case": benchmark.case_dict(case), "reason": str(e)}
                results.setdefault("skipped", []).append(skipped)
                continue
            say(f"  inputs and providers ready in {time.perf_counter() - start:.1f} s")
            unavailable = {name: fn.reason for name, fn in fns.items() if isinstance(fn, Unavailable)}
            for name, reason in unavailable.items():
                say(f"  {name}: not run: {reason}")
            e2e = benchmark.end_to_end.get(device.type)
            runnable = {name: fn for name, fn in fns.items() if name not in unavailable}
            if device.type == "cpu" and not e2e:  # timed in turns, see measure_cpu
                say(f"  timing {', '.join(runnable)} in turns ...")
                start = time.perf_counter()
                measured = measure_cpu(runnable)
                for m in measured:
                    say(f"  {m.provider}: {m.time_ms:.3f} ms per call")
                say(f"  timed in {time.perf_counter() - start:.1f} s")
            else:
                measured = []
                for name, fn in runnable.items():
                    say(f"  {name} ...")
                    start = time.perf_counter()
                    if e2e:
                        measured.append(measure(name, fn, device, end_to_end=True, **e2e))
                    else:
                        measured.append(measure(name, fn, device))
                    if e2e and callable(getattr(fn, "stats", None)):  # numbers of its own over the timed calls
                        measured[-1].extra.update(fn.stats(e2e["repeats"]))
                    say(f"  {name}: {time.perf_counter() - start:.1f} s")
            if benchmark.items_per_call is not None:
                for m in measured:
                    if m.time_ms:
                        m.extra["items_per_second"] = benchmark.items_per_call(case) / (m.time_ms / 1e3)
            if benchmark.work_per_call is not None:
                work = benchmark.work_per_call(case)
                peak = gpu_bf16_peak_flops(device)
                for m in measured:
                    if m.time_ms:
                        m.extra.update(throughput(work, m.time_ms, peak))
            del fns
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            ours = next(m for m in measured if m.provider == "fastrank")
            floor = MEMORY_FLOOR[device.type]
            lower_bound = ours.peak_bytes is not None and ours.peak_bytes < floor
            ratios = {
                m.provider: {
                    "time": ratio(m.time_ms, ours.time_ms),
                    "graph_time": ratio(m.graph_time_ms, ours.graph_time_ms),
                    "memory": ratio(m.peak_bytes, ours.peak_bytes, floor),
                    # fastrank's peak is under the measurement floor: the true ratio is at least this
                    "memory_is_lower_bound": lower_bound,
                }
                for m in measured
                if m.provider != "fastrank"
            }
            results["cases"].append(
                {
                    "op": op,
                    "case": benchmark.case_dict(case),
                    "measurements": [m.to_dict() for m in measured],
                    "ratios": ratios,
                    "unavailable": unavailable,
                }
            )
    return results


def _fmt_ratio(r: Optional[float], lower_bound: bool = False) -> str:
    if r is None:
        return "-"
    text = f"{r:.3g}x" if r < 1000 else f"{r:.2e}x"
    return (">" + text) if lower_bound else text


def case_label(op: str, case: dict) -> str:
    """A saved case's shape in a few words, as the table and the plot show it (its op's ``table_label``; files
    saved before the Case fields were renamed read the same)."""
    benchmark = OPS.get(op)
    if benchmark is None:  # an op this version does not have: its fields as saved
        return " ".join(f"{key}={value}" for key, value in case.items())
    return benchmark.table_label(benchmark.current_keys(case))


def _rate_unit(op: str) -> str:
    """What a saved op's ``items_per_second`` counts: "pairs/s", ..."""
    unit = OPS[op].unit if op in OPS else None
    return f"{unit or 'items'}/s"


def _latency(measurement: dict) -> str:
    """`` p50/p99 12.3/45.6 ms`` where a provider reported per-request latencies (serve), else empty."""
    extra = measurement.get("extra", {})
    if "p50_ms" not in extra:
        return ""
    return f" p50/p99 {extra['p50_ms']:.1f}/{extra['p99_ms']:.1f} ms"


def format_table(results: dict) -> str:
    """One line per (case, baseline): how many times slower / larger the baseline is than fastrank; a
    baseline that could not be built, and a case that could not be set up, get a line with the reason."""
    env = results["environment"]
    hw = env.get("gpu") or f"CPU ({env.get('cpu_threads')} threads)"
    lines = [
        f"fastrank {env.get('fastrank', '?')} on {hw}; torch {env['torch']}, triton {env.get('triton')}",
        "ratios are baseline / fastrank: above 1x means fastrank is faster (time) or smaller (peak memory);",
        "time: eager calls timed with CUDA events (launch and Python overhead included) or the wall clock on CPU;",
        "graph: the same call captured in a CUDA graph and replayed (device time only; GPU only);",
        "memory: peak allocated above the inputs; '>' marks a fastrank peak under the measurement floor (1 MiB on CPU)",
        "",
        f"{'op':<11} {'case':<36} {'baseline':<15} {'time':>9} {'graph':>9} {'memory':>10}   fastrank: time, peak",
    ]
    for entry in results["cases"]:
        label = case_label(entry["op"], entry["case"])
        ours = next(m for m in entry["measurements"] if m["provider"] == "fastrank")
        if ours["time_ms"] is None:
            ours_txt = ours["error"]
        elif "items_per_second" in ours.get("extra", {}):
            rate = f"{ours['extra']['items_per_second']:.1f} {_rate_unit(entry['op'])}"
            ours_txt = f"{rate}{_latency(ours)}, {format_bytes(ours['peak_bytes'])}"
            extra = ours["extra"]
            if "tokens_per_second" in extra:
                ours_txt += f", {extra['tokens_per_second']:,.0f} tokens/s"
                if "mfu" in extra:
                    ours_txt += f" ({100 * extra['mfu']:.1f}% of bf16 peak)"
        else:
            ours_txt = f"{ours['time_ms']:.3f} ms, {format_bytes(ours['peak_bytes'])}"
        baselines = [m for m in entry["measurements"] if m["provider"] != "fastrank"]
        if not baselines:  # every baseline was unavailable: fastrank's own numbers still get a line
            lines.append(f"{entry['op']:<11} {label:<36} {'-':<15} {'-':>9} {'-':>9} {'-':>10}   {ours_txt}")
            label = ""
        for m in baselines:
            r = entry["ratios"][m["provider"]]
            if m["error"]:
                t_txt, g_txt, m_txt = m["error"], "", ""
            else:
                t_txt, g_txt = _fmt_ratio(r["time"]), _fmt_ratio(r["graph_time"])
                m_txt = _fmt_ratio(r["memory"], r["memory_is_lower_bound"])
            theirs = f" ({m['provider']}:{_latency(m)})" if _latency(m) else ""  # serve: the baseline's latencies
            lines.append(
                f"{entry['op']:<11} {label:<36} {m['provider']:<15} {t_txt:>9} {g_txt:>9} {m_txt:>10}   {ours_txt}"
                + theirs
            )
            ours_txt = ""
            label = ""
        for name, reason in entry.get("unavailable", {}).items():
            lines.append(f"{entry['op']:<11} {label:<36} {name:<15} not run: {reason}")
            label = ""
    for skipped in results.get("skipped", []):
        label = case_label(skipped["op"], skipped["case"])
        lines.append(f"{skipped['op']:<11} {label:<36} {'(all)':<15} not run: {skipped['reason']}")
    return "\n".join(lines)


def write_json(results: dict, path: str) -> None:
    """Save the results of :func:`run` (read back by :func:`read_json`)."""
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")


def read_json(path: str) -> dict:
    """Results saved by :func:`write_json` (``fastrank bench --json``); ValueError naming the file otherwise."""
    try:
        with open(path) as f:
            results = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(results, dict) or not {"environment", "cases"} <= results.keys():
        raise ValueError(f"{path}: not the output of `fastrank bench --json` (no 'environment' and 'cases')")
    return results
