"""Backward pass of fused RBF attention, in three deterministic kernels (no atomics).

With logits s_ij = scale (2 q_i.k_j - |k_j|^2), weights P = softmax(s) and output O = P V, the
gradients are those of FlashAttention-2 plus one term for the key norm:

    dV = P^T dO
    dP = dO V^T,   Delta_i = sum_d dO_id O_id  (= sum_j P_ij dP_ij),   dS = P * (dP - Delta)
    dQ = 2 scale dS K
    dK = 2 scale (dS^T Q - rowsum(dS^T) * K)      <- d|k_j|^2 / dk_j = 2 k_j

P is never stored: each kernel recomputes it from the saved base-2 log-sum-exp. ``delta_kernel``
computes Delta, ``dkdv_kernel`` owns a tile of keys and walks over query tiles, ``dq_kernel`` owns a
tile of queries and walks over key tiles. Each output element is written by exactly one program.
"""

import triton
import triton.language as tl

from .exclusive import add_own_value_gradient
from .tiles import load_tile, squared_norms, store_tile


@triton.jit
def delta_kernel(
    OUT, DO, DELTA,                        # OUT, dO (B, H, Nq, Dv); DELTA (B, H, Nq) in ACC_DTYPE
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    n_heads, n_queries,
    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    batch_head = tl.program_id(1)
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_DV)
    o = load_tile(OUT + batch * stride_ob + head * stride_oh, rows, dims, stride_on, n_queries, HEAD_DIM_V,
                  True, BLOCK_DV != HEAD_DIM_V)
    do = load_tile(DO + batch * stride_dob + head * stride_doh, rows, dims, stride_don, n_queries,
                   HEAD_DIM_V, True, BLOCK_DV != HEAD_DIM_V)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), axis=1)
    tl.store(DELTA + batch_head.to(tl.int64) * n_queries + rows, delta, mask=rows < n_queries)


