"""The comparison every check is built on: one line when it holds, the details when it does not."""

from __future__ import annotations

import torch

__all__ = ["assert_close", "compare", "report_close"]


def _reference_name(expected: torch.Tensor, reference: str | None) -> str:
    if reference is not None:
        return reference
    return "float64" if expected.dtype == torch.float64 else "the reference"


def compare(actual: torch.Tensor, expected: torch.Tensor, *, name: str = "result",
            atol: float = 1e-5, rtol: float = 1e-4) -> tuple[bool, float]:
    """``(close, max_diff)`` for ``actual`` against ``expected``, printing nothing.

    Close means ``torch.allclose`` in float64 and no NaN or infinity in ``actual``. A tensor of the
    wrong shape or type raises at once: there is nothing to compare.
    """
    if not isinstance(actual, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(actual).__name__}")
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} but expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    finite = bool(torch.isfinite(a).all())
    close = finite and bool(torch.allclose(a, e, atol=atol, rtol=rtol))
    max_diff = (a - e).abs().nan_to_num(nan=float("inf")).max().item() if a.numel() else 0.0
    return close, max_diff


def _failure_details(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> str:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not bool(torch.isfinite(a).all()):
        bad = int((~torch.isfinite(a)).sum())
        return f"{bad} of {a.numel()} entries are NaN or infinite"
    diff = (a - e).abs()
    wrong = diff > atol + rtol * e.abs()
    index = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
    return (f"{int(wrong.sum())} of {a.numel()} entries differ; the largest difference, "
            f"{diff.max().item():.3g}, is at index {index} (got {a[index].item():.6g}, expected "
            f"{e[index].item():.6g}; tolerance atol={atol}, rtol={rtol})")


def report_close(actual: torch.Tensor, expected: torch.Tensor, *, name: str = "result",
                 atol: float = 1e-5, rtol: float = 1e-4, reference: str | None = None) -> bool:
    """Print one line saying whether ``actual`` matches ``expected``; return whether it does.

    ``✓ name matches float64 (max diff 3e-08)`` when close, ``✗ name differs from float64: ...``
    with the details when not. ``reference`` names what ``expected`` is (default: "float64" for a
    float64 tensor, else "the reference").
    """
    close, max_diff = compare(actual, expected, name=name, atol=atol, rtol=rtol)
    against = _reference_name(expected, reference)
    if close:
        print(f"✓ {name} matches {against} (max diff {max_diff:.1e})")
    else:
        print(f"✗ {name} differs from {against}: {_failure_details(actual, expected, atol, rtol)}")
    return close


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, name: str = "result", atol: float = 1e-5,
                 rtol: float = 1e-4, hint: str = "", reference: str | None = None) -> None:
    """Print ``✓ name matches <reference> (max diff ...)``, or raise ``AssertionError`` saying where
    and by how much ``actual`` differs, followed by ``hint`` (the likely mistake)."""
    close, max_diff = compare(actual, expected, name=name, atol=atol, rtol=rtol)
    against = _reference_name(expected, reference)
    if not close:
        details = _failure_details(actual, expected, atol, rtol)
        raise AssertionError(f"{name} does not match {against}: {details}. {hint}".strip())
    print(f"✓ {name} matches {against} (max diff {max_diff:.1e})")
