# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03a · A fused RBF-attention kernel in Triton: the forward pass
#
# **What you will build.** The forward pass of a FlashAttention-style Triton kernel for RBF
# attention, writing its three key pieces yourself inside `@triton.jit` functions: the RBF logits of
# one tile with the key norms taken in SRAM, the online-softmax update, and the causal loop bounds
# that skip the tiles nobody may see. Each piece is launched, checked against float64, and then
# carries the rest of the chapter. Part 03b writes the backward pass.
#
# **What you need.** Chapter 02's identity $-\|q-k\|^2 = 2\,q\cdot k - \|k\|^2 - \|q\|^2$ and why
# softmax ignores the $\|q\|^2$ term; softmax and matrix products. No Triton experience.
#
# **How long.** About an hour with the three exercises. The solved notebook executes in about
# 10 s on a 2-core CPU, where every kernel runs through Triton's interpreter at tiny sizes, and in
# about 26 s on an H200 with an empty Triton cache (compiling the kernels included).
#
# **Exercises.** Solutions are inline, folded under each exercise (click the cell to unfold it).
# For the exercise-only version run `rbf-tutorial assignments OUT_DIR --chapters 03a` and open
# `OUT_DIR/student/03a_triton_forward.ipynb`.
#
# The kernels here are *teaching* kernels: short, one idea per step, each checked before the next
# builds on it. The production kernel in `kernels/` (behind `rbf_attention(..., backend="triton")`)
# has the same skeleton plus what speed and generality need: autotuned tile shapes, any head
# dimension, a separate value head dimension, bf16.

# %% [markdown]
# ## Setup
#
# `import rbf_tutorial` must come **before** `import triton`: with no GPU visible it sets
# `TRITON_INTERPRET=1`, which Triton reads once, at import. The interpreter runs every kernel
# through NumPy on the CPU, correct and slow, so sizes are tiny there. Every size is picked once,
# here, from the device: on a GPU the same cells run compiled, at real sizes, in fp16.

# %%
import rbf_tutorial  # first, before triton: with no GPU visible it switches Triton to its interpreter

print("Triton kernels will run:", rbf_tutorial.runtime.kernel_mode())

# %%
import math

import matplotlib.pyplot as plt
import torch
import triton
import triton.language as tl

from rbf_tutorial import checks, teaching, teaching_plots
from rbf_tutorial.device import DEVICE, describe, sizes
from rbf_tutorial.reference import rbf_attention_reference
from rbf_tutorial.viz import use_style

use_style()
print(describe())

torch.manual_seed(0)
DTYPE = sizes(cpu=torch.float32, gpu=torch.float16)  # the interpreter's tl.dot is only right in fp32
BATCH, HEADS = 1, 2  # the float64 reference materialises (B, H, Nq, Nk, D): keep it modest
N_QUERIES, N_KEYS = sizes(cpu=(37, 45), gpu=(449, 517))  # deliberately not multiples of a tile
HEAD_DIM = sizes(cpu=16, gpu=64)  # a power of two: tl.arange needs one (kernels/ pads other sizes)
BLOCK = sizes(cpu=16, gpu=64)  # rows per tile; 16 is the smallest tl.dot accepts
SCALE = 1 / math.sqrt(HEAD_DIM)
LOG2_E = math.log2(math.e)  # exp(x) == exp2(x * LOG2_E)
# How close a kernel must come to a float64 answer: fp32 everywhere on the CPU; on a GPU the
# inputs are fp16 and the probabilities are rounded to fp16 before they multiply V.
TOLERANCE = sizes(cpu=dict(atol=2e-5, rtol=2e-5), gpu=dict(atol=5e-3, rtol=5e-3))
LOGIT_TOLERANCE = sizes(cpu=dict(atol=1e-4, rtol=1e-5), gpu=dict(atol=2e-2, rtol=2e-3))


def random_qkv(n_queries=N_QUERIES, n_keys=N_KEYS):
    """Random (B, H, N, D) queries, keys and values on DEVICE: never zeros, never a lucky layout."""
    shape = (BATCH, HEADS)
    q = torch.randn(*shape, n_queries, HEAD_DIM, device=DEVICE).to(DTYPE)
    k = torch.randn(*shape, n_keys, HEAD_DIM, device=DEVICE).to(DTYPE)
    v = torch.randn(*shape, n_keys, HEAD_DIM, device=DEVICE).to(DTYPE)
    return q, k, v


