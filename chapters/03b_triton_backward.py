# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03b · A fused RBF-attention kernel in Triton: the backward pass
#
# **What you will build.** The two backward kernels of the RBF flash kernel, writing their key
# lines yourself inside `@triton.jit` functions: dK with the extra term the key norms add, and the
# dQ loop. Then a PyTorch operator around your kernels that autograd, `gradcheck` and
# `torch.compile` all accept, and a look at how the production kernel compares with its peers.
#
# **What you need.** Part 03a (the forward kernel, its tiles and its log-sum-exp); the chain rule
# through a softmax.
#
# **How long.** About an hour with the two exercises. The solved notebook executes in about 15 s
# on a 2-core CPU, where every kernel runs through Triton's interpreter at tiny sizes, and in about
# 35 s on an H200, compiling its kernels included.
#
# **Exercises.** Solutions are inline, folded under each exercise (click the cell to unfold it).
# For the exercise-only version run `rbf-tutorial assignments OUT_DIR --chapters 03b` and open
# `OUT_DIR/student/03b_triton_backward.ipynb`.

# %% [markdown]
# ## Setup
#
# As in 03a, `import rbf_tutorial` comes before `import triton`, and every size is picked here from
# the device: tiny and fp32 under the CPU interpreter, real and fp16 on a GPU.

# %%
import rbf_tutorial  # first, before triton: with no GPU visible it switches Triton to its interpreter

print("Triton kernels will run:", rbf_tutorial.runtime.kernel_mode())

# %%
import math

import matplotlib.pyplot as plt
import torch
import triton
import triton.language as tl

from rbf_tutorial import bench, checks, teaching, teaching_plots
from rbf_tutorial.device import DEVICE, SMALL, describe, sizes
from rbf_tutorial.reference import causal_visibility, rbf_attention_reference
from rbf_tutorial.teaching import key_range  # 03a's exercise 3, finished
from rbf_tutorial.viz import use_style

use_style()
print(describe())

torch.manual_seed(0)
DTYPE = sizes(cpu=torch.float32, gpu=torch.float16)  # the interpreter's tl.dot is only right in fp32
BATCH, HEADS = 1, 2
N_QUERIES, N_KEYS = sizes(cpu=(37, 45), gpu=(449, 517))  # deliberately not multiples of a tile
HEAD_DIM = sizes(cpu=16, gpu=64)
BLOCK = sizes(cpu=16, gpu=64)
SCALE = 1 / math.sqrt(HEAD_DIM)
LOG2_E = math.log2(math.e)
TOLERANCE = sizes(cpu=dict(atol=2e-5, rtol=2e-5), gpu=dict(atol=5e-3, rtol=5e-3))
GRAD_TOLERANCE = sizes(cpu=dict(atol=1e-4, rtol=1e-4), gpu=dict(atol=3e-2, rtol=3e-2))


def random_qkv(n_queries=N_QUERIES, n_keys=N_KEYS, dtype=DTYPE):
    """Random (B, H, N, D) queries, keys and values on DEVICE: never zeros, never a lucky layout."""
    shape = (BATCH, HEADS)
    return tuple(torch.randn(*shape, n, HEAD_DIM, device=DEVICE).to(dtype) for n in (n_queries, n_keys, n_keys))


# %% [markdown]
# ## Where 03a left off
#
# 03a built the forward kernel from three pieces. This notebook starts from the finished version,
# `teaching.flash_rbf_forward`: the same kernel with the solutions of 03a's exercises (a test keeps
# the library's copy and 03a's solutions identical). It returns the output and, per query row, the
# base-2 log-sum-exp of the logits, $\mathrm{lse}_{2,i} = \log_2 \sum_j 2^{s_{ij}}$ with
# $s_{ij} = \text{scale}\,\log_2 e\,(2\,q_i\cdot k_j - \|k_j\|^2)$. Both, checked against float64:

# %%
q, k, v = random_qkv()
out, lse = teaching.flash_rbf_forward(q, k, v, causal=True, block=BLOCK)
checks.assert_close(out, rbf_attention_reference(q, k, v, causal=True), name="03a's forward, causal",
                    **TOLERANCE)

q64, k64 = q.double().cpu(), k.double().cpu()
logits2 = SCALE * LOG2_E * (2 * q64 @ k64.transpose(-1, -2) - k64.square().sum(-1)[..., None, :])
logits2 = logits2.masked_fill(~causal_visibility(N_QUERIES, N_KEYS), float("-inf"))
checks.assert_close(lse, torch.logsumexp(logits2 * math.log(2), dim=-1) / math.log(2),
                    name="its base-2 log-sum-exp", **TOLERANCE)