@triton.jit
def _dkdv_query_tiles(
    dk, dv, ds_rowsum, k, v, key_penalty, Q, DO, LSE, DELTA, stride_qn, stride_don,
    key_rows, query_start, query_end, n_queries, causal_offset, dot_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Accumulate one key tile's dK, dV and rowsum(dS^T) over query tiles [query_start, query_end).

    Works on transposed tiles (keys x queries) so that every product is a plain tl.dot.
    """
    query_offsets = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    for tile_start in range(query_start, query_end, BLOCK_M):
        queries = tile_start + query_offsets
        # Masked query rows load as zeros (q, dO) and a zero LSE/Delta: they then add exactly nothing.
        q = load_tile(Q, queries, dims, stride_qn, n_queries, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
        do = load_tile(DO, queries, dims_v, stride_don, n_queries, HEAD_DIM_V, MASKED, BLOCK_DV != HEAD_DIM_V)
        if MASKED:
            lse = tl.load(LSE + queries, mask=queries < n_queries, other=0.0)
            delta = tl.load(DELTA + queries, mask=queries < n_queries, other=0.0)
        else:
            lse = tl.load(LSE + queries)
            delta = tl.load(DELTA + queries)
        if FP32_DOT:
            kq = tl.dot(k, tl.trans(q), input_precision="tf32x3", out_dtype=ACC_DTYPE)
        else:
            kq = tl.dot(k, tl.trans(q), out_dtype=ACC_DTYPE)
        weights_t = tl.math.exp2(kq * dot_scale - key_penalty[:, None] - lse[None, :])
        if MASKED:
            visible = queries[None, :] < n_queries
            if CAUSAL:
                visible = visible & (key_rows[:, None] <= queries[None, :] + causal_offset)
            weights_t = tl.where(visible, weights_t, 0.0)
        if FP32_DOT:
            dv = tl.dot(weights_t.to(do.dtype), do, dv, input_precision="tf32x3", out_dtype=ACC_DTYPE)
            dp_t = tl.dot(v, tl.trans(do), input_precision="tf32x3", out_dtype=ACC_DTYPE)
        else:
            dv = tl.dot(weights_t.to(do.dtype), do, dv, out_dtype=ACC_DTYPE)
            dp_t = tl.dot(v, tl.trans(do), out_dtype=ACC_DTYPE)
        # Round dS once and use the same rounded values for both terms of dK: they nearly cancel
        # when queries sit close to the key, and rounding them differently would leave the error.
        ds_t = (weights_t * (dp_t - delta[None, :])).to(q.dtype)
        ds_rowsum += tl.sum(ds_t.to(ACC_DTYPE), axis=1)
        if FP32_DOT:
            dk = tl.dot(ds_t, q, dk, input_precision="tf32x3", out_dtype=ACC_DTYPE)
        else:
            dk = tl.dot(ds_t, q, dk, out_dtype=ACC_DTYPE)
    return dk, dv, ds_rowsum


@triton.jit
def dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    DV_OWN,                                # XSA: dL/du per query (B, H, Nq, Dv), read when EXCLUSIVE
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_dub, stride_duh, stride_dun,
    n_heads, n_queries, n_keys, causal_offset,
    dot_scale,                             # 2 * scale * log2(e), as in the forward
    norm_scale,                            # scale * log2(e)
    grad_scale,                            # 2 * scale: turns sum_i dS_ij (q_i - k_j) into dk_j
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr, ACC_DTYPE: tl.constexpr, EXCLUSIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    key_start = tl.program_id(0) * BLOCK_N
    batch_head = tl.program_id(1)
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    DO += batch * stride_dob + head * stride_doh
    LSE += batch_head.to(tl.int64) * n_queries
    DELTA += batch_head.to(tl.int64) * n_queries

    key_rows = key_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    # Key rows past the end load as zeros; their results are computed but never stored.
    k = load_tile(K, key_rows, dims, stride_kn, n_keys, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    v = load_tile(V, key_rows, dims_v, stride_vn, n_keys, HEAD_DIM_V, True, BLOCK_DV != HEAD_DIM_V)
    key_penalty = squared_norms(k, ACC_DTYPE) * norm_scale

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC_DTYPE)
    ds_rowsum = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)

    # Query tiles: [first_query, full_start) cross the causal diagonal (masked), [full_start,
    # full_end) see every key of this tile (unmasked), [full_end, n_queries) is the ragged tail.
    full_end = (n_queries // BLOCK_M) * BLOCK_M
    first_query = 0
    full_start = 0
    if CAUSAL:
        # Query i sees key j iff i >= j - causal_offset.
        first_query = (tl.maximum(key_start - causal_offset, 0) // BLOCK_M) * BLOCK_M
        last_key = key_start + BLOCK_N - 1
        full_start = tl.cdiv(tl.maximum(last_key - causal_offset, 0), BLOCK_M) * BLOCK_M
        full_start = tl.minimum(tl.maximum(full_start, first_query), full_end)
        dk, dv, ds_rowsum = _dkdv_query_tiles(
            dk, dv, ds_rowsum, k, v, key_penalty, Q, DO, LSE, DELTA, stride_qn, stride_don,
            key_rows, first_query, full_start, n_queries, causal_offset, dot_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, True, CAUSAL, FP32_DOT, ACC_DTYPE)
    dk, dv, ds_rowsum = _dkdv_query_tiles(
        dk, dv, ds_rowsum, k, v, key_penalty, Q, DO, LSE, DELTA, stride_qn, stride_don,
        key_rows, full_start, full_end, n_queries, causal_offset, dot_scale,
        HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, False, CAUSAL, FP32_DOT, ACC_DTYPE)
    dk, dv, ds_rowsum = _dkdv_query_tiles(
        dk, dv, ds_rowsum, k, v, key_penalty, Q, DO, LSE, DELTA, stride_qn, stride_don,
        key_rows, tl.maximum(full_end, first_query), n_queries, n_queries, causal_offset, dot_scale,
        HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, True, CAUSAL, FP32_DOT, ACC_DTYPE)

    dk = grad_scale * (dk - ds_rowsum[:, None] * k.to(ACC_DTYPE))
    if EXCLUSIVE:
        dv = add_own_value_gradient(dv, DV_OWN + batch * stride_dub + head * stride_duh, key_rows,
                                    stride_dun, n_queries, causal_offset, HEAD_DIM_V, BLOCK_DV)
    store_tile(DK + batch * stride_dkb + head * stride_dkh, dk.to(DK.dtype.element_ty), key_rows, dims,
               stride_dkn, n_keys, HEAD_DIM)
    store_tile(DV + batch * stride_dvb + head * stride_dvh, dv.to(DV.dtype.element_ty), key_rows, dims_v,
               stride_dvn, n_keys, HEAD_DIM_V)


@triton.jit
def _dq_key_tiles(
    dq, q, do, lse, delta, K, V, stride_kn, stride_vn,
    query_rows, key_start, key_end, n_keys, causal_offset, dot_scale, norm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Accumulate one query tile's dQ (before the 2*scale factor) over key tiles [key_start, key_end)."""
    key_offsets = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    for tile_start in range(key_start, key_end, BLOCK_N):
        keys = tile_start + key_offsets
        k = load_tile(K, keys, dims, stride_kn, n_keys, HEAD_DIM, MASKED, BLOCK_D != HEAD_DIM)
        v = load_tile(V, keys, dims_v, stride_vn, n_keys, HEAD_DIM_V, MASKED, BLOCK_DV != HEAD_DIM_V)
        key_penalty = squared_norms(k, ACC_DTYPE) * norm_scale
        if FP32_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision="tf32x3", out_dtype=ACC_DTYPE)
            dp = tl.dot(do, tl.trans(v), input_precision="tf32x3", out_dtype=ACC_DTYPE)
        else:
            qk = tl.dot(q, tl.trans(k), out_dtype=ACC_DTYPE)
            dp = tl.dot(do, tl.trans(v), out_dtype=ACC_DTYPE)
        weights = tl.math.exp2(qk * dot_scale - key_penalty[None, :] - lse[:, None])
        if MASKED:
            visible = keys[None, :] < n_keys
            if CAUSAL:
                visible = visible & (keys[None, :] <= query_rows[:, None] + causal_offset)
            weights = tl.where(visible, weights, 0.0)
        ds = (weights * (dp - delta[:, None])).to(k.dtype)
        if FP32_DOT:
            dq = tl.dot(ds, k, dq, input_precision="tf32x3", out_dtype=ACC_DTYPE)
        else:
            dq = tl.dot(ds, k, dq, out_dtype=ACC_DTYPE)
    return dq


