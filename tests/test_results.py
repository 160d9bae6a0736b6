"""Recorded training comparisons: written from run folders, read back, shown like fresh runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_runs import train_tiny_runs

from rbf_tutorial import compare, results


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two finished tiny runs on a small text file: a dot run and an RBF run."""
    return train_tiny_runs(tmp_path_factory.mktemp("runs"), ("dot-rope", "rbf-susie-reg"))


def test_record_then_load_round_trip(runs, tmp_path):
    out = tmp_path / "nested" / "recorded.json"
    document = results.record_runs(runs, out, command="rbf-tutorial train --preset smoke --variant X")
    assert json.loads(out.read_text()) == document
    assert document["format"] == results.FORMAT_VERSION
    meta = document["metadata"]
    assert meta["command"] == "rbf-tutorial train --preset smoke --variant X"
    assert meta["preset"] == "smoke" and meta["seeds"] == [0]
    assert meta["torch"] == str(torch.__version__) and meta["device"].startswith("CPU")
    assert [run["name"] for run in document["runs"]] == ["dot-rope", "rbf-susie-reg"]
    for record, folder in zip(document["runs"], runs, strict=True):
        summary = json.loads((folder / "summary.json").read_text())
        assert record["final_val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
        assert record["parameters"] == summary["parameters"] and record["steps"] == 4
        assert [point["step"] for point in record["curve"]] == [2, 4]
        assert record["model"]["attention"] in ("dot", "rbf")

    recorded = results.load_recorded(out)
    assert recorded.path == out and recorded.metadata == meta
    fresh = compare.results_table([compare.load_run(folder) for folder in runs])
    table = results.format_table(recorded)
    # The same table as for the run folders, but for rounding in the last digit and the speed column.
    assert table.splitlines()[0] == fresh.splitlines()[0]
    assert "| dot-rope |" in table and "| 1.00x |" in table.splitlines()[2]
    description = results.describe(recorded)
    assert "command: rbf-tutorial train" in description and "torch " in description
    figure = results.plot_recorded(recorded)
    assert len(figure.axes) == 2 and all(len(axes.lines) == 2 for axes in figure.axes)


def test_unfinished_runs_and_mixed_runs_are_refused(runs, tmp_path):
    stopped = tmp_path / "stopped"
    shutil.copytree(runs[0], stopped)
    summary = json.loads((stopped / "summary.json").read_text())
    (stopped / "summary.json").write_text(json.dumps({**summary, "complete": False}))
    with pytest.raises(ValueError, match="stopped after 4 of 4 steps"):
        results.record_runs([stopped], tmp_path / "out.json", command="x")
    (stopped / "summary.json").unlink()
    with pytest.raises(ValueError, match="no summary.json"):
        results.record_runs([stopped], tmp_path / "out.json", command="x")

    other_device = tmp_path / "other"
    shutil.copytree(runs[1], other_device)
    summary = json.loads((other_device / "summary.json").read_text())
    (other_device / "summary.json").write_text(json.dumps({**summary, "device": "NVIDIA H100"}))
    with pytest.raises(ValueError, match="device"):
        results.record_runs([runs[0], other_device], tmp_path / "out.json", command="x")
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize(
    ("run_dirs", "command", "message"),
    [("runs/x", "x", "run_dirs"), ([], "x", "run_dirs"), (None, " ", "command")],
)
def test_bad_arguments_are_named(runs, tmp_path, run_dirs, command, message):
    with pytest.raises(ValueError, match=message):
        results.record_runs(runs if run_dirs is None else run_dirs, tmp_path / "out.json", command=command)


def test_load_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="no recorded training comparison"):
        results.load_recorded(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        results.load_recorded(tmp_path / "bad.json")
    (tmp_path / "bench.json").write_text(json.dumps({"metadata": {}, "results": []}))
    with pytest.raises(ValueError, match="record_runs"):
        results.load_recorded(tmp_path / "bench.json")


@pytest.mark.skipif(not results.RECORDED_TRAINING.is_file(), reason="no recorded GPU comparison shipped yet")
def test_the_shipped_recording_reads_and_comes_from_a_gpu():
    recorded = results.load_recorded()
    assert recorded.metadata["preset"] == "gpu10"
    assert not recorded.metadata["device"].startswith("CPU")
    names = [run.name for run in recorded.runs]
    assert {"dot-rope", "rbf-susie-reg", "rbf-susie-reg-xsa", "rbf-rope"} <= set(names)
    assert all(run.evaluated and run.summary["final_val_loss"] > 0 for run in recorded.runs)
    assert "| 1.00x |" in results.format_table(recorded)
