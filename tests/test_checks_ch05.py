"""The chapter 05 checks pass the right answers and fail stubs and the usual wrong ones.
(tests/test_exercise_contract.py checks the chapter's exercise cells themselves.)
"""

from __future__ import annotations

import pytest
import torch

from rbf_tutorial.checks import ch05

# ---------------------------------------------------------------- rotating pairs


def rotate_pairs(x, angles):
    first, second = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1).flatten(-2)


def rotate_pairs_clockwise(x, angles):
    return rotate_pairs(x, -angles)


def rotate_pairs_half_split(x, angles):
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def rotate_pairs_cos_only(x, angles):
    return x * angles.cos().repeat_interleave(2, dim=-1)


def rotate_pairs_swapped_output(x, angles):
    first, second = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([first * sin + second * cos, first * cos - second * sin], dim=-1).flatten(-2)


def rotate_pairs_in_float32(x, angles):
    return rotate_pairs(x.float(), angles.float())


# ---------------------------------------------------------------- SuSiE's distance


def susie_distance_closed_form(offset, frequencies, weights):
    return (4 * weights.square() * torch.sin(offset[..., None] * frequencies / 2).square()).sum(dim=-1)


def susie_distance_via_cosine(offset, frequencies, weights):
    # 4 sin²(t/2) = 2 - 2 cos t: the same function, another correct answer.
    return (2 * weights.square() * (1 - torch.cos(offset[..., None] * frequencies))).sum(dim=-1)


def susie_distance_weights_not_squared(offset, frequencies, weights):
    return (4 * weights * torch.sin(offset[..., None] * frequencies / 2).square()).sum(dim=-1)


def susie_distance_no_four(offset, frequencies, weights):
    return (weights.square() * torch.sin(offset[..., None] * frequencies / 2).square()).sum(dim=-1)


def susie_distance_full_angle(offset, frequencies, weights):
    return (4 * weights.square() * torch.sin(offset[..., None] * frequencies).square()).sum(dim=-1)


def susie_distance_not_summed(offset, frequencies, weights):
    return 4 * weights.square() * torch.sin(offset[..., None] * frequencies / 2).square()


def susie_distance_sum_over_everything(offset, frequencies, weights):
    return susie_distance_closed_form(offset, frequencies, weights).sum()


def stub(*args):
    raise NotImplementedError()


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("correct", [rotate_pairs])
def test_rotate_pairs_accepts_solution(correct, capsys):
    ch05.check_rotate_pairs(correct)
    out = capsys.readouterr().out
    assert "✓" in out and "max diff" in out and "✗" not in out


@pytest.mark.parametrize(
    "wrong",
    [rotate_pairs_clockwise, rotate_pairs_half_split, rotate_pairs_cos_only, rotate_pairs_swapped_output,
     rotate_pairs_in_float32],
)
def test_rotate_pairs_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError):
        ch05.check_rotate_pairs(wrong)


@pytest.mark.parametrize(
    ("wrong", "named_mistake"),
    [(rotate_pairs_clockwise, "clockwise"), (rotate_pairs_half_split, "x\\[f \\+ D/2\\]"),
     (rotate_pairs_cos_only, "sin terms are missing")],
)
def test_rotate_pairs_names_the_mistake(wrong, named_mistake):
    with pytest.raises(AssertionError, match=named_mistake):
        ch05.check_rotate_pairs(wrong)


def test_rotate_pairs_rejects_wrong_shape():
    with pytest.raises(AssertionError, match="shape"):
        ch05.check_rotate_pairs(lambda x, angles: x[..., 0::2])


@pytest.mark.parametrize("correct", [susie_distance_closed_form, susie_distance_via_cosine])
def test_susie_distance_accepts_solutions(correct, capsys):
    ch05.check_susie_distance_closed_form(correct)
    out = capsys.readouterr().out
    assert "✓" in out and "✗" not in out


@pytest.mark.parametrize(
    "wrong",
    [susie_distance_weights_not_squared, susie_distance_no_four, susie_distance_full_angle,
     susie_distance_not_summed, susie_distance_sum_over_everything],
)
def test_susie_distance_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError):
        ch05.check_susie_distance_closed_form(wrong)


def test_susie_distance_names_the_mistake():
    with pytest.raises(AssertionError, match="weights enter squared"):
        ch05.check_susie_distance_closed_form(susie_distance_weights_not_squared)
    with pytest.raises(AssertionError, match="half angle"):
        ch05.check_susie_distance_closed_form(susie_distance_full_angle)


@pytest.mark.parametrize("check", [ch05.check_rotate_pairs, ch05.check_susie_distance_closed_form])
def test_checks_fail_on_the_student_stub(check):
    with pytest.raises(NotImplementedError):
        check(stub)


def test_closed_form_matches_the_library():
    # The exercise's answer is the library's susie_distance_squared, with frequencies spelled out.
    from rbf_tutorial.positional import rope_frequencies, susie_distance_squared

    gen = torch.Generator().manual_seed(0)
    offsets = 100 * torch.randn(13, generator=gen, dtype=torch.float64)
    weights = torch.rand(8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        susie_distance_closed_form(offsets, rope_frequencies(16), weights),
        susie_distance_squared(offsets, 16, weights),
    )
