"""Checks for chapter 04: when a key beats a register at the origin, how much mass the register
gets, and attention with a register in front of the keys, computed by hand."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..reference import rbf_attention_reference, rbf_logits_reference
from ..registers import RegisterTokens, register_weights
from .tally import Tally

__all__ = ["check_attention_with_register", "check_key_beats_register", "check_register_weight"]

_SHAPES = [(1, 1, 5, 7, 2), (2, 3, 9, 9, 8), (1, 2, 16, 33, 32)]  # (B, H, Nq, Nk, D)


def _random_qk(generator: torch.Generator, batch: int, heads: int, n_queries: int, n_keys: int, dim: int):
    """Queries, and keys at a mix of distances: some inside a query's ball through the origin, most not.

    Half the keys are a query plus a little noise (close to it, so they beat the register), the
    rest are random with random lengths; float64, never zero.
    """
    q = torch.randn(batch, heads, n_queries, dim, generator=generator, dtype=torch.float64)
    k = torch.randn(batch, heads, n_keys, dim, generator=generator, dtype=torch.float64)
    k = k * torch.rand(batch, heads, n_keys, 1, generator=generator, dtype=torch.float64).mul(2).add(0.25)
    near = torch.randint(0, n_queries, (n_keys // 2,), generator=generator)
    noise = 0.3 * torch.randn(batch, heads, n_keys // 2, dim, generator=generator, dtype=torch.float64)
    k[:, :, : n_keys // 2] = q[:, :, near] + noise
    return q, k


def _shape_error(function: str, actual: object, expected_shape: tuple[int, ...], meaning: str) -> str | None:
    if not isinstance(actual, torch.Tensor):
        return f"{function} returned {type(actual).__name__}; return a torch.Tensor of shape {meaning}."
    if tuple(actual.shape) != expected_shape:
        return f"{function} returned shape {tuple(actual.shape)}; expected {expected_shape} = {meaning}."
    return None


# ------------------------------------------------------------------------------------ exercise 1


def check_key_beats_register(
    key_beats_register: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """``key_beats_register(q (..., Nq, D), k (..., Nk, D)) -> bool (..., Nq, Nk)`` must be True
    exactly where key ``j`` scores higher than a register at the origin for query ``i``:
    ``|q_i - k_j| < |q_i|``, whatever the scale."""
    generator = torch.Generator().manual_seed(40)
    decided = 0
    for batch, heads, n_queries, n_keys, dim in _SHAPES:
        q, k = _random_qk(generator, batch, heads, n_queries, n_keys, dim)
        actual = key_beats_register(q, k)
        name = f"Nq={n_queries} Nk={n_keys} D={dim}"
        problem = _shape_error("key_beats_register", actual, (batch, heads, n_queries, n_keys),
                               "(B, H, Nq, Nk)")
        if problem:
            raise AssertionError(f"{name}: {problem}")
        if actual.dtype != torch.bool:
            raise AssertionError(f"{name}: key_beats_register returned dtype {actual.dtype}; return a "
                                 "bool tensor (a comparison such as `a < b` gives one).")
        # The definition itself: the key's RBF logit against the register's, -|q - 0|² = -|q|².
        key_logits = rbf_logits_reference(q, k, 1.0)
        register_logits = -q.square().sum(-1, keepdim=True)
        expected = key_logits > register_logits
        mismatches = int((actual != expected).sum())
        decided += expected.numel()
        if mismatches:
            distances = (q[..., :, None, :] - k[..., None, :, :]).norm(dim=-1)
            if torch.equal(actual, distances < k.norm(dim=-1)[..., None, :]):
                hint = "You compared |q - k| with |k|; the register's distance to the query is |q - 0| = |q|."
            elif torch.equal(actual, distances > q.norm(dim=-1, keepdim=True)):
                hint = ("The comparison is the wrong way round: "
                        "a key wins when it is *closer* than the origin.")
            else:
                hint = ("Expected (q[..., :, None, :] - k[..., None, :, :]).norm(dim=-1) "
                        "< q.norm(dim=-1)[..., None].")
            raise AssertionError(f"key_beats_register is wrong for {name} ({mismatches} of "
                                 f"{expected.numel()} pairs). {hint}")
    print(f"✓ key_beats_register agrees with the logits on all {decided} query-key pairs")


# ------------------------------------------------------------------------------------ exercise 2


def check_register_weight(
    register_weight: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
) -> None:
    """``register_weight(q (B, H, Nq, D), k (B, H, Nk, D), scale) -> (B, H, Nq)`` must be the softmax
    weight of one register at the origin placed in front of the keys:
    ``1 / (1 + sum_j exp(scale (2 q·k_j - |k_j|²)))``."""
    generator = torch.Generator().manual_seed(41)
    tally = Tally()
    for batch, heads, n_queries, n_keys, dim in _SHAPES:
        for scale in (dim**-0.5, 0.8):
            q, k = _random_qk(generator, batch, heads, n_queries, n_keys, dim)
            actual = register_weight(q, k, scale)
            name = f"Nq={n_queries} Nk={n_keys} D={dim} s={scale:.3g}"
            problem = _shape_error("register_weight", actual, (batch, heads, n_queries), "(B, H, Nq)")
            if problem:
                raise AssertionError(f"{name}: {problem}")
            registers = RegisterTokens(num_heads=heads, head_dim=dim).double()
            expected = register_weights(q, k, registers, scale=scale)[..., 0]
            if not tally.close(actual, expected, atol=1e-10, rtol=1e-8):
                dot_logits = scale * (2 * q @ k.transpose(-2, -1) - k.square().sum(-1)[..., None, :])
                near_misses = {
                    "1 / (1 + sum_j exp(-scale |q - k_j|²)): the register's own term is "
                    "exp(-scale |q|²), not 1; divide it out (or drop |q|² from every logit)":
                        1 / (1 + torch.exp(rbf_logits_reference(q, k, scale)).sum(-1)),
                    "the factor 2 on q·k is missing (|q - k|² = |q|² - 2 q·k + |k|²)":
                        1 / (1 + torch.exp(dot_logits - scale * q @ k.transpose(-2, -1)).sum(-1)),
                    "the register's own term (the 1 in the denominator) is missing":
                        1 / torch.exp(dot_logits).sum(-1),
                    "one minus the register weight: that is the mass left for the real keys":
                        1 - expected,
                }
                hint = "Expected 1 / (1 + exp(scale * (2 q·kᵀ - |k|²)).sum(-1))."
                for mistake, value in near_misses.items():
                    if torch.allclose(actual.double(), value, atol=1e-10, rtol=1e-8):
                        hint = f"Your weights equal {mistake}."
                        break
                raise AssertionError(f"register_weight is wrong for {name}. {hint}")
    tally.passed("register_weight matches the register column of the full softmax")


# ------------------------------------------------------------------------------------ exercise 3

# (B, H, Nq, Nk, D, Dv): equal lengths, and fewer queries than keys (a decoding step's view).
_ATTENTION_SHAPES = [(1, 1, 6, 6, 4, 3), (2, 3, 5, 11, 8, 8), (1, 2, 17, 17, 16, 5), (2, 1, 1, 9, 8, 4)]


def check_attention_with_register(attention_with_register: Callable[..., torch.Tensor]) -> None:
    """``attention_with_register(q, k, v, register_key (D,), register_value (Dv,), *, scale, causal)``
    must be RBF attention over ``[register, k_0, ..., k_{Nk-1}]`` with values
    ``[register_value, v_0, ...]``; with ``causal=True`` every query sees the register, and query
    ``i`` sees real key ``j`` iff ``j <= i + Nk - Nq``. Shape ``(B, H, Nq, Dv)``."""
    generator = torch.Generator().manual_seed(42)
    tally = Tally()
    for batch, heads, n_queries, n_keys, dim, value_dim in _ATTENTION_SHAPES:
        for causal in (False, True):
            q, k = _random_qk(generator, batch, heads, n_queries, n_keys, dim)
            v = torch.randn(batch, heads, n_keys, value_dim, generator=generator, dtype=torch.float64)
            # A register away from the origin, so that a register left out or put in the wrong place shows.
            register_key = 0.5 * torch.randn(dim, generator=generator, dtype=torch.float64)
            register_value = torch.randn(value_dim, generator=generator, dtype=torch.float64)
            scale = dim**-0.5
            actual = attention_with_register(q, k, v, register_key, register_value,
                                             scale=scale, causal=causal)
            name = f"Nq={n_queries} Nk={n_keys} causal={causal}"
            problem = _shape_error("attention_with_register", actual,
                                   (batch, heads, n_queries, value_dim), "(B, H, Nq, Dv)")
            if problem:
                raise AssertionError(f"{name}: {problem}")
            extended_k = torch.cat([register_key.expand(batch, heads, 1, dim), k], dim=2)
            extended_v = torch.cat([register_value.expand(batch, heads, 1, value_dim), v], dim=2)
            expected = rbf_attention_reference(q, extended_k, extended_v, causal=causal, scale=scale)
            if tally.close(actual, expected, atol=1e-10, rtol=1e-8):
                continue
            if causal and n_queries == n_keys:
                # Query i seeing extended keys 0..i: the register plus real keys 0..i-1 (its own key lost).
                top_left = torch.ones(n_queries, n_keys + 1, dtype=torch.bool).tril()
                logits = rbf_logits_reference(q, extended_k, scale).masked_fill(~top_left, float("-inf"))
                if torch.allclose(actual.double(), torch.softmax(logits, -1) @ extended_v, atol=1e-10):
                    raise AssertionError(
                        f"{name}: your causal mask is top-left aligned on the extended keys, so query i "
                        "sees the register and real keys 0..i-1 but not its own key i. Align it "
                        "bottom-right: extended key j' is visible iff j' <= i + (Nk + 1) - Nq."
                    )
            without_register = rbf_attention_reference(q, k, v, causal=causal, scale=scale)
            if torch.allclose(actual.double(), without_register, atol=1e-10):
                raise AssertionError(f"{name}: this is attention without the register; put it in front "
                                     "of the keys (torch.cat along the sequence dim, dim=2).")
            appended = rbf_attention_reference(
                q, torch.cat([k, extended_k[:, :, :1]], dim=2), torch.cat([v, extended_v[:, :, :1]], dim=2),
                causal=causal, scale=scale,
            )
            if torch.allclose(actual.double(), appended, atol=1e-10):
                raise AssertionError(f"{name}: the register is at the end of the keys. Put it in front: "
                                     "with a causal mask, a key at the end is a future key for most queries.")
            raise AssertionError(
                f"attention_with_register is wrong for {name}. Expected "
                "softmax(-scale |q - k'|², masked) @ v' with k' = [register_key, k] "
                "and v' = [register_value, v] along dim 2."
            )
    tally.passed("attention_with_register matches the float64 reference, causal and not")
