"""Backward pass of fused RBF attention, in two deterministic kernels (no atomics).

With logits s_ij = scale (2 q_i.k_j - |k_j|^2), weights P = softmax(s) and output O = P V, the
gradients are those of FlashAttention-2 plus one term for the key norm:

    dV = P^T dO
    dP = dO V^T,   Delta_i = sum_d dO_id O_id  (= sum_j P_ij dP_ij),   dS = P * (dP - Delta)
    dQ = 2 scale dS K
    dK = 2 scale (dS^T Q - rowsum(dS^T) * K)      <- d|k_j|^2 / dk_j = 2 k_j

P is never stored: each kernel recomputes it from the saved base-2 log-sum-exp. ``dq_kernel`` owns a
tile of queries and walks over key tiles; it runs first and also computes Delta for its rows (one
row-wise dot product of two tiles it holds anyway) and stores it. ``dkdv_kernel`` runs second, owns a
tile of keys and walks over query tiles, reading that Delta. Each output element is written by exactly
one program, so results are deterministic. Two launches per backward pass: at short sequences the
host's cost per launch, not the GPU, sets the time.

The alternative FlashAttention-2 takes is one kernel over key tiles that adds its share of dQ into an
fp32 buffer with atomics: one pass instead of two, but the additions land in a run-dependent order
(nondeterministic rounding) and the buffer costs 4 bytes per query element.
"""

import triton
import triton.language as tl

from .exclusive import add_own_value_gradient
from .tiles import key_norm_penalty, load_tile, store_tile


