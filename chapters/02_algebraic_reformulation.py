# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · The algebraic reformulation: a distance in dot-product clothing
#
# **What you will build.** The identity that turns $-\lVert q-k \rVert^2$ into a dot product plus a
# per-key penalty, checked in float64, and where it loses digits; then two ways to run RBF attention
# through PyTorch's fused `scaled_dot_product_attention` (SDPA), each measured for memory, speed and
# bfloat16 error.
#
# **What you need.** Chapter 01 (naive RBF attention and its N² memory), softmax.
#
# **How long.** About 40 minutes to work through; executes in about 10 s on a 2-core CPU,
# about 12 s on an H200.
#
# **Exercises.** Solutions are inline, folded under each exercise; for the exercise-only version run
# `rbf-tutorial assignments OUT_DIR --chapters 02` and open
# `OUT_DIR/student/02_algebraic_reformulation.ipynb`.

# %%
import functools

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch.utils import benchmark

from rbf_tutorial import backends, checks, memory, viz
from rbf_tutorial.device import DEVICE, SMALL, describe, sizes
from rbf_tutorial.memory import format_bytes
from rbf_tutorial.reference import rbf_attention_reference, rbf_logits_reference

viz.use_style()
print(describe())

# All sizes in one place: small on a CPU (seconds), real on a GPU.
# On a GPU the largest route below holds about four 1 GiB N×N matrices: fits a 16 GB card.
batch, heads, n_tokens, head_dim = sizes(cpu=(1, 4, 1024, 64), gpu=(2, 8, 4096, 64))
speed_dtype = sizes(cpu=torch.float32, gpu=torch.bfloat16)  # fused GPU kernels want half precision
dtype_name = str(speed_dtype).removeprefix("torch.")
error_batch, error_heads, error_tokens = sizes(cpu=(1, 4, 512), gpu=(2, 8, 2048))
print(f"SMALL = {SMALL}: batch={batch}, heads={heads}, N={n_tokens}, head_dim={head_dim}")


def random_qkv(batch, heads, n, dim, *, dtype=torch.float32, device=DEVICE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, dim, generator=generator).to(device=device, dtype=dtype)
                 for _ in range(3))


# %% [markdown]
# ## Where we are
#
# Chapter 01 ended at a wall: naive RBF attention holds `(B, H, N, N)` tensors. Dot-product
# attention hit the same wall years ago and got past it with *fused* kernels (FlashAttention and
# friends, all reachable through `F.scaled_dot_product_attention`): they stream keys through in
# tiles, keep a running softmax, and never hold the matrix. Side by side, at the same size:

# %%
q, k, v = random_qkv(batch, heads, n_tokens, head_dim)
one_matrix = batch * heads * n_tokens**2 * 4  # bytes of one (B, H, N, N) float32 tensor
naive_peak = memory.peak_memory(backends.naive_attention, q, k, v)
sdpa_peak = memory.peak_memory(F.scaled_dot_product_attention, q, k, v)
print(f"N = {n_tokens:,}: naive RBF attention {format_bytes(naive_peak)} "
      f"({naive_peak / one_matrix:.2f} N×N matrices), "
      f"SDPA dot-product attention {format_bytes(sdpa_peak)} ({sdpa_peak / one_matrix:.2f})")

# %% [markdown]
# SDPA computes $\operatorname{softmax}(s\, q \cdot k) V$ and nothing else. If we can write the
# RBF score as a dot product, we get its memory for free.
#
# ## The algebra
#
# Expand the square:
#
# $$ \lVert q - k \rVert^2 = (q - k)\cdot(q - k) = \lVert q \rVert^2 - 2\, q \cdot k + \lVert k \rVert^2 , $$
#
# so the RBF logit is
#
# $$ -s \lVert q - k \rVert^2 = s\,\bigl(2\, q \cdot k - \lVert k \rVert^2\bigr) - s \lVert q \rVert^2 . $$
#
# Three terms: a dot product (with $q$ doubled), a penalty that depends on the key alone, and a
# term that depends on the query alone. First, the identity in float64, on random vectors:

