"""Checks for chapter 00: RBF scores, and the magnitude at which a long key starts to bully."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .tally import Tally

__all__ = ["check_crossover_magnitude", "check_rbf_scores"]


def _diagnose_scores(actual: torch.Tensor, query: torch.Tensor, keys: torch.Tensor, gamma: float) -> str:
    """Name the usual mistake, if ``actual`` matches one of them."""
    squared_distance = (keys - query).square().sum(dim=-1)
    near_misses = {
        "the plain dot product query·key: RBF scores use the distance instead": keys @ query,
        "+gamma·|q - k|²: the sign is missing, so far keys would score highest": gamma * squared_distance,
        "-gamma·|q - k| (not squared): square the distance": -gamma * squared_distance.sqrt(),
        "-|q - k|², without gamma: multiply by gamma": -squared_distance,
    }
    for mistake, value in near_misses.items():
        same_shape = actual.shape == value.shape
        if same_shape and torch.allclose(actual.double(), value.double(), atol=1e-6, rtol=1e-5):
            return f"Your scores equal {mistake}."
    return "Expected -gamma * sum((keys - query)**2, dim=-1): one score per key, closest key highest."


def check_rbf_scores(rbf_scores: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]) -> None:
    """``rbf_scores(query (D,), keys (M, D), gamma) -> (M,)`` must equal ``-gamma * |query - key|²``."""
    generator = torch.Generator().manual_seed(0)
    tally = Tally()
    cases = [(2, 3, 1.0), (2, 5, 0.5), (8, 7, 2.0), (64, 33, 1 / 8)]
    for dim, n_keys, gamma in cases:
        query = torch.randn(dim, generator=generator, dtype=torch.float64)
        keys = torch.randn(n_keys, dim, generator=generator, dtype=torch.float64) * 2
        actual = rbf_scores(query, keys, gamma)
        if not isinstance(actual, torch.Tensor):
            raise AssertionError(
                f"rbf_scores returned {type(actual).__name__}; return a torch.Tensor of shape (M,)."
            )
        if actual.shape != (n_keys,):
            raise AssertionError(
                f"rbf_scores(query {tuple(query.shape)}, keys {tuple(keys.shape)}) returned shape "
                f"{tuple(actual.shape)}; expected ({n_keys},): one score per key (sum over the last dim)."
            )
        expected = -gamma * (keys - query).square().sum(dim=-1)
        name = f"D={dim} M={n_keys} γ={gamma:g}"
        if not tally.close(actual, expected, atol=1e-8, rtol=1e-6):
            diagnosis = _diagnose_scores(actual, query, keys, gamma)
            raise AssertionError(f"rbf_scores is wrong for {name}. {diagnosis}")
    tally.passed("rbf_scores matches -γ|q - k|² in float64")


def check_crossover_magnitude(
    crossover_magnitude: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float],
) -> None:
    """``crossover_magnitude(query, close_key, long_direction)`` is the length of the long key at
    which its dot-product score equals the close key's: ``(q·k_close) / (q·u)`` with ``u`` the
    long key's unit direction. Checked on the chapter's keys and on random ones, and by scoring
    the long key just below and just above the answer.
    """
    generator = torch.Generator().manual_seed(1)
    chapter_case = (
        torch.tensor([1.0, 0.0], dtype=torch.float64),
        torch.tensor([math.cos(math.radians(10)), math.sin(math.radians(10))], dtype=torch.float64),
        torch.tensor([math.cos(math.radians(60)), math.sin(math.radians(60))], dtype=torch.float64) * 4,
    )
    cases = [chapter_case]
    tally = Tally()
    while len(cases) < 5:
        query, close_key, direction = torch.randn(3, 4, generator=generator, dtype=torch.float64)
        # Only meaningful when both keys point somewhat towards the query.
        if query @ close_key > 0.3 and query @ direction / direction.norm() > 0.3:
            cases.append((query, close_key, direction))
    for query, close_key, direction in cases:
        answer = crossover_magnitude(query, close_key, direction)
        try:
            answer = float(answer)
        except (TypeError, ValueError) as error:
            raise AssertionError(
                f"crossover_magnitude returned {type(answer).__name__}; "
                "return a number (a float or a 0-d tensor)."
            ) from error
        unit = direction / direction.norm()
        expected = float(query @ close_key / (query @ unit))
        name = f"|q|={query.norm():.2f} |k_close|={close_key.norm():.2f}"
        if not tally.close(torch.tensor(answer), torch.tensor(expected), atol=1e-6, rtol=1e-6):
            hint = (
                "Did you use long_direction without normalising it? Its length is not the magnitude."
                if math.isclose(answer, float(query @ close_key / (query @ direction)), rel_tol=1e-6)
                else "Solve m · (q·u) = q·k_close for m, where u = long_direction / |long_direction|."
            )
            raise AssertionError(
                f"crossover_magnitude is off for {name}: got {answer:.6g}, expected {expected:.6g}. {hint}"
            )
        # The meaning of the number: just below it the close key wins, just above it the long key does.
        below, above = (float(query @ (unit * expected * f)) for f in (0.999, 1.001))
        assert below < float(query @ close_key) < above, "internal: crossover formula disagrees with scoring"
    query, close_key, direction = chapter_case
    answer = float(crossover_magnitude(query, close_key, direction))
    tally.passed(f"crossover_magnitude matches (q·k_close) / (q·u); the chapter's long key wins above "
                 f"length {answer:.4f}")
