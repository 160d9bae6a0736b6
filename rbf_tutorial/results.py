"""Training comparisons recorded on a GPU, shipped with the package so a CPU can show real numbers.

On the GPU, after training the variants (``rbf-tutorial train --preset gpu10 --variant ...``)::

    from rbf_tutorial import results
    results.record_runs(["runs/gpu10-dot-rope", "runs/gpu10-rbf-susie-reg", ...],
                        "rbf_tutorial/recorded/training_gpu10_h100.json",
                        command="rbf-tutorial train --preset gpu10 --variant VARIANT  (for each run)")

Anywhere, later::

    recorded = results.load_recorded()   # the H100 comparison that ships with the package
    print(results.describe(recorded))    # device, versions, date, command
    print(results.format_table(recorded))
    results.plot_recorded(recorded)      # validation loss by step and by wall time

The file keeps per run what the results table and the loss plots need (name, model settings,
parameters, steps, final validation loss and bits per byte, tokens per second, times, and the
validation curve), not the checkpoints or every logged row. It reads back as
:class:`rbf_tutorial.runs.Run` objects, so a recorded comparison and a fresh one are shown by
the very same code.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import compare, runs
from .runs import Run

__all__ = [
    "FORMAT_VERSION",
    "RECORDED_TRAINING",
    "RecordedTraining",
    "describe",
    "format_table",
    "load_recorded",
    "plot_recorded",
    "record_runs",
]

FORMAT_VERSION = 1
RECORDED_TRAINING = Path(__file__).parent / "recorded" / "training_gpu10_h100.json"

# Settings every run of one comparison must share; a table mixing them would compare the wrong thing.
_SHARED_SETTINGS = ("preset", "device", "data", "world_size", "compile")
# From each validation row, what the plots and the table read back (and the train loss beside it).
_CURVE_FIELDS = ("step", "elapsed_s", "train_loss", "val_loss", "val_bpb")
_RUN_FIELDS = (
    "parameters",
    "steps",
    "tokens",
    "final_val_loss",
    "final_val_bpb",
    "tokens_per_s_median",
    "elapsed_s",
    "wall_time_s",
)


@dataclass
class RecordedTraining:
    """A recorded comparison: its runs (:class:`rbf_tutorial.runs.Run`), where and how they were made."""

    runs: list[Run]
    metadata: dict[str, Any]
    path: Path | None = None


def _round(value: Any) -> Any:
    # Seven significant digits: far below run-to-run noise, and the file stays readable in a diff.
    return float(f"{value:.7g}") if isinstance(value, float) else value


def _run_record(run: Run) -> dict[str, Any]:
    if not run.summary:
        raise ValueError(f"run_dirs: {run.path} has no summary.json; let the run finish (or resume it)")
    if not run.complete:
        raise ValueError(
            f"run_dirs: {run.path} stopped after {run.summary.get('steps')} of "
            f"{run.config.get('steps')} steps; resume it to the end before recording"
        )
    if not run.evaluated:
        raise ValueError(f"run_dirs: {run.path} logged no validation loss")
    record: dict[str, Any] = {"name": run.name, "variant": run.summary.get("variant")}
    record.update({name: _round(run.summary.get(name)) for name in _RUN_FIELDS})
    record["seed"] = run.config.get("seed")
    record["model"] = run.config.get("model", {})
    record["train"] = {key: value for key, value in run.config.items() if key != "model"}
    record["curve"] = [{name: _round(row.get(name)) for name in _CURVE_FIELDS} for row in run.evaluated]
    return record


def record_runs(
    run_dirs: Sequence[str | os.PathLike], out_json: str | os.PathLike, *, command: str
) -> dict[str, Any]:
    """Write the comparison of finished run folders to ``out_json`` and return what was written.

    ``command`` says how the runs were made, for whoever reads the numbers later. Every run must
    have finished, and all must share preset, device, data, process count and compile setting
    (ValueError naming the first that does not).
    """
    if isinstance(run_dirs, (str, os.PathLike)) or not run_dirs:
        raise ValueError("run_dirs: expected a list of one or more run folders")
    if not isinstance(command, str) or not command.strip():
        raise ValueError("command: say how the runs were made, e.g. 'rbf-tutorial train --preset gpu10 ...'")
    loaded = [runs.load_run(run_dir) for run_dir in run_dirs]
    records = [_run_record(run) for run in loaded]
    first = loaded[0].summary
    for run in loaded[1:]:
        for name in _SHARED_SETTINGS:
            if run.summary.get(name) != first.get(name):
                raise ValueError(
                    f"run_dirs: {run.path} has {name} {run.summary.get(name)!r} but {loaded[0].path} has "
                    f"{first.get(name)!r}; record runs of one comparison together"
                )
    metadata = {
        "command": command.strip(),
        "date": max(run.summary.get("date") or "" for run in loaded),  # when the last run finished
        "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{name: first.get(name) for name in (*_SHARED_SETTINGS, "torch", "triton", "cuda")},
        "seeds": sorted({record["seed"] for record in records}),
    }
    document = {"format": FORMAT_VERSION, "metadata": metadata, "runs": records}
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    runs.write_json(out_json, document, indent=1)  # compact: the curves are long
    return document


def _as_run(record: dict[str, Any], metadata: dict[str, Any]) -> Run:
    summary = {name: record.get(name) for name in _RUN_FIELDS}
    summary.update(
        label=record["name"], variant=record.get("variant"), complete=True, device=metadata.get("device")
    )
    config = {**record.get("train", {}), "model": record.get("model", {})}
    name = record["name"]
    return Run(path=Path(name), name=name, config=config, metrics=record["curve"], summary=summary)


def load_recorded(path: str | os.PathLike = RECORDED_TRAINING) -> RecordedTraining:
    """Read a file written by :func:`record_runs`; the default is the recorded H100 comparison."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no recorded training comparison at {path}")
    try:
        document = runs.read_json(path)
    except ValueError as error:
        raise ValueError(f"path: {error}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"path: {path} is not a recorded training comparison of format {FORMAT_VERSION} "
            "(write one with rbf_tutorial.results.record_runs)"
        )
    metadata = document["metadata"]
    recorded_runs = [_as_run(record, metadata) for record in document["runs"]]
    return RecordedTraining(runs=recorded_runs, metadata=metadata, path=path)


def describe(recorded: RecordedTraining) -> str:
    """Where the numbers come from: device, versions, corpus, date and the command, in two lines."""
    meta = recorded.metadata
    versions = f"torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}"
    return (
        f"{meta.get('device')}, {versions}, preset {meta.get('preset')}, seed "
        f"{', '.join(map(str, meta.get('seeds', [])))}, finished {str(meta.get('date'))[:10]}\n"
        f"data: {meta.get('data')}\ncommand: {meta.get('command')}"
    )


def format_table(recorded: RecordedTraining) -> str:
    """The markdown results table, exactly as ``rbf-tutorial compare`` prints it for run folders."""
    return compare.results_table(recorded.runs)


def plot_recorded(recorded: RecordedTraining):
    """Validation loss against step and against wall time, as ``rbf-tutorial compare`` draws it."""
    figure = compare.plot_runs(recorded.runs)
    figure.suptitle(f"Recorded: {recorded.metadata.get('preset')} on {recorded.metadata.get('device')}")
    return figure