# %% [markdown]
# ## 1. The gradients
#
# Training needs $\partial L/\partial q$, $\partial L/\partial k$ and $\partial L/\partial v$, given
# the upstream gradient $dO = \partial L/\partial O$. Write the forward pass as three steps, row by
# row (natural units here; the kernels convert with $\log_2 e$):
#
# $$S_{ij} = \text{scale}\,(2\,q_i\cdot k_j - \|k_j\|^2),\qquad P_{ij} = \frac{e^{S_{ij}}}{\sum_l e^{S_{il}}},
# \qquad O_i = \sum_j P_{ij}\, v_j .$$
#
# **Through $O = PV$.** $dV = P^\top dO$, and $dP = dO\,V^\top$, i.e. $dP_{ij} = dO_i\cdot v_j$.
#
# **Through softmax.** For one row, $\partial P_{ij}/\partial S_{il} = P_{ij}(\delta_{jl} - P_{il})$, so
#
# $$dS_{ij} = P_{ij}\Big(dP_{ij} - \sum_l P_{il}\, dP_{il}\Big) = P_{ij}\,(dP_{ij} - \Delta_i).$$
#
# The row constant is cheaper than it looks:
# $\Delta_i = \sum_l P_{il}\,(dO_i\cdot v_l) = dO_i\cdot \sum_l P_{il} v_l = dO_i \cdot O_i$. One dot
# product per query, from two tensors we already have, and no pass over the keys. It is computed
# once, before the backward kernels.
#
# **Through the logits.** $S_{ij}$ depends on $q_i$ through $2\,\text{scale}\,q_i\cdot k_j$, and on
# $k_j$ through both terms:
#
# $$dq_i = 2\,\text{scale}\sum_j dS_{ij}\, k_j,\qquad
# dk_j = 2\,\text{scale}\sum_i dS_{ij}\, q_i \;-\; 2\,\text{scale}\Big(\sum_i dS_{ij}\Big)k_j .$$
#
# In matrices, $dQ = 2\,\text{scale}\; dS\,K$ and $dK = 2\,\text{scale}\,(dS^\top Q - \mathrm{colsum}(dS)
# \odot K)$. The last term is what the key norms add: dot-product attention has no such term.
#
# **Recomputing $P$.** The forward kernel kept no $P$; that was the point. It kept the log-sum-exp,
# so any tile of probabilities comes back in one step, $P_{ij} = 2^{\,s_{ij} - \mathrm{lse}_{2,i}}$,
# with no running maximum: the row's normaliser is already known.

# %% [markdown]
# ## 2. Who writes which gradient
#
# $dK_j$ and $dV_j$ are sums over *queries*; $dQ_i$ is a sum over *keys*. A program that owns one
# key tile can keep its $dK$ and $dV$ in registers while it walks down all the query tiles, and
# write them once at the end. But every key tile contributes to every $dQ_i$, so somebody has to
# add up contributions that are computed in different programs. There are two ways to do it.
#
# - **Atomic adds.** FlashAttention-2's backward (the CUDA code in the flash-attention repository,
#   which PyTorch's flash backend uses) runs one program per key tile and adds each tile's share of
#   $dQ$ into a float32 buffer in HBM with `atomicAdd`. One pass over the tiles. The price: the
#   programs add in whatever order they happen to finish, and float addition is not associative,
#   so $dQ$ differs in its last bits from run to run; and the float32 accumulator is a
#   $(B, N, H, D)$ buffer twice the size of a bf16 $dQ$, converted in an extra step at the end. For
#   `torch.use_deterministic_algorithms(True)`, PyTorch's flash backward allocates several such
#   buffers and sums them in a fixed order instead.
# - **A second pass.** Triton's fused-attention tutorial avoids atomics: $dK, dV$ come from a loop
#   over query tiles, and $dQ$ from a separate loop over key tiles that recomputes $P$ and $dS$
#   once more. No two programs write the same row, so the result is deterministic and no float32
#   buffer is needed; the price is the recomputation, seven matrix products per tile pair instead
#   of five.
#
# The teaching kernels take the second way, as two kernels: `rbf_dkdv_kernel` (one program per key
# tile) and `rbf_dq_kernel` (one program per query tile). Both mask every tile they visit, to stay
# short, but skip the tiles causality hides entirely: dQ ends its key loop at the forward's `hi`,
# and dK/dV starts its query loop at the first query tile that sees the key tile (`query_start`).
# Which tiles each program visits, for a causal problem with more keys than queries (tiles of 8,
# drawn from the same bound functions the kernels call):

