"""Checks for chapter 06: exclusive self attention, forward (the projection), backward (its
gradients), and the projection written in Triton for the forward kernel's epilogue.

- :func:`check_exclusive`: exercise 1, ``exclusive(y, v)`` in PyTorch;
- :func:`check_exclusive_backward`: exercise 2, its gradients by hand;
- :func:`check_remove_own_value`: exercise 3, ``remove_own_value(out, own_v)`` inside
  ``@triton.jit``, launched in the teaching forward kernel (the interpreter on a CPU, compiled on a
  GPU) against float64 attention followed by the projection.

Each prints one ✓ line when it passes and raises ``AssertionError`` naming the likely mistake when
it does not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..device import DEVICE, SMALL
from ..reference import rbf_attention_reference
from .core import compare
from .stubs import not_written_yet

__all__ = ["check_exclusive", "check_exclusive_backward", "check_remove_own_value"]

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
    worst_diff, worst_cosine = 0.0, 0.0
    for shape in _SHAPES:
        y, v = _random_pair(generator, shape)
        actual = exclusive(y, v)
        name = "x".join(str(size) for size in shape)
        if not isinstance(actual, torch.Tensor) or actual.shape != y.shape:
            got = tuple(actual.shape) if isinstance(actual, torch.Tensor) else type(actual).__name__
            raise AssertionError(f"exclusive for shape {name} returned {got}; expected y's shape {shape}.")
        if actual.dtype != y.dtype:
            raise AssertionError(f"exclusive returned dtype {actual.dtype}; expected y's dtype {y.dtype}.")
        close, max_diff = compare(actual, _exclusive_reference(y, v), name=f"z {name}", atol=1e-10, rtol=1e-9)
        if not close:
            raise AssertionError(f"exclusive is wrong for shape {name} (off by up to {max_diff:.3g}). "
                                 f"{_diagnose_exclusive(actual, y, v)}")
        cosine = ((actual * v).sum(-1) / (actual.norm(dim=-1) * v.norm(dim=-1))).abs().max().item()
        if cosine > 1e-9:
            raise AssertionError(f"z is not orthogonal to v for shape {name}: |cos(z, v)| = {cosine:.1e}.")
        worst_diff, worst_cosine = max(worst_diff, max_diff), max(worst_cosine, cosine)

    # Gradients: autograd through the learner's function against finite differences, in float64.
    y, v = _random_pair(generator, (1, 2, 3, 4))
    y.requires_grad_(True)
    v.requires_grad_(True)
    try:
        passed = torch.autograd.gradcheck(exclusive, (y, v), eps=1e-6, atol=1e-6, raise_exception=False)
    except RuntimeError as error:  # for example an in-place write on a tensor autograd needs
        raise AssertionError(f"exclusive is not differentiable: {error}") from error
    if not passed:
        raise AssertionError(
            "exclusive gives the right values but wrong gradients: avoid .detach(), .data and in-place "
            "writes into y or v."
        )
    print(f"✓ exclusive matches float64 in {len(_SHAPES)} shapes (max diff {worst_diff:.1e}), z ⟂ v "
          f"(largest |cos(z, v)| {worst_cosine:.1e}), and gradcheck passes")


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
    worst = 0.0
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
            close, max_diff = compare(actual, wanted, name=f"{name} {label}", atol=1e-10, rtol=1e-8)
            if not close:
                hint = _diagnose_backward(name, actual, y, v, grad_z)
                raise AssertionError(f"{name} is wrong for shape {label} (off by up to {max_diff:.3g}). "
                                     f"{hint}")
            worst = max(worst, max_diff)
    print(f"✓ exclusive_backward: grad_y and grad_v match float64 autograd in {len(_SHAPES)} shapes "
          f"(max diff {worst:.1e})")


# ------------------------------------------------------------------------------------------------
# Exercise 3: remove_own_value in the Triton kernel's epilogue

EXERCISE_REMOVE_OWN = "exercise 3 (the projection in `remove_own_value`)"

# Tiny under the interpreter, real compiled. fp32 on a CPU (the interpreter's half-precision tl.dot
# is unreliable), fp16 on a GPU. HEAD_DIM differs from BLOCK_M, so a row sum taken over the wrong
# axis cannot broadcast silently.
_DTYPE = torch.float32 if SMALL else torch.float16
_HEAD_DIM = 32
_BLOCK = 16 if SMALL else 64
_TOLERANCE = dict(atol=2e-5, rtol=2e-5) if SMALL else dict(atol=5e-3, rtol=5e-3)
# (Nq, Nk, causal): ragged tiles, more keys than queries (registers in front), square, and not causal.
_KERNEL_SHAPES = [(37, 45, True), (29, 29, True), (19, 50, False)] if SMALL else \
    [(449, 517, True), (300, 300, True), (257, 640, False)]
# Weights spread over many keys, with the own key a little closer than the rest: the outputs lean
# towards their own values (as a trained model's do), so every wrong formula lands far away.
_SCALE = 0.06


def _leaning_qkv(n_queries: int, n_keys: int, seed: int, dtype: torch.dtype = _DTYPE):
    """Random q, k, v (1, 2, N, D) where each query's own key (i + Nk - Nq) lies near the query and
    the values have very different lengths."""
    generator = torch.Generator().manual_seed(seed)
    shape = (1, 2)
    q = torch.randn(*shape, n_queries, _HEAD_DIM, generator=generator, dtype=torch.float64)
    k = torch.randn(*shape, n_keys, _HEAD_DIM, generator=generator, dtype=torch.float64)
    k[..., n_keys - n_queries:, :] = q + 0.5 * torch.randn(q.shape, generator=generator, dtype=torch.float64)
    lengths = torch.rand(*shape, n_keys, 1, generator=generator, dtype=torch.float64) * 2.2 + 0.3
    v = torch.randn(*shape, n_keys, _HEAD_DIM, generator=generator, dtype=torch.float64) * lengths
    return tuple(x.to(device=DEVICE, dtype=dtype) for x in (q, k, v))


def _projection_parts(q, k, v, causal: bool):
    """float64 attention output y, own values u, y·u and |u|² (zero rows of u: coefficient 0)."""
    q64, k64, v64 = (x.double().cpu() for x in (q, k, v))
    y = rbf_attention_reference(q64, k64, v64, causal=causal, scale=_SCALE)
    own = v64[..., k.shape[-2] - q.shape[-2]:, :]
    along = (y * own).sum(-1, keepdim=True)
    norm_sq = own.square().sum(-1, keepdim=True)
    return y, own, along, norm_sq


def _exclusive_candidates(y, own, along, norm_sq) -> dict[str, torch.Tensor]:
    """The right answer first, then the float64 value of each usual mistake."""
    coefficient = along / norm_sq
    y_norm_sq = y.square().sum(-1, keepdim=True)
    return {
        "right": y - coefficient * own,
        "the output unchanged: nothing was subtracted (return out - coefficient[:, None] * own_v)": y,
        "the projection itself, (y·v/|v|²) v: return the residual, out minus it": coefficient * own,
        "y - (y·v/|v|) v: divide by |v|², the projection of y on v is (y·v / v·v) v": (
            y - along / norm_sq.sqrt() * own),
        "y - (y·v) v: the division by |v|² is missing": y - along * own,
        "y + (y·v/|v|²) v: the sign is flipped, subtract the projection": y + coefficient * own,
        "v minus its projection on y: the roles of out and own_v are swapped": own - along / y_norm_sq * y,
        "y minus its projection on y itself: project on own_v, the query's own value": (
            y - along / y_norm_sq * y),
    }


def _launch(remove_own_value: Callable, q, k, v, causal: bool):
    from .. import teaching

    hint = ("out and own_v are (BLOCK_M, D): the dot products are one number per row, "
            "tl.sum(..., axis=1), and broadcast back as coefficient[:, None].")
    with not_written_yet(EXERCISE_REMOVE_OWN):
        try:
            out, _ = teaching.flash_rbf_forward(q, k, v, causal, scale=_SCALE, block=_BLOCK, exclusive=True,
                                                remove_own=remove_own_value)
        except Exception as error:
            text = " ".join(str(cause) for cause in _error_chain(error)).lower()
            if "broadcast" in text or "incompatible dimensions" in text:
                raise AssertionError(f"{EXERCISE_REMOVE_OWN}: the kernel does not run, tile shapes do not "
                                     f"match. {hint}\nTriton said: {str(error).strip()[-600:]}") from error
            raise
    return out


def _error_chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def check_remove_own_value(remove_own_value: Callable) -> None:
    """``remove_own_value(out, own_v)`` as the epilogue of the teaching forward kernel.

    The kernel runs with ``EXCLUSIVE=True`` and the learner's function, on ragged shapes, causal
    and not, with more keys than queries, against float64 RBF attention followed by the projection;
    then with float64 inputs (exact arithmetic), and with one query whose own value is zero (the
    output must stay as it is, not turn into NaN).
    """
    worst = 0.0
    for case, (n_queries, n_keys, causal) in enumerate(_KERNEL_SHAPES):
        q, k, v = _leaning_qkv(n_queries, n_keys, seed=600 + 3 * case)
        got = _launch(remove_own_value, q, k, v, causal)
        candidates = _exclusive_candidates(*_projection_parts(q, k, v, causal))
        expected = candidates.pop("right")
        close, max_diff = compare(got, expected, **_TOLERANCE)
        if not close:
            shape = f"Nq={n_queries}, Nk={n_keys}, causal={causal}"
            if not bool(torch.isfinite(got).all()):
                raise AssertionError(f"{EXERCISE_REMOVE_OWN}: the output holds NaN or infinity ({shape}), "
                                     "though no value here is zero.")
            mistake = next((name for name, value in candidates.items()
                            if compare(got, value, **_TOLERANCE)[0]), None)
            raise AssertionError(
                f"{EXERCISE_REMOVE_OWN}: the exclusive output differs from float64 by up to {max_diff:.3g} "
                f"({shape}). " + (f"It equals {mistake}." if mistake else
                                  "Expected out - (sum(out * own_v, axis=1) / sum(own_v * own_v, axis=1))"
                                  "[:, None] * own_v.")
            )
        worst = max(worst, max_diff)

    # float64 inputs accumulate in float64: the epilogue must keep that precision.
    q, k, v = _leaning_qkv(21, 30, seed=650, dtype=torch.float64)
    got = _launch(remove_own_value, q, k, v, True)
    expected = _exclusive_candidates(*_projection_parts(q, k, v, True))["right"]
    close, max_diff = compare(got, expected, atol=1e-11, rtol=1e-11)
    if not close:
        raise AssertionError(f"{EXERCISE_REMOVE_OWN}: right in {str(_DTYPE)[6:]}, but with float64 inputs "
                             f"off by {max_diff:.1e}: compute in the dtype out and own_v arrive in.")

    # A query whose own value is zero has no direction to remove: its output stays y.
    q, k, v = _leaning_qkv(20, 24, seed=660)
    zero_query = 7
    v[..., 24 - 20 + zero_query, :] = 0.0
    got = _launch(remove_own_value, q, k, v, True)
    y, own, along, norm_sq = _projection_parts(q, k, v, True)
    coefficient = torch.where(norm_sq > 0, along / norm_sq.clamp_min(1e-300), torch.zeros_like(along))
    expected = y - coefficient * own
    if not bool(torch.isfinite(got).all()):
        raise AssertionError(
            f"{EXERCISE_REMOVE_OWN}: query {zero_query}'s own value is zero, and its output became NaN "
            "(0 / 0). Guard the division as the production kernel does: where |v|² <= OWN_VALUE_EPS use "
            "coefficient 0, dividing by tl.where(has_direction, norm_sq, 1.0) so no row divides by 0."
        )
    close, zero_diff = compare(got, expected, **_TOLERANCE)
    if not close:
        raise AssertionError(f"{EXERCISE_REMOVE_OWN}: with one zero own value (query {zero_query}) the "
                             f"output is off by {zero_diff:.3g}: a row with no direction keeps out as it is.")
    print(f"✓ remove_own_value: the exclusive kernel matches float64 in {len(_KERNEL_SHAPES)} ragged and "
          f"causal shapes, in float64, and with a zero own value (max diff {max(worst, zero_diff):.1e})")