@triton.jit
def _dkdv_query_tiles(
    dk, dv, ds_rowsum, k, v, key_penalty, Q, DO, LSE, DELTA, stride_qn, stride_don,
    key_rows, query_start, query_end, n_queries, causal_offset, dot_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
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
        q = load_tile(Q, queries, dims, stride_qn, n_queries, HEAD_DIM, MASKED, PAD_D)
        do = load_tile(DO, queries, dims_v, stride_don, n_queries, HEAD_DIM_V, MASKED, PAD_DV)
        if MASKED:
            lse = tl.load(LSE + queries, mask=queries < n_queries, other=0.0)
            delta = tl.load(DELTA + queries, mask=queries < n_queries, other=0.0)
        else:
            lse = tl.load(LSE + queries)
            delta = tl.load(DELTA + queries)
        kq = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        weights_t = tl.math.exp2(kq * dot_scale - key_penalty[:, None] - lse[None, :])
        if MASKED:
            visible = queries[None, :] < n_queries
            if CAUSAL:
                visible = visible & (key_rows[:, None] <= queries[None, :] + causal_offset)
            weights_t = tl.where(visible, weights_t, 0.0)
        dv = tl.dot(weights_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        # Round dS once and use the same rounded values for both terms of dK: they nearly cancel
        # when queries sit close to the key, and rounding them differently would leave the error.
        ds_t = (weights_t * (dp_t - delta[None, :])).to(q.dtype)
        ds_rowsum += tl.sum(ds_t.to(ACC_DTYPE), axis=1)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return dk, dv, ds_rowsum


@triton.jit
def dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,       # DO is dL/dO (dL/dy with XSA); LSE, DELTA (B, H, Nq)
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
    CAUSAL: tl.constexpr, FP32_INPUTS: tl.constexpr, FP64_INPUTS: tl.constexpr, EXCLUSIVE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Derived once from the input dtype: tl.dot's input_precision ("tf32x3" gives fp32 inputs
    # fp32-accurate products; for fp16/bf16/fp64 operands "tf32", Triton's default, changes nothing)
    # and the accumulators' dtype (fp64 only for fp64 inputs, which gradcheck uses).
    DOT_PRECISION: tl.constexpr = "tf32x3" if FP32_INPUTS else "tf32"
    ACC_DTYPE: tl.constexpr = tl.float64 if FP64_INPUTS else tl.float32
    # torch.compile passes Python floats as fp64 scalars: with fp32 accumulators, keep them fp32 (fp64
    # ones would turn the loop-carried row sums into fp64, which Triton refuses).
    if not FP64_INPUTS:
        dot_scale, norm_scale = tl.cast(dot_scale, tl.float32), tl.cast(norm_scale, tl.float32)
        grad_scale = tl.cast(grad_scale, tl.float32)
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
    # Key rows past the end load as zeros with an infinite norm penalty (zero weight everywhere);
    # their results are computed but never stored.
    k = load_tile(K, key_rows, dims, stride_kn, n_keys, HEAD_DIM, True, PAD_D)
    v = load_tile(V, key_rows, dims_v, stride_vn, n_keys, HEAD_DIM_V, True, PAD_DV)
    key_penalty = key_norm_penalty(k, key_rows, n_keys, norm_scale, True, ACC_DTYPE)

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
            HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, PAD_D, PAD_DV, True, CAUSAL,
            DOT_PRECISION, ACC_DTYPE)
    dk, dv, ds_rowsum = _dkdv_query_tiles(
        dk, dv, ds_rowsum, k, v, key_penalty, Q, DO, LSE, DELTA, stride_qn, stride_don,
        key_rows, full_start, full_end, n_queries, causal_offset, dot_scale,
        HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, PAD_D, PAD_DV, False, CAUSAL,
        DOT_PRECISION, ACC_DTYPE)
    dk, dv, ds_rowsum = _dkdv_query_tiles(
        dk, dv, ds_rowsum, k, v, key_penalty, Q, DO, LSE, DELTA, stride_qn, stride_don,
        key_rows, tl.maximum(full_end, first_query), n_queries, n_queries, causal_offset, dot_scale,
        HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, PAD_D, PAD_DV, True, CAUSAL,
        DOT_PRECISION, ACC_DTYPE)

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
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Accumulate one query tile's dQ (before the 2*scale factor) over key tiles [key_start, key_end)."""
    key_offsets = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    for tile_start in range(key_start, key_end, BLOCK_N):
        keys = tile_start + key_offsets
        k = load_tile(K, keys, dims, stride_kn, n_keys, HEAD_DIM, MASKED, PAD_D)
        v = load_tile(V, keys, dims_v, stride_vn, n_keys, HEAD_DIM_V, MASKED, PAD_DV)
        key_penalty = key_norm_penalty(k, keys, n_keys, norm_scale, MASKED, ACC_DTYPE)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        weights = tl.math.exp2(qk * dot_scale - key_penalty[None, :] - lse[:, None])
        if MASKED and CAUSAL:
            visible = keys[None, :] <= query_rows[:, None] + causal_offset
            weights = tl.where(visible, weights, 0.0)
        ds = (weights * (dp - delta[:, None])).to(k.dtype)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return dq


@triton.jit
def dq_kernel(
    Q, K, V, OUT, DO, LSE, DELTA, DQ,      # OUT is read only with COMPUTE_DELTA; DELTA (B, H, Nq)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    n_heads, n_queries, n_keys, causal_offset,
    dot_scale, norm_scale, grad_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    CAUSAL: tl.constexpr, FP32_INPUTS: tl.constexpr, FP64_INPUTS: tl.constexpr,
    COMPUTE_DELTA: tl.constexpr,           # compute Delta = rowsum(dO * O) here and store it for dkdv;
                                           # False when XSA's preprocessing kernel already wrote it
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Derived once from the input dtype: tl.dot's input_precision ("tf32x3" gives fp32 inputs
    # fp32-accurate products; for fp16/bf16/fp64 operands "tf32", Triton's default, changes nothing)
    # and the accumulators' dtype (fp64 only for fp64 inputs, which gradcheck uses).
    DOT_PRECISION: tl.constexpr = "tf32x3" if FP32_INPUTS else "tf32"
    ACC_DTYPE: tl.constexpr = tl.float64 if FP64_INPUTS else tl.float32
    # torch.compile passes Python floats as fp64 scalars: with fp32 accumulators, keep them fp32 (fp64
    # ones would turn the loop-carried row sums into fp64, which Triton refuses).
    if not FP64_INPUTS:
        dot_scale, norm_scale = tl.cast(dot_scale, tl.float32), tl.cast(norm_scale, tl.float32)
        grad_scale = tl.cast(grad_scale, tl.float32)
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
    q = load_tile(Q, query_rows, dims, stride_qn, n_queries, HEAD_DIM, True, PAD_D)
    do = load_tile(DO, query_rows, dims_v, stride_don, n_queries, HEAD_DIM_V, True, PAD_DV)
    lse = tl.load(LSE + query_rows, mask=query_rows < n_queries, other=0.0)
    if COMPUTE_DELTA:
        out = load_tile(OUT + batch * stride_ob + head * stride_oh, query_rows, dims_v, stride_on,
                        n_queries, HEAD_DIM_V, True, PAD_DV)
        delta = tl.sum(out.to(ACC_DTYPE) * do.to(ACC_DTYPE), axis=1)
        tl.store(DELTA + query_rows, delta, mask=query_rows < n_queries)
    else:
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
                       BLOCK_D, BLOCK_DV, PAD_D, PAD_DV, False, CAUSAL, DOT_PRECISION, ACC_DTYPE)
    dq = _dq_key_tiles(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, query_rows, full_end, key_end,
                       n_keys, causal_offset, dot_scale, norm_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_N,
                       BLOCK_D, BLOCK_DV, PAD_D, PAD_DV, True, CAUSAL, DOT_PRECISION, ACC_DTYPE)
    store_tile(DQ + batch * stride_dqb + head * stride_dqh, (dq * grad_scale).to(DQ.dtype.element_ty),
               query_rows, dims, stride_dqn, n_queries, HEAD_DIM)
