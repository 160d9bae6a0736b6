"""Known-wrong solutions of chapter 03's (and 06's) Triton exercises, kept as test cases.

Each one is a mistake a learner makes; tests/test_checks_ch03.py asserts that its check fails
with a message naming that mistake. The pieces of 03a are written out; the wrong backward kernels
are the teaching kernel with one line changed (:func:`kernel_variant`), so they differ from the
right one in exactly the place the exercise is about.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
from pathlib import Path

import rbf_tutorial  # noqa: F401  (before triton: with no GPU it switches Triton to its interpreter)

# isort: split
import triton
import triton.language as tl

# ------------------------------------------------------------------------------------------------
# 03a exercise 1: rbf_scores(q, k_t, qk_scale, ACC_DTYPE)


@triton.jit
def scores_stub(q, k_t, qk_scale, ACC_DTYPE: tl.constexpr):
    # YOUR CODE HERE
    raise NotImplementedError()


@triton.jit
def scores_raising_with_a_message(q, k_t, qk_scale, ACC_DTYPE: tl.constexpr):
    raise NotImplementedError("a message: not nbgrader's stub")


@triton.jit
def scores_norm_added(q, k_t, qk_scale, ACC_DTYPE: tl.constexpr):
    k_acc = k_t.to(ACC_DTYPE)
    return (2.0 * tl.dot(q, k_t) + tl.sum(k_acc * k_acc, axis=0)[None, :]) * qk_scale


@triton.jit
def scores_without_two(q, k_t, qk_scale, ACC_DTYPE: tl.constexpr):
    k_acc = k_t.to(ACC_DTYPE)
    return (tl.dot(q, k_t) - tl.sum(k_acc * k_acc, axis=0)[None, :]) * qk_scale


@triton.jit
def scores_without_norms(q, k_t, qk_scale, ACC_DTYPE: tl.constexpr):
    return tl.dot(q, k_t) * qk_scale


@triton.jit
def scores_without_scale(q, k_t, qk_scale, ACC_DTYPE: tl.constexpr):
    k_acc = k_t.to(ACC_DTYPE)
    return 2.0 * tl.dot(q, k_t) - tl.sum(k_acc * k_acc, axis=0)[None, :]


@triton.jit
def scores_full_distance(q, k_t, qk_scale, ACC_DTYPE: tl.constexpr):
    # -qk_scale |q - k|^2: the same softmax, but not the logits the backward pass recomputes.
    k_acc = k_t.to(ACC_DTYPE)
    q_acc = q.to(ACC_DTYPE)
    query_norms = tl.sum(q_acc * q_acc, axis=1)
    return (2.0 * tl.dot(q, k_t) - tl.sum(k_acc * k_acc, axis=0)[None, :] - query_norms[:, None]) * qk_scale


@triton.jit
def scores_norms_over_wrong_axis(q, k_t, qk_scale, ACC_DTYPE: tl.constexpr):
    k_acc = k_t.to(ACC_DTYPE)
    return (2.0 * tl.dot(q, k_t) - tl.sum(k_acc * k_acc, axis=1)[None, :]) * qk_scale


@triton.jit
def scores_always_float32(q, k_t, qk_scale, ACC_DTYPE: tl.constexpr):
    k32 = k_t.to(tl.float32)
    return (2.0 * tl.dot(q, k_t).to(tl.float32) - tl.sum(k32 * k32, axis=0)[None, :]) * qk_scale


# ------------------------------------------------------------------------------------------------
# 03a exercise 2: online_softmax_update(acc, row_max, row_sum, scores, v) -> (acc, row_max, row_sum)


@triton.jit
def update_stub(acc, row_max, row_sum, scores, v):
    # YOUR CODE HERE
    raise NotImplementedError()


@triton.jit
def update_without_rescale(acc, row_max, row_sum, scores, v):
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    reference = tl.where(new_max == float("-inf"), 0.0, new_max)
    p = tl.math.exp2(scores - reference[:, None])
    return acc + tl.dot(p.to(v.dtype), v).to(acc.dtype), new_max, row_sum + tl.sum(p, axis=1)


@triton.jit
def update_acc_not_rescaled(acc, row_max, row_sum, scores, v):
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    reference = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.math.exp2(row_max - reference)
    p = tl.math.exp2(scores - reference[:, None])
    return acc + tl.dot(p.to(v.dtype), v).to(acc.dtype), new_max, alpha * row_sum + tl.sum(p, axis=1)


@triton.jit
def update_sum_not_rescaled(acc, row_max, row_sum, scores, v):
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    reference = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.math.exp2(row_max - reference)
    p = tl.math.exp2(scores - reference[:, None])
    return alpha[:, None] * acc + tl.dot(p.to(v.dtype), v).to(acc.dtype), new_max, row_sum + tl.sum(p, axis=1)


@triton.jit
def update_alpha_inverted(acc, row_max, row_sum, scores, v):
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    reference = tl.where(new_max == float("-inf"), 0.0, new_max)
    old = tl.where(row_max == float("-inf"), 0.0, row_max)
    alpha = tl.math.exp2(reference - old)
    p = tl.math.exp2(scores - reference[:, None])
    return (alpha[:, None] * acc + tl.dot(p.to(v.dtype), v).to(acc.dtype), new_max,
            alpha * row_sum + tl.sum(p, axis=1))


@triton.jit
def update_without_guard(acc, row_max, row_sum, scores, v):
    # Right until a row has seen no key: then -inf - (-inf) makes NaN.
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    alpha = tl.math.exp2(row_max - new_max)
    p = tl.math.exp2(scores - new_max[:, None])
    return (alpha[:, None] * acc + tl.dot(p.to(v.dtype), v).to(acc.dtype), new_max,
            alpha * row_sum + tl.sum(p, axis=1))


@triton.jit
def update_keeps_old_max(acc, row_max, row_sum, scores, v):
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    reference = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.math.exp2(row_max - reference)
    p = tl.math.exp2(scores - reference[:, None])
    return (alpha[:, None] * acc + tl.dot(p.to(v.dtype), v).to(acc.dtype), row_max,
            alpha * row_sum + tl.sum(p, axis=1))


@triton.jit
def update_without_max(acc, row_max, row_sum, scores, v):
    # Exact in exact arithmetic; exp2 of logits in the hundreds overflows float32.
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    p = tl.math.exp2(scores)
    return acc + tl.dot(p.to(v.dtype), v).to(acc.dtype), new_max, row_sum + tl.sum(p, axis=1)


# ------------------------------------------------------------------------------------------------
# 03a exercise 3: key_range(first_query, n_queries, n_keys, BLOCK_M, BLOCK_N, CAUSAL)


@triton.jit
def key_range_stub(first_query, n_queries, n_keys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr):
    if CAUSAL:
        # YOUR CODE HERE
        raise NotImplementedError()
    else:
        seen_by_all = n_keys
        hi = n_keys
    band_start = (seen_by_all // BLOCK_N) * BLOCK_N
    return band_start, hi


@triton.jit
def key_range_hi_from_first_query(first_query, n_queries, n_keys, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    if CAUSAL:
        seen_by_all = tl.minimum(tl.maximum(first_query + 1 + n_keys - n_queries, 0), n_keys)
        hi = seen_by_all
    else:
        seen_by_all = n_keys
        hi = n_keys
    band_start = (seen_by_all // BLOCK_N) * BLOCK_N
    return band_start, hi


@triton.jit
def key_range_top_left(first_query, n_queries, n_keys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr):
    if CAUSAL:  # forgets the bottom-right offset n_keys - n_queries
        last_query = tl.minimum(first_query + BLOCK_M, n_queries) - 1
        seen_by_all = tl.minimum(first_query + 1, n_keys)
        hi = tl.minimum(last_query + 1, n_keys)
    else:
        seen_by_all = n_keys
        hi = n_keys
    band_start = (seen_by_all // BLOCK_N) * BLOCK_N
    return band_start, hi


@triton.jit
def key_range_unclamped_below(first_query, n_queries, n_keys, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    if CAUSAL:  # no clamp at 0: a negative count, then Triton's truncating //
        last_query = tl.minimum(first_query + BLOCK_M, n_queries) - 1
        seen_by_all = tl.minimum(first_query + 1 + n_keys - n_queries, n_keys)
        hi = tl.minimum(last_query + 1 + n_keys - n_queries, n_keys)
    else:
        seen_by_all = n_keys
        hi = n_keys
    band_start = (seen_by_all // BLOCK_N) * BLOCK_N
    return band_start, hi


@triton.jit
def key_range_band_from_last_query(first_query, n_queries, n_keys, BLOCK_M: tl.constexpr,
                                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    if CAUSAL:
        last_query = tl.minimum(first_query + BLOCK_M, n_queries) - 1
        hi = tl.minimum(tl.maximum(last_query + 1 + n_keys - n_queries, 0), n_keys)
        seen_by_all = hi
    else:
        seen_by_all = n_keys
        hi = n_keys
    band_start = (seen_by_all // BLOCK_N) * BLOCK_N
    return band_start, hi


@triton.jit
def key_range_unclipped_above(first_query, n_queries, n_keys, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    if CAUSAL:  # the last tile's last row may lie past n_queries, and hi is not clamped to n_keys
        last_query = first_query + BLOCK_M - 1
        seen_by_all = tl.minimum(tl.maximum(first_query + 1 + n_keys - n_queries, 0), n_keys)
        hi = tl.maximum(last_query + 1 + n_keys - n_queries, 0)
    else:
        seen_by_all = n_keys
        hi = n_keys
    band_start = (seen_by_all // BLOCK_N) * BLOCK_N
    return band_start, hi


@triton.jit
def key_range_masks_everything(first_query, n_queries, n_keys, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    if CAUSAL:  # right, but slow: every tile takes the masked path
        last_query = tl.minimum(first_query + BLOCK_M, n_queries) - 1
        seen_by_all = 0
        hi = tl.minimum(tl.maximum(last_query + 1 + n_keys - n_queries, 0), n_keys)
    else:
        seen_by_all = n_keys
        hi = n_keys
    band_start = (seen_by_all // BLOCK_N) * BLOCK_N
    return band_start, hi


# ------------------------------------------------------------------------------------------------
# Whole kernels with one line changed


def kernel_variant(kernel, old: str, new: str, folder: Path, preamble: str = ""):
    """``kernel`` with the source line(s) ``old`` replaced by ``new``, as a fresh ``@triton.jit`` kernel.

    It is written to a module file in ``folder`` (the interpreter and the compiler both read a
    kernel's source from its file) that imports what the teaching kernels call.
    """
    source = inspect.getsource(kernel.fn)
    if old not in source:
        raise ValueError(f"{kernel.fn.__name__} has no line {old!r}")
    text = ("import triton\nimport triton.language as tl\n"
            "from rbf_tutorial.teaching import key_range, probabilities_and_ds, query_start\n"
            f"{preamble}\n\n{source.replace(old, new)}")
    name = f"variant_{kernel.fn.__name__}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"
    path = folder / f"{name}.py"
    path.write_text(text, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, kernel.fn.__name__)


# The solution lines of 03b's exercises in rbf_tutorial.teaching, and what a learner writes instead.
_DS_T_Q = "tl.dot(tl.trans(ds).to(q.dtype), q).to(ACC_DTYPE)"
_COLSUM_K = "tl.sum(ds, axis=0)[:, None] * k_acc"
DKDV_LINE = f"dk += {_DS_T_Q} - {_COLSUM_K}"
DKDV_WRONG = {
    "dot-product attention": f"dk += {_DS_T_Q}",
    "wrong sign": f"dk += {_DS_T_Q} + {_COLSUM_K}",
    "counted twice": f"dk += {_DS_T_Q} - 2.0 * {_COLSUM_K}",
    "applied twice": f"dk += 2.0 * scale * ({_DS_T_Q} - {_COLSUM_K})",
    "shapes do not match": f"dk += {_DS_T_Q} - tl.sum(ds, axis=1)[:, None] * k_acc",
    "stub": "# YOUR CODE HERE\n        raise NotImplementedError()",
}
DQ_LINE = "dq += tl.dot(ds.to(k.dtype), k).to(ACC_DTYPE)  # dS K"
_DQ_CALL_END = "n_queries, n_keys, qk_scale,\n" + " " * 37 + "{}, ACC_DTYPE)\n        dq +="
DQ_WRONG = {
    "P K instead of dS K": ("_, ds = probabilities_and_ds", "ds, _ = probabilities_and_ds"),
    "pass CAUSAL on": (_DQ_CALL_END.format("CAUSAL"), _DQ_CALL_END.format("False")),
    "2 scale": (DQ_LINE, "dq += 2.0 * scale * tl.dot(ds.to(k.dtype), k).to(ACC_DTYPE)"),
}
