"""Checks for chapter 05: rotating pairs of coordinates (RoPE), and SuSiE's closed-form distance."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..positional import rope, rope_frequencies
from .tally import Tally

__all__ = ["check_rotate_pairs", "check_susie_distance_closed_form"]


# ------------------------------------------------------------------------------------------------
# Exercise 1: rotate each pair (x[2f], x[2f + 1]) by its own angle


def _rotate_pairs_reference(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Pair ``f`` read as the complex number ``x[2f] + i x[2f+1]``, times ``e^{i angle}``.

    Written through complex numbers on purpose: a second route to the same rotation, so the check
    does not grade a learner's code against a copy of itself.
    """
    as_complex = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    rotated = as_complex * torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(rotated).flatten(-2)


def _diagnose_rotation(actual: torch.Tensor, x: torch.Tensor, angles: torch.Tensor) -> str:
    """Name the usual mistake, if ``actual`` matches one of them."""
    half = x.shape[-1] // 2
    # Pairs taken as (x[f], x[f + D/2]): the other common RoPE layout, not the one used here.
    halves = torch.stack([x[..., :half], x[..., half:]], dim=-1).flatten(-2)
    halves_rotated = _rotate_pairs_reference(halves, angles).unflatten(-1, (-1, 2))
    halves_rotated = torch.cat([halves_rotated[..., 0], halves_rotated[..., 1]], dim=-1)
    pairs = x.unflatten(-1, (-1, 2))
    cos = angles.cos()
    near_misses = {
        "a clockwise rotation (by -angle): the sin terms have the wrong signs": _rotate_pairs_reference(
            x, -angles
        ),
        "pairs taken as (x[f], x[f + D/2]); here pair f is (x[2f], x[2f + 1]), consecutive coordinates": (
            halves_rotated
        ),
        "each coordinate scaled by cos(angle) alone: the sin terms are missing": (
            torch.stack([pairs[..., 0] * cos, pairs[..., 1] * cos], dim=-1).flatten(-2)
        ),
        "x unchanged: nothing was rotated": x,
    }
    for mistake, value in near_misses.items():
        if actual.shape == value.shape and torch.allclose(actual.double(), value, atol=1e-9, rtol=1e-7):
            return f"Your result equals {mistake}."
    return (
        "Expected, for each pair (a, b) = (x[..., 2f], x[..., 2f + 1]) and angle t = angles[..., f]: "
        "(a cos t - b sin t, a sin t + b cos t), written back into the same two coordinates."
    )


def _rotation_cases(generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x, angles) pairs of several shapes; angles broadcast against x's pairs ``(..., D/2)``."""
    cases = []
    for x_shape, angles_shape in [((2,), (1,)), ((5, 8), (5, 4)), ((2, 3, 7, 16), (7, 8)), ((1, 64), (32,))]:
        x = torch.randn(*x_shape, generator=generator, dtype=torch.float64)
        # Angles well past 2π and negative ones too: nothing may assume a small or positive angle.
        angles = 20 * torch.rand(*angles_shape, generator=generator, dtype=torch.float64) - 10
        cases.append((x, angles))
    return cases


