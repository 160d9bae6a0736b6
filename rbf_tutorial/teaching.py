"""Chapter 03's teaching kernels, finished: the tested solutions of its Triton exercises.

Chapter 03a builds a FlashAttention-style forward kernel for RBF attention from three small
``@triton.jit`` pieces the learner writes, and chapter 03b its backward kernels. This module holds
the same code, complete, so that

- the checks can run a learner's piece inside an otherwise known-good kernel (each piece is a
  compile-time argument of the kernel: a ``@triton.jit`` function passed as ``tl.constexpr``);
- a later cell whose exercise is still a stub can show the reference result instead
  (:func:`rbf_tutorial.checks.stubs.learner_or_reference`);
- chapter 03b and chapter 06 start from 03a's finished forward kernel without re-running 03a.

``tests/test_teaching.py`` checks the chapters' copies against these, so the two cannot drift.

The pieces, each one idea:

- :func:`rbf_scores`: one tile of base-2 RBF logits, ``qk_scale * (2 q.k - |k|^2)``, the key norms
  taken from the key tile already in SRAM;
- :func:`online_softmax_update`: fold one tile of scores into the running max, sum and output;
- :func:`key_range`: for a causal query tile, where the unmasked key tiles end and where the
  visible keys end;
- :func:`remove_own_value` (chapter 06's exercise): exclusive self attention in the forward
  kernel's epilogue, each finished output row minus its projection on the query's own value.

Every kernel takes an accumulator dtype (``ACC_DTYPE``): float32 for half and single precision
inputs, float64 for float64 ones, so ``torch.autograd.gradcheck`` can test the kernels themselves.
The teaching kernels take power-of-two head dims of at least 16 (``tl.dot`` needs 16) with
``Dv = D``; ``kernels/`` lifts these limits.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .runtime import interpreting
from .xsa import FUSED_VALUE_EPS

__all__ = [
    "LOG2_E",
    "OWN_VALUE_EPS",
    "REFERENCE_PIECES",
    "accumulator_dtype",
    "default_block",
    "dkdv_bounds",
    "flash_rbf_backward",
    "flash_rbf_forward",
    "forward_bounds",
    "online_softmax_trace",
    "rbf_attention",
    "remove_own_value",
    "tile_scores",
]

LOG2_E = math.log2(math.e)  # exp(x) == exp2(x * LOG2_E)
# XSA leaves an output alone where its own value has |v|^2 at or below this: float32's square root
# of the smallest normal number, the one threshold rbf_tutorial.xsa defines for every fused route. A
# tl.constexpr, so that @triton.jit code may read it as a global.
OWN_VALUE_EPS = tl.constexpr(FUSED_VALUE_EPS)


def accumulator_dtype(dtype: torch.dtype) -> tl.dtype:
    """What the kernels accumulate in: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def default_block() -> int:
    """Rows per tile: 16 under the CPU interpreter (the smallest ``tl.dot`` takes), 64 compiled."""
    return 16 if interpreting() else 64


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B*H, N, D): fold batch and heads into the one axis ``z`` the kernels walk."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def check_teaching_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    """What the teaching kernels accept, with errors that name the argument."""
    tensors = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor (B, H, N, D), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name}: expected 4 dimensions (B, H, N, D), got shape {tuple(x.shape)}")
        if x.dtype not in (torch.float16, torch.float32, torch.float64):
            raise TypeError(f"{name}: expected float16, float32 or float64, got {x.dtype}")
    head_dim = q.shape[-1]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"q: the teaching kernels take a power-of-two head dim of at least 16, got "
                         f"{head_dim} (rbf_attention(..., backend='triton') takes any)")
    for name, x in tensors.items():
        if x.shape[:2] != q.shape[:2] or x.shape[-1] != head_dim or x.dtype != q.dtype:
            raise ValueError(f"{name}: expected batch, heads, head dim and dtype of q "
                             f"{tuple(q.shape[:2])}, {head_dim}, {q.dtype}; got {tuple(x.shape)}, {x.dtype}")
    if v is not None and v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v: expected as many rows as k ({k.shape[-2]}), got {v.shape[-2]}")


# ------------------------------------------------------------------------------------------------
# The pieces (chapter 03a's exercises)


@triton.jit
def dot_scores(q, k_t, qk_scale, ACC_DTYPE: tl.constexpr):
    """Dot-product logits of one tile, ``qk_scale * q . k``: the worked example before the RBF one."""
    return tl.dot(q, k_t).to(ACC_DTYPE) * qk_scale


@triton.jit
def rbf_scores(q, k_t, qk_scale, ACC_DTYPE: tl.constexpr):
    """RBF logits of one tile, ``qk_scale * (2 q . k - |k|^2)``: q (BLOCK_M, D), k_t (D, BLOCK_N).

    Softmax over a row of these equals softmax(-scale |q - k|^2): the missing ``-|q|^2`` is the same
    for every key of the row. The key norms come from the tile already loaded, summed over its
    feature axis (axis 0 of the transposed tile), in the accumulator dtype.
    """
    k_acc = k_t.to(ACC_DTYPE)
    key_norms = tl.sum(k_acc * k_acc, axis=0)  # (BLOCK_N,): |k_j|^2, no trip to HBM
    return (2.0 * tl.dot(q, k_t).to(ACC_DTYPE) - key_norms[None, :]) * qk_scale


@triton.jit
def online_softmax_update(acc, row_max, row_sum, scores, v):
    """Fold one tile of base-2 scores (BLOCK_M, BLOCK_N) and its values v (BLOCK_N, D) into the
    running (acc, row_max, row_sum); return the new three, in that order."""
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    # A row that has seen no visible key yet has new_max = -inf; measure it against 0 instead, so
    # that -inf - (-inf) never makes a NaN (its weights are exp2(-inf) = 0 either way).
    reference = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.math.exp2(row_max - reference)  # how far the old reference was off: rescale by it
    p = tl.math.exp2(scores - reference[:, None])
    row_sum = alpha * row_sum + tl.sum(p, axis=1)
    acc = alpha[:, None] * acc + tl.dot(p.to(v.dtype), v).to(acc.dtype)
    return acc, new_max, row_sum


@triton.jit
def key_range(first_query, n_queries, n_keys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr):
    """(band_start, hi) for the query tile that starts at row ``first_query``.

    Keys ``[0, band_start)`` are whole tiles every query of the tile sees: no mask needed. Keys
    ``[band_start, hi)`` need the mask (the causal diagonal, the ragged end). No query of the tile
    sees a key at or past ``hi``: skipped. Causal is bottom-right aligned: query i sees key j iff
    ``j <= i + n_keys - n_queries``.
    """
    if CAUSAL:
        last_query = tl.minimum(first_query + BLOCK_M, n_queries) - 1  # the tile may hang over the end
        # Clamp to [0, n_keys] before any division: Triton's // truncates toward zero, as C does.
        seen_by_all = tl.minimum(tl.maximum(first_query + 1 + n_keys - n_queries, 0), n_keys)
        hi = tl.minimum(tl.maximum(last_query + 1 + n_keys - n_queries, 0), n_keys)
    else:
        seen_by_all = n_keys
        hi = n_keys
    band_start = (seen_by_all // BLOCK_N) * BLOCK_N  # whole tiles only
    return band_start, hi


@triton.jit
def query_start(first_key, n_queries, n_keys, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """The first query tile (as a row index) that sees any key of the key tile starting at ``first_key``."""
    lo = 0
    if CAUSAL:  # query i sees key first_key from i = first_key - (n_keys - n_queries) on
        lo = tl.minimum(tl.maximum(first_key + n_queries - n_keys, 0), n_queries)
        lo = (lo // BLOCK_M) * BLOCK_M
    return lo


REFERENCE_PIECES = {"SCORES": rbf_scores, "UPDATE": online_softmax_update, "KEY_RANGE": key_range}


@triton.jit
def remove_own_value(out, own_v):
    """Exclusive self attention on a tile of finished outputs: ``out - (out . v / |v|^2) v`` per row.

    ``out`` and ``own_v`` are (BLOCK_M, D) in the accumulator dtype, row i of ``own_v`` the value of
    query i's own key. A row whose own value is (nearly) zero has no direction to remove and is left
    alone, as in the production kernel (``kernels/exclusive.py``).
    """
    along = tl.sum(out * own_v, axis=1)  # (BLOCK_M,): y_i . v_i
    norm_sq = tl.sum(own_v * own_v, axis=1)  # (BLOCK_M,): |v_i|^2
    has_direction = norm_sq > OWN_VALUE_EPS
    # Divide by 1 where there is no direction, so no row ever computes 0 / 0.
    coefficient = tl.where(has_direction, along / tl.where(has_direction, norm_sq, 1.0), 0.0)
    return out - coefficient[:, None] * own_v


# ------------------------------------------------------------------------------------------------
# Forward kernels


@triton.jit
def scores_tile_kernel(
    Q, K, Scores,  # q (Z, Nq, D), k (Z, Nk, D), the output (Z, Nq, Nk)
    stride_qz, stride_qm, stride_qd,  # q's strides, in elements: per (batch, head), per query, per feature
    stride_kz, stride_kn, stride_kd,  # the same for k
    stride_sz, stride_sm, stride_sn,  # and for the scores
    n_queries, n_keys,  # true lengths: the last tiles may hang over them
    qk_scale,  # what the logits are multiplied by
    HEAD_DIM: tl.constexpr,  # D; constexpr because tile shapes must be known when compiling
    BLOCK_M: tl.constexpr,  # queries per tile
    BLOCK_N: tl.constexpr,  # keys per tile
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 inputs
    SCORES: tl.constexpr,  # the @triton.jit piece that turns a (q, k) tile pair into logits
):
    tile_m = tl.program_id(0)  # which query tile this program owns
    tile_n = tl.program_id(1)  # which key tile
    z = tl.program_id(2)  # which (batch, head)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + z * stride_qz + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=rows[:, None] < n_queries, other=0.0)  # (BLOCK_M, D)
    # k transposed, straight from memory: dims down the rows, keys along the columns.
    k_t = tl.load(K + z * stride_kz + dims[:, None] * stride_kd + keys[None, :] * stride_kn,
                  mask=keys[None, :] < n_keys, other=0.0)  # (D, BLOCK_N)
    scores = SCORES(q, k_t, qk_scale, ACC_DTYPE)  # (BLOCK_M, BLOCK_N)
    in_bounds = (rows[:, None] < n_queries) & (keys[None, :] < n_keys)
    tl.store(Scores + z * stride_sz + rows[:, None] * stride_sm + keys[None, :] * stride_sn,
             scores, mask=in_bounds)


@triton.jit
def flash_rbf_kernel(
    Q, K, V, Out, Lse,  # q (Z, Nq, D), k and v (Z, Nk, D), output (Z, Nq, D), base-2 lse (Z, Nq)
    stride_qz, stride_qm, stride_qd,  # strides of q, in elements
    stride_kz, stride_kn, stride_kd,  # of k
    stride_vz, stride_vn, stride_vd,  # of v
    stride_oz, stride_om, stride_od,  # of the output (Lse is contiguous)
    n_queries, n_keys,  # true sequence lengths
    qk_scale,  # scale * log2(e): the logits come out in base-2 units
    HEAD_DIM: tl.constexpr,  # D (the teaching kernels use the same D for values)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    CAUSAL: tl.constexpr,  # bottom-right aligned: query i sees key j iff j <= i + n_keys - n_queries
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 inputs
    SCORES: tl.constexpr,  # exercise 1: rbf_scores
    UPDATE: tl.constexpr,  # exercise 2: online_softmax_update
    KEY_RANGE: tl.constexpr,  # exercise 3: key_range
    EXCLUSIVE: tl.constexpr = False,  # chapter 06: exclusive self attention in the epilogue
    REMOVE_OWN: tl.constexpr = None,  # chapter 06's exercise: remove_own_value
):
    tile_m = tl.program_id(0)
    z = tl.program_id(1)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(Q + z * stride_qz + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
                mask=rows[:, None] < n_queries, other=0.0)

    row_max = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    row_sum = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC_DTYPE)
    band_start, hi = KEY_RANGE(tile_m * BLOCK_M, n_queries, n_keys, BLOCK_M, BLOCK_N, CAUSAL)
    k_base = K + z * stride_kz + dims[:, None] * stride_kd  # transposed tiles: dims down, keys across
    v_base = V + z * stride_vz + dims[None, :] * stride_vd
    for start_n in range(0, band_start, BLOCK_N):  # every query sees every key here: no masks
        keys = start_n + offs_n
        k_t = tl.load(k_base + keys[None, :] * stride_kn)
        v = tl.load(v_base + keys[:, None] * stride_vn)
        scores = SCORES(q, k_t, qk_scale, ACC_DTYPE)
        acc, row_max, row_sum = UPDATE(acc, row_max, row_sum, scores, v)
    for start_n in range(band_start, hi, BLOCK_N):  # the diagonal band and the ragged last tile
        keys = start_n + offs_n
        k_t = tl.load(k_base + keys[None, :] * stride_kn, mask=keys[None, :] < n_keys, other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vn, mask=keys[:, None] < n_keys, other=0.0)
        visible = keys[None, :] < n_keys
        if CAUSAL:
            visible = visible & (keys[None, :] <= rows[:, None] + n_keys - n_queries)
        scores = tl.where(visible, SCORES(q, k_t, qk_scale, ACC_DTYPE), float("-inf"))
        acc, row_max, row_sum = UPDATE(acc, row_max, row_sum, scores, v)

    seen_nothing = row_sum == 0.0  # only when causal and n_queries > n_keys: such rows output zeros
    row_sum = tl.where(seen_nothing, 1.0, row_sum)
    out = acc / row_sum[:, None]
    if EXCLUSIVE:  # a False constexpr branch is not even compiled: plain attention pays nothing
        # Query i's own value is key row i + n_keys - n_queries (bottom-right, as the causal mask;
        # the host requires n_keys >= n_queries). Rows past the last query load zeros.
        own_rows = rows + n_keys - n_queries
        own_v = tl.load(v_base + own_rows[:, None] * stride_vn, mask=rows[:, None] < n_queries, other=0.0)
        out = REMOVE_OWN(out, own_v.to(ACC_DTYPE))
    tl.store(Out + z * stride_oz + rows[:, None] * stride_om + dims[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=rows[:, None] < n_queries)
    tl.store(Lse + z * n_queries + rows, row_max + tl.math.log2(row_sum), mask=rows < n_queries)


@triton.jit
def online_softmax_trace_kernel(
    Q, K, V, TraceMax, TraceSum, TraceAcc,  # q (Nq, D), k and v (Nk, D); traces (tiles, Nq[, D])
    n_queries, n_keys, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr,
    SCORES: tl.constexpr, UPDATE: tl.constexpr,
):
    """The forward loop of one head, non-causal, writing the running state after every key tile."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + rows[:, None] * HEAD_DIM + dims[None, :], mask=rows[:, None] < n_queries, other=0.0)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    row_sum = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC_DTYPE)
    for start_n in range(0, n_keys, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k_t = tl.load(K + keys[None, :] * HEAD_DIM + dims[:, None], mask=keys[None, :] < n_keys, other=0.0)
        v = tl.load(V + keys[:, None] * HEAD_DIM + dims[None, :], mask=keys[:, None] < n_keys, other=0.0)
        scores = tl.where(keys[None, :] < n_keys, SCORES(q, k_t, qk_scale, ACC_DTYPE), float("-inf"))
        acc, row_max, row_sum = UPDATE(acc, row_max, row_sum, scores, v)
        step = start_n // BLOCK_N
        tl.store(TraceMax + step * n_queries + rows, row_max, mask=rows < n_queries)
        tl.store(TraceSum + step * n_queries + rows, row_sum, mask=rows < n_queries)
        tl.store(TraceAcc + (step * n_queries + rows[:, None]) * HEAD_DIM + dims[None, :], acc,
                 mask=rows[:, None] < n_queries)


@triton.jit
def key_range_probe_kernel(Bounds, n_queries, n_keys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           CAUSAL: tl.constexpr, KEY_RANGE: tl.constexpr):
    """Bounds[tile] = (band_start, hi) of each query tile, from the same KEY_RANGE the kernels call."""
    tile_m = tl.program_id(0)
    band_start, hi = KEY_RANGE(tile_m * BLOCK_M, n_queries, n_keys, BLOCK_M, BLOCK_N, CAUSAL)
    zero = tl.zeros([1], dtype=tl.int32)  # stores a tensor even where a bound folds to a constant
    tl.store(Bounds + 2 * tile_m + tl.arange(0, 1), zero + band_start)
    tl.store(Bounds + 2 * tile_m + 1 + tl.arange(0, 1), zero + hi)


@triton.jit
def query_start_probe_kernel(Starts, n_queries, n_keys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             CAUSAL: tl.constexpr):
    """Starts[tile] = the first query row each key tile's dK/dV program visits."""
    tile_n = tl.program_id(0)
    lo = query_start(tile_n * BLOCK_N, n_queries, n_keys, BLOCK_M, CAUSAL)
    tl.store(Starts + tile_n + tl.arange(0, 1), tl.zeros([1], dtype=tl.int32) + lo)


# ------------------------------------------------------------------------------------------------
# Backward kernels (chapter 03b's exercises)


@triton.jit
def probabilities_and_ds(q, k, v, do, lse, delta, rows, keys, n_queries, n_keys, qk_scale,
                         CAUSAL: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """For one (query tile, key tile): P recomputed from the log-sum-exp, and dS = P * (dP - delta)."""
    k_acc = k.to(ACC_DTYPE)
    key_norms = tl.sum(k_acc * k_acc, axis=1)
    scores = (2.0 * tl.dot(q, tl.trans(k)).to(ACC_DTYPE) - key_norms[None, :]) * qk_scale
    visible = (rows[:, None] < n_queries) & (keys[None, :] < n_keys)
    if CAUSAL:
        visible = visible & (keys[None, :] <= rows[:, None] + n_keys - n_queries)
    p = tl.where(visible, tl.math.exp2(scores - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v)).to(ACC_DTYPE)
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def rbf_dkdv_kernel(
    Q, K, V, dO, Lse, Delta, dK, dV,  # inputs, the saved log-sum-exp and delta (Z, Nq); outputs
    stride_qz, stride_qm, stride_qd,  # strides shared by q and dO (the host makes them contiguous)
    stride_kz, stride_kn, stride_kd,  # strides shared by k, v, dK and dV
    n_queries, n_keys,
    scale,  # the softmax scale (the gradients carry 2 * scale)
    qk_scale,  # scale * log2(e), as the forward used it
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    tile_n = tl.program_id(0)
    z = tl.program_id(1)
    keys = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    kv_offsets = z * stride_kz + keys[:, None] * stride_kn + dims[None, :] * stride_kd
    k = tl.load(K + kv_offsets, mask=keys[:, None] < n_keys, other=0.0)
    v = tl.load(V + kv_offsets, mask=keys[:, None] < n_keys, other=0.0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC_DTYPE)
    lo = query_start(tile_n * BLOCK_N, n_queries, n_keys, BLOCK_M, CAUSAL)
    for start_m in range(lo, n_queries, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q_offsets = z * stride_qz + rows[:, None] * stride_qm + dims[None, :] * stride_qd
        q = tl.load(Q + q_offsets, mask=rows[:, None] < n_queries, other=0.0)
        do = tl.load(dO + q_offsets, mask=rows[:, None] < n_queries, other=0.0)
        lse = tl.load(Lse + z * n_queries + rows, mask=rows < n_queries, other=0.0)
        delta = tl.load(Delta + z * n_queries + rows, mask=rows < n_queries, other=0.0)
        p, ds = probabilities_and_ds(q, k, v, do, lse, delta, rows, keys, n_queries, n_keys, qk_scale,
                                     CAUSAL, ACC_DTYPE)
        dv += tl.dot(tl.trans(p).to(do.dtype), do).to(ACC_DTYPE)  # dV = P^T dO
        # dK = 2 scale (dS^T Q - colsum(dS) k): the second term is what the key norms add.
        k_acc = k.to(ACC_DTYPE)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q).to(ACC_DTYPE) - tl.sum(ds, axis=0)[:, None] * k_acc

    dk = 2.0 * scale * dk
    tl.store(dK + kv_offsets, dk.to(dK.dtype.element_ty), mask=keys[:, None] < n_keys)
    tl.store(dV + kv_offsets, dv.to(dV.dtype.element_ty), mask=keys[:, None] < n_keys)


@triton.jit
def rbf_dq_kernel(
    Q, K, V, dO, Lse, Delta, dQ,  # inputs, the saved log-sum-exp and delta (Z, Nq); output
    stride_qz, stride_qm, stride_qd,  # strides shared by q, dO and dQ
    stride_kz, stride_kn, stride_kd,  # strides shared by k and v
    n_queries, n_keys,
    scale,  # the softmax scale (the gradients carry 2 * scale)
    qk_scale,  # scale * log2(e), as the forward used it
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    tile_m = tl.program_id(0)
    z = tl.program_id(1)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q_offsets = z * stride_qz + rows[:, None] * stride_qm + dims[None, :] * stride_qd
    q = tl.load(Q + q_offsets, mask=rows[:, None] < n_queries, other=0.0)
    do = tl.load(dO + q_offsets, mask=rows[:, None] < n_queries, other=0.0)
    lse = tl.load(Lse + z * n_queries + rows, mask=rows < n_queries, other=0.0)
    delta = tl.load(Delta + z * n_queries + rows, mask=rows < n_queries, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC_DTYPE)
    # The forward's bound; this kernel masks every tile it visits, so the unmasked end goes unused.
    unmasked_end, hi = key_range(tile_m * BLOCK_M, n_queries, n_keys, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        kv_offsets = z * stride_kz + keys[:, None] * stride_kn + dims[None, :] * stride_kd
        k = tl.load(K + kv_offsets, mask=keys[:, None] < n_keys, other=0.0)
        v = tl.load(V + kv_offsets, mask=keys[:, None] < n_keys, other=0.0)
        _, ds = probabilities_and_ds(q, k, v, do, lse, delta, rows, keys, n_queries, n_keys, qk_scale,
                                     CAUSAL, ACC_DTYPE)
        dq += tl.dot(ds.to(k.dtype), k).to(ACC_DTYPE)  # dS K

    tl.store(dQ + q_offsets, (2.0 * scale * dq).to(dQ.dtype.element_ty), mask=rows[:, None] < n_queries)


# ------------------------------------------------------------------------------------------------
# Host side


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def tile_scores(q, k, qk_scale, *, scores=rbf_scores, block_m=None, block_n=None):
    """Every tile of ``scores(q, k)`` written out, one program per tile: ``(B, H, Nq, Nk)`` in the
    accumulator dtype. A teaching aid: a real kernel never writes this matrix."""
    check_teaching_inputs(q, k)
    block_m, block_n = block_m or default_block(), block_n or default_block()
    q3, k3 = as_rows(q), as_rows(k)
    z_count, n_queries, n_keys = q3.shape[0], q3.shape[1], k3.shape[1]
    out_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(z_count, n_queries, n_keys, device=q.device, dtype=out_dtype)
    grid = (triton.cdiv(n_queries, block_m), triton.cdiv(n_keys, block_n), z_count)
    scores_tile_kernel[grid](
        q3, k3, out, *q3.stride(), *k3.stride(), *out.stride(), n_queries, n_keys, float(qk_scale),
        HEAD_DIM=q.shape[-1], BLOCK_M=block_m, BLOCK_N=block_n, ACC_DTYPE=accumulator_dtype(q.dtype),
        SCORES=scores,
    )
    return out.reshape(*q.shape[:-1], n_keys)


def launch_forward(kernel, q, k, v, *, causal=False, scale=None, pieces=None, block=None, **constexprs):
    """Run a forward kernel with :func:`flash_rbf_kernel`'s signature; return (out, lse).

    ``pieces`` maps SCORES / UPDATE / KEY_RANGE to ``@triton.jit`` functions (default: the reference
    ones); ``constexprs`` are passed on (chapter 06's ``EXCLUSIVE``).
    """
    check_teaching_inputs(q, k, v)
    block = block or default_block()
    pieces = {**REFERENCE_PIECES, **(pieces or {})}
    q3, k3, v3 = as_rows(q), as_rows(k), as_rows(v)
    out = torch.empty_like(q3)
    lse = torch.empty(q3.shape[:2], device=q.device,
                      dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    grid = (triton.cdiv(q3.shape[1], block), q3.shape[0])
    kernel[grid](
        q3, k3, v3, out, lse, *q3.stride(), *k3.stride(), *v3.stride(), *out.stride(),
        q3.shape[1], k3.shape[1], _scale(q, scale) * LOG2_E,
        HEAD_DIM=q.shape[-1], BLOCK_M=block, BLOCK_N=block, CAUSAL=bool(causal),
        ACC_DTYPE=accumulator_dtype(q.dtype), **pieces, **constexprs,
    )
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


def flash_rbf_forward(q, k, v, causal=False, scale=None, *, pieces=None, block=None, exclusive=False,
                      remove_own=remove_own_value):
    """The teaching forward pass: (output (B, H, Nq, D), base-2 log-sum-exp (B, H, Nq)).

    ``exclusive=True`` applies exclusive self attention in the kernel's epilogue: each output row
    minus its projection on its own value, ``v[i + Nk - Nq]``, by the ``@triton.jit`` function
    ``remove_own`` (default :func:`remove_own_value`). The log-sum-exp is that of the attention
    weights, unchanged. Forward only: the teaching backward knows nothing of XSA.
    """
    if not exclusive:
        return launch_forward(flash_rbf_kernel, q, k, v, causal=causal, scale=scale, pieces=pieces,
                              block=block)
    check_teaching_inputs(q, k, v)
    if k.shape[-2] < q.shape[-2]:
        raise ValueError(f"k: with exclusive=True each query needs its own key, so k needs at least as "
                         f"many rows as q ({q.shape[-2]}), got {k.shape[-2]}")
    return launch_forward(flash_rbf_kernel, q, k, v, causal=causal, scale=scale, pieces=pieces, block=block,
                          EXCLUSIVE=True, REMOVE_OWN=remove_own)


def online_softmax_trace(q, k, v, scale=None, *, update=online_softmax_update, scores=rbf_scores,
                         block=None):
    """The running (row_max, row_sum, acc) after each key tile, for one head ``q (Nq, D)``, ``k, v (Nk, D)``.

    Returns tensors of shape (tiles, Nq), (tiles, Nq) and (tiles, Nq, D); ``acc / row_sum`` after
    the last tile is the attention output.
    """
    if q.dim() != 2 or k.dim() != 2 or v.shape != k.shape:
        raise ValueError(f"q, k, v: expected one head, q (Nq, D) and k, v (Nk, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    check_teaching_inputs(q[None, None], k[None, None], v[None, None])
    block = block or default_block()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    n_queries, n_keys, head_dim = q.shape[0], k.shape[0], q.shape[1]
    steps = triton.cdiv(n_keys, block)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    trace_max = torch.empty(steps, n_queries, device=q.device, dtype=acc_dtype)
    trace_sum = torch.empty_like(trace_max)
    trace_acc = torch.empty(steps, n_queries, head_dim, device=q.device, dtype=acc_dtype)
    online_softmax_trace_kernel[(triton.cdiv(n_queries, block),)](
        q, k, v, trace_max, trace_sum, trace_acc, n_queries, n_keys, _scale(q[None], scale) * LOG2_E,
        HEAD_DIM=head_dim, BLOCK_M=block, BLOCK_N=block, ACC_DTYPE=accumulator_dtype(q.dtype),
        SCORES=scores, UPDATE=update,
    )
    return trace_max, trace_sum, trace_acc


def forward_bounds(n_queries, n_keys, *, causal=True, block_m=None, block_n=None, key_range=key_range,
                   device=None):
    """[(band_start, hi)] per query tile, computed by ``key_range`` itself inside a kernel."""
    block_m, block_n = block_m or default_block(), block_n or default_block()
    tiles = triton.cdiv(n_queries, block_m)
    device = device or ("cpu" if interpreting() else "cuda")
    bounds = torch.zeros(tiles, 2, dtype=torch.int32, device=device)
    key_range_probe_kernel[(tiles,)](bounds, n_queries, n_keys, BLOCK_M=block_m, BLOCK_N=block_n,
                                     CAUSAL=bool(causal), KEY_RANGE=key_range)
    return [tuple(int(x) for x in row) for row in bounds.cpu()]


def dkdv_bounds(n_queries, n_keys, *, causal=True, block_m=None, block_n=None, device=None):
    """[first query row] per key tile of :func:`rbf_dkdv_kernel`, computed by ``query_start`` itself."""
    block_m, block_n = block_m or default_block(), block_n or default_block()
    tiles = triton.cdiv(n_keys, block_n)
    device = device or ("cpu" if interpreting() else "cuda")
    starts = torch.zeros(tiles, dtype=torch.int32, device=device)
    query_start_probe_kernel[(tiles,)](starts, n_queries, n_keys, BLOCK_M=block_m, BLOCK_N=block_n,
                                       CAUSAL=bool(causal))
    return [int(x) for x in starts.cpu()]


def backward_inputs(grad_out, q, k, v, out, lse):
    """Contiguous (Z, N, D) views, and Delta_i = dO_i . O_i (one number per query), for the backward."""
    q3, k3, v3, do3 = (as_rows(t).contiguous() for t in (q, k, v, grad_out))
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    delta = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(dim=-1).reshape(q3.shape[:2]).contiguous()
    return q3, k3, v3, do3, lse.reshape(q3.shape[:2]).contiguous(), delta


def launch_dkdv(kernel, q3, k3, v3, do3, lse, delta, *, causal, scale, block_m, block_n):
    """(dk, dv) from a kernel with :func:`rbf_dkdv_kernel`'s signature; one program per key tile."""
    dk, dv = torch.empty_like(k3), torch.empty_like(v3)
    grid = (triton.cdiv(k3.shape[1], block_n), q3.shape[0])
    kernel[grid](q3, k3, v3, do3, lse, delta, dk, dv, *q3.stride(), *k3.stride(), q3.shape[1], k3.shape[1],
                 scale, scale * LOG2_E, HEAD_DIM=q3.shape[-1], BLOCK_M=block_m, BLOCK_N=block_n,
                 CAUSAL=bool(causal), ACC_DTYPE=accumulator_dtype(q3.dtype))
    return dk, dv


def launch_dq(kernel, q3, k3, v3, do3, lse, delta, *, causal, scale, block_m, block_n):
    """dq from a kernel with :func:`rbf_dq_kernel`'s signature; one program per query tile."""
    dq = torch.empty_like(q3)
    grid = (triton.cdiv(q3.shape[1], block_m), q3.shape[0])
    # Unpipelined (num_stages=1), as kernels/launch.py's dq tiles: on triton 3.6 pipelined dq tiles
    # measured run-to-run different results in fp16 and bf16.
    kernel[grid](q3, k3, v3, do3, lse, delta, dq, *q3.stride(), *k3.stride(), q3.shape[1], k3.shape[1],
                 scale, scale * LOG2_E, HEAD_DIM=q3.shape[-1], BLOCK_M=block_m, BLOCK_N=block_n,
                 CAUSAL=bool(causal), ACC_DTYPE=accumulator_dtype(q3.dtype), num_stages=1)
    return dq


def flash_rbf_backward(grad_out, q, k, v, out, lse, causal=False, scale=None, *,
                       dkdv_kernel=rbf_dkdv_kernel, dq_kernel=rbf_dq_kernel, block=None):
    """The teaching backward pass: (dq, dk, dv) from the forward's output and log-sum-exp."""
    check_teaching_inputs(q, k, v)
    block = block or default_block()
    q3, k3, v3, do3, lse3, delta = backward_inputs(grad_out, q, k, v, out, lse)
    shared = dict(causal=causal, scale=_scale(q, scale), block_m=block, block_n=block)
    dk, dv = launch_dkdv(dkdv_kernel, q3, k3, v3, do3, lse3, delta, **shared)
    dq = launch_dq(dq_kernel, q3, k3, v3, do3, lse3, delta, **shared)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


# ------------------------------------------------------------------------------------------------
# The teaching operator (chapter 03b builds the same one from the learner's kernels)


@torch.library.custom_op("rbf_tutorial_teaching::forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return flash_rbf_forward(q, k, v, causal, scale)


@_forward_op.register_fake
def _(q, k, v, causal, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op("rbf_tutorial_teaching::backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, causal: bool,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_rbf_backward(grad_out, q, k, v, out, lse, causal, scale)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def rbf_attention(q, k, v, causal=False, scale=None):
    """RBF attention through the teaching kernels, as a differentiable, compilable PyTorch operator."""
    check_teaching_inputs(q, k, v)
    return _forward_op(q, k, v, bool(causal), _scale(q, scale))[0]