q, k, v = random_qkv()
print(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, {DTYPE}, tiles of {BLOCK}")

# %% [markdown]
# ## Why another kernel?
#
# PyTorch's fastest attention, the flash backend of `scaled_dot_product_attention`, computes
# $\mathrm{softmax}(\text{scale}\cdot QK^\top)\,V$, optionally causal, and nothing else. RBF
# attention needs one more thing inside that loop: subtract $\|k_j\|^2$ from every score in key
# column $j$. The flash backend has nowhere to put it. Chapter 02 found the two ways around, and
# both pay: hand SDPA the term as an additive *bias*, and PyTorch falls back to a backend that
# reads a bias tile from memory for every score; or *pad the head dimension* with a column carrying
# $-\|k\|^2$, and pay for the extra column while rounding $\|k\|^2$ to the input's precision.
#
# And "just materialise the scores" costs this much at a modest training shape:

# %%
batch, heads, n_tokens, head_dim = 4, 16, 16_384, 64
bytes_bf16 = 2
qkv_gib = 3 * batch * heads * n_tokens * head_dim * bytes_bf16 / 2**30
logits_gib = batch * heads * n_tokens * n_tokens * bytes_bf16 / 2**30
print(f"q, k and v together:      {qkv_gib:6.2f} GiB")
print(f"one Nq x Nk score matrix: {logits_gib:6.1f} GiB   ({logits_gib / qkv_gib:.0f}x the inputs)")

# %% [markdown]
# A fused kernel never writes that matrix. It keeps one *tile* of scores at a time in the GPU's
# on-chip memory and folds it into the output before moving on. Since we compute the tile
# ourselves, subtracting $\|k\|^2$ costs one vector per key tile.

# %% [markdown]
# ## 1. One tile of logits
#
# **The machine.** A GPU has two memories that matter here. *HBM* is big (tens of GB) and far
# away: a few TB/s. *SRAM*, the registers and shared memory inside each streaming multiprocessor,
# is tiny (a few hundred KB per multiprocessor) and an order of magnitude faster. Unfused attention
# writes the $N_q\times N_k$ scores to HBM, reads them back for the softmax, writes the weights,
# reads them again to multiply $V$: passes that do almost no arithmetic per byte, so HBM traffic,
# not arithmetic, sets the speed. The whole art of a fused kernel is to load a tile into SRAM once,
# do everything you can with it there, and write back only the result.
#
# **The programming model.** A Triton kernel is one function that runs as many *programs*, laid
# out on a *grid*. Each program asks `tl.program_id(axis)` which piece of the grid it is, and works
# on whole blocks (tiles) at once: `tl.arange(0, 16)` is a vector of 16 indices, and arithmetic on
# it is arithmetic on all 16.
#
# **Pointers.** A tensor reaches the kernel as a pointer to its first element. Element `(z, i, d)`
# lives at `base + z*stride_z + i*stride_i + d*stride_d`, counted in *elements*, with the strides
# PyTorch reports. A column of row offsets `rows[:, None]` plus a row of feature offsets
# `dims[None, :]` broadcasts to a whole `(BLOCK, HEAD_DIM)` block of pointers: one tile.
#
# **Edges.** `N_QUERIES` (37 on a CPU) is not a multiple of the tile size, so the last query tile
# hangs over the end. `tl.load(..., mask=rows < n, other=0.0)` reads only the real rows and fills
# the rest with zeros; `tl.store(..., mask=...)` writes only the real ones:

# %%
last_tile = triton.cdiv(N_QUERIES, BLOCK) - 1  # programs along the query axis: ceil(N / BLOCK)
rows = last_tile * BLOCK + torch.arange(BLOCK)
print(f"query tile {last_tile} covers rows {rows[0].item()}..{rows[-1].item()}")
print(f"rows that exist (mask = rows < {N_QUERIES}): {rows[rows < N_QUERIES].tolist()}")
print(f"q's strides in elements (B, H, N, D): {q.stride()}")

# %% [markdown]
# The chapter's kernels fold batch and heads into one axis `z` (the host reshapes `(B, H, N, D)` to
# `(B·H, N, D)`), and one grid axis walks it.
#
# Our first kernel writes out every tile of logits, one program per `(query tile, key tile)`
# pair, so that we can look at them. It loads a query tile and a key tile, the key tile *already
# transposed* (a transpose is only a different pair of strides), and hands both to `SCORES`, a
# small `@triton.jit` function that turns them into logits. `SCORES` is an argument of the kernel,
# marked `tl.constexpr`: Triton compiles a separate kernel for each function passed in, with the
# call inlined, so the indirection costs nothing. We use it to swap formulas without touching the
# kernel, and the checks use it to run *your* piece inside a kernel known to be right.
#
# The worked example is plain dot-product attention's logit, $\text{qk\_scale}\cdot q_i\cdot k_j$.
# `tl.dot` accumulates in fp32 for fp16, bf16 and fp32 inputs alike (and in fp64 for fp64 ones);
# `ACC_DTYPE` is the dtype the kernel accumulates in, fp32 here, fp64 for fp64 inputs.

# %%
@triton.jit
def dot_scores(q, k_t, qk_scale, ACC_DTYPE: tl.constexpr):
    """Dot-product logits of one tile, ``qk_scale * q . k``: the worked example before the RBF one."""
    return tl.dot(q, k_t).to(ACC_DTYPE) * qk_scale


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


def launch_scores_tile(q, k, qk_scale, scores, block=BLOCK):
    """Every tile of ``scores(q, k)``, one program per tile: (B, H, Nq, Nk). A teaching aid only:
    a real kernel never writes this matrix."""
    q3, k3 = q.reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:])  # (B*H, N, D)
    z_count, n_queries, n_keys = q3.shape[0], q3.shape[1], k3.shape[1]
    out = torch.empty(z_count, n_queries, n_keys, device=q.device, dtype=torch.float32)
    # The grid: one program per (query tile, key tile, batch*head). cdiv rounds up, for the ragged edge.
    grid = (triton.cdiv(n_queries, block), triton.cdiv(n_keys, block), z_count)
    scores_tile_kernel[grid](
        q3, k3, out, *q3.stride(), *k3.stride(), *out.stride(), n_queries, n_keys, qk_scale,
        HEAD_DIM=q.shape[-1], BLOCK_M=block, BLOCK_N=block, ACC_DTYPE=tl.float32, SCORES=scores,
    )
    return out.reshape(*q.shape[:-1], n_keys)


