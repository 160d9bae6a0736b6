"""Checks for chapter 01: the size of the score matrix, and naive attention with torch.cdist."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..reference import rbf_attention_reference
from .tally import Tally

__all__ = ["check_naive_rbf_attention", "check_score_matrix_bytes"]


def check_score_matrix_bytes(score_matrix_bytes: Callable[[int, int, int, int, int], int]) -> None:
    """``score_matrix_bytes(batch, heads, n_queries, n_keys, bytes_per_element)`` must equal the
    size of a ``(batch, heads, n_queries, n_keys)`` tensor, compared with a real (meta) tensor."""
    cases = [
        (1, 1, 1024, 1024, 4),
        (4, 16, 4096, 4096, 4),
        (2, 8, 100, 300, 2),
        (8, 32, 32768, 32768, 2),
        (3, 5, 7, 11, 8),
    ]
    element_dtypes = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}
    for batch, heads, n_queries, n_keys, nbytes in cases:
        # A tensor on the meta device has a shape and a dtype but no storage: its size, for free.
        dtype = element_dtypes[nbytes]
        expected = torch.empty(batch, heads, n_queries, n_keys, dtype=dtype, device="meta").nbytes
        actual = score_matrix_bytes(batch, heads, n_queries, n_keys, nbytes)
        shape = f"B={batch} H={heads} Nq={n_queries} Nk={n_keys}, {nbytes} B/element"
        if not isinstance(actual, int | float) or isinstance(actual, bool):
            raise AssertionError(
                f"score_matrix_bytes returned {type(actual).__name__}; return a number of bytes."
            )
        if actual != expected:
            if actual * nbytes == expected:
                hint = "that is the number of elements; multiply by bytes_per_element."
            elif actual * batch * heads == expected:
                hint = "every batch element and every head has its own matrix: multiply by batch and heads."
            else:
                hint = "one score per (batch, head, query, key): multiply all four, then bytes_per_element."
            raise AssertionError(
                f"score_matrix_bytes is wrong for {shape}: got {actual}, expected {expected}; {hint}"
            )
    print(f"✓ score_matrix_bytes matches a real tensor's size for {len(cases)} shapes, up to 512 GiB")


def _diagnose_attention(actual: torch.Tensor, q, k, v, scale: float) -> str:
    distance = torch.cdist(q, k)
    near_misses = {
        "softmax(+scale·d²): the minus sign is missing, so the farthest key wins": scale * distance.square(),
        "softmax(-scale·d): torch.cdist returns the distance, not its square": -scale * distance,
        "softmax(-d²): scale is ignored": -distance.square(),
        "softmax over the query axis: take it over the keys (dim=-1)": None,
    }
    for mistake, logits in near_misses.items():
        if logits is None:
            weights = torch.softmax(-scale * distance.square(), dim=-2)
        else:
            weights = torch.softmax(logits, dim=-1)
        if torch.allclose(actual.double(), weights @ v, atol=1e-8, rtol=1e-6):
            return f"Your output equals {mistake}."
    return "Expected softmax(-scale * cdist(q, k)**2, dim=-1) @ v."


def check_naive_rbf_attention(naive_rbf_attention: Callable[..., torch.Tensor]) -> None:
    """``naive_rbf_attention(q, k, v, scale)`` must match the float64 reference: random shapes with
    odd lengths, Nq ≠ Nk, a value width different from the head dim, and several scales."""
    generator = torch.Generator().manual_seed(0)
    tally = Tally()
    cases = [  # (B, H, Nq, Nk, D, Dv, scale)
        (1, 1, 5, 5, 4, 4, 0.5),
        (2, 3, 7, 13, 8, 8, 1 / math.sqrt(8)),
        (1, 2, 17, 9, 16, 5, 0.1),
        (2, 2, 33, 33, 32, 32, 2.0),
    ]
    for batch, heads, n_queries, n_keys, dim, value_dim, scale in cases:
        q = torch.randn(batch, heads, n_queries, dim, generator=generator, dtype=torch.float64)
        k = torch.randn(batch, heads, n_keys, dim, generator=generator, dtype=torch.float64)
        v = torch.randn(batch, heads, n_keys, value_dim, generator=generator, dtype=torch.float64)
        actual = naive_rbf_attention(q, k, v, scale)
        expected = rbf_attention_reference(q, k, v, scale=scale)
        name = f"Nq={n_queries} Nk={n_keys} D={dim} scale={scale:.3g}"
        if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
            got = tuple(actual.shape) if isinstance(actual, torch.Tensor) else type(actual).__name__
            raise AssertionError(
                f"naive_rbf_attention for {name} returned {got}; expected a tensor of shape "
                f"{tuple(expected.shape)} = (B, H, Nq, Dv)."
            )
        if not tally.close(actual, expected, atol=1e-10, rtol=1e-8):
            raise AssertionError(
                f"naive_rbf_attention does not match the float64 reference for {name}. "
                f"{_diagnose_attention(actual, q, k, v, scale)}"
            )
    tally.passed("naive_rbf_attention matches the float64 reference")
