"""Put training runs side by side: validation loss curves and one results table.

    rbf-tutorial compare runs/gpu10-dot-rope runs/gpu10-rbf-susie-reg ... [--out runs]

Reads each run folder written by :mod:`rbf_tutorial.train` (through :mod:`rbf_tutorial.runs`:
``config.json``, ``metrics.jsonl``, ``summary.json`` when the run finished or was stopped cleanly),
prints a markdown table and writes
``compare.md`` and ``compare.png`` (validation loss against step, and against wall time) to
``--out`` (default: the folder the runs sit in).

Speeds are compared as tokens per second relative to a baseline: the first dot-product run if
there is one (the attention everything else is measured against), else the first run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .runs import Run, load_run, write_atomically

__all__ = ["Run", "compare", "load_run", "main", "results_table"]

# Dot-product runs keep the colour chapters use for dot attention; RBF variants take the others.
DOT_COLOR = "#c44e52"
OTHER_COLORS = ("#2a7f9e", "#e0a030", "#55a868", "#8172b2", "#8c8c8c", "#937860", "#da8bc3")


def _unique_names(runs: Sequence[Run]) -> list[str]:
    """Run names, with the folder added where two runs share a name (e.g. one variant on two devices)."""
    names = [run.name for run in runs]
    return [
        f"{name} ({run.path.name})" if names.count(name) > 1 else name
        for name, run in zip(names, runs, strict=True)
    ]


def _baseline(runs: Sequence[Run]) -> int:
    return next((index for index, run in enumerate(runs) if run.attention == "dot"), 0)


def _speed(run: Run) -> float | None:
    speed = run.summary.get("tokens_per_s_median")
    if speed is None:
        speeds = sorted(row["tokens_per_s"] for row in run.metrics if row.get("tokens_per_s"))
        speed = speeds[len(speeds) // 2] if speeds else None
    return speed


def _format_count(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}{unit}"
    return f"{value:.0f}{' ' + unit if unit else ''}"


def results_table(runs: Sequence[Run]) -> str:
    """The markdown results table of ``runs`` (see the module docstring for the speed baseline)."""
    names = _unique_names(runs)
    baseline = _baseline(runs)
    baseline_speed = _speed(runs[baseline])
    header = [
        "run",
        "params",
        "final val loss (nats)",
        "bits per byte",
        "tokens/s",
        f"speed vs {names[baseline]}",
        "steps",
        "device",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * 6 + ["---"]) + "|"]
    for name, run in zip(names, runs, strict=True):
        last = run.evaluated[-1] if run.evaluated else None
        speed = _speed(run)
        ratio = f"{speed / baseline_speed:.2f}x" if speed and baseline_speed else "—"
        steps = run.summary.get("steps", run.metrics[-1]["step"] if run.metrics else 0)
        planned = run.config.get("steps")
        steps_text = str(steps) if run.complete or steps == planned else f"{steps} of {planned} (stopped)"
        cells = [
            name,
            _format_count(run.summary.get("parameters")),
            f"{last['val_loss']:.4f}" if last else "—",
            f"{last['val_bpb']:.4f}" if last else "—",
            _format_count(speed),
            ratio,
            steps_text,
            run.summary.get("device", "—"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_runs(runs: Sequence[Run]):
    """Validation loss against step (left) and against training wall time (right), one line per run."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12.0, 4.5), layout="constrained")
    by_step, by_time = figure.subplots(1, 2)
    longest = max((row["elapsed_s"] for run in runs for row in run.evaluated), default=0.0)
    minutes = longest > 180
    others = iter(OTHER_COLORS * (len(runs) // len(OTHER_COLORS) + 1))
    for name, run in zip(_unique_names(runs), runs, strict=True):
        color = DOT_COLOR if run.attention == "dot" else next(others)
        rows = run.evaluated
        losses = [row["val_loss"] for row in rows]
        times = [row["elapsed_s"] / (60 if minutes else 1) for row in rows]
        by_step.plot([row["step"] for row in rows], losses, "o-", color=color, label=name, markersize=3)
        by_time.plot(times, losses, "o-", color=color, label=name, markersize=3)
    by_step.set(xlabel="step", ylabel="validation loss (nats per byte)", title="Validation loss by step")
    by_time.set(
        xlabel=f"training time ({'min' if minutes else 's'}, evaluation included)",
        ylabel="validation loss (nats per byte)",
        title="Validation loss by wall time",
    )
    for axes in (by_step, by_time):
        axes.grid(alpha=0.3)
        axes.spines[["top", "right"]].set_visible(False)
    by_step.legend(frameon=False)
    return figure


def compare(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike | None = None):
    """``(markdown_table, figure)`` for the runs; with ``out``, also writes compare.md and compare.png."""
    if isinstance(run_dirs, (str, os.PathLike)) or not run_dirs:
        raise ValueError("run_dirs: expected a list of one or more run folders")
    runs = [load_run(run_dir) for run_dir in run_dirs]
    table = results_table(runs)
    figure = plot_runs(runs)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        sources = ", ".join(sorted({run.summary.get("data", "") for run in runs} - {""}))
        note = f"\nData: {sources}.\n" if sources else ""
        write_atomically(out / "compare.md", f"# Training runs compared\n\n{table}\n{note}")
        write_atomically(out / "compare.png", lambda path: figure.savefig(path, dpi=120, format="png"))
    return table, figure


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m rbf_tutorial.compare",
        allow_abbrev=False,
        description="Validation loss curves and a results table of runs written by `rbf-tutorial train`.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where compare.md and compare.png go (default: the folder holding the runs)",
    )
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    out = args.out
    if out is None:
        out = Path(os.path.commonpath([path.resolve().parent for path in args.run_dirs]))
    try:
        table, _ = compare(args.run_dirs, out)
    except ValueError as error:
        parser.error(str(error))
    print(table)
    print(f"\nwrote {out / 'compare.md'} and {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
