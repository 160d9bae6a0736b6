"""Reading a benchmark run: tables, the kernel's targets, the cost of XSA, and plots.

Everything here works on :class:`rbf_tutorial.bench.Result` lists, fresh from a run or loaded from a
recording (:func:`rbf_tutorial.bench.load_results`), so it runs on any machine::

    from rbf_tutorial import bench, bench_report
    results, run = bench.load_results()
    print(bench_report.format_tables(results))
    print(bench_report.format_target_checks(bench_report.check_targets(results)))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from .bench import FLASH, METHODS, Cell, Result

__all__ = [
    "TARGETS", "TARGETS_HELP", "Target", "TargetCheck", "check_targets", "format_tables",
    "format_target_checks", "format_xsa_overhead", "plot_results", "time_ratio_figure",
]

_STATUS_TEXT = {"OOM": "OOM", "unavailable": "n/a", "error": "error"}
FLEX = "rbf-flex"


def _label(method: str) -> str:
    return METHODS[method].label if method in METHODS else method


def _format_ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _format_small(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def _by_cell(results: Sequence[Result]) -> dict[Cell, dict[str, Result]]:
    table: dict[Cell, dict[str, Result]] = {}
    for r in results:
        table.setdefault(r.cell, {})[r.method] = r
    return table


def _row_key(r: Result, per_mode: bool) -> list[str]:
    return [str(r.head_dim), str(r.seq_len), "yes" if r.causal else "no"] + ([r.mode] if per_mode else [])


def _time_entry(ms: float | None, ratio: float | None) -> str | None:
    if ms is None:
        return None
    return f"{_format_ms(ms)} {ratio:.2f}x" if ratio is not None else _format_ms(ms)


def _graph_entry(r: Result) -> str | None:
    if r.cuda_graph_ms is None:
        return "n/a" if r.cuda_graph_note else None
    return _time_entry(r.cuda_graph_ms, r.cuda_graph_ratio_to_flash)


def _wide_table(results: Sequence[Result], methods: Sequence[str], entry: Callable[[Result], str | None],
                per_mode: bool = True) -> str:
    """A row per cell (both modes merged when not ``per_mode``), a column per method."""
    rows: dict[tuple[str, ...], dict[str, str]] = {}
    for r in results:
        row = rows.setdefault(tuple(_row_key(r, per_mode)), {})
        text = entry(r) if r.ok else _STATUS_TEXT.get(r.status, r.status)
        # merging modes: a number beats a status, and the first number stays
        if text is not None and (r.method not in row or row[r.method] in _STATUS_TEXT.values()):
            row[r.method] = text
    headers = ["D", "N", "causal"] + (["mode"] if per_mode else []) + [_label(m) for m in methods]
    body = [[*key, *(row.get(m, "-") for m in methods)] for key, row in rows.items()]
    return tabulate(body, headers=headers, stralign="right", disable_numparse=True)


def _graph_notes(results: Sequence[Result]) -> list[str]:
    """Why a CUDA-graph time is missing, once per (method, reason)."""
    seen: dict[tuple[str, str], list[Cell]] = {}
    for r in results:
        if r.ok and r.cuda_graph_ms is None and r.cuda_graph_note:
            seen.setdefault((r.method, r.cuda_graph_note), []).append(r.cell)
    return [f"  n/a, {method} ({len(cells)} cell{'s' * (len(cells) > 1)}, first {cells[0].describe()}): {why}"
            for (method, why), cells in seen.items()]


def format_tables(results: Sequence[Result], methods: Sequence[str] | None = None) -> str:
    """The report: eager time, CUDA-graph time, peak memory and error; a row per cell, a column per method."""
    if not results:
        return "No results."
    methods = list(methods) if methods is not None else list(dict.fromkeys(r.method for r in results))
    first = results[0]
    sections = [
        "Columns: " + ", ".join(f"{_label(m)} = {m}" for m in methods)
        + ".  n/a = unavailable, OOM = out of memory, - = not measured."
        + f"\nbatch {first.batch}, heads x D = {first.heads * first.head_dim}",
        f"Eager time: ms and x {FLASH}'s eager time (median of triton.testing.do_bench, L2 flushed; "
        "what a Python loop gets)\n"
        + _wide_table(results, methods, lambda r: _time_entry(r.ms, r.ratio_to_flash)),
    ]
    if any(r.cuda_graph_ms is not None or r.cuda_graph_note for r in results):
        notes = _graph_notes(results)
        sections.append(
            f"CUDA-graph time: ms and x {FLASH}'s CUDA-graph time (one captured step replayed: the GPU's "
            "share; eager minus this is host time)\n" + _wide_table(results, methods, _graph_entry)
            + ("\n" + "\n".join(notes) if notes else ""))
    else:
        sections.append("CUDA-graph time: not in this run (recorded before the benchmark measured it).")
    sections.append("Peak memory, MiB beyond the inputs\n" + _wide_table(
        results, methods, lambda r: None if r.peak_mib is None else _format_small(r.peak_mib)))
    sections.append(
        "Relative error of the forward output vs a float32 reference (RBF vs RBF, dot vs dot)\n"
        + _wide_table(results, methods, lambda r: None if r.rel_err is None else f"{r.rel_err:.1e}",
                      per_mode=False))
    return "\n\n".join(sections)


def format_xsa_overhead(results: Sequence[Result], *, plain: str = "rbf-triton") -> str:
    """Eager time of the kernel with XSA (fused, and unfused when measured) over the plain kernel's.

    Empty when the run measured no XSA method next to ``plain``.
    """
    cells = _by_cell(results)
    columns = [name for name in ("rbf-triton-xsa", "rbf-triton-xsa-unfused")
               if any(name in row for row in cells.values())]
    body = []
    for row in cells.values():
        base = row.get(plain)
        if not columns or base is None or not base.ok or not base.ms:
            continue
        ratios = [f"{row[c].ms / base.ms:.2f}x" if c in row and row[c].ok else "n/a" for c in columns]
        body.append([*_row_key(base, True), *ratios])
    if not body:
        return ""
    return (f"XSA cost: eager time with exclusive self attention / time of {plain} (same cell)\n"
            + tabulate(body, headers=["D", "N", "causal", "mode", *map(_label, columns)],
                       stralign="right", disable_numparse=True))


@dataclasses.dataclass(frozen=True)
class Target:
    """``value(ours, peers) <= limit`` in every cell where ``applies``; ``strict`` asks for ``<``."""

    text: str
    limit: float
    value: Callable[[Result, dict[str, Result]], float | None]  # None: a peer is missing here
    applies: Callable[[Cell], bool] = lambda cell: True
    strict: bool = False
    shown: str = "{:.2f}x"

    def passes(self, value: float) -> bool:
        return value < self.limit if self.strict else value <= self.limit  # NaN fails either way


def _over(peer: str, field: str) -> Callable[[Result, dict[str, Result]], float | None]:
    """Our ``field`` over the peer's in the same cell; None when the peer has no number there."""
    def value(ours: Result, row: dict[str, Result]) -> float | None:
        other = row.get(peer)
        if other is None or not other.ok:
            return None
        mine, theirs = getattr(ours, field), getattr(other, field)
        return mine / theirs if mine is not None and theirs else None

    return value


