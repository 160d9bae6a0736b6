"""Graded checks for the chapters' exercises.

Each check prints what it compared (exact / allclose / max difference) and raises
``AssertionError`` with a message a learner can act on. Chapter-specific checks live in
``checks/chNN.py`` and are re-exported here so a notebook needs one import.
"""

from . import ch00, ch01, ch02, ch03, ch04, ch05, ch06, ch07  # noqa: F401  (re-exported: notebooks call checks.chNN.check_...)
from .core import assert_close, report_close

__all__ = ["assert_close", "report_close"]