@triton.jit
def dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    n_heads, n_queries, n_keys, causal_offset,
    dot_scale, norm_scale, grad_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    CAUSAL: tl.constexpr, FP32_DOT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    block_index = tl.program_id(0)
    if CAUSAL:
        # Late query tiles see the most keys: launch them first so the last wave is short work.
        block_index = tl.num_programs(0) - 1 - block_index
    block_start = block_index * BLOCK_M
    batch_head = tl.program_id(1)
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    Q += batch * stride_qb + head * stride_qh
    K += batch * stride_kb + head * stride_kh
    V += batch * stride_vb + head * stride_vh
    DO += batch * stride_dob + head * stride_doh
    LSE += batch_head.to(tl.int64) * n_queries
    DELTA += batch_head.to(tl.int64) * n_queries

    query_rows = block_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    q = load_tile(Q, query_rows, dims, stride_qn, n_queries, HEAD_DIM, True, BLOCK_D != HEAD_DIM)
    do = load_tile(DO, query_rows, dims_v, stride_don, n_queries, HEAD_DIM_V, True, BLOCK_DV != HEAD_DIM_V)
    lse = tl.load(LSE + query_rows, mask=query_rows < n_queries, other=0.0)
    delta = tl.load(DELTA + query_rows, mask=query_rows < n_queries, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)

    # The same two key ranges as the forward pass: whole visible tiles, then masked ones.
    full_end = (n_keys // BLOCK_N) * BLOCK_N
    key_end = n_keys
    if CAUSAL:
        first_row_last_key = block_start + causal_offset
        full_end = tl.minimum(full_end, ((first_row_last_key + 1) // BLOCK_N) * BLOCK_N)
        key_end = tl.minimum(n_keys, block_start + BLOCK_M + causal_offset)
    dq = _dq_key_tiles(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, query_rows, 0, full_end,
                       n_keys, causal_offset, dot_scale, norm_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_N,
                       BLOCK_D, BLOCK_DV, False, CAUSAL, FP32_DOT, ACC_DTYPE)
    dq = _dq_key_tiles(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, query_rows, full_end, key_end,
                       n_keys, causal_offset, dot_scale, norm_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_N,
                       BLOCK_D, BLOCK_DV, True, CAUSAL, FP32_DOT, ACC_DTYPE)
    store_tile(DQ + batch * stride_dqb + head * stride_dqh, (dq * grad_scale).to(DQ.dtype.element_ty),
               query_rows, dims, stride_dqn, n_queries, HEAD_DIM)