TARGETS: tuple[Target, ...] = (
    Target("bf16 relative error vs float32 <= 2.5e-3, every cell", 2.5e-3, lambda ours, row: ours.rel_err,
           shown="{:.2e}"),
    Target(f"peak memory <= 1.1x {FLASH}'s, every cell", 1.1, _over(FLASH, "peak_mib")),
    Target(f"at N >= 4096, eager time <= 1.0x {FLASH}'s, every cell", 1.0, _over(FLASH, "ms"),
           applies=lambda cell: cell.seq_len >= 4096),
    Target(f"faster than FlexAttention: eager time < 1.0x {FLEX}'s, every cell", 1.0, _over(FLEX, "ms"),
           strict=True),
    Target(f"at N = 1024, eager forward <= 1.1x {FLASH}'s", 1.1, _over(FLASH, "ms"),
           applies=lambda cell: cell.seq_len == 1024 and cell.mode == "fwd"),
    Target(f"at N = 1024, eager forward+backward <= 1.3x {FLASH}'s", 1.3, _over(FLASH, "ms"),
           applies=lambda cell: cell.seq_len == 1024 and cell.mode == "fwd+bwd"),
)
"""What the fused kernel promises, judged on its eager times (what users get)."""

TARGETS_HELP = "also judge rbf-triton against its targets and print met / not met with the worst cell of " \
    "each: " + "; ".join(t.text for t in TARGETS) + ". Times are eager; a cell where rbf-triton did not " \
    "run counts as not met, one where the peer did not run is skipped."


@dataclasses.dataclass
class TargetCheck:
    """One target judged over a run: met (True), not met (False) or not checkable (None)."""

    target: str
    checked: int = 0
    misses: list[str] = dataclasses.field(default_factory=list)
    worst: str = ""  # the cell furthest from the limit, with its value
    worst_value: float | None = None

    @property
    def met(self) -> bool | None:
        return False if self.misses else (True if self.checked else None)