def check_rotate_pairs(rotate_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """``rotate_pairs(x (..., D), angles (..., D/2))`` rotates pair ``(x[2f], x[2f+1])`` anticlockwise
    by ``angles[..., f]``; ``angles`` broadcasts against the pairs. Then: it is ``positional.rope``
    when the angles are ``position * frequency``, it keeps lengths, and rotated dot products depend
    on the positions only through their difference."""
    generator = torch.Generator().manual_seed(5)
    tally = Tally()
    for x, angles in _rotation_cases(generator):
        actual = rotate_pairs(x, angles)
        name = f"x {tuple(x.shape)}"
        if not isinstance(actual, torch.Tensor) or actual.shape != x.shape:
            got = tuple(actual.shape) if isinstance(actual, torch.Tensor) else type(actual).__name__
            raise AssertionError(
                f"rotate_pairs(x {tuple(x.shape)}, angles {tuple(angles.shape)}) returned {got}; "
                f"expected a tensor of x's shape {tuple(x.shape)}."
            )
        expected = _rotate_pairs_reference(x, angles)
        if not tally.close(actual, expected, atol=1e-10, rtol=1e-10):
            raise AssertionError(f"rotate_pairs is wrong for {name}. {_diagnose_rotation(actual, x, angles)}")

    # The same rotation as the library's RoPE, when the angles are position * frequency.
    n_tokens, dim = 11, 16
    x = torch.randn(2, n_tokens, dim, generator=generator, dtype=torch.float64)
    positions = torch.randint(-50, 500, (n_tokens,), generator=generator)
    angles = positions.double()[:, None] * rope_frequencies(dim)[None, :]
    if not tally.close(rotate_pairs(x, angles), rope(x, positions), atol=1e-10, rtol=1e-10):
        raise AssertionError("With angles = position * frequency, rotate_pairs must be RoPE "
                             "(positional.rope); it is not.")

    # Rotations keep lengths, and q·k after rotating by m and n depends on n - m alone.
    q, k = torch.randn(2, dim, generator=generator, dtype=torch.float64)
    frequencies = rope_frequencies(dim)
    rotated = rotate_pairs(q, 123.0 * frequencies)
    if not tally.close(rotated.norm(), q.norm(), atol=1e-10, rtol=1e-10):
        raise AssertionError("rotate_pairs changed a vector's length; a rotation keeps the length of every "
                             "pair, so of the whole vector.")
    scores = []
    for shift in (0.0, 7.0, 1000.0):
        query_angles, key_angles = (40.0 + shift) * frequencies, (25.0 + shift) * frequencies
        scores.append(rotate_pairs(q, query_angles) @ rotate_pairs(k, key_angles))
    scores = torch.stack(scores)
    if not tally.close(scores, scores[:1].expand(3), atol=1e-9, rtol=1e-9):
        raise AssertionError("Shifting both positions by the same amount changed q·k; rotated scores must "
                             "depend on the positions only through their difference.")
    tally.passed("rotate_pairs is RoPE: it keeps lengths, and scores see only n - m")


# ------------------------------------------------------------------------------------------------
# Exercise 2: |P_i - P_j|^2 without building the table


def _table_distance_squared(
    positions_i: torch.Tensor, positions_j: torch.Tensor, frequencies: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``|P_i - P_j|^2`` the long way: build both rows of the weighted sinusoid table, subtract."""

    def rows(positions: torch.Tensor) -> torch.Tensor:
        angles = positions[..., None] * frequencies
        return torch.stack([weights * angles.sin(), weights * angles.cos()], dim=-1).flatten(-2)

    return (rows(positions_i) - rows(positions_j)).square().sum(dim=-1)


def _diagnose_distance(
    actual: torch.Tensor, offsets: torch.Tensor, frequencies: torch.Tensor, weights: torch.Tensor
) -> str:
    half_angles = offsets[..., None] * frequencies / 2
    near_misses = {
        "sum_f 4 w_f sin²(...): weights enter squared, w_f²": (
            4 * weights * half_angles.sin().square()
        ).sum(-1),
        "sum_f w_f² sin²(...) without the factor 4": (weights.square() * half_angles.sin().square()).sum(-1),
        "sum_f 4 w_f² sin²(w_f · offset) without the half angle": (
            4 * weights.square() * (2 * half_angles).sin().square()
        ).sum(-1),
        "sum_f 2 w_f² sin²(w_f · offset / 2): the factor is 4, from 2 - 2cos(t) = 4 sin²(t/2)": (
            2 * weights.square() * half_angles.sin().square()
        ).sum(-1),
    }
    for mistake, value in near_misses.items():
        if actual.shape == value.shape and torch.allclose(actual.double(), value, atol=1e-9, rtol=1e-7):
            return f"Your result equals {mistake}."
    return "Expected (4 * weights**2 * torch.sin(offset[..., None] * frequencies / 2)**2).sum(-1)."


def check_susie_distance_closed_form(
    susie_distance_closed_form: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """``susie_distance_closed_form(offset (...), frequencies (F,), weights (F,)) -> (...)`` must be
    ``sum_f 4 weights[f]² sin²(frequencies[f] * offset / 2)``: checked against building the weighted
    table ``(w sin(ω p), w cos(ω p))`` at random (float, negative too) positions and subtracting."""
    generator = torch.Generator().manual_seed(6)
    tally = Tally()
    for offset_shape, n_frequencies in [((), 1), ((7,), 4), ((3, 5), 32), ((2, 2, 9), 8)]:
        frequencies = rope_frequencies(2 * n_frequencies)
        weights = torch.randn(n_frequencies, generator=generator, dtype=torch.float64)
        positions_i = 400 * torch.rand(offset_shape, generator=generator, dtype=torch.float64) - 100
        positions_j = 400 * torch.rand(offset_shape, generator=generator, dtype=torch.float64) - 100
        offsets = positions_i - positions_j
        actual = susie_distance_closed_form(offsets, frequencies, weights)
        name = f"offsets {tuple(offset_shape)} F={n_frequencies}"
        if not isinstance(actual, torch.Tensor) or actual.shape != offsets.shape:
            got = tuple(actual.shape) if isinstance(actual, torch.Tensor) else type(actual).__name__
            raise AssertionError(
                f"susie_distance_closed_form for {name} returned {got}; expected one distance per "
                f"offset, shape {tuple(offsets.shape)} (sum over the frequencies, the last axis)."
            )
        expected = _table_distance_squared(positions_i, positions_j, frequencies, weights)
        if not tally.close(actual, expected, atol=1e-9, rtol=1e-9):
            hint = _diagnose_distance(actual, offsets, frequencies, weights)
            raise AssertionError(f"susie_distance_closed_form is wrong for {name}. {hint}")
    tally.passed("susie_distance_closed_form matches the table's distances, which depend on the offset alone")