# %%
q64, k64, _ = random_qkv(2, 3, 9, 16, dtype=torch.float64, device="cpu", seed=1)
scale = 16**-0.5
true_logits = rbf_logits_reference(q64, k64, scale)  # from the differences q_i - k_j themselves
expanded = (scale * (2 * q64 @ k64.transpose(-2, -1)
                     - k64.square().sum(-1)[..., None, :]
                     - q64.square().sum(-1)[..., :, None]))
checks.assert_close(expanded, true_logits, name="expanded vs -s|q-k|²", atol=1e-12, rtol=1e-12)

# %% [markdown]
# ### Where the expansion loses digits
#
# The identity is exact; its arithmetic is not. The expanded form adds and subtracts
# $\lVert q\rVert^2$, $\lVert k\rVert^2$ and $2\,q\cdot k$, each about $\lVert q\rVert^2$ in size,
# and the answer $\lVert q-k\rVert^2$ can be far smaller than they are. That happens when $q$ and $k$
# are **close to each other and far from the origin**: the three terms nearly cancel, and float32,
# with about 7 significant digits, keeps only what is left of them after rounding. (Far-apart $q$
# and $k$ are harmless: their squared distance is as large as the terms.) Two queries and keys of
# length about 100, in float32, against float64:

# %%
cancel_generator = torch.Generator().manual_seed(4)


def cancel_draw(scale: float) -> torch.Tensor:
    return scale * torch.randn(16, generator=cancel_generator, dtype=torch.float64)


far_out = 100 * torch.nn.functional.normalize(cancel_draw(1.0), dim=0)  # a point of length 100
pairs = {"close to each other, far from the origin": (far_out, far_out + cancel_draw(0.02)),
         "far apart, far from the origin": (far_out, -far_out + cancel_draw(1.0))}
relative_errors = {}
for label, (q_pair, k_pair) in pairs.items():
    exact = (q_pair - k_pair).square().sum().item()  # float64, from the difference itself
    q32, k32 = q_pair.float(), k_pair.float()
    expanded32 = (q32.square().sum() - 2 * q32 @ k32 + k32.square().sum()).item()
    relative_errors[label] = abs(expanded32 - exact) / exact
    print(f"{label:<42} |q-k|² = {exact:11.5f}   float32 expanded: {expanded32:11.5f}   "
          f"absolute error {abs(expanded32 - exact):.1e}, relative {relative_errors[label]:.1e}")
close_error, far_error = relative_errors.values()
assert close_error > 1000 * far_error, "cancellation should hit the close pair, not the far one"

# %% [markdown]
# For the close pair the float32 expansion gets the squared distance wrong by a large fraction of
# itself; for the far pair it is fine. Attention survives this better than the numbers suggest:
# softmax needs each *logit* to within a small absolute error, not each distance to within a small
# relative one, and the absolute error printed above is of order $10^{-3}$ for terms of $10^4$. But any code
# that reads distances themselves off the expanded form (a nearest-neighbour test, a threshold)
# should compute $q - k$ first. Chapter 03's kernel meets the same trade-off inside its tiles.
#
# ## Softmax forgets per-row constants
#
# The query term $-s\lVert q_i \rVert^2$ is the same for every key $j$ that query $i$ looks at.
# Softmax does not see it:
#
# $$ \frac{e^{x_j + c}}{\sum_l e^{x_l + c}} = \frac{e^{c}\, e^{x_j}}{e^{c} \sum_l e^{x_l}}
#    = \frac{e^{x_j}}{\sum_l e^{x_l}} . $$
#
# Numerically, with a different (and large) constant on every row:

# %%
logits = torch.randn(4, 6, dtype=torch.float64)
row_constants = 100 * torch.randn(4, 1, dtype=torch.float64)
print("row constants:", [round(c, 1) for c in row_constants.flatten().tolist()])
checks.assert_close(torch.softmax(logits + row_constants, dim=-1), torch.softmax(logits, dim=-1),
                    name="softmax(x + c) vs softmax(x)", atol=1e-14, rtol=1e-12)

