"""Known-wrong solutions of chapter 06's Triton exercise, ``remove_own_value(out, own_v)``, kept as
test cases: tests/test_checks_ch06.py asserts that the check rejects each with a message naming
its mistake. ``out`` and ``own_v`` are (BLOCK_M, D) tiles in the accumulator dtype.
"""

from __future__ import annotations

import rbf_tutorial  # noqa: F401  (before triton: with no GPU it switches Triton to its interpreter)

# isort: split
import triton
import triton.language as tl

from rbf_tutorial.teaching import OWN_VALUE_EPS


@triton.jit
def remove_stub(out, own_v):
    # YOUR CODE HERE
    raise NotImplementedError()


@triton.jit
def remove_nothing(out, own_v):
    return out


@triton.jit
def remove_projection_only(out, own_v):
    coefficient = tl.sum(out * own_v, axis=1) / tl.sum(own_v * own_v, axis=1)
    return coefficient[:, None] * own_v


@triton.jit
def remove_divided_by_norm(out, own_v):
    coefficient = tl.sum(out * own_v, axis=1) / tl.sqrt(tl.sum(own_v * own_v, axis=1))
    return out - coefficient[:, None] * own_v


@triton.jit
def remove_not_divided(out, own_v):
    return out - tl.sum(out * own_v, axis=1)[:, None] * own_v


@triton.jit
def remove_sign_flipped(out, own_v):
    coefficient = tl.sum(out * own_v, axis=1) / tl.sum(own_v * own_v, axis=1)
    return out + coefficient[:, None] * own_v


@triton.jit
def remove_roles_swapped(out, own_v):
    # Projects own_v on out: the wrong vector is removed from the wrong one.
    coefficient = tl.sum(out * own_v, axis=1) / tl.sum(out * out, axis=1)
    return own_v - coefficient[:, None] * out


@triton.jit
def remove_along_output(out, own_v):
    # The coefficient's denominator and the direction come from out, not from the own value.
    coefficient = tl.sum(out * own_v, axis=1) / tl.sum(out * out, axis=1)
    return out - coefficient[:, None] * out


@triton.jit
def remove_sum_over_rows(out, own_v):
    # Sums over axis 0 (the rows of the tile): one number per feature, which cannot broadcast.
    coefficient = tl.sum(out * own_v, axis=0) / tl.sum(own_v * own_v, axis=0)
    return out - coefficient[:, None] * own_v


@triton.jit
def remove_without_guard(out, own_v):
    # Right wherever the own value is not zero; 0 / 0 where it is.
    coefficient = tl.sum(out * own_v, axis=1) / tl.sum(own_v * own_v, axis=1)
    return out - coefficient[:, None] * own_v


@triton.jit
def remove_in_float32(out, own_v):
    # Right in float32, but rounds float64 tiles through float32.
    out32 = out.to(tl.float32)
    own32 = own_v.to(tl.float32)
    norm_sq = tl.sum(own32 * own32, axis=1)
    has_direction = norm_sq > OWN_VALUE_EPS
    along = tl.sum(out32 * own32, axis=1)
    coefficient = tl.where(has_direction, along / tl.where(has_direction, norm_sq, 1.0), 0.0)
    return out32 - coefficient[:, None] * own32
