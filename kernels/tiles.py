"""Small Triton helpers shared by the forward and backward kernels: tiles at ragged edges, key norms.

A tile is BLOCK rows by BLOCK_D columns. Rows past the sequence end, and columns past a head dim that
is not a power of two, are masked to zero. Zero is the safe filler for the tiles' *contents*: a zero
query or key row adds nothing to a dot product, and a zero upstream gradient adds nothing to dk or dv.
A key row past the end must still get no *weight*, which :func:`key_norm_penalty` guarantees by giving
it an infinite norm: its logit is -inf and its weight exactly 0, whatever the query.

Masks cost instructions in the hot loop, so the caller says (as compile-time constants) which of the
two edges can actually occur for the tile at hand.
"""

import triton
import triton.language as tl


@triton.jit
def load_tile(base, rows, cols, row_stride, n_rows, n_cols: tl.constexpr,
              CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load ``base[rows, cols]`` (row stride ``row_stride``, unit column stride) with zero padding."""
    ptrs = base + rows[:, None] * row_stride + cols[None, :]
    if CHECK_ROWS:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def store_tile(base, tile, rows, cols, row_stride, n_rows, n_cols: tl.constexpr):
    """Store ``tile`` into ``base[rows, cols]``, skipping rows and columns past the edges."""
    ptrs = base + rows[:, None] * row_stride + cols[None, :]
    tl.store(ptrs, tile, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def squared_norms(k, ACC_DTYPE: tl.constexpr):
    """``|k_j|^2`` per row of the tile, summed in ACC_DTYPE."""
    k_acc = k.to(ACC_DTYPE)
    return tl.sum(k_acc * k_acc, axis=1)


@triton.jit
def key_norm_penalty(k, keys, n_keys, norm_scale, CHECK_ROWS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``norm_scale * |k_j|^2`` per key row of the tile, in ACC_DTYPE; +inf for rows past the last key.

    The infinite penalty makes a padded key's logit -inf, so its weight is exactly 0 in every kernel
    without a separate bounds mask (and exp2 never sees the huge values a zero key would give).
    """
    penalty = squared_norms(k, ACC_DTYPE) * norm_scale
    if CHECK_ROWS:
        penalty = tl.where(keys < n_keys, penalty, float("inf"))
    return penalty


@triton.jit
def read_key_penalty(NORMS, keys, n_keys, norm_scale, CHECK_ROWS: tl.constexpr):
    """:func:`key_norm_penalty` from precomputed squared norms ``NORMS[keys]`` (kernels/key_norms.py)."""
    if CHECK_ROWS:
        return tl.load(NORMS + keys, mask=keys < n_keys, other=float("inf")) * norm_scale
    return tl.load(NORMS + keys) * norm_scale
