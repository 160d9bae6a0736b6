"""Every chapter, executed top to bottom the way a learner's notebook runs.

chapters/NN_topic.py (or NNa_topic.py, a chapter in parts; jupytext percent format) is converted to
build/chapters/NN_topic.ipynb and run by nbmake's runner in a fresh kernel: one test per chapter. This
is the one run of each chapter with its solutions (tests/test_assignments.py runs the student version).
After the run the notebook in build/ holds the outputs, to look at when a chapter misbehaves. A failure
names the failing cell and shows its source and traceback.

Cells tagged `raises-exception` may fail (the chapter shows a failure on purpose); cells tagged
`skip-execution` are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbmake.nb_run import NotebookRun

REPO_ROOT = Path(__file__).resolve().parent.parent
CHAPTERS_DIR = REPO_ROOT / "chapters"
BUILD_DIR = REPO_ROOT / "build" / "chapters"
# "03_triton_kernel.py", and chapters in parts: "03a_triton_forward.py", "03b_triton_backward.py".
CHAPTER_GLOB = "[0-9][0-9]*_*.py"
CHAPTERS = sorted(CHAPTERS_DIR.glob(CHAPTER_GLOB))

# Per cell, as nbmake counts it. Chapters take seconds on a CPU; this only stops a hung kernel.
CELL_TIMEOUT_S = int(os.environ.get("RBF_TUTORIAL_CELL_TIMEOUT", "600"))

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.fixture(scope="session")
def chapter_build_dir() -> Path:
    """build/chapters/, emptied once per test session so no stale notebook is ever executed."""
    shutil.rmtree(BUILD_DIR, ignore_errors=True)
    BUILD_DIR.mkdir(parents=True)
    return BUILD_DIR


def convert_chapter(chapter: Path, build_dir: Path) -> Path:
    notebook = jupytext.read(chapter, fmt="py:percent")
    notebook_path = build_dir / f"{chapter.stem}.ipynb"
    jupytext.write(notebook, notebook_path, fmt="ipynb")
    return notebook_path


def _describe_failure(chapter: Path, notebook: nbformat.NotebookNode, error) -> str:
    cell_index = error.failing_cell_index
    code_cells_before = sum(1 for cell in notebook.cells[:cell_index] if cell.cell_type == "code")
    where = f"cell {cell_index} (code cell {code_cells_before + 1})" if cell_index >= 0 else "unknown cell"
    trace = _ANSI_ESCAPE.sub("", error.trace)
    return f"{chapter.name}: {where} failed: {_ANSI_ESCAPE.sub('', error.summary)}\n{trace}"


def _warn_about_cells_that_should_have_raised(chapter: Path, notebook: nbformat.NotebookNode) -> None:
    """A cell tagged `raises-exception` that ran clean tells the learner a failure that did not happen."""
    for index, cell in enumerate(notebook.cells):
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.cell_type != "code" or "raises-exception" not in tags or "skip-execution" in tags:
            continue
        if not any(output.get("output_type") == "error" for output in cell.get("outputs", [])):
            warnings.warn(
                f"{chapter.name}: cell {index} is tagged raises-exception but raised nothing on this device",
                stacklevel=2,
            )


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[chapter.stem for chapter in CHAPTERS])
def test_chapter_runs_top_to_bottom(chapter: Path, chapter_build_dir: Path, record_property) -> None:
    notebook_path = convert_chapter(chapter, chapter_build_dir)
    started = time.perf_counter()
    result = NotebookRun(notebook_path, default_timeout=CELL_TIMEOUT_S).execute()
    record_property("seconds", round(time.perf_counter() - started, 1))
    nbformat.write(result.nb, notebook_path)  # executed copy, outputs included, for a human to inspect
    if result.error is not None:
        message = _describe_failure(chapter, result.nb, result.error)
        relative_path = notebook_path.relative_to(REPO_ROOT)
        pytest.fail(f"{message}\n(the executed notebook, outputs included: {relative_path})", pytrace=False)
    _warn_about_cells_that_should_have_raised(chapter, result.nb)


def test_there_are_chapters() -> None:
    assert CHAPTERS, f"no chapters found in {CHAPTERS_DIR} (expected files named NN_topic.py)"
    for chapter in CHAPTERS:
        assert re.fullmatch(r"\d\d[a-z]?_\w+\.py", chapter.name), f"unexpected chapter name {chapter.name}"
