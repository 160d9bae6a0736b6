"""Checks for chapter 02: key-norm logits, and the padded vectors that turn them into a dot product."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..reference import rbf_logits_reference
from .tally import Tally

__all__ = ["check_key_norm_logits", "check_padded_query_key"]

_SHAPES = [(1, 1, 5, 7, 4), (2, 3, 9, 9, 8), (1, 2, 16, 33, 64)]  # (B, H, Nq, Nk, D)


def _random_qk(generator: torch.Generator, batch: int, heads: int, n_queries: int, n_keys: int, dim: int):
    q = torch.randn(batch, heads, n_queries, dim, generator=generator, dtype=torch.float64)
    # Keys with different lengths, so a missing |k|² term changes which key wins.
    k = torch.randn(batch, heads, n_keys, dim, generator=generator, dtype=torch.float64)
    k = k * torch.rand(batch, heads, n_keys, 1, generator=generator, dtype=torch.float64).mul(2).add(0.25)
    return q, k


def check_key_norm_logits(
    key_norm_logits: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
) -> None:
    """``key_norm_logits(q, k, scale)`` must be ``scale * (2 q·kᵀ - |k|²)``, shape (B, H, Nq, Nk),
    and give the same softmax as the true RBF logits ``-scale * |q - k|²``."""
    generator = torch.Generator().manual_seed(0)
    tally = Tally()
    for batch, heads, n_queries, n_keys, dim in _SHAPES:
        q, k = _random_qk(generator, batch, heads, n_queries, n_keys, dim)
        scale = dim**-0.5
        actual = key_norm_logits(q, k, scale)
        expected = scale * (2 * q @ k.transpose(-2, -1) - k.square().sum(-1)[..., None, :])
        name = f"Nq={n_queries} Nk={n_keys} D={dim}"
        if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
            got = tuple(actual.shape) if isinstance(actual, torch.Tensor) else type(actual).__name__
            raise AssertionError(
                f"key_norm_logits for {name} returned {got}; "
                f"expected shape {tuple(expected.shape)} = (B, H, Nq, Nk)."
            )
        if not tally.close(actual, expected, atol=1e-9, rtol=1e-9):
            true_logits = rbf_logits_reference(q, k, scale)
            if torch.allclose(actual, true_logits, atol=1e-9, rtol=1e-9):
                hint = (
                    "These are the full distance logits -scale·|q - k|², with the -scale·|q|² term: "
                    "correct softmax, but the point is that you may leave |q|² out."
                )
            elif torch.allclose(actual, scale * 2 * q @ k.transpose(-2, -1), atol=1e-9):
                hint = "The key-norm penalty -|k|² is missing: without it, long keys win (the bully)."
            elif torch.allclose(actual, scale * (q @ k.transpose(-2, -1) - k.square().sum(-1)[..., None, :])):
                hint = "The dot product needs a factor 2: |q - k|² = |q|² - 2 q·k + |k|²."
            else:
                hint = "Expected scale * (2 * q @ k.transpose(-2, -1) - (k**2).sum(-1)[..., None, :])."
            raise AssertionError(f"key_norm_logits is wrong for {name}. {hint}")
        same_softmax = torch.softmax(actual, -1)
        if not tally.close(same_softmax, torch.softmax(rbf_logits_reference(q, k, scale), -1), atol=1e-12,
                           rtol=1e-9):
            raise AssertionError(f"key_norm_logits for {name}: the softmax differs from RBF attention's.")
    tally.passed("key_norm_logits matches scale·(2 q·kᵀ - |k|²), and its softmax is RBF attention's")


def check_padded_query_key(
    padded_query_key: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """``padded_query_key(q, k) -> (q_padded, k_padded)`` must satisfy
    ``q_padded @ k_paddedᵀ == 2 q·kᵀ - |k|²``, with ``q_padded`` built from ``q`` alone and
    ``k_padded`` from ``k`` alone (a fused kernel sees one query and one key at a time)."""
    generator = torch.Generator().manual_seed(1)
    tally = Tally()
    for batch, heads, n_queries, n_keys, dim in _SHAPES:
        q, k = _random_qk(generator, batch, heads, n_queries, n_keys, dim)
        result = padded_query_key(q, k)
        if not (isinstance(result, tuple | list) and len(result) == 2):
            raise AssertionError("padded_query_key must return a pair (q_padded, k_padded).")
        q_padded, k_padded = result
        name = f"Nq={n_queries} Nk={n_keys} D={dim}"
        if q_padded.shape[:-1] != q.shape[:-1] or k_padded.shape[:-1] != k.shape[:-1]:
            raise AssertionError(
                f"{name}: q_padded {tuple(q_padded.shape)} / k_padded {tuple(k_padded.shape)} must keep the "
                f"leading dims of q {tuple(q.shape)} / k {tuple(k.shape)}; only the last (head) dim grows."
            )
        if q_padded.shape[-1] != k_padded.shape[-1] or q_padded.shape[-1] <= dim:
            raise AssertionError(
                f"{name}: head dims {q_padded.shape[-1]} and {k_padded.shape[-1]}: both must be equal, "
                f"and wider than D={dim} (the extra column carries |k|²)."
            )
        expected = 2 * q @ k.transpose(-2, -1) - k.square().sum(-1)[..., None, :]
        if not tally.close(q_padded @ k_padded.transpose(-2, -1), expected, atol=1e-9, rtol=1e-9):
            raise AssertionError(
                f"{name}: q_padded @ k_padded.T is not 2 q·kᵀ - |k|². Hint: put 2q in the first D "
                f"columns of q_padded and k in those of k_padded; in the extra column, a constant c in "
                f"every query and -|k|²/c in every key."
            )
        # Each side must be computable on its own: change the other input, nothing may move.
        other_q, other_k = _random_qk(generator, batch, heads, n_queries, n_keys, dim)
        if not torch.equal(padded_query_key(q, other_k)[0], q_padded):
            raise AssertionError(f"{name}: q_padded changed when only k changed; build it from q alone.")
        if not torch.equal(padded_query_key(other_q, k)[1], k_padded):
            raise AssertionError(f"{name}: k_padded changed when only q changed; build it from k alone.")
    tally.passed("padded_query_key gives 2 q·kᵀ - |k|², each side built from its own input")
