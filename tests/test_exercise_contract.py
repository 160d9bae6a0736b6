"""Every chapter's exercises keep nbgrader's contract, so the student version fails only at the checks.

An exercise is a solution cell (an editable cell holding ``### BEGIN SOLUTION`` / ``### END SOLUTION``)
followed by its graded check (a locked cell with points that calls ``checks.chNN.check_...``). In the
student version each solution region is ``raise NotImplementedError()``, so a function defined in a
solution cell (an *exercise function*) raises when it runs. A later cell may still use it, the
learner's code carrying the story, but only through ``checks.learner_or_reference(learner, reference,
uses=...)``, which says which exercise to finish and shows the reference result while it is a stub.

The rule, checked on each later code cell's syntax, outside function bodies:

- a name is *tainted* if it is an exercise function, or if its definition mentions a tainted name
  (a ``def`` whose body does, an assignment whose value does, an operator whose autograd or fake
  implementation is registered with a tainted function);
- a tainted name may be called, launched (``kernel[grid](...)``) or passed to a call only inside the
  ``learner`` argument of ``learner_or_reference``. Wrapping it without running it is fine: in a
  ``dict``, ``list``, ``tuple``, ``functools.partial``, ``torch.compile``, or a ``register_*`` call.

Text between the two arguments of ``learner_or_reference`` never taints: the reference must not use
the learner's code, and the learner argument is where it may.
"""

from __future__ import annotations

import ast
from pathlib import Path

import jupytext
import pytest

CHAPTERS = sorted((Path(__file__).resolve().parent.parent / "chapters").glob("[0-9][0-9]*_*.py"))
HELPER = "learner_or_reference"
# Calls that hold on to a function without running it.
WRAPPERS = {"dict", "list", "tuple", "set", "partial", "compile", "jit"}
REGISTRATIONS = {"register_autograd", "register_fake", "register_kernel"}


def exercise_cells(chapter: Path):
    notebook = jupytext.read(chapter, fmt="py:percent")
    return notebook, [cell for cell in notebook.cells if "nbgrader" in cell.metadata]


def parse(source: str) -> ast.Module:
    # IPython magics (`%matplotlib inline`) are not Python: drop them before parsing.
    return ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith("%")))


def defined_functions(source: str) -> set[str]:
    return {node.name for node in ast.walk(parse(source)) if isinstance(node, ast.FunctionDef)}


def chapter_id(chapter: Path) -> str:
    """ "03a" for 03a_triton_forward.py, "01" for 01_naive_cdist.py."""
    return chapter.name.split("_", 1)[0]


# ------------------------------------------------------------------------------------------------
# The analysis


def _call_name(call: ast.Call) -> str:
    function = call.func
    if isinstance(function, ast.Attribute):
        return function.attr
    return function.id if isinstance(function, ast.Name) else ""


def _learner_arguments(tree: ast.AST) -> set[int]:
    """ids of the nodes passed as ``learner`` to ``learner_or_reference`` anywhere in ``tree``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _call_name(node) == HELPER:
            if node.args:
                found.add(id(node.args[0]))
            found.update(id(keyword.value) for keyword in node.keywords if keyword.arg == "learner")
    return found


def _nodes(tree: ast.AST, skip: set[int], into_bodies: bool):
    """Every node of ``tree`` except the subtrees in ``skip``; function and lambda bodies only if
    ``into_bodies`` (their code runs later, when they are called)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if id(node) in skip:
            continue
        yield node
        if not into_bodies and node is not tree and isinstance(node, ast.FunctionDef | ast.Lambda):
            continue
        stack.extend(ast.iter_child_nodes(node))


def _mentions(tree: ast.AST, tainted: set[str], skip: set[int]) -> set[str]:
    return {node.id for node in _nodes(tree, skip, into_bodies=True)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)} & tainted


def _targets(node: ast.AST) -> set[str]:
    return {name.id for name in ast.walk(node)
            if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Store)}


def misuses(source: str, tainted: set[str]) -> list[str]:
    """What in one later cell runs a tainted name outside the helper; adds the cell's new tainted
    names to ``tainted``."""
    tree = parse(source)
    learner = _learner_arguments(tree)
    problems = []
    for statement in tree.body:
        if isinstance(statement, ast.FunctionDef | ast.ClassDef):
            body = ast.Module(body=statement.body, type_ignores=[])
            if _mentions(body, tainted, learner):
                tainted.add(statement.name)
            continue
        for node in _nodes(statement, learner, into_bodies=False):
            if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign) and node.value is not None:
                if _mentions(node.value, tainted, learner):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    tainted.update(*(_targets(target) for target in targets))
            if not isinstance(node, ast.Call):
                continue
            callee = node.func.value if isinstance(node.func, ast.Subscript) else node.func
            if isinstance(callee, ast.Name) and callee.id in tainted:
                problems.append(f"calls `{callee.id}` outside {HELPER}: {ast.unparse(node)[:120]}")
                continue
            passed = set().union(*(_mentions(arg, tainted, learner)
                                   for arg in [*node.args, *(keyword.value for keyword in node.keywords)]))
            name = _call_name(node)
            if passed and name in REGISTRATIONS and isinstance(node.func, ast.Attribute):
                tainted.update(_names(node.func.value))  # op.register_autograd(f): op now runs f
            elif passed and name not in WRAPPERS | REGISTRATIONS:
                problems.append(f"passes `{', '.join(sorted(passed))}` to `{name or ast.unparse(node.func)}` "
                                f"outside {HELPER}: {ast.unparse(node)[:120]}")
    return problems