dot_logits = launch_scores_tile(q, k, SCALE, dot_scores)
checks.assert_close(dot_logits, SCALE * q.double() @ k.double().transpose(-1, -2),
                    name="tiles of dot-product logits", **LOGIT_TOLERANCE)

# %% [markdown]
# Every entry matches, including the ragged last row and column of tiles. This kernel wrote all
# $N_q \times N_k$ logits to HBM so we could compare them; from the next section on they never
# leave the chip.
#
# ### The RBF logit, with the key norms in SRAM
#
# Chapter 02 showed
#
# $$-\text{scale}\,\|q_i - k_j\|^2 = \text{scale}\,(2\,q_i\cdot k_j - \|k_j\|^2) - \text{scale}\,\|q_i\|^2 ,$$
#
# and the last term is the same for every key of row $i$, so softmax ignores it. The kernel's
# logits are therefore
#
# $$s_{ij} = \text{qk\_scale}\,(2\,q_i\cdot k_j - \|k_j\|^2).$$
#
# (Later, `qk_scale` will be $\text{scale}\cdot\log_2 e$; here it is just a number.) $\|k_j\|^2$ is
# one number per key, and the key tile it comes from is *already in SRAM* for the dot product:
# squaring and summing it along the feature axis costs $D$ multiply-adds per key and nothing from
# HBM. Sum in `ACC_DTYPE`: the norms are large, the differences that matter are small, and an fp16
# tile summed in fp16 would lose them.
#
# ### Exercise 1: the key norms, in Triton
#
# Write the body of `rbf_scores(q, k_t, qk_scale, ACC_DTYPE)`. `q` is the query tile
# `(BLOCK_M, D)`, `k_t` the **transposed** key tile `(D, BLOCK_N)`, both in the input dtype. Return
# the `(BLOCK_M, BLOCK_N)` logits $\text{qk\_scale}\,(2\,q\,k^\top - \|k\|^2)$ in `ACC_DTYPE`. You
# need `x.to(ACC_DTYPE)`, `tl.dot(q, k_t)` (convert its result with `.to(ACC_DTYPE)` too),
# `tl.sum(x, axis=...)`, and broadcasting with `[None, :]`. Which axis of `k_t` holds the features?
# The check launches your function inside `scores_tile_kernel` on ragged tiles whose keys have very
# different lengths, then on float64 inputs.

# %% nbgrader={"grade": false, "grade_id": "ch03a-ex1-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
@triton.jit
def rbf_scores(q, k_t, qk_scale, ACC_DTYPE: tl.constexpr):
    """RBF logits of one tile, ``qk_scale * (2 q . k - |k|^2)``: q (BLOCK_M, D), k_t (D, BLOCK_N)."""
    ### BEGIN SOLUTION
    k_acc = k_t.to(ACC_DTYPE)
    key_norms = tl.sum(k_acc * k_acc, axis=0)  # (BLOCK_N,): |k_j|^2, no trip to HBM
    return (2.0 * tl.dot(q, k_t).to(ACC_DTYPE) - key_norms[None, :]) * qk_scale
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch03a-ex1-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.ch03.check_rbf_scores(rbf_scores)

