"""checks.core: one pass line when a comparison holds, the details when it does not."""

from __future__ import annotations

import pytest
import torch

from rbf_tutorial.checks import assert_close, report_close


def test_assert_close_prints_one_line_naming_the_reference(capsys):
    expected = torch.randn(3, 4, dtype=torch.float64)
    assert_close(expected.float(), expected, name="tile", atol=1e-6, rtol=1e-6)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("✓ tile matches float64 (max diff ")


def test_assert_close_says_where_and_by_how_much(capsys):
    expected = torch.randn(3, 4)
    actual = expected.clone()
    actual[1, 2] += 0.5
    with pytest.raises(AssertionError, match=r"tile does not match the reference: 1 of 12 entries differ.*"
                                             r"index \(1, 2\).*did you rescale"):
        assert_close(actual, expected, name="tile", hint="did you rescale?")
    assert capsys.readouterr().out == ""


def test_assert_close_reports_nan():
    with pytest.raises(AssertionError, match="1 of 2 entries are NaN"):
        assert_close(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))


def test_assert_close_refuses_wrong_shapes_and_types():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(2), torch.zeros(3))
    with pytest.raises(TypeError, match="tile: expected a torch.Tensor"):
        assert_close([1.0], torch.zeros(1), name="tile")


def test_report_close_never_prints_lines_that_read_as_failure_when_it_holds(capsys):
    x = torch.randn(5)
    assert report_close(x + 1e-9, x, name="shown", reference="the matmul route")
    out = capsys.readouterr().out
    assert out.startswith("✓ shown matches the matmul route") and "False" not in out and "exact" not in out
    assert not report_close(x + 1, x, name="shown")
    assert capsys.readouterr().out.startswith("✗ shown differs from the reference: 5 of 5 entries differ")
