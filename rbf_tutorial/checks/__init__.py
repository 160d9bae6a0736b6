"""Graded checks for the chapters' exercises.

Each check prints one ``✓`` line when the learner's code is right and raises ``AssertionError``
with a message a learner can act on when it is not; an exercise that is still nbgrader's stub
raises ``NotImplementedError`` saying which one. Chapter-specific checks live in
``checks/chNN.py`` and are re-exported here so a notebook needs one import.
:func:`learner_or_reference` is how a later cell uses code an exercise asks for.
"""

from . import ch00, ch01, ch02, ch03, ch04, ch05, ch06, ch07  # noqa: F401  (re-exported: notebooks call checks.chNN.check_...)
from .core import assert_close, report_close
from .stubs import find_stub, learner_or_reference, not_written_yet

__all__ = ["assert_close", "find_stub", "learner_or_reference", "not_written_yet", "report_close"]