# %% [markdown]
# Your `rbf_scores` is the logit every kernel of this chapter uses from now on. The next cell runs
# it through the tile kernel and checks it against the definition, computed from plain differences
# in float64: the rows of your logits and of $-\text{scale}\,\|q_i - k_j\|^2$ differ only by the
# constant $\text{scale}\,\|q_i\|^2$, so their softmaxes agree.

# %%
rbf_logits = checks.learner_or_reference(
    lambda: launch_scores_tile(q, k, SCALE, rbf_scores),
    lambda: launch_scores_tile(q, k, SCALE, teaching.rbf_scores),
    uses="your `rbf_scores` (exercise 1)",
)
distances = (q.double()[..., :, None, :] - k.double()[..., None, :, :]).square().sum(-1)
checks.assert_close(torch.softmax(rbf_logits.double(), dim=-1), torch.softmax(-SCALE * distances, dim=-1),
                    name="softmax of the RBF tile logits", reference="softmax(-scale |q - k|^2)", **TOLERANCE)

# %% [markdown]
# ## 2. Online softmax: one pass over the keys
#
# To turn a row of logits into weights, softmax needs the row's maximum (for stability) and the sum
# of its exponentials: both properties of the *whole* row, which a program sees one tile at a time.
# The way out (Milakov and Gimelshein's *online normalizer*, the core of FlashAttention) is to keep
# three running quantities per query row and correct them as tiles arrive. Write $s_j$ for the
# logits seen so far. After any number of tiles the kernel holds
#
# $$m = \max_{j\ \text{seen}} s_j,\qquad \ell = \sum_{j\ \text{seen}} e^{s_j - m},\qquad
# \mathrm{acc} = \sum_{j\ \text{seen}} e^{s_j - m}\, v_j .$$
#
# When a new tile $T$ arrives, with $m' = \max(m, \max_{j\in T} s_j)$ and $\alpha = e^{m - m'}$:
#
# $$\ell' = \alpha\,\ell + \sum_{j\in T} e^{s_j - m'},\qquad
# \mathrm{acc}' = \alpha\,\mathrm{acc} + \sum_{j\in T} e^{s_j - m'}\, v_j .$$
#
# **Why this is exact, not an approximation.** Multiplying an old term $e^{s_j - m}$ by
# $\alpha = e^{m-m'}$ gives exactly $e^{s_j - m'}$. So after the update every term of $\ell'$ and
# $\mathrm{acc}'$, old and new, is measured against the same reference $m'$, and the three
# definitions hold again. By induction they hold after the last tile, where
#
# $$\frac{\mathrm{acc}}{\ell} = \frac{\sum_j e^{s_j - m} v_j}{\sum_j e^{s_j - m}}
# = \frac{e^{-m}\sum_j e^{s_j} v_j}{e^{-m}\sum_j e^{s_j}} = \sum_j \mathrm{softmax}(s)_j\, v_j .$$
#
# The reference $m$ cancels; it is there only for the floating-point numbers: every exponent is
# $\le 0$, so every term lies in $(0, 1]$ and nothing overflows. Without it, a logit of 100 already
# breaks float32:

# %%
print("exp(100) in float32:", torch.exp(torch.tensor(100.0)).item())
print("exp(100 - 100):     ", torch.exp(torch.tensor(100.0) - 100.0).item())

# %% [markdown]
# **The base-2 trick.** GPUs evaluate $2^x$ in one hardware instruction; $e^x$ costs a multiply
# more. Since $e^x = 2^{x \log_2 e}$, the kernel multiplies the logits once by
# $\text{qk\_scale} = \text{scale}\cdot\log_2 e$, folding $\log_2 e$ into the scale it applies
# anyway, and uses `exp2` everywhere. All the reasoning above holds with 2 in place of $e$: $m$ and
# the scores are then in "base-2 units", the ratio $\mathrm{acc}/\ell$ is unchanged, and the
# log-sum-exp comes out as $\mathrm{lse}_2 = m + \log_2 \ell$.
#
# ### Exercise 2: the online-softmax update, in Triton
#
# Write the body of `online_softmax_update(acc, row_max, row_sum, scores, v)`, which folds one tile
# into the running state and returns the new `(acc, row_max, row_sum)`, in that order. Shapes:
# `row_max` and `row_sum` are `(BLOCK_M,)`, `acc` is `(BLOCK_M, D)`, all in the accumulator dtype;
# `scores` is the `(BLOCK_M, BLOCK_N)` tile of base-2 logits (`-inf` where a key is masked) and `v`
# the `(BLOCK_N, D)` value tile in the input dtype. Use `tl.maximum`, `tl.max(x, axis=1)`,
# `tl.math.exp2`, `tl.sum`, and `tl.dot(p.to(v.dtype), v)` for $\sum_j p_j v_j$ (convert its result
# to `acc.dtype`: multiplying `p` in the input dtype is what fast kernels do).
#
# One trap: in the causal kernel of section 3 a row may have seen no visible key yet, so
# `row_max` and the new maximum are both $-\infty$, and $-\infty - (-\infty)$ is NaN. Measure such
# a row against 0 instead of its maximum (`tl.where(new_max == float("-inf"), 0.0, new_max)`); its
# terms are $2^{-\infty} = 0$ either way. The check runs your update over several key tiles whose
# maxima keep rising, with causal rows that see nothing, and with logits large enough to overflow.

