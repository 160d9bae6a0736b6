"""Silent comparisons for checks that try many cases and then print one pass line.

A learner should see one line when an exercise is right (``✓ rbf_scores matches ... (max diff
2e-16)``) and an explanation when it is wrong, not a screen of per-case rows. A :class:`Tally`
compares each case quietly, remembers the largest difference among the cases that passed, and
:meth:`Tally.passed` prints the single line.
"""

from __future__ import annotations

import torch

__all__ = ["Tally"]


class Tally:
    """Quiet ``allclose`` comparisons, with the largest difference kept for the pass line."""

    def __init__(self) -> None:
        self.cases = 0
        self.largest_difference = 0.0

    def close(self, actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float) -> bool:
        """True when ``actual`` has ``expected``'s shape, is finite, and is allclose to it (in float64)."""
        if not isinstance(actual, torch.Tensor):
            return False
        actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
        if actual.shape != expected.shape or not bool(torch.isfinite(actual).all()):
            return False
        if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
            return False
        self.cases += 1
        if actual.numel():
            self.largest_difference = max(self.largest_difference, (actual - expected).abs().max().item())
        return True

    def passed(self, what: str) -> None:
        """Print the one pass line: ``✓ what (N cases, max diff D)``."""
        print(f"✓ {what} ({self.cases} cases, max diff {self.largest_difference:.1g})")
