"""How sharply softmax attention can single out one key as the number of keys grows.

Softmax hands out one unit of mass. When the logits cannot grow with the number of keys ``N``
(fixed query and key norms), every key's share of the denominator stays the same size while the
number of shares grows, so the weight of even the best key falls towards ``1 / N``: attention
flattens. Mudarisov et al. (arXiv:2508.17821) call this *vanishing attention*. RBF logits are
capped at zero, ``-s |q - k|^2 <= 0``; this module measures whether the cap changes anything.

The experiment, for a batch of queries and one pool of random keys:

* every query gets a **planted** key, a slightly perturbed copy of itself, placed first;
* the other keys are the first ``N - 1`` rows of a fixed pool, so growing ``N`` only *adds* keys
  (each query's planted weight can then only fall, exactly: a larger denominator, same numerator);
* the same queries and keys are scored by each rule (:func:`score_logits`), and
  :func:`selectivity_curve` reports, per ``N``, the planted key's weight, the largest weight, the
  entropy of the weights divided by ``log N`` (0: one-hot, 1: uniform) and how often the planted
  key is still the top-weighted one.

Everything is float64 on the CPU: the numbers are small and exact enough to compare.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .arguments import positive_float, positive_int

__all__ = ["SCORES", "PlantedKeys", "SelectivityCurve", "planted_keys", "score_logits", "selectivity_curve"]

#: The scoring rules :func:`score_logits` knows: ``s q.k`` and ``-s |q - k|^2``.
SCORES: tuple[str, ...] = ("dot", "rbf")


@dataclass
class PlantedKeys:
    """Queries ``(T, D)``, each query's planted key ``(T, D)``, and the shared random key pool ``(M, D)``."""

    queries: torch.Tensor
    planted: torch.Tensor
    pool: torch.Tensor


@dataclass
class SelectivityCurve:
    """One scoring rule's measurements at each key count in ``n_keys`` (means over the queries)."""

    n_keys: list[int]
    planted_weight: list[float]
    max_weight: list[float]
    normalized_entropy: list[float]
    planted_on_top: list[float]



def planted_keys(
    n_queries: int,
    pool_size: int,
    dim: int,
    *,
    perturbation: float = 0.1,
    generator: torch.Generator | None = None,
) -> PlantedKeys:
    """Standard-normal queries and pool keys (so every norm is about ``sqrt(dim)``, whatever ``N``),
    and per query a planted key ``q + perturbation * noise``: the key it should find."""
    n_queries = positive_int("n_queries", n_queries)
    pool_size = positive_int("pool_size", pool_size)
    dim = positive_int("dim", dim)
    perturbation = positive_float("perturbation", perturbation)
    draw = {"generator": generator, "dtype": torch.float64}
    queries = torch.randn(n_queries, dim, **draw)
    planted = queries + perturbation * torch.randn(n_queries, dim, **draw)
    pool = torch.randn(pool_size, dim, **draw)
    return PlantedKeys(queries=queries, planted=planted, pool=pool)


def score_logits(queries: torch.Tensor, keys: torch.Tensor, score: str, scale: float) -> torch.Tensor:
    """Logits ``(T, M)`` of queries ``(T, D)`` against keys ``(M, D)``: ``scale * q.k`` for
    ``score="dot"``, ``-scale * |q - k|^2`` for ``score="rbf"`` (from the differences themselves,
    so no cancellation)."""
    if score not in SCORES:
        raise ValueError(f"score: expected one of {SCORES}, got {score!r}")
    scale = positive_float("scale", scale)
    for name, tensor in (("queries", queries), ("keys", keys)):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() != 2:
            raise TypeError(f"{name}: expected a 2-D floating-point torch.Tensor (rows, D)")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"keys: expected D = {queries.shape[1]} columns like queries, got {keys.shape[1]}")
    if score == "dot":
        return scale * queries @ keys.T
    # cdist without its matmul shortcut sums the squared differences themselves, in chunks it
    # manages, so a pool of 65 536 keys never builds a (T, M, D) tensor.
    distances = torch.cdist(queries, keys, compute_mode="donot_use_mm_for_euclid_dist")
    return -scale * distances.square()


def _planted_logits(queries: torch.Tensor, planted: torch.Tensor, score: str, scale: float) -> torch.Tensor:
    """Each query's logit for its own planted key, ``(T,)``: the same rule as :func:`score_logits`."""
    if score == "dot":
        return scale * (queries * planted).sum(dim=-1)
    return -scale * (queries - planted).square().sum(dim=-1)


def selectivity_curve(
    problem: PlantedKeys, n_keys: Sequence[int], *, score: str, scale: float
) -> SelectivityCurve:
    """Softmax over ``[planted key, pool[0], ..., pool[N - 2]]`` for each ``N`` in ``n_keys``.

    ``N`` counts the planted key, so ``N = 1`` is the planted key alone. Each ``N`` must be at most
    ``len(pool) + 1``; the list must be increasing.
    """
    lengths = [positive_int("n_keys", n) for n in n_keys]
    if not lengths or lengths != sorted(set(lengths)):
        raise ValueError(f"n_keys: expected a non-empty, strictly increasing list, got {list(n_keys)}")
    if lengths[-1] > problem.pool.shape[0] + 1:
        raise ValueError(
            f"n_keys: the largest N is {lengths[-1]} but the pool holds {problem.pool.shape[0]} keys "
            f"(N counts the planted key: at most {problem.pool.shape[0] + 1})"
        )
    pool_logits = score_logits(problem.queries, problem.pool[: lengths[-1] - 1], score, scale)
    planted_logit = _planted_logits(problem.queries, problem.planted, score, scale)
    curve = SelectivityCurve(n_keys=lengths, planted_weight=[], max_weight=[], normalized_entropy=[],
                             planted_on_top=[])
    for n in lengths:
        logits = torch.cat([planted_logit[:, None], pool_logits[:, : n - 1]], dim=1)
        weights = torch.softmax(logits, dim=-1)
        # Entropy from log-softmax: exact even where a weight underflows to zero.
        entropy = -(weights * torch.log_softmax(logits, dim=-1)).sum(dim=-1)
        curve.planted_weight.append(weights[:, 0].mean().item())
        curve.max_weight.append(weights.max(dim=-1).values.mean().item())
        curve.normalized_entropy.append((entropy / math.log(n)).mean().item() if n > 1 else 0.0)
        curve.planted_on_top.append((weights.argmax(dim=-1) == 0).double().mean().item())
    return curve