# %% nbgrader={"grade": false, "grade_id": "ch03a-ex2-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
@triton.jit
def online_softmax_update(acc, row_max, row_sum, scores, v):
    """Fold one tile of base-2 scores (BLOCK_M, BLOCK_N) and its values v (BLOCK_N, D) into the
    running (acc, row_max, row_sum); return the new three, in that order."""
    ### BEGIN SOLUTION
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    # A row that has seen no visible key yet has new_max = -inf; measure it against 0 instead, so
    # that -inf - (-inf) never makes a NaN (its weights are exp2(-inf) = 0 either way).
    reference = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.math.exp2(row_max - reference)  # how far the old reference was off: rescale by it
    p = tl.math.exp2(scores - reference[:, None])
    row_sum = alpha * row_sum + tl.sum(p, axis=1)
    acc = alpha[:, None] * acc + tl.dot(p.to(v.dtype), v).to(acc.dtype)
    return acc, new_max, row_sum
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch03a-ex2-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
checks.ch03.check_online_softmax_update(online_softmax_update)

# %% [markdown]
# ### The forward kernel
#
# Now the pieces make a kernel. Each program owns one *query* tile and loops over the key tiles;
# the grid has one axis fewer than the tile kernel's, `(cdiv(Nq, BLOCK_M), B·H)`. The loop comes
# in two halves, and a third piece, `KEY_RANGE`, says where each ends:
#
# - keys `[0, band_start)`: whole tiles that every query of the program sees. No mask at all: the
#   fast path.
# - keys `[band_start, hi)`: tiles that need a mask, because they hang over the end of the keys or,
#   in section 3, cross the causal diagonal. Masked keys load as zeros and get the score $-\infty$,
#   so weight $2^{-\infty} = 0$.
#
# Without causality the bounds are simple: every whole tile is unmasked and `hi` is the number of
# keys. That is `all_keys` below; section 3's exercise replaces it. After the loop the program
# divides by $\ell$ and stores, next to its output rows, each row's base-2 log-sum-exp
# $m + \log_2 \ell$: one float per query, which the backward pass of 03b needs. (A causal row that
# sees no key at all ends with $\ell = 0$; it outputs zeros, the convention of
# `rbf_attention_reference`.)
# The `if EXCLUSIVE:` branch before the store is chapter 06's, off by default here: a `constexpr`
# branch that is `False` is not even compiled, so this kernel pays nothing for it.

