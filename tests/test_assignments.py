"""`rbf-tutorial assignments` builds a student release that fails exactly at its stubs.

One release of every chapter is generated per test session. Then, per chapter:
- the student notebook has no solution left and has nbgrader's stub in its place;
- executed as a learner would (from the student folder), only the graded check cells fail: every
  exercise is needed by its check (none gives itself away) and nothing else depends on a stub;
- the instructor notebook holds the chapter's cells unchanged. It is not executed here: the chapter
  itself runs top to bottom in tests/test_chapters.py, and a second run of the same cells would only
  double the time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import jupytext
import nbformat
import pytest

from rbf_tutorial import assignments

REPO_ROOT = Path(__file__).resolve().parent.parent
# Every chapter file, "NN_topic.py" or a part "NNa_topic.py" (the same glob as tests/test_chapters.py).
CHAPTERS = sorted((REPO_ROOT / "chapters").glob("[0-9][0-9]*_*.py"))
# Per cell. Chapter cells take seconds on a CPU; this only catches a hung execution (see execute()).
CELL_TIMEOUT_S = int(os.environ.get("RBF_TUTORIAL_CELL_TIMEOUT", "120"))
STUB = "raise NotImplementedError()"

chapter_params = pytest.mark.parametrize("chapter", CHAPTERS, ids=[chapter.stem for chapter in CHAPTERS])


@pytest.fixture(scope="session")
def release(tmp_path_factory) -> dict[str, assignments.GeneratedAssignment]:
    out_dir = tmp_path_factory.mktemp("assignments")
    generated = assignments.generate_assignments(out_dir)
    return {assignment.chapter.name: assignment for assignment in generated}


def execute(notebook_path: Path) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel from the notebook's folder, recording errors instead of stopping.

    Now and then an execution stalls for good after a cell that displays a widget: the kernel is
    idle, the client still waits for its reply (jupyter/nbclient#312, seen here about once in ten
    runs of chapter 00). That says nothing about the notebook, so a stalled run is retried once, in
    a new kernel, and the test fails only when that one stalls too.
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    for attempt in (1, 2):
        notebook = nbformat.read(notebook_path, as_version=4)
        client = NotebookClient(
            notebook,
            timeout=CELL_TIMEOUT_S,
            kernel_name="python3",
            allow_errors=True,
            resources={"metadata": {"path": str(notebook_path.parent)}},
        )
        try:
            client.execute()
            return notebook
        except (CellTimeoutError, DeadKernelError) as error:
            if attempt == 2:
                raise
            warnings.warn(
                f"{notebook_path.name}: execution stalled ({error!s:.200}); retrying once", stacklevel=2
            )
    raise AssertionError("unreachable")


def failing_cells(notebook: nbformat.NotebookNode) -> dict[int, str]:
    """Index -> 'ErrorName: message' of every code cell that raised."""
    failures = {}
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.get("output_type") == "error":
                failures[index] = f"{output['ename']}: {output['evalue']}"[:300]
    return failures


def is_graded_check(cell: nbformat.NotebookNode) -> bool:
    nbgrader = cell.get("metadata", {}).get("nbgrader", {})
    return bool(nbgrader.get("grade")) and not nbgrader.get("solution")


def expected_to_raise(cell: nbformat.NotebookNode) -> bool:
    return "raises-exception" in cell.get("metadata", {}).get("tags", [])


def describe(notebook: nbformat.NotebookNode, indices) -> str:
    lines = []
    for index in sorted(indices):
        first_line = (
            notebook.cells[index].source.strip().splitlines()[0] if notebook.cells[index].source else ""
        )
        lines.append(f"  cell {index}: {first_line[:100]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# generation


def test_every_chapter_has_a_student_and_an_instructor_notebook(release) -> None:
    assert sorted(release) == [chapter.stem for chapter in CHAPTERS]
    for assignment in release.values():
        assert assignment.student_notebook.is_file()
        assert assignment.instructor_notebook.is_file()
        assert assignment.student_notebook.parent.name == "student"
        assert assignment.instructor_notebook.parent.name == "instructor"


@chapter_params
def test_student_notebook_has_stubs_instead_of_solutions(chapter, release) -> None:
    assignment = release[chapter.stem]
    student = nbformat.read(assignment.student_notebook, as_version=4)
    instructor = nbformat.read(assignment.instructor_notebook, as_version=4)
    student_text = "\n".join(cell.source for cell in student.cells)
    for marker in ("### BEGIN SOLUTION", "### END SOLUTION", "### BEGIN HIDDEN TESTS"):
        assert marker not in student_text, f"{chapter.stem}: the student notebook still holds {marker!r}"

    solution_ids = [
        cell.metadata.nbgrader["grade_id"]
        for cell in instructor.cells
        if cell.get("metadata", {}).get("nbgrader", {}).get("solution")
    ]
    assert solution_ids, f"{chapter.stem} has no exercise (no nbgrader solution cell)"
    stubbed = {
        cell.metadata.nbgrader["grade_id"]
        for cell in student.cells
        if cell.get("metadata", {}).get("nbgrader", {}).get("solution") and STUB in cell.source
    }
    assert stubbed == set(solution_ids), (
        f"{chapter.stem}: cells without a stub: {set(solution_ids) - stubbed}"
    )
    # Hidden tests are removed, visible checks kept: every graded cell is still there, locked.
    graded = [cell for cell in student.cells if is_graded_check(cell)]
    assert graded and all(cell.metadata.nbgrader.get("locked") for cell in graded)


def test_the_course_folder_is_ready_for_nbgrader(release) -> None:
    course = next(iter(release.values())).student_notebook.parent.parent / "course"
    assert (course / "gradebook.db").is_file()
    config = (course / "nbgrader_config.py").read_text()
    assert f"c.CourseDirectory.root = {str(course)!r}" in config


def test_unknown_chapter_is_refused_by_name(tmp_path) -> None:
    with pytest.raises(assignments.AssignmentError, match=r"--chapters: no chapter '42'"):
        assignments.generate_assignments(tmp_path, ["42"])


def test_out_dir_that_is_a_file_is_refused(tmp_path) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(assignments.AssignmentError, match="not a folder"):
        assignments.generate_assignments(a_file, ["00"])


def test_out_dir_that_cannot_be_created_is_refused(tmp_path) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(assignments.AssignmentError, match="cannot be created"):
        assignments.generate_assignments(a_file / "inside", ["00"])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_dir_is_refused(tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(assignments.AssignmentError, match="not writable"):
        assignments.generate_assignments(locked, ["00"])


def test_command_line_selects_chapters_and_reports_errors(tmp_path) -> None:
    script = Path(sys.executable).parent / "rbf-tutorial"
    if not script.exists():
        pytest.skip(f"no console script at {script}: the package is not installed in this environment")
    run = subprocess.run(
        [str(script), "assignments", str(tmp_path / "out"), "--chapters", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert sorted(path.name for path in (tmp_path / "out" / "student").iterdir()) == [
        f"{CHAPTERS[0].stem}.ipynb"
    ]
    run = subprocess.run(
        [str(script), "assignments", str(tmp_path / "out"), "--chapters", "00,77"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2
    assert re.search(r"no chapter '77' \(available: 00", run.stderr), run.stderr


# --------------------------------------------------------------------------------------------------
# validation: the student release fails exactly at the stubs, the instructor one nowhere


@pytest.mark.slow
@chapter_params
def test_student_notebook_fails_only_at_its_graded_checks(chapter, release) -> None:
    notebook = execute(release[chapter.stem].student_notebook)
    failures = failing_cells(notebook)
    checks = {index for index, cell in enumerate(notebook.cells) if is_graded_check(cell)}
    allowed = {index for index, cell in enumerate(notebook.cells) if expected_to_raise(cell)}

    passing_checks = checks - set(failures)
    assert not passing_checks, (
        f"{chapter.stem}: these graded checks pass without the learner's solution, so they give "
        f"nothing to do or check nothing:\n{describe(notebook, passing_checks)}"
    )
    unexpected = set(failures) - checks - allowed
    assert not unexpected, (
        f"{chapter.stem}: cells outside the graded checks fail in the student version (they depend "
        "on an exercise, or are broken):\n"
        + "\n".join(
            f"{describe(notebook, [index])}\n    -> {failures[index]}" for index in sorted(unexpected)
        )
    )
    for index in checks:
        assert "NotImplementedError" in failures[index], (
            f"{chapter.stem}: cell {index} fails for another reason than the stub: {failures[index]}"
        )


@chapter_params
def test_instructor_notebook_holds_the_chapter_unchanged(chapter, release) -> None:
    """The solutions teachers see are the chapter's own, cell for cell, so the chapter's run in
    tests/test_chapters.py stands for the instructor notebook's."""
    instructor = nbformat.read(release[chapter.stem].instructor_notebook, as_version=4)
    source = jupytext.read(chapter, fmt="py:percent")

    def cells(notebook):
        return [(cell.cell_type, cell.source, dict(cell.metadata)) for cell in notebook.cells]

    assert cells(instructor) == cells(source), f"{chapter.stem}: the instructor notebook is not the chapter"
    assert instructor.metadata.get("kernelspec", {}).get("name") == "python3"