# %%
MAP_QUERIES, MAP_KEYS, MAP_BLOCK = 37, 50, 8
visits = teaching_plots.tile_visits(MAP_QUERIES, MAP_KEYS, MAP_BLOCK, MAP_BLOCK)
teaching_plots.tile_visit_figure(visits, MAP_QUERIES, MAP_KEYS, MAP_BLOCK, MAP_BLOCK)
plt.show()

# %% [markdown]
# The forward and dQ programs walk right along their row of tiles; the dK/dV programs walk down
# their column, starting at the first query tile that sees any of their keys. All three visit the
# same tiles; only the forward knows which of them need no mask.
#
# The two kernels share the recomputation of one tile, `probabilities_and_ds`: the RBF logits from
# the tile's keys (their norms in SRAM, as in 03a's exercise 1), $P$ from the saved log-sum-exp,
# $dP = dO\,V^\top$ and $dS = P \odot (dP - \Delta)$. The kernels load $k$ and $v$ the natural way
# round, `(keys, D)`, because $dQ \mathrel{+}= dS\,K$ wants them so, and transpose in registers with
# `tl.trans` where a product needs $K^\top$.

# %%
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
def query_start(first_key, n_queries, n_keys, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """The first query tile (as a row index) that sees any key of the key tile starting at ``first_key``."""
    lo = 0
    if CAUSAL:  # query i sees key first_key from i = first_key - (n_keys - n_queries) on
        lo = tl.minimum(tl.maximum(first_key + n_queries - n_keys, 0), n_queries)
        lo = (lo // BLOCK_M) * BLOCK_M
    return lo


# %% [markdown]
# ### Exercise 1: dK, with the key-norm term
#
# `rbf_dkdv_kernel` below is complete except for the lines that update `dk` inside the query loop.
# Write them: per query tile, `dk` gains $dS^\top Q - \mathrm{colsum}(dS) \odot k$, in `ACC_DTYPE`.
# The factor $2\,\text{scale}$ is applied once, after the loop. Shapes: `ds` is
# `(BLOCK_M, BLOCK_N)` in `ACC_DTYPE`, `q` is `(BLOCK_M, D)` and `k` is `(BLOCK_N, D)`, both in the
# input dtype. As with $dV$ two lines above, multiply in the input dtype
# (`tl.dot(tl.trans(ds).to(q.dtype), q)`) and convert the product to `ACC_DTYPE`. The column sums
# of `ds` are one number per key. The check launches your kernel on 03a's forward output, causal
# and not, with $N_q \ne N_k$ both ways, and compares dK and dV with float64 autograd.

# %% nbgrader={"grade": false, "grade_id": "ch03b-ex1-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
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
        ### BEGIN SOLUTION
        k_acc = k.to(ACC_DTYPE)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q).to(ACC_DTYPE) - tl.sum(ds, axis=0)[:, None] * k_acc
        ### END SOLUTION

    dk = 2.0 * scale * dk
    tl.store(dK + kv_offsets, dk.to(dK.dtype.element_ty), mask=keys[:, None] < n_keys)
    tl.store(dV + kv_offsets, dv.to(dV.dtype.element_ty), mask=keys[:, None] < n_keys)


# %% nbgrader={"grade": true, "grade_id": "ch03b-ex1-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
checks.ch03.check_dkdv_kernel(rbf_dkdv_kernel)

# %% [markdown]
# ### Exercise 2: the dQ loop
#
# `rbf_dq_kernel` owns one query tile: it loads $q$, $dO$, the log-sum-exp and $\Delta$ once, then
# walks the key tiles up to the forward's `hi`. Write the body of that loop: the key indices of the
# tile (`start_n + tl.arange(0, BLOCK_N)`), `k` and `v` loaded as `(BLOCK_N, D)` tiles with the same
# offsets and mask as in `rbf_dkdv_kernel` (the last key tile may hang over `n_keys`), $dS$ from
# `probabilities_and_ds` (the kernel does not need $P$ itself), and `dq` gaining $dS\,K$, multiplied
# in the input dtype and converted to `ACC_DTYPE`. The store after the loop applies $2\,\text{scale}$.

# %% nbgrader={"grade": false, "grade_id": "ch03b-ex2-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
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
        ### BEGIN SOLUTION
        keys = start_n + tl.arange(0, BLOCK_N)
        kv_offsets = z * stride_kz + keys[:, None] * stride_kn + dims[None, :] * stride_kd
        k = tl.load(K + kv_offsets, mask=keys[:, None] < n_keys, other=0.0)
        v = tl.load(V + kv_offsets, mask=keys[:, None] < n_keys, other=0.0)
        _, ds = probabilities_and_ds(q, k, v, do, lse, delta, rows, keys, n_queries, n_keys, qk_scale,
                                     CAUSAL, ACC_DTYPE)
        dq += tl.dot(ds.to(k.dtype), k).to(ACC_DTYPE)  # dS K
        ### END SOLUTION

    tl.store(dQ + q_offsets, (2.0 * scale * dq).to(dQ.dtype.element_ty), mask=rows[:, None] < n_queries)


# %% nbgrader={"grade": true, "grade_id": "ch03b-ex2-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
checks.ch03.check_dq_kernel(rbf_dq_kernel)

# %% [markdown]
# The host side computes $\Delta$ and launches both kernels, one program per key tile for dK/dV
# and one per query tile for dQ (`teaching.flash_rbf_backward`, which takes the two kernels as
# arguments). With *your* kernels, against float64 autograd through the reference, which knows
# nothing of tiles, log-sum-exps or $\Delta$, causal and not, with $N_q \ne N_k$ both ways:

# %%
def backward_with_your_kernels(grad_out, q, k, v, out, lse, causal, scale=None):
    """(dq, dk, dv) from the forward's output and log-sum-exp, through exercises 1 and 2."""
    return teaching.flash_rbf_backward(grad_out, q, k, v, out, lse, causal, scale, dkdv_kernel=rbf_dkdv_kernel,
                                       dq_kernel=rbf_dq_kernel, block=BLOCK)


def check_backward(n_queries, n_keys, causal):
    q_c, k_c, v_c = random_qkv(n_queries, n_keys)
    grad_out = torch.randn_like(q_c)
    out_c, lse_c = teaching.flash_rbf_forward(q_c, k_c, v_c, causal, block=BLOCK)
    grads = checks.learner_or_reference(
        lambda: backward_with_your_kernels(grad_out, q_c, k_c, v_c, out_c, lse_c, causal),
        lambda: teaching.flash_rbf_backward(grad_out, q_c, k_c, v_c, out_c, lse_c, causal, block=BLOCK),
        uses="your `rbf_dkdv_kernel` and `rbf_dq_kernel` (exercises 1 and 2)",
    )
    leaves = [x.detach().double().cpu().requires_grad_() for x in (q_c, k_c, v_c)]
    expected = torch.autograd.grad(rbf_attention_reference(*leaves, causal=causal), leaves,
                                   grad_out.double().cpu())
    print(f"Nq={n_queries} Nk={n_keys} causal={causal}")
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected, strict=True):
        checks.assert_close(got, want, name=f"  {name}", reference="float64 autograd", **GRAD_TOLERANCE)