# %%
@triton.jit
def all_keys(first_query, n_queries, n_keys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             CAUSAL: tl.constexpr):
    """(band_start, hi) without a causal mask: whole tiles unmasked, the ragged last tile masked."""
    return (n_keys // BLOCK_N) * BLOCK_N, n_keys


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
    if EXCLUSIVE:  # chapter 06 fills this in; a False constexpr branch is not even compiled
        own_rows = rows + n_keys - n_queries  # query i's own key, bottom-right aligned
        own_v = tl.load(v_base + own_rows[:, None] * stride_vn, mask=rows[:, None] < n_queries, other=0.0)
        out = REMOVE_OWN(out, own_v.to(ACC_DTYPE))
    tl.store(Out + z * stride_oz + rows[:, None] * stride_om + dims[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=rows[:, None] < n_queries)
    tl.store(Lse + z * n_queries + rows, row_max + tl.math.log2(row_sum), mask=rows < n_queries)


# %% [markdown]
# The host side is the tile kernel's, with the smaller grid: `teaching.launch_forward` reshapes to
# `(B·H, N, D)`, allocates the output and the log-sum-exp, and launches the kernel you pass it with
# the pieces you pass it. Here is *your* kernel, with your two pieces and `all_keys`, against the
# float64 definition $\mathrm{softmax}(-\text{scale}\,\|q_i-k_j\|^2)\,V$:

# %%
def forward_with_your_pieces(q, k, v, causal, key_range):
    """The chapter's flash_rbf_kernel with exercises 1 and 2 and the given key range."""
    pieces = dict(SCORES=rbf_scores, UPDATE=online_softmax_update, KEY_RANGE=key_range)
    return teaching.launch_forward(flash_rbf_kernel, q, k, v, causal=causal, pieces=pieces, block=BLOCK)


out, lse = checks.learner_or_reference(
    lambda: forward_with_your_pieces(q, k, v, False, all_keys),
    lambda: teaching.flash_rbf_forward(q, k, v, block=BLOCK),
    uses="your `rbf_scores` and `online_softmax_update` (exercises 1 and 2)",
)
checks.assert_close(out, rbf_attention_reference(q, k, v), name="flash RBF forward", **TOLERANCE)

# %% [markdown]
# One pass over the keys, no $N_q\times N_k$ anything in memory, and the answer of a full softmax.
#
# ### Watching it converge
#
# What does the online softmax do along the way? The teaching library has a variant of the same
# loop that writes the running state out after every key tile (`teaching.online_softmax_trace`,
# with your two pieces plugged in). Below it runs on one head whose key tiles lie at different
# distances from the origin, so that some tiles bring a new largest logit and some do not. For the
# query row whose maximum rose most often: the running maximum $m$, the running sum $\ell$, and two
# coordinates of the output so far, $\mathrm{acc}/\ell$, against the exact float64 values (dashed).

# %%
TRACE_TILES = 6
generator = torch.Generator().manual_seed(0)
tile_lengths = torch.tensor([1.2, 1.0, 1.6, 0.55, 1.3, 1.1]).repeat_interleave(BLOCK)[:, None]
trace_q = torch.randn(BLOCK, HEAD_DIM, generator=generator)
trace_k = torch.randn(TRACE_TILES * BLOCK, HEAD_DIM, generator=generator) * tile_lengths
trace_v = torch.randn(TRACE_TILES * BLOCK, HEAD_DIM, generator=generator)
trace_q, trace_k, trace_v = (x.to(device=DEVICE, dtype=DTYPE) for x in (trace_q, trace_k, trace_v))

trace_max, trace_sum, trace_acc = checks.learner_or_reference(
    lambda: teaching.online_softmax_trace(trace_q, trace_k, trace_v, SCALE, update=online_softmax_update,
                                          scores=rbf_scores, block=BLOCK),
    lambda: teaching.online_softmax_trace(trace_q, trace_k, trace_v, SCALE, block=BLOCK),
    uses="your `rbf_scores` and `online_softmax_update` (exercises 1 and 2)",
)
q64, k64, v64 = (x.double().cpu() for x in (trace_q, trace_k, trace_v))
exact_logits = SCALE * LOG2_E * (2 * q64 @ k64.T - k64.square().sum(-1))  # base 2, as the kernel's
exact_max = exact_logits.max(dim=1).values
exact_sum = torch.exp2(exact_logits - exact_max[:, None]).sum(dim=1)
exact_out = torch.softmax(exact_logits * math.log(2), dim=1) @ v64
row = teaching_plots.most_rescaled_row(trace_max)
teaching_plots.online_softmax_figure(trace_max.cpu(), trace_sum.cpu(), trace_acc.cpu(), exact_max[row],
                                     exact_sum[row], exact_out[row], row=row)
plt.show()
checks.assert_close(trace_acc[-1] / trace_sum[-1, :, None], exact_out, name="acc / l after the last tile",
                    **TOLERANCE)

# %% [markdown]
# Read the three panels together. Where $m$ rises (grey bands), the old terms were measured against
# a smaller maximum and are rescaled by $\alpha = 2^{m - m'} < 1$ before the new tile's terms are
# added; after a large jump $\ell$ can even fall although a tile was added. Where $m$ stays put,
# $\alpha = 1$ and $\ell$ only grows. The output coordinates wander while tiles arrive, since each
# new tile changes which keys dominate, and land on the float64 answer after the last one. Nothing
# is ever recomputed: the whole history of a row is carried in $m$, $\ell$ and its row of `acc`.

# %% [markdown]
# ## 3. Causal masking, and skipping what is masked
#
# With `causal=True`, query $i$ may see key $j$ only if $j \le i + N_k - N_q$. This is the
# *bottom-right* alignment: the last query sees every key. When $N_q = N_k$ it is the familiar
# "no peeking ahead"; when there are more keys than queries (registers or a cached prompt in
# front), the first $N_k - N_q$ keys are visible to every query; when there are *more queries*
# than keys, the first $N_q - N_k$ queries see nothing at all.
#
# Masking is cheap; computing a tile only to mask all of it is not. Most tiles of a causal problem
# are either fully visible to the whole query tile or fully hidden from it; only a thin band along
# the diagonal needs a mask. So `KEY_RANGE` becomes, for the query tile that starts at row
# `first_query`:
#
# - `hi`: the number of keys the tile's **last real** query sees, $\text{last} + 1 + N_k - N_q$
#   with $\text{last} = \min(\text{first} + \text{BLOCK\_M}, N_q) - 1$ (the last tile may hang over
#   the end). No query of the tile sees a key at or past `hi`: those tiles are skipped, never loaded.
# - `band_start`: the keys its **first** query sees, $\text{first} + 1 + N_k - N_q$, rounded down to
#   whole tiles. Every query of the tile sees all of those: no mask needed.
#
# Both counts must lie in $[0, N_k]$: with more queries than keys they go negative, and with a
# ragged tile they can pass $N_k$. Clamp them *before* dividing: Triton's `//` on integers
# truncates toward zero, as C does, so `-20 // 16` is `-1` there, not Python's `-2`.
#
# ### Exercise 3: the causal bounds, in Triton
#
# Complete the `CAUSAL` branch of `key_range(first_query, n_queries, n_keys, BLOCK_M, BLOCK_N,
# CAUSAL)`: set `seen_by_all` (the keys the first query sees, clamped to `[0, n_keys]`) and `hi`
# (the keys the last real query sees, clamped the same way). The non-causal branch and the rounding
# of `band_start` are given. Use `tl.minimum` and `tl.maximum`. The check computes your bounds
# inside a kernel for every query tile of 58 shapes (odd lengths, $N_q \ne N_k$ both ways, unequal
# tile sizes) and checks them key by key: nothing visible missed, nothing hidden left unmasked, no
# tile visited that nobody sees, and no mask where none is needed.

# %% nbgrader={"grade": false, "grade_id": "ch03a-ex3-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
@triton.jit
def key_range(first_query, n_queries, n_keys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr):
    """(band_start, hi) for the query tile that starts at row ``first_query``: keys below band_start
    need no mask, keys in [band_start, hi) do, and no query of the tile sees a key at or past hi."""
    if CAUSAL:
        ### BEGIN SOLUTION
        last_query = tl.minimum(first_query + BLOCK_M, n_queries) - 1  # the tile may hang over the end
        # Clamp to [0, n_keys] before any division: Triton's // truncates toward zero, as C does.
        seen_by_all = tl.minimum(tl.maximum(first_query + 1 + n_keys - n_queries, 0), n_keys)
        hi = tl.minimum(tl.maximum(last_query + 1 + n_keys - n_queries, 0), n_keys)
        ### END SOLUTION
    else:
        seen_by_all = n_keys
        hi = n_keys
    band_start = (seen_by_all // BLOCK_N) * BLOCK_N  # whole tiles only
    return band_start, hi


# %% nbgrader={"grade": true, "grade_id": "ch03a-ex3-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
checks.ch03.check_key_range(key_range)

# %% [markdown]
# What your bounds make the kernel do, tile by tile, for a causal problem with more keys than
# queries (as with registers in front). The map is computed by running your `key_range` inside a
# kernel, so it shows what the kernel really visits; the numbers are the order in which each
# program (one per row of tiles) walks its key tiles. Small tiles of 8, to see the pattern:

# %%
MAP_QUERIES, MAP_KEYS, MAP_BLOCK = 37, 50, 8
visits = checks.learner_or_reference(
    lambda: teaching_plots.tile_visits(MAP_QUERIES, MAP_KEYS, MAP_BLOCK, MAP_BLOCK, key_range=key_range),
    lambda: teaching_plots.tile_visits(MAP_QUERIES, MAP_KEYS, MAP_BLOCK, MAP_BLOCK),
    uses="your `key_range` (exercise 3)",
)
teaching_plots.tile_visit_figure(visits, MAP_QUERIES, MAP_KEYS, MAP_BLOCK, MAP_BLOCK, kernels=("forward",))
plt.show()
print(f"forward: {visits['forward'].visited_share:.0%} of the tiles are loaded at all")

# %% [markdown]
# Every program starts with its unmasked tiles, from the left, and ends in the band that the red
# diagonal crosses; everything to the right of the band is never loaded. The fraction of tiles
# loaded tends to one half as $N$ grows, which is why causal attention costs about half as much.
#
# Now the whole forward kernel with all three of your pieces, everywhere the rule is subtle:
# without the mask, with more keys than queries, with more queries than keys (the first
# $N_q - N_k$ rows see nothing and must come out as zeros), and square.

# %%
def check_forward(n_queries, n_keys, causal):
    q_c, k_c, v_c = random_qkv(n_queries, n_keys)
    out_c, _ = checks.learner_or_reference(
        lambda: forward_with_your_pieces(q_c, k_c, v_c, causal, key_range),
        lambda: teaching.flash_rbf_forward(q_c, k_c, v_c, causal, block=BLOCK),
        uses="your `rbf_scores`, `online_softmax_update` and `key_range` (exercises 1 to 3)",
    )
    expected = rbf_attention_reference(q_c, k_c, v_c, causal=causal)
    checks.assert_close(out_c, expected, name=f"Nq={n_queries} Nk={n_keys} causal={causal}", **TOLERANCE)


for shape in [(N_QUERIES, N_KEYS, False), (N_QUERIES, N_KEYS, True), (N_KEYS, N_QUERIES, True),
              (N_KEYS, N_KEYS, True)]:
    check_forward(*shape)

# %% [markdown]
# ## Summary
#
# - A fused kernel keeps one tile of scores in SRAM and never writes the $N_q \times N_k$ matrix.
#   Programs own tiles; pointers are base plus index times stride; masks handle ragged edges.
# - **RBF is one piece** on top of dot-product attention: $\|k\|^2$ per key from the tile already
#   in SRAM, summed in the accumulator dtype, and the logit $\text{qk\_scale}\,(2\,q\cdot k - \|k\|^2)$.
# - The **online softmax** carries a running max $m$, sum $\ell$ and output $\mathrm{acc}$, rescaling
#   the old ones by $2^{m - m'}$. It is exact: the reference max cancels in $\mathrm{acc}/\ell$.
#   Working in base 2 costs nothing: $\log_2 e$ folds into the scale.
# - **Causal** programs end their key loop at `hi`, from the tile's last real query, and mask only
#   the band from `band_start`, from its first query; bounds are clamped before dividing because
#   Triton's `//` truncates.
# - The kernel also stores the base-2 log-sum-exp per query: 03b recomputes every probability from it.
#
# ## Where this breaks
#
# - The teaching kernels take power-of-two head dims of at least 16, with $D_v = D$, fold batch and
#   heads into one contiguous axis and use one tile size. `kernels/` lifts each of these (padding to
#   the next power of two, strides per tensor, autotuned tiles).
# - Under the CPU interpreter every program runs one after another through NumPy: thousands of
#   times slower than a GPU, and the interpreter's half-precision `tl.dot` gives wrong numbers, so
#   CPU runs use fp32.
# - A causal query that sees no key (the first $N_q - N_k$ when $N_q > N_k$) gets zeros by
#   convention; `rbf_attention` refuses such inputs rather than guess.
# - The expansion $2\,q\cdot k - \|k\|^2$ is exact algebra, not exact arithmetic: far from the
#   origin the norms grow while the differences that matter do not, and float32 cancels them away.
#   03b measures how far.

# %% [markdown]
# ## Sources and further reading
#
# - Dao, Fu, Ermon, Rudra and Ré, *FlashAttention: Fast and Memory-Efficient Exact Attention with
#   IO-Awareness* (arXiv:2205.14135): the tiled, fused kernel that keeps scores in SRAM, and the
#   HBM/SRAM reasoning of section 1.
# - Dao, *FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning*
#   (arXiv:2307.08691): one program per query tile looping over key tiles, and dividing by
#   $\ell$ once, after the loop.
# - Milakov and Gimelshein, *Online normalizer calculation for softmax* (arXiv:1805.02867): the
#   running maximum and rescaled sum of section 2.
# - Triton's fused-attention tutorial
#   (https://triton-lang.org/main/getting-started/tutorials/06-fused-attention.html): base-2
#   exponentials with $\log_2 e$ folded into the scale, and the split of the key loop into
#   unmasked tiles and a masked diagonal band.
# - Triton-Puzzles (https://github.com/srush/Triton-Puzzles): learning Triton by writing kernels
#   under the CPU interpreter, as the exercises here do.
# - R. Pisoni, *Scaled RBF Attention: Trading Dot Products for Euclidean Distance*
#   (https://pisoni.ai/posts/scaled-rbf-attention) and its code
#   (https://github.com/4rtemi5/rbf_attention): RBF attention as dot-product attention with a
#   key-norm penalty, and a Triton kernel for it; the idea this tutorial builds on.
