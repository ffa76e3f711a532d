"""A figure of benchmark results: time and peak-memory ratios baseline / fastrank, per op and case.

One row of panels per op, horizontal bars on a log scale from the 1x line (to the right: fastrank is faster or
smaller; to the left: the baseline is), each labelled with its ratio. Needs matplotlib, an optional
dependency (``pip install matplotlib``); nothing else in fastrank imports it.

    from fastrank.benchmarks.plot import plot_results
    plot_results(["bench/results/pool-h100.json", "bench/results/rerank-h100.json"], "ratios.png")
"""

from __future__ import annotations

import math
import os
from typing import List, Sequence

from fastrank.benchmarks.runner import case_label, read_json

MATPLOTLIB_MISSING = "needs matplotlib, which is not installed: pip install matplotlib"
_ROW_INCHES = 0.24  # height of one bar's row
_PANEL_INCHES = 0.7  # title and axis of one op's panels


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"plotting benchmark results {MATPLOTLIB_MISSING}") from e
    return Figure


def check_output(path: str) -> None:
    """Before a long run: raise ImportError when matplotlib is missing, ValueError when ``path`` cannot be
    written as a figure (unknown file type, missing directory)."""
    figure = _figure_class()
    kind = os.path.splitext(path)[1].lstrip(".").lower()
    supported = figure().canvas.get_supported_filetypes()
    if kind not in supported:
        raise ValueError(
            f"{path}: cannot write a figure of type {kind or '(no extension)'!r}; "
            f"use .png, .svg or .pdf (any of {', '.join(sorted(supported))})"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{path}: the folder {folder} does not exist")


def _rows(results: Sequence[dict]) -> dict:
    """op -> [(case label, baseline, time ratio, memory ratio, memory is a lower bound, note)], in run order."""
    by_op: dict = {}
    for res in results:
        for entry in res["cases"]:
            rows = by_op.setdefault(entry["op"], [])
            label = case_label(entry["op"], entry["case"])
            for m in entry["measurements"]:
                if m["provider"] == "fastrank":
                    continue
                r = entry["ratios"][m["provider"]]
                rows.append((label, m["provider"], r["time"], r["memory"], r["memory_is_lower_bound"], m["error"]))
            for name in entry.get("unavailable", {}):
                rows.append((label, name, None, None, False, "not run"))
    return by_op


def _title(results: Sequence[dict]) -> str:
    machines = []
    for res in results:
        env = res["environment"]
        hw = env.get("gpu") or f"CPU ({env.get('cpu_threads')} threads)"
        text = f"fastrank {env.get('fastrank', '?')} on {hw}, torch {env['torch']}"
        if text not in machines:
            machines.append(text)
    return (
        "; ".join(machines) + "\nbaseline / fastrank: right of 1x fastrank is faster or smaller, left of it slower"
        " or larger; '>': a lower bound"
    )


def _ratio_text(value: float) -> str:
    """0.292x, 36.5x, 594x, 2.4e3x: three significant digits, or two and the power of ten from 1000 up."""
    if float(f"{value:.3g}") < 1000:
        return f"{value:.3g}x"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}x"


def _panel(ax, rows, column: int, color_of) -> None:
    """One op's bars of one quantity (column 2: time, 3: memory) from the 1x line, labelled with the ratio."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    values = [row[column] for row in rows if row[column] is not None] + [1.0]
    # whole decades, at least 0.1x to 10x, with room for the labels beside the bars
    lo = 10.0 ** min(-1, math.floor(math.log10(min(values) / 3)))
    hi = 10.0 ** max(1, math.ceil(math.log10(max(values) * 8)))
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _ratio_text(x)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.axvline(1.0, color="black", linewidth=1)
    for y, row in enumerate(rows):
        if y and row[0] != rows[y - 1][0]:
            ax.axhline(y - 0.5, color="0.85", linewidth=0.6)
        value = row[column]
        if value is None:
            ax.text(1.0, y, f" {row[5] or 'no value'}", va="center", ha="left", fontsize=7, color="0.35")
            continue
        ax.barh(y, value - 1.0, left=1.0, height=0.7, color=color_of[row[1]])
        bound = ">" if column == 3 and row[4] else ""
        text = bound + _ratio_text(value)
        right = value >= 1.0
        ax.text(
            value * (1.08 if right else 1 / 1.08), y, text, va="center", ha="left" if right else "right", fontsize=7
        )
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", which="major", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)


def plot(results: Sequence[dict], out: str) -> None:
    """Write the figure of one or more results of :func:`fastrank.benchmarks.runner.run` to ``out``
    (the type from its extension: .png, .svg, .pdf, ...)."""
    figure = _figure_class()
    by_op = {op: rows for op, rows in _rows(results).items() if rows}
    if not by_op:
        raise ValueError("no baseline was measured: nothing to plot")
    heights = [len(rows) * _ROW_INCHES + _PANEL_INCHES for rows in by_op.values()]
    fig = figure(figsize=(13, sum(heights) + 0.9), layout="constrained")
    axes = fig.subplots(len(by_op), 2, sharey="row", squeeze=False, gridspec_kw={"height_ratios": heights})
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:olive"]
    for (op, rows), (ax_time, ax_mem) in zip(by_op.items(), axes):
        names: List[str] = list(dict.fromkeys(row[1] for row in rows))
        color_of = {name: palette[i % len(palette)] for i, name in enumerate(names)}
        _panel(ax_time, rows, 2, color_of)
        _panel(ax_mem, rows, 3, color_of)
        labels = [
            f"{row[0]}   {row[1]}" if y == 0 or row[0] != rows[y - 1][0] else row[1] for y, row in enumerate(rows)
        ]
        ax_time.set_yticks(range(len(rows)), labels, fontsize=7)
        ax_time.set_title(f"{op}: time", loc="left", fontsize=9, fontweight="bold")
        ax_mem.set_title(f"{op}: peak memory", loc="left", fontsize=9, fontweight="bold")
    fig.suptitle(_title(results), fontsize=9)
    fig.savefig(out, dpi=110)


def plot_results(paths: Sequence[str], out: str) -> None:
    """Write the figure of one or more JSON files saved by ``fastrank bench --json`` to ``out``."""
    plot([read_json(path) for path in paths], out)
