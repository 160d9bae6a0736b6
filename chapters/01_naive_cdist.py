# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Naive RBF attention, and the N² wall
#
# **What you will build.** RBF attention in three lines with `torch.cdist`, checked against a
# float64 reference; then a measurement of its peak memory against sequence length, an N² fit,
# and the length at which this device runs out.
#
# **What you need.** Chapter 00 (RBF scores), tensor shapes `(batch, heads, tokens, head_dim)`.
#
# **How long.** About 30 minutes to work through; executes in about 8 s on a 2-core CPU,
# about 9 s on an H200.
#
# **Exercises.** Solutions are inline, folded under each exercise; for the exercise-only version run
# `rbf-tutorial assignments OUT_DIR --chapters 01` and open `OUT_DIR/student/01_naive_cdist.ipynb`.

# %%
import functools
import math

import matplotlib.pyplot as plt
import torch

from rbf_tutorial import checks, memory, rbf_attention, viz
from rbf_tutorial.device import DEVICE, SMALL, describe, sizes
from rbf_tutorial.memory import format_bytes
from rbf_tutorial.reference import rbf_attention_reference

viz.use_style()
print(describe())

# All sizes in one place: small on a CPU (seconds), real on a GPU.
batch, heads, head_dim = sizes(cpu=(1, 4, 32), gpu=(2, 8, 64))
candidate_lengths = sizes(cpu=[128, 256, 384, 512, 768, 1024, 1536],
                          gpu=[1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384])
print(f"SMALL = {SMALL}: batch={batch}, heads={heads}, head_dim={head_dim}")

# %% [markdown]
# ## The failure
#
# Here is RBF attention from the library, the obvious way (`backend="naive"`), on one sequence
# with one head. The sequence length is picked from this device's free memory so that the
# call *cannot* fit. The queries, keys and values themselves are small (a few MiB). Watch what
# happens.

# %%
available = memory.available_memory()
bytes_per_score = 4  # float32
# The shortest sequence whose one float32 N×N matrix needs 1.5× the free memory.
n_fail = math.ceil(math.sqrt(1.5 * available / bytes_per_score))
q_fail, k_fail, v_fail = (torch.randn(1, 1, n_fail, 16, device=DEVICE) for _ in range(3))
print(f"free memory on {DEVICE.type}: {format_bytes(available)}")
print(f"N = {n_fail:,} tokens: q, k and v take {format_bytes(3 * q_fail.nbytes)} together")

# %% tags=["raises-exception"]
if DEVICE.type == "cpu":
    # A CPU does not fail cleanly: the operating system may promise memory it does not have,
    # then swap or kill processes once the pages are written. So we refuse up front, with the
    # same numbers a GPU's allocator would use. On a GPU, the call itself fails at once.
    memory.ensure_fits(n_fail * n_fail * bytes_per_score, what=f"the {n_fail:,} × {n_fail:,} distance matrix")
rbf_attention(q_fail, k_fail, v_fail, backend="naive")

# %%
del q_fail, k_fail, v_fail
if DEVICE.type == "cuda":
    torch.cuda.empty_cache()  # hand the cached blocks back before we measure

# %% [markdown]
# Inputs of a few MiB asked for more memory than the device has. The culprit is one
# intermediate tensor. Let us build the computation ourselves and find it.
#
# ## The computation
#
# For queries $Q \in \mathbb{R}^{N_q \times D}$, keys $K \in \mathbb{R}^{N_k \times D}$ and values
# $V \in \mathbb{R}^{N_k \times D_v}$ (per batch element and head), RBF attention is
#
# $$ \Delta_{ij} = \lVert q_i - k_j \rVert, \qquad
#    W = \operatorname{softmax}_j\!\left(-s\, \Delta_{ij}^2\right), \qquad
#    \text{out} = W V , $$
#
# with scale $s = 1/\sqrt{D}$ by default. `torch.cdist(q, k)` computes $\Delta$ for every pair at
# once, over any leading batch dimensions: from `(B, H, Nq, D)` and `(B, H, Nk, D)` it returns
# `(B, H, Nq, Nk)`. Note that it returns the distance, not its square.

# %% [markdown]
# ### Exercise 1: naive RBF attention
#
# Write `naive_rbf_attention(q, k, v, scale)` with `torch.cdist`, softmax over the keys, and a
# matrix product with `v`. Shapes: `q (B, H, Nq, D)`, `k (B, H, Nk, D)`, `v (B, H, Nk, Dv)`,
# result `(B, H, Nq, Dv)`. The check compares it, in float64, with the library's reference,
# which computes every difference $q_i - k_j$ explicitly.

