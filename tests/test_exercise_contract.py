"""Every chapter's exercises keep nbgrader's contract, so the student version fails only at the checks.

An exercise is a solution cell (an editable cell holding ``### BEGIN SOLUTION`` / ``### END SOLUTION``)
followed by its graded check (a locked cell with points that calls ``checks.chNN.check_...``). A
function the learner writes there must not be called anywhere else in the chapter: in the student
version it raises ``NotImplementedError``, and a later cell calling it would fail too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import jupytext
import pytest

CHAPTERS = sorted((Path(__file__).resolve().parent.parent / "chapters").glob("[0-9][0-9]_*.py"))


def exercise_cells(chapter: Path):
    notebook = jupytext.read(chapter, fmt="py:percent")
    return notebook, [cell for cell in notebook.cells if "nbgrader" in cell.metadata]


def parse(source: str) -> ast.Module:
    # IPython magics (`%matplotlib inline`) are not Python: drop them before parsing.
    return ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith("%")))


def defined_functions(source: str) -> set[str]:
    return {node.name for node in ast.walk(parse(source)) if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_each_solution_cell_is_followed_by_its_graded_check(chapter):
    prefix = f"ch{chapter.name[:2]}"
    _, cells = exercise_cells(chapter)
    assert len(cells) >= 4, f"{chapter.name}: expected at least two exercises"
    assert len(cells) % 2 == 0, f"{chapter.name}: every solution cell needs one graded check"
    for solution, check in zip(cells[::2], cells[1::2], strict=True):
        solution_id = solution.metadata["nbgrader"]["grade_id"]
        check_id = check.metadata["nbgrader"]["grade_id"]
        exercise = solution_id.removesuffix("-solution")
        assert solution_id.startswith(prefix) and solution_id.endswith("-solution"), solution_id
        assert check_id == f"{exercise}-check", f"{solution_id} is followed by {check_id}"
        assert "### BEGIN SOLUTION" in solution.source and "### END SOLUTION" in solution.source
        assert not solution.metadata["nbgrader"]["grade"] and solution.metadata["nbgrader"]["solution"]
        grading = check.metadata["nbgrader"]
        assert grading["grade"] and grading["locked"] and grading["points"] > 0, check_id
        assert f"checks.{prefix}.check_" in check.source, f"{check_id} does not call checks.{prefix}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_exercise_functions_are_called_only_by_their_checks(chapter):
    notebook, cells = exercise_cells(chapter)
    exercises = set().union(*(defined_functions(cell.source) for cell in cells[::2]))
    for cell in notebook.cells:
        if cell.cell_type != "code" or "nbgrader" in cell.metadata:
            continue
        called = {node.func.id for node in ast.walk(parse(cell.source))
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
        assert not called & exercises, f"{chapter.name}: {called & exercises} called in\n{cell.source[:300]}"