# %% [markdown]
# So we may drop $\lVert q \rVert^2$, and RBF attention becomes
#
# $$ \operatorname{softmax}_j\!\Bigl(s\,\bigl(2\, q_i \cdot k_j - \lVert k_j \rVert^2\bigr)\Bigr) V :$$
#
# dot-product attention with the queries doubled and a *per-key* penalty $-s\lVert k_j\rVert^2$.
# That penalty is what tames chapter 00's bully: a long key pays for its length.
#
# ### Exercise 1: key-norm logits
#
# Write `key_norm_logits(q, k, scale)` returning $s\,(2\, q k^\top - \lVert k \rVert^2)$ with shape
# `(B, H, Nq, Nk)`, from `q (B, H, Nq, D)` and `k (B, H, Nk, D)`. One matrix product and one
# broadcast subtraction (think about which axis $\lVert k_j \rVert^2$ varies along). The check
# also confirms your logits give exactly RBF attention's softmax.

# %% nbgrader={"grade": false, "grade_id": "ch02-ex1-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
def key_norm_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    ### BEGIN SOLUTION
    key_norms = k.square().sum(dim=-1)  # (B, H, Nk)
    return scale * (2 * q @ k.transpose(-2, -1) - key_norms[..., None, :])
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch02-ex1-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.ch02.check_key_norm_logits(key_norm_logits)

# %% [markdown]
# ## Getting $-\lVert k \rVert^2$ into SDPA
#
# SDPA's fused loop computes $s'\, q \cdot k$, optionally adds a mask you pass in, and runs the
# softmax. There are two ways to smuggle in the key penalty.
#
# **Route 1, a float mask (bias).** SDPA accepts `attn_mask`, a float tensor added to the scores.
# Pass $-s\lVert k_j\rVert^2$ with shape `(B, H, 1, Nk)` (it broadcasts over queries) and
# $s' = 2s$. The catch: the fastest kernel (flash) takes no mask, and causal masking has to be
# folded into the same tensor, which then has a row per query: `(B, H, Nq, Nk)`, N² again.
#
# **Route 2, a padded head dimension.** Make the penalty part of the dot product. Give every
# query one extra coordinate and every key one extra coordinate:
#
# $$ q' = [\,q,\; -\tfrac12\,], \qquad k' = [\,k,\; \lVert k \rVert^2\,], \qquad
#    q' \cdot k' = q \cdot k - \tfrac12 \lVert k \rVert^2 , $$
#
# so $2s\, q' \cdot k' = s\,(2 q\cdot k - \lVert k \rVert^2)$: plain SDPA, no mask, flash kernels
# allowed. Flash kernels want the head dimension to be a multiple of 8, so in practice $D+1$
# is zero-padded to $D+8$.
#
# ### Exercise 2: the padded vectors
#
# Write `padded_query_key(q, k)` returning `(q_padded, k_padded)` with one extra column each, such
# that `q_padded @ k_padded.transpose(-2, -1)` equals $2\, q k^\top - \lVert k \rVert^2$ (no scale:
# SDPA applies it). `q_padded` may depend only on `q`, and `k_padded` only on `k`: a fused kernel
# meets them one tile at a time. (`torch.cat` along the last dimension; the factor 2 can go on
# either side.)