# %% nbgrader={"grade": false, "grade_id": "ch01-ex1-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
def naive_rbf_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    ### BEGIN SOLUTION
    distances = torch.cdist(q, k)
    weights = torch.softmax(-scale * distances.square(), dim=-1)
    return weights @ v
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch01-ex1-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
checks.ch01.check_naive_rbf_attention(naive_rbf_attention)

# %% [markdown]
# The library's `rbf_attention(q, k, v, backend="naive")` is the same three lines (it also
# upcasts half precision, which `cdist` handles badly). The rest of the chapter measures the
# library's version, so it runs whether or not your exercise is done yet. A last check that
# both agree on the device you are using:

# %%
generator = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(batch, heads, 64, head_dim, generator=generator) for _ in range(3))
checks.assert_close(rbf_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), backend="naive").cpu(),
                    rbf_attention_reference(q, k, v), name="library naive route", atol=1e-4)

# %% [markdown]
# ## How big is the distance matrix?
#
# $\Delta$ holds one number per (batch element, head, query, key). Nothing about it is shared
# between heads or sequences, and nothing is thrown away before the softmax has seen all of it.
#
# ### Exercise 2: bytes of the score matrix
#
# Write `score_matrix_bytes(batch, heads, n_queries, n_keys, bytes_per_element)`: the size in
# bytes of a `(batch, heads, n_queries, n_keys)` tensor with elements of `bytes_per_element`
# bytes (4 for float32, 2 for bfloat16).

# %% nbgrader={"grade": false, "grade_id": "ch01-ex2-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
def score_matrix_bytes(batch: int, heads: int, n_queries: int, n_keys: int, bytes_per_element: int) -> int:
    ### BEGIN SOLUTION
    return batch * heads * n_queries * n_keys * bytes_per_element
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch01-ex2-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.ch01.check_score_matrix_bytes(score_matrix_bytes)

# %% [markdown]
# The failing call needed one such matrix, $N^2 \times 4$ bytes: by construction, 1.5× the free
# memory. For a feel of the numbers: one head of one 32k-token sequence is
# $32768^2 \times 4$ bytes = 4 GiB; 16 heads and a batch of 4 make that 256 GiB.
#
# ## Measuring it
#
# `memory.peak_memory(fn, *args)` runs `fn(*args)` and reports how many bytes it allocated at its
# highest point, beyond what was already live. On a GPU it reads PyTorch's allocator
# (`torch.cuda.max_memory_allocated`); on a CPU it replays the allocations and frees that
# PyTorch's profiler records for every tensor. We measure a range of lengths, skipping any that
# would come near the device's limit.

# %%
naive_route = functools.partial(rbf_attention, backend="naive")


def one_matrix(n: int) -> int:
    """Bytes of one (batch, heads, n, n) float32 matrix: Exercise 2's formula."""
    return batch * heads * n * n * bytes_per_score


budget = 0.5 * memory.available_memory()
# About three N×N float32 tensors are live at the peak (measured below); stay well inside.
lengths = [n for n in candidate_lengths if 3.5 * one_matrix(n) < budget]

measured = []
for n in lengths:
    q, k, v = (torch.randn(batch, heads, n, head_dim, device=DEVICE) for _ in range(3))
    measured.append(memory.peak_memory(naive_route, q, k, v))
    print(f"N = {n:>6,}: peak {format_bytes(measured[-1]):>10}   "
          f"one N×N matrix {format_bytes(one_matrix(n)):>10}   ratio {measured[-1] / one_matrix(n):.2f}")
del q, k, v

# %% [markdown]
# The peak is a fixed multiple of one score matrix (it tends to 3 on a CPU): the distances,
# their scaled squares (the logits) and the softmax weights are all alive at the same moment,
# because each is computed from the one before. Queries, keys, values and the output grow only
# linearly in $N$, so their share of the ratio fades as $N$ grows.
#
# ## The N² fit, and where this device runs out
#
# Fit $\text{bytes} \approx aN^2 + bN + c$ by least squares, then solve for the $N$ at which it
# reaches the free memory. We never run that size; the fit tells us.

# %%
fit = memory.fit_quadratic(lengths, measured)
available = memory.available_memory()
oom_n = memory.predict_oom_n(fit, available)
print(f"fit: {fit.a:.4g}·N² + {fit.b:.4g}·N + {fit.c:.4g} bytes "
      f"(a / one matrix's N² coefficient = {fit.a / one_matrix(1):.2f})")