def _names(node: ast.AST) -> set[str]:
    return {name.id for name in ast.walk(node) if isinstance(name, ast.Name)}


def chapter_misuses(chapter: Path) -> list[str]:
    notebook, cells = exercise_cells(chapter)
    tainted = set().union(*(defined_functions(cell.source) for cell in cells[::2]))
    problems = []
    for cell in notebook.cells:
        if cell.cell_type == "code" and "nbgrader" not in cell.metadata:
            problems.extend(misuses(cell.source, tainted))
    return problems


# ------------------------------------------------------------------------------------------------
# The chapters


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_each_solution_cell_is_followed_by_its_graded_check(chapter):
    grade_prefix = f"ch{chapter_id(chapter)}-"  # ch03a-ex1-solution, ch01-ex2-check
    checks_module = f"checks.ch{chapter.name[:2]}."  # both parts of chapter 03 use checks.ch03
    _, cells = exercise_cells(chapter)
    assert len(cells) >= 4, f"{chapter.name}: expected at least two exercises"
    assert len(cells) % 2 == 0, f"{chapter.name}: every solution cell needs one graded check"
    for solution, check in zip(cells[::2], cells[1::2], strict=True):
        solution_id = solution.metadata["nbgrader"]["grade_id"]
        check_id = check.metadata["nbgrader"]["grade_id"]
        exercise = solution_id.removesuffix("-solution")
        assert solution_id.startswith(grade_prefix) and solution_id.endswith("-solution"), solution_id
        assert check_id == f"{exercise}-check", f"{solution_id} is followed by {check_id}"
        assert "### BEGIN SOLUTION" in solution.source and "### END SOLUTION" in solution.source
        assert not solution.metadata["nbgrader"]["grade"] and solution.metadata["nbgrader"]["solution"]
        grading = check.metadata["nbgrader"]
        assert grading["grade"] and grading["locked"] and grading["points"] > 0, check_id
        assert f"{checks_module}check_" in check.source, f"{check_id} does not call {checks_module}check_..."


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_later_cells_use_exercise_functions_only_through_the_helper(chapter):
    problems = chapter_misuses(chapter)
    assert not problems, f"{chapter.name}:\n" + "\n".join(problems)


# ------------------------------------------------------------------------------------------------
# The rule itself, on small cells


def verdict(*cells: str, exercises=("scores",)) -> list[str]:
    tainted = set(exercises)
    return [problem for cell in cells for problem in misuses(cell, tainted)]


@pytest.mark.parametrize("cell", [
    "out = scores(q, k)",
    "scores(q, k)",
    "kernel = scores\nkernel(q)",
    "scores[grid](q, k)",
    "torch.autograd.gradcheck(scores, inputs)",
    "for n in sizes:\n    total += scores(q, n)",
    "compiled = torch.compile(scores)\ncompiled(q)",
    "checks.learner_or_reference(lambda: 1, lambda: scores(q), uses='x')",  # in the reference
])
def test_running_an_exercise_function_outside_the_helper_is_refused(cell):
    assert verdict(cell)


def test_a_function_that_uses_an_exercise_is_one_too():
    assert verdict("def forward(q):\n    return launch(kernel, pieces=dict(SCORES=scores))", "forward(q)")


def test_an_operator_registered_with_exercise_code_is_one_too():
    registered = ("def backward(ctx, g):\n    return scores(g)",
                  "op.register_autograd(backward, setup_context=setup)",
                  "def attention(q):\n    return op(q)")
    assert verdict(*registered, "attention(q).sum().backward()")
    helped = "checks.learner_or_reference(lambda: attention(q), lambda: ref(q), uses='x')"
    assert not verdict(*registered, helped)


@pytest.mark.parametrize("cells", [
    ("out = checks.learner_or_reference(lambda: scores(q, k), lambda: reference(q, k), uses='x')",),
    ("learner_or_reference(learner=lambda: scores(q), reference=lambda: reference(q), uses='x')",),
    ("pieces = dict(SCORES=scores)", "checks.learner_or_reference(lambda: run(pieces), lambda: 0, uses='x')"),
    ("def forward(q):\n    return scores(q)",
     "def check(q):\n    return checks.learner_or_reference(lambda: forward(q), lambda: ref(q), uses='x')",
     "check(q)"),
    ("@op.register_fake\ndef _(q):\n    return q",),
    ("print(reference(q))",),
])
def test_the_helper_and_wrapping_are_allowed(cells):
    assert not verdict(*cells)