# %% nbgrader={"grade": false, "grade_id": "ch02-ex2-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
def padded_query_key(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ### BEGIN SOLUTION
    minus_one = q.new_full((*q.shape[:-1], 1), -1.0)
    q_padded = torch.cat([2 * q, minus_one], dim=-1)
    k_padded = torch.cat([k, k.square().sum(dim=-1, keepdim=True)], dim=-1)
    return q_padded, k_padded
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch02-ex2-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.ch02.check_padded_query_key(padded_query_key)

# %% [markdown]
# The library has both routes, `backends.sdpa_bias_attention` and `backends.sdpa_padded_attention`,
# with signature `(q, k, v, *, causal=False, scale=None)`. The rest of the chapter uses them.
# First, are they right? In float32, against the float64 reference, with and without causal
# masking (query $i$ sees keys $j \le i$ here, as $N_q = N_k$):

# %%
routes = {"SDPA + bias": backends.sdpa_bias_attention, "SDPA + padded": backends.sdpa_padded_attention}
q_small, k_small, v_small = random_qkv(2, 3, 37, 32, seed=2)
for causal in (False, True):
    expected = rbf_attention_reference(q_small, k_small, v_small, causal=causal)
    for name, route in routes.items():
        checks.assert_close(route(q_small, k_small, v_small, causal=causal).cpu(), expected,
                            name=f"{name}, causal={causal}", atol=1e-4, rtol=1e-4)

# %% [markdown]
# ## What each route costs: memory
#
# Peak memory beyond the inputs, in units of one `(B, H, N, N)` float32 matrix, for the routes so
# far and for SDPA's plain dot-product attention (the cost we would like to match):

# %%


def dot_product_sdpa(q, k, v, causal=False):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


all_routes = {
    "dot product (not RBF)": dot_product_sdpa,
    "naive (cdist)": backends.naive_attention,
    "matmul": backends.matmul_attention,
    **routes,
}
peaks = {}
for causal in (False, True):
    for name, route in all_routes.items():
        peaks[name, causal] = memory.peak_memory(functools.partial(route, causal=causal), q, k, v)
        print(f"causal={causal!s:<5}  {name:<22} {format_bytes(peaks[name, causal]):>10}  "
              f"= {peaks[name, causal] / one_matrix:5.2f} N×N matrices")

# %%
figure, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
for ax, causal in zip(axes, (False, True), strict=True):
    viz.plot_bars([name.replace(" (", "\n(") for name in all_routes],
                  [peaks[name, causal] / one_matrix for name in all_routes],
                  ylabel="peak memory (N×N float32 matrices)", value_format="%.2f", ax=ax,
                  title=f"{'Causal' if causal else 'Full'} attention, N={n_tokens:,}, {DEVICE.type}")
plt.show()

# %% [markdown]
# Read the bars as "how many N×N matrices did this route hold at its peak". Anything well below 1
# never held the matrix. Without a causal mask both SDPA routes stay there. With one, the bias
# route has to fold the mask into its bias, one row per query: N² elements on every device. The
# padded route passes PyTorch's bottom-right causal mask object instead, which fused GPU kernels
# apply tile by tile; where SDPA has no such kernel, it expands the mask. The bars show what this
# device does.
#
# ## What each route costs: speed
#
# Wall time per forward call, median of repeated runs (`torch.utils.benchmark`, which waits for
# the GPU to finish). On a GPU this runs at the real sizes above in bfloat16, where the fused
# kernels live; on a CPU the sizes are tiny and the numbers say little about a GPU.

# %%
q_speed, k_speed, v_speed = random_qkv(batch, heads, n_tokens, head_dim, dtype=speed_dtype)
times_ms = {}
for name, route in all_routes.items():
    timer = benchmark.Timer(stmt="route(q, k, v)",
                            globals={"route": route, "q": q_speed, "k": k_speed, "v": v_speed})
    times_ms[name] = timer.blocked_autorange(min_run_time=0.3).median * 1e3
    ratio = times_ms[name] / times_ms["dot product (not RBF)"]
    print(f"{name:<22} {times_ms[name]:8.2f} ms   ({ratio:.2f}× dot product)")

viz.plot_bars([name.replace(" (", "\n(") for name in all_routes], list(times_ms.values()),
              ylabel="time per forward call (ms)", value_format="%.2f",
              title=f"Forward time, B={batch} H={heads} N={n_tokens:,} D={head_dim}, "
                    f"{dtype_name} on {DEVICE.type}")
plt.show()

# %% [markdown]
# What to look for on a GPU: the padded route runs SDPA's flash kernel, but on $D + 8$ columns
# instead of $D$ (12% more work at $D=64$; at $D=128$ the width 136 falls onto the next larger
# kernel size), and it copies $q$, $k$ and $v$ into padded tensors first. The bias route cannot
# use flash at all and reads its mask from memory on every tile.
#
# ## What each route costs: bfloat16 error
#
# Now the inputs are bfloat16, as in training. The reference is the float64 computation *of the
# same bfloat16 inputs*, so input rounding is excluded and what remains is each route's own error.
# We report the relative error $\lVert \text{out} - \text{ref} \rVert / \lVert \text{ref} \rVert$.
# For scale: rounding the exact answer itself to bfloat16 already costs about $2\times10^{-3}$;
# no bfloat16 output can do better.

# %%
q_bf16, k_bf16, v_bf16 = random_qkv(error_batch, error_heads, error_tokens, head_dim,
                                    dtype=torch.bfloat16, seed=3)
reference_out = backends.naive_attention(q_bf16.double(), k_bf16.double(), v_bf16.double())


def relative_error(out: torch.Tensor) -> float:
    return float((out.double() - reference_out).norm() / reference_out.norm())


errors = {
    "SDPA + bias": relative_error(backends.sdpa_bias_attention(q_bf16, k_bf16, v_bf16)),
    "SDPA + padded": relative_error(backends.sdpa_padded_attention(q_bf16, k_bf16, v_bf16)),
    "float32 inside\n(naive route)": relative_error(backends.naive_attention(q_bf16, k_bf16, v_bf16)),
    "exact, rounded\nto bfloat16": relative_error(reference_out.to(torch.bfloat16)),
}
for name, error in errors.items():
    print(f"{name.replace(chr(10), ' '):<30} relative error {error:.2e}")

viz.plot_bars(list(errors), list(errors.values()), ylabel="relative error ‖out − ref‖ / ‖ref‖",
              value_format="%.1e",
              reference_lines={"H100 reference: both SDPA hacks ≈ 8e-3": 8e-3,
                               "H100 reference: fp32-accumulated kernel ≈ 2e-3": 2e-3},
              title=f"bfloat16 output error, N={error_tokens:,}, D={head_dim}, on {DEVICE.type}")
plt.show()

# %% [markdown]
# The dashed lines are the reference figures measured on an H100 for this project: both SDPA
# routes at about $8\times10^{-3}$ relative error in bfloat16, where a kernel that keeps its scores
# in float32 shows about $2\times10^{-3}$, close to the rounding floor. The bars are what this
# device measured just now.
#
# Where do the hacks lose a factor of four? In $\lVert k\rVert^2$. Both routes hand it to SDPA in
# the inputs' dtype: as the bfloat16 mask $-s\lVert k\rVert^2$, or as the bfloat16 extra column.
# bfloat16 keeps 8 significant bits, and $\lVert k\rVert^2 \approx D = 64$ is *large*: near 64 the
# spacing between bfloat16 numbers is 0.5. The rounding error lands directly in each key's logit:

# %%
norms = backends.key_norms(k_bf16)  # float32, (B, H, Nk)
attention_scale = head_dim**-0.5
logit_errors = attention_scale * (norms.to(torch.bfloat16).float() - norms)
print(f"|k|² ranges over [{norms.min():.1f}, {norms.max():.1f}]")
print(f"logit error from rounding s·|k|² to bfloat16: typical {logit_errors.abs().mean():.4f}, "
      f"largest {logit_errors.abs().max():.4f}")
largest_weight_error = logit_errors.abs().max().exp() - 1
print(f"-> each key's weight is off by a factor e^error: up to {100 * largest_weight_error:.1f}%")

# %% [markdown]
# A logit error $\epsilon$ multiplies that key's weight by $e^\epsilon \approx 1 + \epsilon$: a
# per-key error of about 1%, fixed by the key and not averaged away. A kernel that computes
# $\lVert k \rVert^2$ in float32 from the tile it already holds never rounds it.
#
# (Here $s = 1/8$ is a power of two, so rounding $s\lVert k\rVert^2$ for the bias and
# $\lVert k\rVert^2$ for the padded column makes exactly the same error: that is why the two
# routes' errors coincide.)
#
# (The library's padded route has a partial repair, `split_norms=True`: it stores
# $\lVert k\rVert^2$ as a bfloat16 high part plus a bfloat16 remainder in two columns, which the
# kernel's float32 accumulation adds back together. It recovers the accuracy and keeps the cost
# in width.)

# %%
split_error = relative_error(backends.sdpa_padded_attention(q_bf16, k_bf16, v_bf16, split_norms=True))
print(f"SDPA + padded, split norms: relative error {split_error:.2e}")

# %% [markdown]
# ## Why a fused kernel of our own
#
# SDPA's fused loop knows one score: $s\, q \cdot k$, plus whatever it reads from a mask. To subtract
# $\lVert k\rVert^2$ inside that loop we had to either
#
# - **pass a bias**: a tensor read from memory, in the inputs' precision, that rules out the flash
#   kernel and, once causal masking joins it, has N² elements again; or
# - **pad the head dimension**: an extra column in the inputs' precision, $D + 8$ columns of work
#   and memory traffic for $q$, $k$ and $v$, and extra copies to build them.
#
# Both put $\lVert k\rVert^2$ through bfloat16, costing about 4× the error of a float32-accumulated
# kernel. What we want is simple to say: load a tile of keys into fast on-chip memory, compute their
# norms there in float32, subtract them from the tile's scores, and carry on with the online
# softmax. No N² tensor, no padding, no rounded norms. Chapter 03 writes that kernel in Triton.
#
# ## Summary
#
# - $-\lVert q-k\rVert^2 = 2\,q\cdot k - \lVert k\rVert^2 - \lVert q\rVert^2$, exactly (checked to
#   $10^{-12}$ in float64), and softmax ignores the per-query $-\lVert q\rVert^2$.
# - So RBF attention is dot-product attention with doubled queries and a per-key penalty.
# - Through SDPA that penalty goes in as a float mask or as an extra head-dim column. Both avoid
#   N² memory without causal masking. Both round $\lVert k\rVert^2$ to bfloat16: the H100
#   reference puts them at ≈8e-3 relative error against ≈2e-3 for a float32-accumulated kernel,
#   and the bars above are this device's own measurement. Each has its own speed cost on a GPU.
#
# ## Where this breaks
#
# - **Cancellation.** The expanded form subtracts large numbers that nearly cancel when $q \approx k$
#   far from the origin: for $q$ and $k$ of length 100 and $\lVert q - k\rVert \approx 0.06$, the
#   terms are about $10^4$ and float32 gets their small difference wrong by a large fraction of
#   itself (measured above). Tolerable for softmax logits, which need a small absolute error; not for
#   computing distances themselves.
# - **bfloat16 penalties.** Any route that stores $\lVert k\rVert^2$ in bfloat16 rounds it by up
#   to $\lVert k\rVert^2 / 256$ (0.25 near 64): about 4× the output error of a float32 kernel.
# - **Causal masks.** A bias has one row per query once causality is folded in: N² elements,
#   exactly what we set out to avoid.

# %% [markdown]
# ## Sources and further reading
#
# - R. Pisoni, *Scaled RBF Attention: Trading Dot Products for Euclidean Distance*
#   (https://pisoni.ai/posts/scaled-rbf-attention/) and https://github.com/4rtemi5/rbf_attention:
#   the expansion $-\lVert q-k\rVert^2 = -\lVert q\rVert^2 + 2q\cdot k - \lVert k\rVert^2$ and the
#   observation that softmax drops the query term, leaving dot-product attention with a built-in
#   penalty on the key norms.
# - PyTorch, `torch.nn.functional.scaled_dot_product_attention`
#   (https://docs.pytorch.org/docs/stable/generated/torch.nn.functional.scaled_dot_product_attention.html):
#   the fused routine both routes go through, its `attn_mask` and `scale` arguments, and its
#   choice among flash, memory-efficient and math kernels.
# - T. Dao, D. Y. Fu, S. Ermon, A. Rudra, C. Ré, *FlashAttention* (arXiv:2205.14135), and T. Dao,
#   *FlashAttention-2* (arXiv:2307.08691): the fused, tiled kernels that SDPA's flash backend is built
#   on, and the reason a mask or an odd head dimension costs speed.
