"""Comparing runs: the results table, the two-panel figure, the files, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_runs import train_tiny_runs

from rbf_tutorial import cli
from rbf_tutorial.compare import compare, load_run, main


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """An RBF run and a dot run (in that order: the speed baseline must still be the dot run)."""
    return train_tiny_runs(tmp_path_factory.mktemp("runs"), ("rbf-susie-reg", "dot-rope"))


def test_table_and_figure(runs, tmp_path):
    table, figure = compare(runs, out=tmp_path)
    lines = table.splitlines()
    assert lines[0].startswith("| run | params | final val loss")
    assert "speed vs dot-rope" in lines[0]
    assert len(lines) == 4  # header, rule, two runs
    rbf_row, dot_row = lines[2], lines[3]
    assert rbf_row.startswith("| rbf-susie-reg |") and dot_row.startswith("| dot-rope |")
    assert "| 1.00x |" in dot_row
    summary = json.loads((runs[1] / "summary.json").read_text())
    assert f"{summary['final_val_loss']:.4f}" in dot_row and f"{summary['final_val_bpb']:.4f}" in dot_row
    assert len(figure.axes) == 2 and all(len(axes.lines) == 2 for axes in figure.axes)
    assert table in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_stopped_run_without_summary_still_compares(runs, tmp_path):
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    for name in ("config.json", "metrics.jsonl"):
        (stopped / name).write_bytes((runs[0] / name).read_bytes())
    rows = (stopped / "metrics.jsonl").read_text().splitlines()[:2]
    (stopped / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    run = load_run(stopped)
    assert run.name == "rbf-susie-reg" and not run.complete
    table, _ = compare([stopped, runs[1]])
    assert "2 of 4 (stopped)" in table


def test_command_line(runs, tmp_path, capsys):
    assert cli.main(["compare", *map(str, runs), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| dot-rope |" in printed and "compare.md" in printed
    assert (tmp_path / "compare.png").is_file()


def test_default_out_is_the_folder_holding_the_runs(runs, capsys):
    assert main([str(run) for run in runs]) == 0
    assert (runs[0].parent / "compare.md").is_file()


def test_bad_run_folders_are_named(runs, tmp_path, capsys):
    with pytest.raises(ValueError, match="run_dir"):
        load_run(tmp_path / "missing")
    with pytest.raises(ValueError, match="metrics.jsonl"):
        load_run(tmp_path)  # a folder, but not a run
    with pytest.raises(SystemExit) as stopped:
        main([str(runs[0]), str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert stopped.value.code == 2 and "missing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="run_dirs"):
        compare([])
