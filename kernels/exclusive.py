"""Exclusive self attention (XSA) fused into the kernels: drop each output's part along its own value.

XSA replaces each attention output ``y_i`` by

    z_i = y_i - c_i u_i,      c_i = (y_i . u_i) / |u_i|^2,

where ``u_i`` is query i's *own* value: the value row aligned with it under the bottom-right
convention, ``v[i + Nk - Nq]`` (register keys prepended in front are nobody's own value). Rows with
``|u_i|^2 <= eps`` have no direction to remove and keep ``z_i = y_i``.

Forward, this is an epilogue on a finished query tile: one extra value-tile load and two row sums,
while ``y`` is still in registers. Only the scalar ``c_i`` is saved: ``y_i = z_i + c_i u_i`` is
recovered in the backward pass, so XSA costs no extra (Nq x Dv) buffer between the passes.

Backward, with ``g = dL/dz`` and ``n = |u|^2``, differentiating ``z = y - (y.u / n) u`` gives

    dL/dy = g - (g.u / n) u                                     (g with its u-component removed)
    dL/du = -(g.u / n) y - c g + 2 c (g.u / n) u                (only for the own-value row)

``exclusive_preprocess_kernel`` computes both per query row, together with FlashAttention's
``Delta_i = dL/dy_i . y_i`` (which the dq kernel then reads instead of computing it). The attention
backward then runs unchanged on ``dL/dy``, and the key
tile that holds row ``i + Nk - Nq`` adds ``dL/du_i`` to its dV (no atomics: each row has one owner).
"""

import triton
import triton.language as tl

from .tiles import load_tile, store_tile


@triton.jit
def remove_own_value(y, V, own_rows, stride_vn, n_keys, value_eps, HEAD_DIM_V: tl.constexpr,
                     BLOCK_DV: tl.constexpr, PAD_DV: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(z, c) for a tile of outputs ``y`` (ACC_DTYPE): ``z = y - c u`` with ``u = V[own_rows]``."""
    own = load_tile(V, own_rows, tl.arange(0, BLOCK_DV), stride_vn, n_keys, HEAD_DIM_V, True,
                    PAD_DV).to(ACC_DTYPE)
    along = tl.sum(y * own, axis=1)
    norm_sq = tl.sum(own * own, axis=1)
    has_direction = norm_sq > value_eps
    coef = tl.where(has_direction, along / tl.where(has_direction, norm_sq, 1.0), 0.0)
    return y - coef[:, None] * own, coef


@triton.jit
def exclusive_preprocess_kernel(
    OUT, DO, V, OWN_COEF,                  # z and dL/dz (B, H, Nq, Dv); v (B, H, Nk, Dv); c (B, H, Nq)
    DY, DELTA, DV_OWN,                     # out: dL/dy (B, H, Nq, Dv), Delta (B, H, Nq), dL/du (B, H, Nq, Dv)
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    stride_vb, stride_vh, stride_vn,
    stride_dyb, stride_dyh, stride_dyn,
    stride_dub, stride_duh, stride_dun,
    n_heads, n_queries, n_keys, causal_offset, value_eps,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_DV: tl.constexpr, FP64_INPUTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    ACC_DTYPE: tl.constexpr = tl.float64 if FP64_INPUTS else tl.float32
    if not FP64_INPUTS:  # torch.compile passes Python floats as fp64 scalars
        value_eps = tl.cast(value_eps, tl.float32)
    batch_head = tl.program_id(1)
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_DV)
    z = load_tile(OUT + batch * stride_ob + head * stride_oh, rows, dims, stride_on, n_queries,
                  HEAD_DIM_V, True, PAD_DV).to(ACC_DTYPE)
    g = load_tile(DO + batch * stride_dob + head * stride_doh, rows, dims, stride_don, n_queries,
                  HEAD_DIM_V, True, PAD_DV).to(ACC_DTYPE)
    # Rows past the last query would map to keys that exist; mask them by the query count instead.
    own_rows = tl.where(rows < n_queries, rows + causal_offset, n_keys)
    u = load_tile(V + batch * stride_vb + head * stride_vh, own_rows, dims, stride_vn, n_keys,
                  HEAD_DIM_V, True, PAD_DV).to(ACC_DTYPE)
    row_offset = batch_head.to(tl.int64) * n_queries
    coef = tl.load(OWN_COEF + row_offset + rows, mask=rows < n_queries, other=0.0)

    y = z + coef[:, None] * u
    norm_sq = tl.sum(u * u, axis=1)
    has_direction = norm_sq > value_eps
    g_along = tl.where(has_direction, tl.sum(g * u, axis=1) / tl.where(has_direction, norm_sq, 1.0), 0.0)
    dy = g - g_along[:, None] * u
    dv_own = -g_along[:, None] * y - coef[:, None] * g + (2.0 * coef * g_along)[:, None] * u

    # Delta from the rounded dL/dy that the dK/dV and dQ kernels will read, as in the plain path.
    dy_stored = dy.to(DY.dtype.element_ty)
    delta = tl.sum(dy_stored.to(ACC_DTYPE) * y, axis=1)
    store_tile(DY + batch * stride_dyb + head * stride_dyh, dy_stored, rows, dims, stride_dyn, n_queries,
               HEAD_DIM_V)
    store_tile(DV_OWN + batch * stride_dub + head * stride_duh, dv_own, rows, dims, stride_dun, n_queries,
               HEAD_DIM_V)
    tl.store(DELTA + row_offset + rows, delta, mask=rows < n_queries)


@triton.jit
def add_own_value_gradient(dv, DV_OWN, key_rows, stride_dun, n_queries, causal_offset,
                           HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dV of a key tile plus dL/du of the queries whose own value it holds (key j is query j - offset's)."""
    own_queries = key_rows - causal_offset
    dims = tl.arange(0, BLOCK_DV)
    mask = ((own_queries >= 0) & (own_queries < n_queries))[:, None] & (dims[None, :] < HEAD_DIM_V)
    extra = tl.load(DV_OWN + own_queries[:, None] * stride_dun + dims[None, :], mask=mask, other=0.0)
    return dv + extra
