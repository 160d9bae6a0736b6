"""The comparison every check is built on: print the evidence, then assert."""

from __future__ import annotations

import torch


def report_close(actual: torch.Tensor, expected: torch.Tensor, *, name: str = "result",
                 atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """Print exact / allclose / max difference for ``actual`` vs ``expected``; return allclose."""
    if not isinstance(actual, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(actual).__name__}")
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} but expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    exact = torch.equal(a, e)
    close = bool(torch.allclose(a, e, atol=atol, rtol=rtol)) and bool(torch.isfinite(a).all())
    max_diff = (a - e).abs().max().item() if a.numel() else 0.0
    print(f"{name:<24} exact: {exact!s:<5}  allclose: {close!s:<5}  max difference: {max_diff:.3g}")
    return close


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, name: str = "result",
                 atol: float = 1e-5, rtol: float = 1e-4, hint: str = "") -> None:
    """Like :func:`report_close`, but raise ``AssertionError`` (with ``hint``) when not close."""
    if not report_close(actual, expected, name=name, atol=atol, rtol=rtol):
        message = f"{name} does not match the reference (atol={atol}, rtol={rtol})."
        raise AssertionError(f"{message} {hint}".strip())
