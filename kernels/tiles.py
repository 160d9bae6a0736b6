"""Small Triton helpers shared by the forward and backward kernels: loading tiles at ragged edges.

A tile is BLOCK rows by BLOCK_D columns. Rows past the sequence end, and columns past a head dim that
is not a power of two, are masked to zero. Zero is the safe filler everywhere it is used here: a zero
query or key row adds nothing to a dot product, and a zero upstream gradient adds nothing to dk or dv.
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
def squared_norms(tile, ACC_DTYPE: tl.constexpr):
    """Row-wise squared Euclidean norms of a tile, accumulated in ACC_DTYPE (fp32, or fp64 for fp64)."""
    tile_acc = tile.to(ACC_DTYPE)
    return tl.sum(tile_acc * tile_acc, axis=1)