print(f"free memory: {format_bytes(available)} -> out of memory at N ≈ {oom_n:,} "
      f"(batch={batch}, heads={heads}, float32)")
largest_fit_error = max(abs(fit(n) - m) / m for n, m in zip(lengths, measured, strict=True))
print(f"largest relative misfit at the measured points: {largest_fit_error:.2%}")
assert largest_fit_error < 0.05, "peak memory is not quadratic in N on this device?"

# %%
viz.plot_memory_curve(lengths, measured, fit, oom_n, available_bytes=available,
                      title=f"Naive RBF attention, batch={batch}, heads={heads}, float32 on {DEVICE.type}")
plt.show()

# %% [markdown]
# On log-log axes a quadratic is a line of slope 2: double $N$, four times the memory. The
# dotted line is where the fitted curve meets this device's free memory.
#
# Training makes it worse. Autograd keeps what the backward pass needs, which here includes
# $N \times N$ tensors, and a model keeps them for *every* layer until the backward pass reaches
# it. Forward and backward together, at the largest length we measured:

# %%
n = lengths[-1]
q, k, v = (torch.randn(batch, heads, n, head_dim, device=DEVICE, requires_grad=True) for _ in range(3))


def forward_backward(q, k, v):
    naive_route(q, k, v).sum().backward()


training_peak = memory.peak_memory(forward_backward, q, k, v)
print(f"N = {n:,}: forward {format_bytes(measured[-1])}, forward + backward {format_bytes(training_peak)} "
      f"({training_peak / one_matrix(n):.1f} N×N matrices)")
del q, k, v

# %% [markdown]
# ## Summary
#
# - `torch.cdist` makes RBF attention three lines, and exactly right (checked in float64).
# - It materialises every pairwise distance: a `(B, H, N, N)` tensor, and at the peak three of
#   them. Memory grows as $N^2$, which the fit above confirms to within a few percent.
# - The call at the top failed at a length computed from the free memory alone: the shortest $N$
#   whose single float32 $N \times N$ matrix needs 1.5× what is free. It failed before computing
#   anything. The fit, made afterwards from a handful of small measurements, predicts the wall from
#   the other side: the length at which the *measured* peak (about three such matrices, for this
#   batch and head count) reaches the free memory.
#
# ## Where this breaks
#
# - **Long sequences.** With three float32 copies live, an 80 GB GPU holds
#   $N \approx \sqrt{80\times10^9 / (3 \cdot 4 \cdot B H)}$ tokens: about 10 200 for $B=4$,
#   $H=16$; 82 000 for one head of one sequence. The cell below prints the same for this device.
# - **Training** multiplies it: the backward pass needs more $N \times N$ tensors, per layer.
# - **Half precision helps only 2×.** bfloat16 halves every matrix; $N^2$ still wins.
#
# The way out is to never hold the matrix at all: stream the keys through in tiles and keep a
# running softmax, as fused attention kernels do for dot products. Those kernels only know
# $q \cdot k$, though. Chapter 02 rewrites the distance so that a dot-product kernel can compute it.

# %%
for b, h in [(1, 1), (1, 16), (4, 16)]:
    longest = math.isqrt(int(available / (3 * bytes_per_score * b * h)))
    print(f"batch={b}, heads={h:>2}: naive RBF attention fits up to N ≈ {longest:,} on this {DEVICE.type}")


# %% [markdown]
# ## Sources and further reading
#
# - PyTorch, `torch.cdist` (https://docs.pytorch.org/docs/stable/generated/torch.cdist.html): the pairwise
#   distance routine of the naive route, and its batched shapes.
# - PyTorch, `torch.cuda.max_memory_allocated`
#   (https://docs.pytorch.org/docs/stable/generated/torch.cuda.max_memory_allocated.html): the allocator's
#   peak that `memory.peak_memory` reads on a GPU.
# - R. Pisoni, https://github.com/4rtemi5/rbf_attention: the RBF-attention experiment whose README
#   names this wall first: computed naively, RBF attention materialises the full $N \times N$ matrix
#   and runs out of memory on longer sequences.
# - T. Dao, D. Y. Fu, S. Ermon, A. Rudra, C. Ré, *FlashAttention: Fast and Memory-Efficient Exact
#   Attention with IO-Awareness* (arXiv:2205.14135): the way out sketched at the end, tiles of keys
#   and a running softmax that never hold the matrix.