def check_targets(results: Sequence[Result], *, method: str = "rbf-triton") -> list[TargetCheck]:
    """Judge ``method`` against every target in :data:`TARGETS`, cell by cell."""
    checks = [TargetCheck(target.text) for target in TARGETS]
    for cell, row in _by_cell(results).items():
        ours = row.get(method)
        if ours is None:
            continue
        for target, check in zip(TARGETS, checks, strict=True):
            if not target.applies(cell):
                continue
            if not ours.ok:
                check.checked += 1
                check.misses.append(f"{cell.describe()}: {ours.status}")
                check.worst, check.worst_value = check.misses[-1], math.inf  # nothing is worse
                continue
            value = target.value(ours, row)
            if value is None:
                continue
            check.checked += 1
            where = f"{cell.describe()}: {target.shown.format(value)}"
            if not target.passes(value):
                check.misses.append(where)
            if check.worst_value is None or not value <= check.worst_value:
                check.worst, check.worst_value = where, value
    return checks


def format_target_checks(checks: Sequence[TargetCheck], *, method: str = "rbf-triton") -> str:
    """A line per target: met or not, how many cells passed, and the worst cell."""
    body = [[{True: "met", False: "NOT MET", None: "not checked"}[c.met], c.target,
             f"{c.checked - len(c.misses)}/{c.checked}", c.worst or "-"] for c in checks]
    return (f"Targets for {method} (eager times):\n"
            + tabulate(body, headers=["", "target", "cells passed", "worst cell"], disable_numparse=True))


def plot_results(results: Sequence[Result], out_dir: Path, *, device_name: str = "") -> list[Path]:
    """PNGs, one panel per (D, causal, mode): eager and CUDA-graph time over flash's, and peak memory."""
    if not results:
        return []
    title = f"RBF attention vs dot-product SDPA, bf16{', ' + device_name if device_name else ''}"
    figures = {"time_ratio.png": time_ratio_figure(results, title=title)}
    if any(r.cuda_graph_ratio_to_flash for r in results):
        figures["time_ratio_cuda_graph.png"] = time_ratio_figure(results, title=title, timing="cuda-graph")
    figures["peak_memory.png"] = _plot_grid(results, lambda r: r.peak_mib, ylabel="peak memory (MiB)",
                                            title=title)
    for filename, figure in figures.items():
        figure.savefig(out_dir / filename, dpi=120)
    return [out_dir / filename for filename in figures]


def time_ratio_figure(results: Sequence[Result], *, title: str = "", timing: str = "eager") -> Any:
    """Time over dot-product flash's time vs N, one panel per (D, causal, mode); guides at 1.0 and 1.3.

    ``timing`` is ``"eager"`` (what a Python loop gets) or ``"cuda-graph"`` (the GPU's share).
    """
    if timing not in ("eager", "cuda-graph"):
        raise ValueError(f"timing: expected 'eager' or 'cuda-graph', got {timing!r}")
    ratio = (lambda r: r.ratio_to_flash) if timing == "eager" else (lambda r: r.cuda_graph_ratio_to_flash)
    return _plot_grid(results, ratio, ylabel=f"{timing} time / {FLASH}'s", title=title, skip=(FLASH,),
                      guides=(1.0, 1.3))


def _plot_grid(results: Sequence[Result], value: Callable[[Result], float | None], *, ylabel: str,
               title: str, skip: Sequence[str] = (), guides: Sequence[float] = ()) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state touched
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = list(dict.fromkeys((r.head_dim, r.causal, r.mode) for r in results))
    every_method = list(dict.fromkeys(r.method for r in results))
    colors = {m: f"C{i % 10}" for i, m in enumerate(every_method)}
    seq_lens = sorted({r.seq_len for r in results})
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    handles: dict[str, Any] = {}
    for ax, (head_dim, causal, mode) in zip(axes, panels, strict=False):
        for method in (m for m in every_method if m not in skip):
            points = sorted((r.seq_len, value(r)) for r in results if r.ok and value(r)
                            and (r.method, r.head_dim, r.causal, r.mode) == (method, head_dim, causal, mode))
            if points:
                (line,) = ax.plot(*zip(*points, strict=True), marker="o", color=colors[method], label=method)
                handles.setdefault(method, line)
        for level in guides:
            ax.axhline(level, color="0.4", linestyle="--" if level == 1.0 else ":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(seq_lens, [str(n) for n in seq_lens])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        # label the minor ticks at 2, 3 and 5 (times a power of ten) too: ratios span a decade or less
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "235" else ""))
        ax.set_title(f"D={head_dim}, {'causal' if causal else 'non-causal'}, {mode}", fontsize=10)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.25)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if handles:
        axes[0].legend(list(handles.values()), list(handles), fontsize=7)
    figure.suptitle(title)
    return figure
