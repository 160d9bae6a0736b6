"""The chapter 06 checks pass the right answers and fail stubs and the usual wrong ones; the
chapter's exercise cells are laid out as nbgrader expects."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rbf_tutorial import xsa
from rbf_tutorial.checks import ch06

CHAPTER = Path(__file__).resolve().parent.parent / "chapters" / "06_exclusive_self_attention.py"
EXERCISES = {"ch06-ex1": "exclusive", "ch06-ex2": "exclusive_backward"}
SOLUTION_REGION = re.compile(r"^( *)### BEGIN SOLUTION\n.*?^ *### END SOLUTION\n", re.S | re.M)


def _dots(y, v):
    return (y * v).sum(-1, keepdim=True), v.square().sum(-1, keepdim=True)


# ---------------------------------------------------------------- exercise 1: the projection


def exclusive(y, v):
    along, norm_sq = _dots(y, v)
    return y - along / norm_sq * v


def exclusive_unchanged(y, v):
    return y.clone()


def exclusive_projection_only(y, v):
    along, norm_sq = _dots(y, v)
    return along / norm_sq * v


def exclusive_divided_by_norm(y, v):
    along, norm_sq = _dots(y, v)
    return y - along / norm_sq.sqrt() * v


def exclusive_not_divided(y, v):
    along, _ = _dots(y, v)
    return y - along * v


def exclusive_over_tokens(y, v):
    return y - (y * v).sum(-2, keepdim=True) / v.square().sum(-2, keepdim=True) * v


def exclusive_roles_swapped(y, v):
    along = (y * v).sum(-1, keepdim=True)
    return v - along / y.square().sum(-1, keepdim=True) * y


def exclusive_detached(y, v):
    # Right values, but the coefficient is cut off from autograd: wrong gradients.
    along, norm_sq = _dots(y, v)
    return y - (along / norm_sq).detach() * v


def exclusive_float32(y, v):
    return exclusive(y.float(), v.float())


# ---------------------------------------------------------------- exercise 2: the gradients


def exclusive_backward(y, v, grad_z):
    _, norm_sq = _dots(y, v)
    c = (y * v).sum(-1, keepdim=True) / norm_sq
    d = (grad_z * v).sum(-1, keepdim=True) / norm_sq
    return grad_z - d * v, -c * grad_z - d * y + 2 * c * d * v


def backward_unprojected_grad_y(y, v, grad_z):
    return grad_z, exclusive_backward(y, v, grad_z)[1]


def backward_missing_norm_term(y, v, grad_z):
    _, norm_sq = _dots(y, v)
    c = (y * v).sum(-1, keepdim=True) / norm_sq
    d = (grad_z * v).sum(-1, keepdim=True) / norm_sq
    return grad_z - d * v, -c * grad_z - d * y


def backward_sign_flipped(y, v, grad_z):
    grad_y, grad_v = exclusive_backward(y, v, grad_z)
    return grad_y, -grad_v


def backward_single_tensor(y, v, grad_z):
    return exclusive_backward(y, v, grad_z)[0]


def stub(*args):
    raise NotImplementedError()


# ---------------------------------------------------------------- tests


def test_exclusive_accepts_solution(capsys):
    ch06.check_exclusive(exclusive)
    out = capsys.readouterr().out
    assert "allclose: True" in out and "passed: True" in out


def test_exclusive_accepts_the_library_version():
    ch06.check_exclusive(xsa.exclusive)


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (exclusive_unchanged, "nothing was removed"),
        (exclusive_projection_only, "the projection itself"),
        (exclusive_divided_by_norm, "divide by"),
        (exclusive_not_divided, "division"),
        (exclusive_over_tokens, "over tokens"),
        (exclusive_roles_swapped, "swapped"),
        (exclusive_detached, "gradients"),
        (exclusive_float32, "dtype"),
    ],
)
def test_exclusive_rejects_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ch06.check_exclusive(wrong)


def test_exclusive_backward_accepts_solution(capsys):
    ch06.check_exclusive_backward(exclusive_backward)
    assert "allclose: True" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (backward_unprojected_grad_y, "grad_z itself"),
        (backward_missing_norm_term, "2 c d v"),
        (backward_sign_flipped, "sign"),
        (backward_single_tensor, "pair"),
    ],
)
def test_exclusive_backward_rejects_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ch06.check_exclusive_backward(wrong)


@pytest.mark.parametrize("check", [ch06.check_exclusive, ch06.check_exclusive_backward])
def test_checks_fail_on_the_student_stub(check):
    with pytest.raises(NotImplementedError):
        check(stub)


def test_backward_solution_matches_the_library_through_autograd():
    # The chapter's formula against rbf_tutorial.xsa.exclusive, independently of the check.
    generator = torch.Generator().manual_seed(0)
    y, v, grad_z = (torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64) for _ in range(3))
    y.requires_grad_(True)
    v.requires_grad_(True)
    expected = torch.autograd.grad(xsa.exclusive(y, v), (y, v), grad_z)
    for actual, wanted in zip(exclusive_backward(y.detach(), v.detach(), grad_z), expected, strict=True):
        torch.testing.assert_close(actual, wanted)


def student_version(text: str) -> str:
    """The chapter as a learner receives it: each solution region replaced by the stub."""
    stub_line = lambda match: f"{match.group(1)}raise NotImplementedError()\n"
    stubbed, count = SOLUTION_REGION.subn(stub_line, text)
    assert count == len(EXERCISES), f"expected {len(EXERCISES)} solution regions, found {count}"
    return stubbed


# The student version (stubs in place) failing only at its graded checks is tested for every chapter
# by tests/test_assignments.py.
