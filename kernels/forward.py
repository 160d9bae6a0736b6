"""Forward pass of fused RBF attention: FlashAttention-2's loop with a key-norm penalty.

For one block of queries the kernel walks over key tiles, keeping a running row max and row sum
(the online softmax), so the Nq x Nk matrix of weights never leaves the chip. The logits are

    s_ij = scale * (2 q_i . k_j - |k_j|^2)        (= -scale |q_i - k_j|^2 + scale |q_i|^2)

and softmax ignores the per-row constant scale |q_i|^2, so these are exactly RBF weights. The only
change from a dot-product flash kernel is one fp32 vector per key tile: the squared key norms,
computed from the tile that was loaded anyway, or, at long sequences, read from a vector computed
once beforehand (kernels/key_norms.py) rather than again by every query tile.

Everything runs in base 2 (exp2 is a single hardware instruction): the logits are multiplied by
log2(e) once, through the two constants ``dot_scale`` and ``norm_scale`` below, and the saved
log-sum-exp is in base-2 units too.
"""

import triton
import triton.language as tl

from .exclusive import remove_own_value
from .tiles import key_norm_penalty, load_tile, read_key_penalty, store_tile


@triton.jit
def _accumulate_key_tiles(
    acc, row_sum, row_max, q, K, V, KEY_NORMS, stride_kn, stride_vn,
    query_rows, key_start, key_end, n_keys, causal_offset, dot_scale, norm_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, KEY_NORMS_GIVEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Fold key tiles [key_start, key_end) into the running softmax state (acc, row_sum, row_max).

    MASKED tiles may run past the last key or cross the causal diagonal; unmasked ones do neither,
    so the common case pays for no masks at all.
    """
    key_offsets = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dims_v = tl.arange(0, BLOCK_DV)
    for tile_start in range(key_start, key_end, BLOCK_N):
        keys = tile_start + key_offsets
        k = load_tile(K, keys, dims, stride_kn, n_keys, HEAD_DIM, MASKED, PAD_D)
        if KEY_NORMS_GIVEN:
            key_penalty = read_key_penalty(KEY_NORMS, keys, n_keys, norm_scale, MASKED)
        else:
            key_penalty = key_norm_penalty(k, keys, n_keys, norm_scale, MASKED, ACC_DTYPE)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        logits = qk * dot_scale - key_penalty[None, :]  # keys past the end are -inf already
        if MASKED and CAUSAL:
            visible = keys[None, :] <= query_rows[:, None] + causal_offset
            logits = tl.where(visible, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        weights = tl.math.exp2(logits - new_max[:, None])
        rescale = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None]
        v = load_tile(V, keys, dims_v, stride_vn, n_keys, HEAD_DIM_V, MASKED, PAD_DV)
        acc = tl.dot(weights.to(v.dtype), v, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def rbf_forward_kernel(
    Q, K, V, OUT, LSE,                     # q, k, v (B, H, N, D); OUT (B, H, Nq, Dv); LSE (B, H, Nq)
    OWN_COEF,                              # (B, H, Nq): XSA's coefficient c_i, written when EXCLUSIVE
    KEY_NORMS,                             # (B, H, Nk) contiguous |k_j|^2, read when KEY_NORMS_GIVEN
    stride_qb, stride_qh, stride_qn,       # strides in elements; the last dim of every tensor is unit-stride
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    n_heads, n_queries, n_keys,
    causal_offset,                         # Nk - Nq: query i sees key j iff j <= i + causal_offset
    dot_scale,                             # 2 * scale * log2(e)
    norm_scale,                            # scale * log2(e)
    value_eps,                             # XSA: own values with |u|^2 <= value_eps are left alone
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    CAUSAL: tl.constexpr,
    FP32_INPUTS: tl.constexpr, FP64_INPUTS: tl.constexpr,  # the inputs' dtype, for the products below
    EXCLUSIVE: tl.constexpr,               # apply exclusive self attention (kernels/exclusive.py)
    KEY_NORMS_GIVEN: tl.constexpr,         # read the key norms (kernels/key_norms.py), else compute them
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,   # head dims rounded up to powers of two (>= 16)
    PAD_D: tl.constexpr, PAD_DV: tl.constexpr,       # BLOCK_D != HEAD_DIM, BLOCK_DV != HEAD_DIM_V
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,    # the tile: queries per program, keys per step
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
        value_eps = tl.cast(value_eps, tl.float32)
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
    OUT += batch * stride_ob + head * stride_oh
    LSE += batch_head.to(tl.int64) * n_queries
    KEY_NORMS += batch_head.to(tl.int64) * n_keys

    query_rows = block_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = load_tile(Q, query_rows, dims, stride_qn, n_queries, HEAD_DIM, True, PAD_D)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    row_sum = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC_DTYPE)

    # Key tiles split in two ranges: whole tiles every query of the block may see (no masks), then
    # the tiles that cross the causal diagonal or the end of the keys (masked).
    full_end = (n_keys // BLOCK_N) * BLOCK_N
    key_end = n_keys
    if CAUSAL:
        first_row_last_key = block_start + causal_offset  # last key the block's first query sees
        full_end = tl.minimum(full_end, ((first_row_last_key + 1) // BLOCK_N) * BLOCK_N)
        key_end = tl.minimum(n_keys, block_start + BLOCK_M + causal_offset)
    acc, row_sum, row_max = _accumulate_key_tiles(
        acc, row_sum, row_max, q, K, V, KEY_NORMS, stride_kn, stride_vn, query_rows, 0, full_end,
        n_keys, causal_offset, dot_scale, norm_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
        PAD_D, PAD_DV, False, CAUSAL, KEY_NORMS_GIVEN, DOT_PRECISION, ACC_DTYPE)
    acc, row_sum, row_max = _accumulate_key_tiles(
        acc, row_sum, row_max, q, K, V, KEY_NORMS, stride_kn, stride_vn, query_rows, full_end, key_end,
        n_keys, causal_offset, dot_scale, norm_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
        PAD_D, PAD_DV, True, CAUSAL, KEY_NORMS_GIVEN, DOT_PRECISION, ACC_DTYPE)

    out = acc / row_sum[:, None]
    if EXCLUSIVE:
        # Query i's own value is key row i + causal_offset; rows past the last query read nothing.
        own_rows = tl.where(query_rows < n_queries, query_rows + causal_offset, n_keys)
        out, own_coef = remove_own_value(out, V, own_rows, stride_vn, n_keys, value_eps,
                                         HEAD_DIM_V, BLOCK_DV, PAD_DV, ACC_DTYPE)
        tl.store(OWN_COEF + batch_head.to(tl.int64) * n_queries + query_rows, own_coef,
                 mask=query_rows < n_queries)
    store_tile(OUT, out.to(OUT.dtype.element_ty), query_rows, tl.arange(0, BLOCK_DV), stride_on,
               n_queries, HEAD_DIM_V)
    tl.store(LSE + query_rows, row_max + tl.math.log2(row_sum), mask=query_rows < n_queries)
