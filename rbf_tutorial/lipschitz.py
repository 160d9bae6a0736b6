"""How much one self-attention layer can stretch its input: the spectral norm of its Jacobian.

A map ``f`` is Lipschitz with constant ``L`` when ``|f(x) - f(y)| <= L |x - y|`` for all inputs;
for a differentiable map the smallest such ``L`` is the largest spectral norm of its Jacobian
over all inputs. Kim, Papamakarios and Mnih (arXiv:2006.04710) prove that dot-product
self-attention is *not* Lipschitz on an unbounded input domain, and that self-attention scored by
squared L2 distance, with the query and key projections tied (``W_Q = W_K``), is.

This module measures rather than proves. :func:`self_attention` is one head of full (non-causal)
self-attention on a sequence ``x (N, D)``; :func:`jacobian_spectral_norm` computes the spectral
norm of its Jacobian at ``x`` (exactly, from the full Jacobian, or by power iteration with one
Jacobian-vector and one vector-Jacobian product per step); :func:`stretch_sweep` scales an input
by growing factors ``c`` and records the norm at each ``c * x``. Bounded along every such ray is
what a Lipschitz layer must show; growing without bound along one ray is enough to show it is not.

Two input families put each layer at its weak spot:

* :func:`origin_token_sequence`: one token at the origin among spread-out tokens. Its query
  scores every key alike under the dot product (``0 . k = 0``), so its weights stay uniform while
  the other tokens grow: a small move of that token tilts a uniform average of far-apart values.
  This is the kind of input Kim et al. use against dot-product attention.
* :func:`split_query_sequence`: a token whose query sits exactly halfway between the keys of two
  others, nearer to them than to its own key. With ``W_Q != W_K`` that is possible at every
  scale, and its weights stay split between two far-apart keys; with ``W_Q = W_K`` a token's own
  key is its query, at distance zero, so it always wins.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch.func import jacrev, jvp, vjp

from .arguments import positive_int

__all__ = [
    "SCORES",
    "jacobian_spectral_norm",
    "origin_token_sequence",
    "self_attention",
    "split_query_sequence",
    "stretch_sweep",
]

#: Scores of :func:`self_attention`: ``s q.k`` and ``-s |q - k|^2``.
SCORES: tuple[str, ...] = ("dot", "rbf")


def _matrix(name: str, value: object, rows: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 2:
        raise TypeError(f"{name}: expected a 2-D floating-point torch.Tensor")
    if rows is not None and value.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows, got shape {tuple(value.shape)}")
    return value


def self_attention(
    x: torch.Tensor,
    w_query: torch.Tensor,
    w_key: torch.Tensor,
    w_value: torch.Tensor,
    *,
    score: str,
    scale: float | None = None,
) -> torch.Tensor:
    """One head of full self-attention: ``softmax(logits(x W_Q, x W_K)) (x W_V)``, ``(N, Dv)``.

    ``x`` is ``(N, D)`` (rows are tokens); ``w_query`` and ``w_key`` are ``(D, Dk)``, ``w_value``
    ``(D, Dv)``; pass the same tensor as ``w_query`` and ``w_key`` for the tied layer. Logits are
    ``scale * q.k`` (``score="dot"``) or ``-scale * |q - k|^2`` (``score="rbf"``, from the
    differences themselves); ``scale`` defaults to ``1 / sqrt(Dk)``.
    """
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    x = _matrix("x", x)
    dim = x.shape[1]
    w_query, w_key, w_value = (_matrix(name, w, dim) for name, w in
                               (("w_query", w_query), ("w_key", w_key), ("w_value", w_value)))
    if w_query.shape[1] != w_key.shape[1]:
        raise ValueError(f"w_key: expected {w_query.shape[1]} columns like w_query, got {w_key.shape[1]}")
    if scale is None:
        scale = w_query.shape[1] ** -0.5
    queries, keys, values = x @ w_query, x @ w_key, x @ w_value
    if score == "dot":
        logits = scale * queries @ keys.T
    else:
        logits = -scale * (queries[:, None, :] - keys[None, :, :]).square().sum(dim=-1)
    return torch.softmax(logits, dim=-1) @ values


def jacobian_spectral_norm(
    function: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    method: str = "exact",
    iterations: int = 100,
    generator: torch.Generator | None = None,
) -> float:
    """The largest singular value of the Jacobian of ``function`` at ``x`` (inputs and outputs flattened).

    ``method="exact"`` builds the whole Jacobian (``numel(out) x numel(x)``, fine for small inputs)
    and takes its matrix 2-norm. ``method="power"`` runs ``iterations`` steps of power iteration on
    ``J^T J`` (each a Jacobian-vector product and a vector-Jacobian product, never the matrix): a
    lower bound that converges to the exact value from below.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x: expected a floating-point torch.Tensor")
    if method == "exact":
        jacobian = jacrev(function)(x)
        output_size = jacobian.numel() // x.numel()
        return torch.linalg.matrix_norm(jacobian.reshape(output_size, x.numel()), ord=2).item()
    if method != "power":
        raise ValueError(f"method: expected 'exact' or 'power', got {method!r}")
    iterations = positive_int("iterations", iterations)
    direction = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    direction = direction / direction.norm()
    _, pull_back = vjp(function, x)
    stretch = 0.0
    for _ in range(iterations):
        _, pushed = jvp(function, (x,), (direction,))  # J v
        stretch = pushed.norm().item()
        if stretch == 0.0:
            return 0.0
        (pulled,) = pull_back(pushed)  # J^T J v
        direction = pulled / pulled.norm()
    return stretch