for shape in [(N_QUERIES, N_KEYS, False), (N_QUERIES, N_KEYS, True), (N_KEYS, N_QUERIES, True)]:
    check_backward(*shape)

# %% [markdown]
# ## 3. The autograd operator
#
# Kernels are not yet something a model can call: autograd must know that our backward belongs to
# our forward, and `torch.compile` must be able to trace a model that uses them. `torch.library`
# does both in three moves:
#
# 1. `custom_op` turns a Python function into an operator that PyTorch treats as one opaque unit
#    (the compiler never looks inside at the Triton launch);
# 2. `register_fake` says what the operator returns, shapes and dtypes only, so the compiler can
#    trace without running anything;
# 3. `register_autograd` names the backward, with a `setup_context` that saves what it needs.
#
# The forward operator returns the log-sum-exp next to the output, so the backward has it; the
# backward is an operator of its own for the same reason the forward is. The forward is 03a's
# kernel, the backward is yours.

# %%
@torch.library.custom_op("rbf_tutorial_ch03b::forward", mutates_args=())
def chapter_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return teaching.flash_rbf_forward(q, k, v, causal, scale, block=BLOCK)


@chapter_forward.register_fake
def _(q, k, v, causal, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32  # the accumulator's
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op("rbf_tutorial_ch03b::backward", mutates_args=())
def chapter_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, causal: bool,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward_with_your_kernels(grad_out, q, k, v, out, lse, causal, scale)


@chapter_backward.register_fake
def _(grad_out, q, k, v, out, lse, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def chapter_autograd_backward(ctx, grad_out, grad_lse):  # one gradient per output; lse has none
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = chapter_backward(grad_out.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None  # one per input: causal and scale get none


chapter_forward.register_autograd(chapter_autograd_backward, setup_context=setup_context)


def chapter_attention(q, k, v, causal=False):
    """RBF attention through 03a's forward and your backward kernels, as a PyTorch operator."""
    return chapter_forward(q, k, v, causal, 1 / math.sqrt(q.shape[-1]))[0]


# %% [markdown]
# Now `loss.backward()` just works. In float32 against the float64 reference, and then the checks
# PyTorch itself offers: `torch.library.opcheck` tests the registration (that the fake function
# agrees with the real one, that autograd is wired, that the schema is honest about mutation).

# %%
def loss_gradients(attention, q, k, v):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    attention(*leaves, causal=True).square().sum().backward()
    return [leaf.grad for leaf in leaves]


q_c, k_c, v_c = random_qkv()
grads = checks.learner_or_reference(
    lambda: loss_gradients(chapter_attention, q_c, k_c, v_c),
    lambda: loss_gradients(teaching.rbf_attention, q_c, k_c, v_c),
    uses="your backward kernels (exercises 1 and 2) through `chapter_attention`",
)
leaves = [x.detach().double().cpu().requires_grad_() for x in (q_c, k_c, v_c)]
rbf_attention_reference(*leaves, causal=True).square().sum().backward()
for name, grad, leaf in zip(("q.grad", "k.grad", "v.grad"), grads, leaves, strict=True):
    checks.assert_close(grad, leaf.grad, name=name, reference="float64 autograd", **GRAD_TOLERANCE)

opcheck_args = (q_c, k_c, v_c, True, SCALE)
opcheck_tests = ("test_schema", "test_autograd_registration", "test_faketensor")
checks.learner_or_reference(
    lambda: torch.library.opcheck(chapter_forward, opcheck_args, test_utils=opcheck_tests),
    lambda: torch.library.opcheck(torch.ops.rbf_tutorial_teaching.forward, opcheck_args, test_utils=opcheck_tests),
    uses="`chapter_forward`",
)
print("✓ opcheck: schema, autograd registration and fake tensors")

# %% [markdown]
# ### gradcheck, on the operator itself
#
# The final test of a backward pass is `torch.autograd.gradcheck`: it nudges every input by a tiny
# $\epsilon$, measures how the output moves, and compares that numerical Jacobian with the one the
# backward computes. Finite differences need float64 to mean anything, and this is where the
# kernels' `ACC_DTYPE` pays off: with float64 inputs every kernel accumulates in float64, so
# gradcheck tests *these* kernels, not a stand-in. (On a GPU, `tl.dot` of float64 runs on the
# double-precision units: slow, and fine at this size.) `fast_mode` checks the Jacobian along random
# directions rather than entry by entry: the same test in a fraction of the time.

# %%
gradcheck_inputs = [torch.randn(1, 2, n, 16, device=DEVICE, dtype=torch.float64, requires_grad=True)
                    for n in (7, 9, 9)]


def gradcheck_both_masks(attention):
    for causal in (False, True):
        passed = torch.autograd.gradcheck(lambda q, k, v, causal=causal: attention(q, k, v, causal=causal),
                                          gradcheck_inputs, fast_mode=True)
        print(f"✓ gradcheck in float64 (Nq=7, Nk=9, causal={causal}): {passed}")


checks.learner_or_reference(
    lambda: gradcheck_both_masks(chapter_attention),
    lambda: gradcheck_both_masks(teaching.rbf_attention),
    uses="your backward kernels (exercises 1 and 2) through `chapter_attention`",
)

# %% [markdown]
# ### torch.compile, without a graph break
#
# A model compiled with `torch.compile(fullgraph=True)` must not fall back to Python around the
# attention: `fullgraph=True` turns every graph break into an error. The compiler traces the
# operator through its fake function and keeps the Triton launches opaque, so a small block (a
# projection, attention, a loss) compiles as one graph, forward and backward. On a GPU this uses
# the default backend, Inductor; on a CPU, `aot_eager`, which traces the same graphs (forward and
# backward) without generating code, enough to prove there is no break.

# %%
COMPILE_BACKEND = "aot_eager" if SMALL else "inductor"
projection = torch.randn(HEAD_DIM, HEAD_DIM, device=DEVICE, dtype=DTYPE) / math.sqrt(HEAD_DIM)


def attention_block(attention, q, k, v):
    return attention(q @ projection, k, v, causal=True).float().square().mean()


def compiled_against_eager(attention):
    torch._dynamo.reset()  # a fresh compile, so the graph is traced here and now
    compiled = torch.compile(lambda q, k, v: attention_block(attention, q, k, v), fullgraph=True,
                             backend=COMPILE_BACKEND)
    eager_leaves = [x.detach().clone().requires_grad_() for x in (q_c, k_c, v_c)]
    compiled_leaves = [x.detach().clone().requires_grad_() for x in (q_c, k_c, v_c)]
    attention_block(attention, *eager_leaves).backward()
    compiled(*compiled_leaves).backward()
    for name, a, b in zip(("dq", "dk", "dv"), compiled_leaves, eager_leaves, strict=True):
        checks.assert_close(a.grad, b.grad, name=f"compiled {name}", reference="eager", **GRAD_TOLERANCE)


checks.learner_or_reference(
    lambda: compiled_against_eager(chapter_attention),
    lambda: compiled_against_eager(teaching.rbf_attention),
    uses="your backward kernels (exercises 1 and 2) through `chapter_attention`",
)
print(f"✓ torch.compile(fullgraph=True, backend={COMPILE_BACKEND!r}): one graph, forward and backward")

# %% [markdown]
# The production operator in `kernels/op.py` is wrapped the same way, around the production
# kernels; `rbf_tutorial.rbf_attention(..., backend="triton")` calls it.
#
# ## 4. How fast is it?
#
# Correct is only half the point: the kernel exists to be fast. `rbf-tutorial bench` (on a GPU)
# times the production kernel side by side with its peers in one run: FlexAttention with a
# key-norm `score_mod`, chapter 02's two SDPA routes and the naive `cdist` one, and plain
# dot-product attention through PyTorch's flash and cuDNN kernels as the speed references. Every
# method gets the same bf16 inputs (batch 4, heads × D = 1024) and the same FLOP count; the time is
# the median of `triton.testing.do_bench`, and "×flash" is a method's time over dot-product
# flash's time in the same cell. The package ships one recorded run; `docs/results/` has all of
# its tables. The headline numbers, read from it:

# %%
SHOWN = ["rbf-triton", "rbf-flex", "dot-sdpa-flash", "dot-sdpa-cudnn"]
results, run = bench.load_results()  # the run recorded on a GPU that ships with the package
results = [r for r in results if r.method in SHOWN]
print(f"{run['device']}, torch {run['torch']}, triton {run['triton']}, {run['date'][:10]}")


def time_ratios(method, mode, long_sequences):
    """The method's time over flash's, in every cell of one mode at N >= 4096 (or below)."""
    return [r.ratio_to_flash for r in results if r.method == method and r.mode == mode and r.ok
            and (r.seq_len >= 4096) == long_sequences]


print(f"\n{'time / dot-product flash':<30}{'N >= 4096':>16}{'N < 4096':>16}")
for method in ("rbf-triton", "rbf-flex", "dot-sdpa-cudnn"):
    for mode in ("fwd", "fwd+bwd"):
        spans = [time_ratios(method, mode, long) for long in (True, False)]
        cells = [f"{min(s):.2f}-{max(s):.2f}x" if s else "-" for s in spans]
        print(f"{method + ', ' + mode:<30}{cells[0]:>16}{cells[1]:>16}")

# %%
bench.time_ratio_figure(results, title=f"Time over dot-product flash attention, bf16, {run['device']}")

# %% [markdown]
# What to read off it:
#
# - **Long sequences** are where the kernel is meant to shine: the key norms cost one vector per
#   key tile, so the RBF kernel should take about the time of dot-product flash attention. One
#   refinement over the kernel you wrote: every query tile recomputes the same key norms, so from
#   2048 queries on the package computes them once, in a small kernel of their own
#   (`kernels/key_norms.py`), and the forward reads them. On the H200 that took the non-causal
#   forward at N = 16384 from 12.6 to 11.7 ms (D = 64).
# - **FlexAttention** with the same `score_mod`, compiled with `dynamic=False` as its users would,
#   is the real peer: the compiler writes a fused kernel from the `score_mod`, much as this chapter
#   did by hand. In the recorded run it is slower than this kernel in forward + backward in every
#   cell, and close in the forward at long sequences, where it ties the non-causal cell at
#   N = 16384, D = 64 (`docs/results/kernel-benchmark-h200.md` has every number).
# - **cuDNN** runs dot-product attention faster still, using Hopper features (TMA copies, warp
#   specialisation) this kernel does not: the distance still to go.
# - **Short sequences** are a different story: there the GPU work is a fraction of a millisecond,
#   and the host decides. The forward keeps up with flash, because the host work of a call is
#   done once per problem: its launches, every argument but the tensors worked out, are kept per
#   shape (`kernels/launch.py`) and made without Triton's per-call dispatch
#   (`kernels/direct_launch.py`). Forward +
#   backward still pays for autograd's hand-over to its backward thread and the kernel's Python
#   there, which varies from run to run, so the N = 1024 cells move between runs more than the
#   long ones.
#
# **Memory.** Beyond the inputs, the kernel's forward + backward holds the output, two floats per
# query (the log-sum-exp and $\Delta$) and the three gradients. PyTorch's flash backward holds more:
# the float32 dQ accumulator its atomic adds go into (`dq_accum` in its `mha_bwd`), and contiguous
# copies of $O$ and $dO$ (it calls `.contiguous()` on both, which copies when, as here, SDPA hands
# it `(B, N, H, D)` views of `(B, H, N, D)` tensors). The arithmetic for one cell of the recorded
# run, against what was measured:

# %%
cell = next(r for r in results if r.method == "rbf-triton" and r.mode == "fwd+bwd" and r.ok
            and r.head_dim == 64 and r.seq_len == 4096 and not r.causal)
flash_cell = next(r for r in results if r.method == "dot-sdpa-flash" and r.cell == cell.cell)
mib = 2**20
tensor = cell.batch * cell.heads * cell.seq_len * cell.head_dim * 2 / mib  # one bf16 (B, H, N, D) tensor
per_query = cell.batch * cell.heads * cell.seq_len * 4 / mib  # one float32 per query
ours = tensor + 2 * per_query + 3 * tensor  # output; lse and delta; dq, dk, dv
flash = tensor + 2 * per_query + 2 * tensor + 2 * tensor + 3 * tensor  # ... + fp32 dq_accum, O and dO copies
print(f"{cell.cell.describe()}, batch {cell.batch}, {cell.heads} heads: one bf16 tensor is {tensor:.0f} MiB")
print(f"RBF kernel:        predicted {ours:6.1f} MiB, measured {cell.peak_mib:6.1f} MiB")
print(f"dot-product flash: predicted {flash:6.1f} MiB, measured {flash_cell.peak_mib:6.1f} MiB")

# %% [markdown]
# Whatever the timing, two promises must hold for the recorded run, and the next cell checks them
# in the numbers just shown: bf16 output within 2.5e-3 of the float32 reference, and no more memory
# than dot-product flash attention (plus 10%). To measure on your own GPU: `rbf-tutorial bench`.

# %%
kernel_cells = [r for r in results if r.method == "rbf-triton" and r.ok]
flash_memory = {r.cell: r.peak_mib for r in results if r.method == "dot-sdpa-flash" and r.ok}
assert kernel_cells, "the recorded benchmark holds no rbf-triton results"
worst_error = max(r.rel_err for r in kernel_cells)
assert worst_error <= 2.5e-3, f"bf16 relative error {worst_error:.1e} exceeds 2.5e-3"
for r in kernel_cells:
    assert r.peak_mib <= 1.1 * flash_memory[r.cell], f"{r.cell}: {r.peak_mib:.0f} MiB vs flash's"
print(f"✓ worst bf16 relative error {worst_error:.1e}; memory within flash's in all {len(kernel_cells)} cells")

# %% [markdown]
# ## Summary
#
# - **Backward** recomputes $P$ from the saved log-sum-exp, uses $\Delta_i = dO_i\cdot O_i$, and gives
#   $k$ one extra term, $-2\,\text{scale}\,(\sum_i dS_{ij})\,k_j$: the gradient of the key norms.
# - $dK, dV$ are sums over queries, $dQ$ a sum over keys. FlashAttention-2 adds dQ up with atomic adds
#   into a float32 buffer (one pass, nondeterministic summation order); these kernels recompute in
#   a second kernel (deterministic, seven matrix products per tile pair instead of five).
# - `torch.library.custom_op` + `register_fake` + `register_autograd` make the kernels an operator that
#   autograd, `opcheck`, float64 `gradcheck` and `torch.compile(fullgraph=True)` all accept: you just
#   ran each of them on your own kernels.
# - The production kernel's speed and memory against its peers come from a recorded run, not from
#   this notebook: speed is measured on a GPU, never asserted.
#
# ## Where this breaks
#
# **Cancellation in $2\,q\cdot k - \|k\|^2$.** The expansion is exact algebra but not exact
# arithmetic. RBF attention does not care where the origin is (shift every query and key by the
# same vector $c$ and no distance changes), but the expanded logits do: $\|k\|^2$ grows like
# $\|c\|^2$ while the differences softmax needs stay the same size, and float32 keeps only about
# seven digits. The largest error in the attention weights of one tile, computed in float32 the
# kernel's way, as the whole cloud of points moves away from the origin:

# %%
def kernel_way_weights(q_tile, k_tile, scale):
    """Softmax of the expanded logits, computed in float32 as the kernel computes them."""
    q32, k32 = q_tile.float(), k_tile.float()
    return torch.softmax(scale * (2 * q32 @ k32.T - k32.square().sum(dim=1)[None, :]), dim=1)


q_tile, k_tile = torch.randn(16, 16, dtype=torch.float64), torch.randn(16, 16, dtype=torch.float64)
direction = torch.randn(16, dtype=torch.float64)
direction /= direction.norm()
print("|shift|    max weight error (float32, expanded logits)")
for distance in (0, 10, 100, 1_000, 10_000):
    shift = distance * direction
    exact = torch.softmax(-0.25 * torch.cdist(q_tile, k_tile) ** 2, dim=1)
    approx = kernel_way_weights(q_tile + shift, k_tile + shift, 0.25)
    print(f"{distance:>6}    {(approx.double() - exact).abs().max().item():.1e}")

# %% [markdown]
# The error grows like the square of the shift, a hundredfold per factor of ten, from float32's
# best near the origin to weights that are visibly wrong a thousand units out, and noise ten
# thousand out. (bf16 inputs lose the small differences sooner still, whatever the method: the
# inputs themselves are rounded.) Activations of a trained model are normalised and live near the
# origin, which is why this rarely bites; when it does, the cure is free: subtract a common centre,
# say the keys' mean, from queries and keys before attention.
#
# **The rest, honestly:**
#
# - The teaching backward masks every tile it visits and recomputes every tile of $P$ twice, once
#   per kernel: the price of never storing $P$, paid in full. `kernels/` splits its loops as the
#   forward does.
# - Triton's interpreter runs each program one after another: the CPU numbers in this notebook say
#   the kernels are right, nothing about their speed.
# - The memory arithmetic above is for PyTorch's flash backend as SDPA calls it; other layouts or
#   versions may avoid the copies.

# %% [markdown]
# ## Sources and further reading
#
# - Dao, Fu, Ermon, Rudra and Ré, *FlashAttention: Fast and Memory-Efficient Exact Attention with
#   IO-Awareness* (arXiv:2205.14135): recomputing the attention tiles in the backward pass from the
#   saved softmax statistics instead of storing them.
# - Dao, *FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning*
#   (arXiv:2307.08691): the backward pass parallel over key tiles; its code
#   (https://github.com/Dao-AILab/flash-attention, `csrc/flash_attn/src/flash_bwd_kernel.h`) adds
#   dQ with atomic adds into a float32 accumulator.
# - PyTorch's flash-attention backward
#   (https://github.com/pytorch/pytorch/blob/main/aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp,
#   `mha_bwd`, and `attention_backward.cu` next to it): the `dq_accum` buffer, its deterministic
#   variant, and the contiguous copies of the memory arithmetic.
# - Triton's fused-attention tutorial
#   (https://triton-lang.org/main/getting-started/tutorials/06-fused-attention.html): the
#   atomic-free backward, dK/dV over query tiles and dQ in a second loop, with $\Delta$ computed
#   first.
# - Milakov and Gimelshein, *Online normalizer calculation for softmax* (arXiv:1805.02867): the
#   statistics the saved log-sum-exp summarises.
# - PyTorch's custom operators (https://docs.pytorch.org/docs/stable/library.html):
#   `torch.library.custom_op`, `register_fake`, `register_autograd` and `opcheck`.
# - Triton-Puzzles (https://github.com/srush/Triton-Puzzles): learning Triton by writing kernels
#   under the CPU interpreter.
# - R. Pisoni, *Scaled RBF Attention: Trading Dot Products for Euclidean Distance*
#   (https://pisoni.ai/posts/scaled-rbf-attention) and https://github.com/4rtemi5/rbf_attention:
#   RBF attention and its Triton kernel, which this tutorial builds on.
