"""Checks for chapter 06: exclusive self attention, forward (the projection) and backward (its gradients)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .core import report_close

__all__ = ["check_exclusive", "check_exclusive_backward"]

_SHAPES = [(1, 1, 1, 2), (2, 3, 7, 8), (1, 4, 33, 64)]  # (B, H, N, D)


def _random_pair(generator: torch.Generator, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs ``y`` and values ``v`` in float64; ``y`` leans towards ``v``, as in a trained model,
    so a projection onto the wrong vector, or one that is not removed, is far from the answer."""
    v = torch.randn(shape, generator=generator, dtype=torch.float64)
    v = v * torch.rand(*shape[:-1], 1, generator=generator, dtype=torch.float64).mul(3).add(0.2)
    y = torch.randn(shape, generator=generator, dtype=torch.float64) + 0.7 * v
    return y, v


def _exclusive_reference(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt through the unit vector: a different route to the same projection."""
    unit = v / v.norm(dim=-1, keepdim=True)
    return y - (y * unit).sum(dim=-1, keepdim=True) * unit


def _diagnose_exclusive(actual: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> str:
    along = (y * v).sum(-1, keepdim=True)
    norm_sq = v.square().sum(-1, keepdim=True)
    near_misses = {
        "y unchanged: nothing was removed": y,
        "the projection itself, (y·v/|v|²) v, rather than y minus it": along / norm_sq * v,
        "y - (y·v/|v|) v: divide by |v|² (the projection of y on v is (y·v) v / (v·v))": (
            y - along / norm_sq.sqrt() * v
        ),
        "y - (y·v) v: the division by |v|² is missing": y - along * v,
        "y + (y·v/|v|²) v: the sign is flipped": y + along / norm_sq * v,
        "v minus its projection on y: the roles of y and v are swapped": (
            v - along / y.square().sum(-1, keepdim=True) * y
        ),
    }
    # Dot products summed over tokens (dim -2) rather than over the head dim.
    wrong_axis = y - (y * v).sum(-2, keepdim=True) / v.square().sum(-2, keepdim=True) * v
    near_misses["dot products summed over tokens (dim=-2); sum over the head dim (dim=-1)"] = wrong_axis
    for mistake, value in near_misses.items():
        if actual.shape == value.shape and torch.allclose(actual, value, atol=1e-9, rtol=1e-7):
            return f"Your result equals {mistake}."
    return "Expected z = y - ((y * v).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True)) * v."


def check_exclusive(exclusive: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """``exclusive(y, v)`` must return ``y - (y·v / |v|²) v`` per token and head, over the last dim:
    the same shape and dtype as ``y``, orthogonal to ``v``, and differentiable (gradcheck)."""
    generator = torch.Generator().manual_seed(6)
    for shape in _SHAPES:
        y, v = _random_pair(generator, shape)
        actual = exclusive(y, v)
        name = "x".join(str(size) for size in shape)
        if not isinstance(actual, torch.Tensor) or actual.shape != y.shape:
            got = tuple(actual.shape) if isinstance(actual, torch.Tensor) else type(actual).__name__
            raise AssertionError(f"exclusive for shape {name} returned {got}; expected y's shape {shape}.")
        if actual.dtype != y.dtype:
            raise AssertionError(f"exclusive returned dtype {actual.dtype}; expected y's dtype {y.dtype}.")
        expected = _exclusive_reference(y, v)
        if not report_close(actual, expected, name=f"z {name}", atol=1e-10, rtol=1e-9):
            raise AssertionError(f"exclusive is wrong for shape {name}. {_diagnose_exclusive(actual, y, v)}")
        cosine = ((actual * v).sum(-1) / (actual.norm(dim=-1) * v.norm(dim=-1))).abs().max().item()
        print(f"{'':<24} largest |cos(z, v)|: {cosine:.1e}")
        if cosine > 1e-9:
            raise AssertionError(f"z is not orthogonal to v for shape {name}: |cos(z, v)| = {cosine:.1e}.")

    # Gradients: autograd through the learner's function against finite differences, in float64.
    y, v = _random_pair(generator, (1, 2, 3, 4))
    y.requires_grad_(True)
    v.requires_grad_(True)
    try:
        passed = torch.autograd.gradcheck(exclusive, (y, v), eps=1e-6, atol=1e-6, raise_exception=False)
    except RuntimeError as error:  # for example an in-place write on a tensor autograd needs
        raise AssertionError(f"exclusive is not differentiable: {error}") from error
    print(f"{'gradcheck (float64)':<24} passed: {passed}")
    if not passed:
        raise AssertionError(
            "exclusive gives the right values but wrong gradients: avoid .detach(), .data and in-place "
            "writes into y or v."
        )
    print("exclusive: correct, orthogonal to v, and differentiable.")


def _backward_reference(y: torch.Tensor, v: torch.Tensor, grad_z: torch.Tensor):
    """Gradients of ``sum(grad_z * exclusive(y, v))`` by autograd, in float64."""
    y, v = y.detach().requires_grad_(True), v.detach().requires_grad_(True)
    z = _exclusive_reference(y, v)
    return torch.autograd.grad(z, (y, v), grad_z)


def _diagnose_backward(name: str, actual, y, v, grad_z) -> str:
    norm_sq = v.square().sum(-1, keepdim=True)
    c = (y * v).sum(-1, keepdim=True) / norm_sq
    d = (grad_z * v).sum(-1, keepdim=True) / norm_sq
    if name == "grad_y":
        near_misses = {
            "grad_z itself: the projection also acts on the gradient": grad_z,
            "grad_z - c v with c = y·v/|v|²: project grad_z, not y": grad_z - c * v,
        }
    else:
        near_misses = {
            "-c grad_z - d y: the term 2 c d v (from differentiating 1/|v|²) is missing": -c * grad_z - d * y,
            "-c grad_z: the terms from differentiating c = y·v/|v|² are missing": -c * grad_z,
            "c grad_z + d y - 2 c d v: the sign is flipped": c * grad_z + d * y - 2 * c * d * v,
        }
    for mistake, value in near_misses.items():
        if actual.shape == value.shape and torch.allclose(actual, value, atol=1e-9, rtol=1e-7):
            return f"Your {name} equals {mistake}."
    return "Differentiate z = y - c v with c = (y·v)/(v·v), term by term; see the markdown above."


_Backward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def check_exclusive_backward(exclusive_backward: _Backward) -> None:
    """``exclusive_backward(y, v, grad_z) -> (grad_y, grad_v)`` must be the gradients of
    ``sum(grad_z * z)`` with ``z = y - (y·v / |v|²) v``, without autograd (compared with autograd)."""
    generator = torch.Generator().manual_seed(7)
    for shape in _SHAPES:
        y, v = _random_pair(generator, shape)
        grad_z = torch.randn(shape, generator=generator, dtype=torch.float64)
        result = exclusive_backward(y, v, grad_z)
        if not (isinstance(result, tuple | list) and len(result) == 2):
            raise AssertionError("exclusive_backward must return a pair (grad_y, grad_v).")
        expected = _backward_reference(y, v, grad_z)
        label = "x".join(str(size) for size in shape)
        for name, actual, wanted in zip(("grad_y", "grad_v"), result, expected, strict=True):
            if not isinstance(actual, torch.Tensor) or actual.shape != wanted.shape:
                got = tuple(actual.shape) if isinstance(actual, torch.Tensor) else type(actual).__name__
                raise AssertionError(f"{name} for shape {label} is {got}; expected {tuple(wanted.shape)}.")
            if not report_close(actual, wanted, name=f"{name} {label}", atol=1e-10, rtol=1e-8):
                hint = _diagnose_backward(name, actual, y, v, grad_z)
                raise AssertionError(f"{name} is wrong for shape {label}. {hint}")
    print("exclusive_backward: both gradients match autograd.")