def stretch_sweep(
    function: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    factors: Sequence[float],
    **norm_options,
) -> list[float]:
    """``jacobian_spectral_norm(function, c * x)`` for each ``c`` in ``factors``."""
    values = []
    for factor in factors:
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor):
            raise TypeError(f"factors: expected finite numbers, got {factor!r}")
        values.append(jacobian_spectral_norm(function, factor * x, **norm_options))
    return values


def origin_token_sequence(
    n_tokens: int, dim: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(n_tokens, dim)`` float64: token 0 at the origin, the others standard normal."""
    n_tokens, dim = positive_int("n_tokens", n_tokens), positive_int("dim", dim)
    if n_tokens < 2:
        raise ValueError(f"n_tokens: expected at least 2 (one at the origin, one elsewhere), got {n_tokens}")
    x = torch.randn(n_tokens, dim, generator=generator, dtype=torch.float64)
    x[0] = 0.0
    return x


def split_query_sequence(
    w_query: torch.Tensor,
    w_key: torch.Tensor,
    *,
    spread: float = 0.25,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Three tokens ``(3, D)`` float64: ``a``, ``m + b`` and ``m - b``, where ``m W_K = a W_Q``.

    Token 0's query ``a W_Q`` is then exactly halfway between the keys of tokens 1 and 2, at
    distance ``|b W_K|`` from both. ``b`` is chosen with ``|b W_K| = spread * |a (W_Q - W_K)|``,
    which is token 0's distance to its own key, so for ``spread < 1`` the other two keys are nearer.
    All three relations are linear, so they hold for every multiple ``c`` of the sequence. ``W_K``
    must be square and invertible; with ``W_Q = W_K`` the own key is at distance zero and ``b`` falls
    back to ``spread * |a|`` in a random direction (the tie is then still in place, and loses).
    """
    w_query, w_key = _matrix("w_query", w_query), _matrix("w_key", w_key)
    if w_key.shape[0] != w_key.shape[1] or w_query.shape != w_key.shape:
        raise ValueError(f"w_key: expected square matrices of one shape, got {tuple(w_query.shape)} "
                         f"and {tuple(w_key.shape)}")
    if isinstance(spread, bool) or not isinstance(spread, numbers.Real) or not 0 < spread < 1:
        raise ValueError(f"spread: expected a number in (0, 1), got {spread!r}")
    dim = w_key.shape[0]
    w_query, w_key = w_query.double(), w_key.double()
    a = torch.randn(dim, generator=generator, dtype=torch.float64)
    u = torch.randn(dim, generator=generator, dtype=torch.float64)
    midpoint = torch.linalg.solve(w_key.T, w_query.T @ a)  # m with m W_K = a W_Q (rows times matrices)
    own_distance = (a @ (w_query - w_key)).norm()
    if own_distance < 1e-12 * a.norm():
        b = spread * a.norm() * u / u.norm()
    else:
        b = spread * own_distance * u / (u @ w_key).norm()
    return torch.stack([a, midpoint + b, midpoint - b])
