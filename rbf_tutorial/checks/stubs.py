"""Telling an exercise the learner has not written yet apart from one that is wrong.

In the student version of a chapter every solution region is replaced by nbgrader's stub,
``raise NotImplementedError()``. Where that stub sits decides how it surfaces:

- in plain Python, or in a ``@triton.jit`` function run by Triton's CPU interpreter, it raises
  ``NotImplementedError()`` (the interpreter wraps it in ``InterpreterError``, once per nested call);
- in a ``@triton.jit`` function compiled for a GPU, Triton refuses the ``raise`` statement itself:
  ``CompilationError`` ("unsupported AST node type: Raise"), wrapped once per calling function.

:func:`find_stub` recognises exactly these, and nothing else: a ``NotImplementedError`` with a
message, or any other error, is a real error. :func:`not_written_yet` turns a stub into one clear
message for a graded check; :func:`learner_or_reference` lets a later cell go on with the reference
implementation, saying so, while the exercise it needs is still a stub.
"""

from __future__ import annotations

import ast
import contextlib
import re
import traceback
from collections.abc import Callable, Iterator
from typing import TypeVar

__all__ = ["find_stub", "learner_or_reference", "not_written_yet"]

T = TypeVar("T")

_DEF_LINE = re.compile(r"^\s*def\s+(\w+)\s*\(", re.M)


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and everything it was raised from, outermost first (each once)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _is_stub_statement(node: object) -> bool:
    """``raise NotImplementedError()`` or ``raise NotImplementedError``, with no message."""
    if not isinstance(node, ast.Raise) or node.exc is None:
        return False
    raised = node.exc
    if isinstance(raised, ast.Call):
        if raised.args or raised.keywords:
            return False
        raised = raised.func
    return isinstance(raised, ast.Name) and raised.id == "NotImplementedError"


def _function_raising(error: BaseException) -> str:
    """The name of the function whose frame raised ``error`` (the innermost one)."""
    frames = traceback.extract_tb(error.__traceback__)
    return frames[-1].name if frames else "?"


def find_stub(error: BaseException) -> str | None:
    """The name of the function still holding nbgrader's stub, if ``error`` is (or wraps) that stub.

    ``None`` for every other error, so callers re-raise it unchanged.
    """
    for cause in _causes(error):
        if type(cause) is NotImplementedError and not cause.args:
            return _function_raising(cause)
        node = getattr(cause, "node", None)
        source = getattr(cause, "src", None)
        if _is_stub_statement(node) and isinstance(source, str):  # triton's CompilationError
            match = _DEF_LINE.search(source)
            return match.group(1) if match else "?"
    return None


@contextlib.contextmanager
def not_written_yet(exercise: str) -> Iterator[None]:
    """Inside a graded check: a stub becomes ``NotImplementedError("<exercise> is not written yet ...")``.

    ``exercise`` names it for the learner, e.g. ``"exercise 3 (causal bounds in `key_range`)"``.
    Any other error passes through untouched.
    """
    try:
        yield
    except Exception as error:
        stub = find_stub(error)
        if stub is None:
            raise
        raise NotImplementedError(
            f"{exercise} is not written yet: `{stub}` still holds the stub `raise NotImplementedError()`. "
            "Replace it with your code and run that cell again."
        ) from None


def learner_or_reference(learner: Callable[[], T], reference: Callable[[], T], *, uses: str) -> T:
    """Run ``learner()``, a later cell's use of code the learner wrote; while it is still a stub,
    say which exercise to finish and return ``reference()`` instead.

    ``uses`` says what the cell runs, e.g. ``"your `flash_rbf_kernel` (exercises 1-3)"``. Only the
    stub counts as "not done": any other error in the learner's code propagates, so a wrong
    solution is never papered over by the reference.
    """
    try:
        return learner()
    except Exception as error:
        stub = find_stub(error)
        if stub is None:
            raise
    print(f"⚠ this cell runs {uses}, and `{stub}` is still a stub: finish that exercise. "
          "Until then this cell shows the reference implementation's result.")
    return reference()
