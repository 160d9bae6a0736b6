# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Exclusive self attention: stop sending tokens their own value
#
# **What you will build.** A measurement of the *similarity bias* (attention outputs that point
# along the token's own value) in a small model you train here; exclusive self attention (XSA), a
# two-line projection that removes it, with its gradients written by hand; and the same projection
# written in Triton as the epilogue of chapter 03's forward kernel.
#
# **What you need.** Chapter 03a (the teaching forward kernel), chapter 03b (its backward),
# chapter 04 (registers at the origin, attention sinks), chapter 05 (SuSiE positions). Dot
# products and projections.
#
# **How long.** About 50 minutes with the three exercises. The solved notebook executes in about
# 40 s on a 2-core CPU, most of it training two tiny models.
#
# **Exercises.** Solutions are inline, folded under each exercise (click the cell to unfold it).
# For the exercise-only version run `rbf-tutorial assignments OUT_DIR --chapters 06` and open
# `OUT_DIR/student/06_exclusive_self_attention.ipynb`.

# %%
import math
import time
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import torch

import rbf_tutorial  # noqa: F401  (first: with no GPU it switches Triton to its interpreter)
from rbf_tutorial import checks, data, rbf_attention, viz, xsa
from rbf_tutorial.device import DEVICE, describe, sizes
from rbf_tutorial.model import GPT, ModelConfig

viz.use_style()
print(describe())

# Every size in one place: tiny on a CPU (the chapter runs in about a minute), real on a GPU.
SMALL = not torch.cuda.is_available()
if SMALL:
    # The CPU model's matrices are tiny: one thread trains it nearly as fast as two, and does not
    # slow down tenfold when another process wants the same cores (threads that wait spin).
    torch.set_num_threads(1)
MODEL = ModelConfig(
    context=sizes(cpu=64, gpu=256),
    d_model=sizes(cpu=64, gpu=256),
    n_layers=sizes(cpu=4, gpu=6),
    n_heads=4,
    attention="rbf",
    positional="susie",
    registers=1,
)
TRAIN_STEPS = sizes(cpu=300, gpu=2000)
BATCH_SIZE = sizes(cpu=16, gpu=32)
PEAK_LR = 3e-3
SEED = 0
print(f"SMALL = {SMALL}: {MODEL.n_layers} layers, d_model {MODEL.d_model}, {MODEL.n_heads} heads "
      f"(head dim {MODEL.head_dim}), context {MODEL.context}, {TRAIN_STEPS} steps of {BATCH_SIZE}")

# %% [markdown]
# ## The symptom: an output that points at its own value
#
# An attention head gives token $i$ the output
#
# $$ y_i = \sum_j a_{ij} v_j = a_{ii}\, v_i + \sum_{j \ne i} a_{ij} v_j . $$
#
# The first term is the token's *own* value, which the residual stream already holds in some form
# (the value is a linear map of the same normalised vector that is about to be added back). If
# attention's job is to bring in **context**, that term is wasted capacity. Zhai's *Exclusive
# Self Attention* (arXiv:2603.09078, 2026) measures how much of $y_i$ points along $v_i$,
#
# $$ \cos(y_i, v_i) = \frac{y_i \cdot v_i}{\lVert y_i\rVert\,\lVert v_i\rVert} ,$$
#
# and calls the effect the *attention similarity bias*. Its Figure 1 plots this cosine layer by
# layer in a trained language model, next to the two places it can come from: the weight a token
# puts on itself ($a_{ii}$), and how much the values of *other* tokens resemble its own. (We read
# no numbers off that plot; the paper's language models have up to 2.7B parameters.)
#
# Our models are a million times smaller, so let us measure rather than assume. First, a short
# training loop: byte-level next-token prediction on Python's standard library sources
# (`rbf_tutorial.data`), RBF attention with SuSiE positions and one register per head (chapters
# 04 and 05), AdamW with warm-up and cosine decay. Each batch is a pure function of the step, so
# the two models trained in this chapter see the same bytes in the same order.

# %%
corpus = data.load_corpus()
print(corpus.source)


def learning_rate(step: int) -> float:
    warmup = max(1, TRAIN_STEPS // 10)
    if step < warmup:
        return PEAK_LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, TRAIN_STEPS - warmup)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def validation_loss(model: GPT) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for inputs, targets in data.eval_windows(corpus.val, batch_size=32, context=model.config.context,
                                                 max_batches=sizes(cpu=4, gpu=16), device=DEVICE):
            losses.append(model(inputs, targets)[1].item())
    model.train()
    return sum(losses) / len(losses)


def train_briefly(config: ModelConfig) -> tuple[GPT, float]:
    """Train from a fixed seed for TRAIN_STEPS steps; return the model and its validation loss (nats/byte)."""
    torch.manual_seed(SEED)
    model = GPT(config).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.0)
    started = time.perf_counter()
    for step in range(TRAIN_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        inputs, targets = data.batch_at(corpus.train, step=step, batch_size=BATCH_SIZE,
                                        context=config.context, seed=SEED, device=DEVICE)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=not SMALL):
            _, loss = model(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    val_loss = validation_loss(model)
    print(f"xsa={config.xsa}: {TRAIN_STEPS} steps in {time.perf_counter() - started:.0f} s, "
          f"last training loss {loss.item():.3f}, validation loss {val_loss:.3f} nats/byte "
          f"({val_loss / math.log(2):.2f} bits/byte)")
    return model, val_loss


baseline, baseline_val_loss = train_briefly(MODEL)

# %% [markdown]
# Now read out what attention did. `capture=[]` makes the model record, per layer, the queries,
# keys and values it used and its output before (`y`) and after (`z`) XSA, as detached float32
# copies. `xsa.similarity(y, v)` is the cosine above, per token and head.


# %%
probe_inputs, _ = next(data.eval_windows(corpus.val, batch_size=16, context=MODEL.context,
                                         max_batches=1, device=DEVICE))


def attention_statistics(model: GPT) -> dict[str, list[float]]:
    """Per layer: mean cos(y_i, v_i), mean cos(z_i, v_i), mean weight on the own key, mean register mass."""
    capture = []
    with torch.no_grad():
        model(probe_inputs, capture=capture)
    stats = {"cos(y, v)": [], "cos(z, v)": [], "own-key weight": [], "register mass": []}
    registers = model.config.registers
    for layer in capture:
        cosine = xsa.similarity(layer.y, layer.v)
        # The similarity is a cosine: it must be one, whatever the model learned.
        assert cosine.abs().max() <= 1
        by_hand = (layer.y * layer.v).sum(-1) / (layer.y.norm(dim=-1) * layer.v.norm(dim=-1))
        torch.testing.assert_close(cosine, by_hand, atol=1e-5, rtol=1e-4)
        weights = model.attention_weights(layer)  # (B, H, T, R + T), registers first
        stats["cos(y, v)"].append(cosine.mean().item())
        stats["cos(z, v)"].append(xsa.similarity(layer.z, layer.v).mean().item())
        stats["own-key weight"].append(weights[..., registers:].diagonal(dim1=-2, dim2=-1).mean().item())
        stats["register mass"].append(weights[..., :registers].sum(-1).mean().item())
    return stats


def print_statistics(title: str, stats: dict[str, list[float]]) -> None:
    print(title)
    print("layer  " + "  ".join(f"{name:>14}" for name in stats))
    for layer, row in enumerate(zip(*stats.values(), strict=True)):
        print(f"{layer:>5}  " + "  ".join(f"{value:>14.3f}" for value in row))


torch.manual_seed(SEED)
untrained_stats = attention_statistics(GPT(MODEL).to(DEVICE))
baseline_stats = attention_statistics(baseline)
print_statistics("untrained (same architecture, initial weights)", untrained_stats)
print_statistics("trained, plain attention", baseline_stats)

# %%
layers = np.arange(MODEL.n_layers)
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(layers, untrained_stats["cos(y, v)"], "o--", color="0.6", label="untrained")
ax.plot(layers, baseline_stats["cos(y, v)"], "o-", label="trained")
ax.set_xticks(layers)
ax.set_xlabel("layer")
ax.set_ylabel(r"mean cos($y_i$, $v_i$)")
ax.set_title("Similarity bias, layer by layer")
ax.legend()
plt.show()

# %% [markdown]
# What to make of it. Start with the untrained row. At initialisation queries and keys are nearly
# zero, so every query spreads its weight almost evenly over the keys it can see; early positions
# see few tokens, and the values of neighbouring bytes are alike, so the cosine starts well above
# zero and nearly flat across layers (they all start alike). Training reshapes it, and how the
# trained cosine changes with depth is what the paper's Figure 1 is about. The verdict for this
# run, against the untrained model:

# %%
trained_cosines = baseline_stats["cos(y, v)"]
untrained_cosines = untrained_stats["cos(y, v)"]
rises = all(later > earlier for earlier, later in zip(trained_cosines, trained_cosines[1:], strict=False))
print(f"trained cos(y, v): first layer {trained_cosines[0]:.2f}, last layer {trained_cosines[-1]:.2f}, "
      f"largest in layer {int(np.argmax(trained_cosines))}; rises at every layer: {rises}")
lowered = sum(trained < untrained for trained, untrained in zip(trained_cosines, untrained_cosines, strict=True))
print(f"mean over layers: untrained {np.mean(untrained_cosines):.2f}, trained {np.mean(trained_cosines):.2f}; "
      f"training lowered it in {lowered} of {len(trained_cosines)} layers")

# %% [markdown]
# On a 2-core CPU, when this chapter was written, the untrained cosines were 0.44, 0.44, 0.46 and
# 0.50 and the trained ones 0.20, 0.27, 0.45 and 0.35 (means 0.46 and 0.32): training *lowered*
# the cosine in every layer, and what is left grows over the first three layers, then falls back
# in the last one. So this tiny model shows a similarity bias that training reshapes with depth,
# not one that training creates. Do not read more into it: four layers and a few hundred steps are
# far from the paper's language models, and the shape moves with the seed and the length of
# training. On a GPU the chapter trains a larger model for longer; compare.
#
# The own-key weight column is the first of the two causes: the mass each query puts on its own
# key. It is small next to the cosine, so most of the bias comes from the other tokens' values
# resembling one's own (neighbouring bytes of source code have a lot in common).
#
# ## The fix: project the own value out
#
# XSA keeps only the part of $y_i$ orthogonal to $v_i$:
#
# $$ z_i = y_i - \frac{y_i \cdot v_i}{\lVert v_i \rVert^2}\, v_i , \qquad z_i \cdot v_i = 0 .$$
#
# Per token, per head, over the head dimension; $z$ then goes to the output projection as $y$
# did. No new parameters, one dot product and one scaled subtraction per row.
#
# ### Exercise 1: exclusive self attention
#
# Write `exclusive(y, v)` for `y, v` of shape `(B, H, N, D)`, returning $z$ of the same shape. Two
# lines: the coefficient $c_i = (y_i \cdot v_i) / \lVert v_i \rVert^2$ (keep the last dim so it
# broadcasts), then $y - c\,v$. The check compares with an independent route in float64, confirms
# $z \perp v$, and runs `torch.autograd.gradcheck` on your function. (Its inputs have no zero
# value rows; the library version, `xsa.exclusive`, also handles those.)

# %% nbgrader={"grade": false, "grade_id": "ch06-ex1-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
def exclusive(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    ### BEGIN SOLUTION
    coefficient = (y * v).sum(dim=-1, keepdim=True) / v.square().sum(dim=-1, keepdim=True)
    return y - coefficient * v
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch06-ex1-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.ch06.check_exclusive(exclusive)

# %% [markdown]
# The library's `xsa.exclusive` is the same projection, computed in at least float32 and safe
# where a value is zero (there it leaves $y$ alone, with finite gradients). Orthogonality and
# gradients, checked on random inputs, in float64:

# %%
generator = torch.Generator().manual_seed(1)
y64 = torch.randn(2, 3, 5, 8, generator=generator, dtype=torch.float64, requires_grad=True)
v64 = torch.randn(2, 3, 5, 8, generator=generator, dtype=torch.float64, requires_grad=True)
z64 = xsa.exclusive(y64, v64)
largest_dot = (z64 * v64).sum(-1).abs().max().item()
print(f"largest |z·v| = {largest_dot:.1e}")
assert largest_dot < 1e-12
assert torch.autograd.gradcheck(xsa.exclusive, (y64, v64))
print("gradcheck passed")

# %% [markdown]
# ### Exercise 2: the gradients, by hand
#
# A fused kernel has no autograd inside it: its backward must apply the chain rule itself. With
# $c = (y\cdot v)/s$, $s = v\cdot v$ and $g = \partial L/\partial z$ (one row; drop the index $i$):
#
# - $\partial z/\partial y = I - v v^\top / s$ is a symmetric projector, so
#   $\dfrac{\partial L}{\partial y} = g - d\,v$ with $d = (g\cdot v)/s$: **the incoming gradient,
#   projected the same way**.
# - For $v$, differentiate $z = y - c\,v$ with $\partial c/\partial v = y/s - 2c\,v/s$ and collect
#   the terms. You should find three: one along $g$, one along $y$, one along $v$.
#
# Write `exclusive_backward(y, v, grad_z)` returning `(grad_y, grad_v)` without autograd. The check
# compares both with autograd in float64.

# %% nbgrader={"grade": false, "grade_id": "ch06-ex2-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
def exclusive_backward(y: torch.Tensor, v: torch.Tensor, grad_z: torch.Tensor):
    ### BEGIN SOLUTION
    norm_sq = v.square().sum(dim=-1, keepdim=True)
    c = (y * v).sum(dim=-1, keepdim=True) / norm_sq
    d = (grad_z * v).sum(dim=-1, keepdim=True) / norm_sq
    grad_y = grad_z - d * v
    grad_v = -c * grad_z - d * y + 2 * c * d * v
    return grad_y, grad_v
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch06-ex2-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.ch06.check_exclusive_backward(exclusive_backward)

# %% [markdown]
# One consequence is worth a sentence: $\partial L/\partial y$ has no component along $v_i$. With
# XSA, attention gets *no learning signal at all* for putting $v_i$'s direction into its output,
# so nothing pushes it to. Here it is on the library's version, through autograd:

# %%
grad_z = torch.randn(y64.shape, generator=generator, dtype=torch.float64)
grad_y, grad_v = torch.autograd.grad(xsa.exclusive(y64, v64), (y64, v64), grad_z)
print(f"largest |dL/dy · v| = {(grad_y * v64).sum(-1).abs().max().item():.1e}")
assert (grad_y * v64).sum(-1).abs().max() < 1e-12

# %% [markdown]
# ## Whose value is "own"? Registers and the bottom-right alignment
#
# In the model, keys and values arrive with the registers in front (chapter 04):
# `keys = [r_1 … r_R, k_1 … k_T]`. The causal mask is bottom-right aligned: query $i$ sees key $j$
# iff $j \le i + N_k - N_q$. The same alignment names each query's own value: key
# $i + N_k - N_q$, that is $R + i$. Registers are nobody's own value, and a query's own key is
# always the *last* one it can see. `xsa.own_values(v, n_queries)` picks these rows, and
# `xsa.exclusive_attention` is RBF attention followed by XSA against them. Taking `v[..., :T, :]`
# instead (the first $T$ rows) would pair query $i$ with the value of token $i - R$ (or a register):

# %%
generator = torch.Generator().manual_seed(2)
n_registers, n_tokens, head_dim = 2, 6, 8
q_demo = torch.randn(1, 1, n_tokens, head_dim, generator=generator, dtype=torch.float64)
keys_demo = torch.randn(1, 1, n_registers + n_tokens, head_dim, generator=generator, dtype=torch.float64)
values_demo = torch.randn(1, 1, n_registers + n_tokens, head_dim, generator=generator, dtype=torch.float64)

z_demo = xsa.exclusive_attention(q_demo, keys_demo, values_demo, causal=True, backend="naive")
own = xsa.own_values(values_demo, n_tokens)
torch.testing.assert_close(own, values_demo[..., n_registers:, :])  # rows R .. R+T-1
print("cos(z, own value)        ", xsa.similarity(z_demo, own).flatten().numpy().round(12))
misaligned = values_demo[..., :n_tokens, :]
print("cos(z, misaligned value) ", xsa.similarity(z_demo, misaligned).flatten().numpy().round(3))
assert xsa.similarity(z_demo, own).abs().max() < 1e-12

# %% [markdown]
# ## XSA in the model
#
# `ModelConfig(xsa=True)` applies it in every layer, after attention and before the output
# projection. Same data, same seed, same steps:

# %%
exclusive_model, exclusive_val_loss = train_briefly(replace(MODEL, xsa=True))
exclusive_stats = attention_statistics(exclusive_model)
print_statistics("trained, exclusive self attention (cos(y, v) is measured before the projection)",
                 exclusive_stats)
assert max(abs(c) for c in exclusive_stats["cos(z, v)"]) < 1e-4  # z ⟂ v, up to float32 rounding
for name in ("cos(y, v)", "own-key weight", "register mass"):
    print(f"mean {name:<15} over layers: plain {np.mean(baseline_stats[name]):.3f}, "
          f"XSA {np.mean(exclusive_stats[name]):.3f}")
print(f"\nvalidation loss: plain {baseline_val_loss:.3f}, XSA {exclusive_val_loss:.3f} nats/byte "
      f"(difference {exclusive_val_loss - baseline_val_loss:+.3f}; one seed, one short run)")

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), layout="constrained")
for ax, name in zip(axes, ["cos(y, v)", "own-key weight", "register mass"], strict=True):
    ax.plot(layers, baseline_stats[name], "o-", label="plain")
    ax.plot(layers, exclusive_stats[name], "s-", label="XSA")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_title(name)
axes[0].legend()
plt.show()

# %% [markdown]
# Three things to read in these numbers (on a CPU, when this chapter was written; check yours
# above):
#
# 1. **$z$ is orthogonal to $v$** in every layer, by construction.
# 2. **Before the projection, $y$ leans *more* towards $v_i$ with XSA than without** (0.6–0.8
#    against 0.2–0.45 in the CPU run). Nothing penalises it (exercise 2: the gradient along $v_i$ is zero), and the model
#    uses it, which is the next point.
# 3. **The model moves attention from the register to the token itself.** With XSA, attending to
#    yourself outputs *nothing*, so a query's own key has become a free sink, and the register
#    mass drops while the own-key weight rises: with XSA, the self position is itself a sink.
#
# The loss difference printed above is one seed of a few hundred steps: a hint, not a result.
# Chapter 07 compares variants properly on a GPU.
#
# ## Sinks, registers and XSA
#
# Chapter 04 gave RBF attention a sink: a register at the origin, whose value starts at zero, so a
# query with nothing to look at parks its mass there and adds (almost) nothing. XSA changes the
# arithmetic of sinking in two ways, both visible in one hand-made example. One query, its own
# key, one other token, and one register; we put the weights where we want them:

# %%
own_value = torch.tensor([1.0, 0.0, 0.0])
other_value = torch.tensor([0.6, 0.8, 0.0])
register_value = torch.tensor([0.3, 0.0, 0.5])  # a trained register need not stay at zero

for label, weights in [("all on itself", (0.0, 0.0, 1.0)),
                       ("all on the register", (1.0, 0.0, 0.0)),
                       ("all on the other token", (0.0, 1.0, 0.0)),
                       ("other token = copy of itself", None)]:
    values = torch.stack([register_value, other_value, own_value])
    if weights is None:  # a repeated token: the other value equals the own one
        values, weights = torch.stack([register_value, own_value, own_value]), (0.0, 1.0, 0.0)
    y_row = torch.tensor(weights) @ values
    z_row = xsa.exclusive(y_row.view(1, 1, 1, 3), own_value.view(1, 1, 1, 3)).flatten()
    print(f"{label:<30} y = {y_row.numpy().round(2)}   z = {z_row.numpy().round(2)}")

# %% [markdown]
# - **All on itself:** $y = v_i$, so $z = 0$ exactly. Under XSA the self position is a perfect
#   sink: it needs no register, no training, and costs nothing. That is what the trained model
#   above started to use.
# - **All on the register:** $y = r_v$, the register's value, which is not any token's own value,
#   so XSA removes only the part of $r_v$ along $v_i$. At initialisation $r_v = 0$ and the register
#   is a clean sink with or without XSA; once training moves $r_v$, a register becomes a learned
#   bias added to every query that sinks on it, minus a query-dependent slice. So with XSA the
#   register is no longer *needed* as a sink, and what it still does is carry such a bias.
# - **A copy of itself:** if another token has the same value (a repeated byte, a repeated word),
#   attending to it is as invisible as attending to yourself. A head that wants to say "this token
#   appeared before" cannot say it along $v_i$'s direction; it must use some other direction of
#   the value space.
#
# ## Fused into the kernel's epilogue
#
# Unfused, XSA costs a second pass over the output: read $y$ and $v$ from memory, write $z$, and
# keep $y$ alive for the backward. But the kernel of chapter 03 already holds a block of finished
# output rows $y_i$ in registers at the end of its key loop, and each query's own value is one row
# of $V$, at key $i + N_k - N_q$. So the **epilogue** (the code after the loop, before the store)
# can load that row, compute $c_i = y_i\cdot v_i / \lVert v_i\rVert^2$ and store
# $z_i = y_i - c_i v_i$ directly, and save $c_i$ (one float per query, like the log-sum-exp) for
# the backward. The backward then uses exercise 2: the incoming gradient is projected
# ($\partial L/\partial y = g - d\,v$) before the usual attention backward, and the own value's
# row of $dV$ gets the extra $-c\,g - d\,y + 2cd\,v$.
#
# ### The production kernel's epilogue
#
# Here are those lines in `kernels/`, printed from the kernel's source so they cannot go stale:
# the end of the forward kernel, and the function it calls.

# %%
import inspect

from rbf_tutorial.kernels import exclusive as fused_exclusive
from rbf_tutorial.kernels import forward as fused_forward


def source_lines(function, first: str, last: str) -> str:
    """The lines of a @triton.jit function's source from the one containing ``first`` to ``last``."""
    lines = inspect.getsource(function.fn).splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    end = next(i for i, line in enumerate(lines) if i > start and last in line)
    return "\n".join(lines[start:end + 1])


print(source_lines(fused_forward.rbf_forward_kernel, "out = acc / row_sum", "mask=query_rows < n_queries)"))
print()
print(source_lines(fused_exclusive.remove_own_value, "own = load_tile", "return y - coef"))

# %% [markdown]
# Four steps: find each query's own row (`own_rows`, clamped so rows past the last query read
# nothing), load those value rows as one tile, take two row sums ($y_i\cdot v_i$ and
# $\lVert v_i\rVert^2$), and subtract. The guard `norm_sq > value_eps` leaves a row alone whose
# own value is (nearly) zero, where the direction would be noise and $0/0$ a NaN; `value_eps` is
# `XSA_VALUE_EPS` in `kernels/launch.py`, float32's square root of the smallest normal number,
# about $10^{-19}$. The teaching library has it as `teaching.OWN_VALUE_EPS`.
#
# Chapter 03a's teaching kernel `flash_rbf_kernel` has an `if EXCLUSIVE:` branch in the same place,
# which loads the own value tile and calls a `@triton.jit` function passed in as `REMOVE_OWN`:
#
# ```python
# out = acc / row_sum[:, None]
# if EXCLUSIVE:
#     own_rows = rows + n_keys - n_queries  # query i's own key, bottom-right aligned
#     own_v = tl.load(v_base + own_rows[:, None] * stride_vn, mask=rows[:, None] < n_queries, other=0.0)
#     out = REMOVE_OWN(out, own_v.to(ACC_DTYPE))
# ```
#
# `teaching.flash_rbf_forward(q, k, v, causal, exclusive=True, remove_own=...)` launches it with
# `EXCLUSIVE=True` (and refuses $N_k < N_q$: then some query has no own key).
#
# ### Exercise 3: the epilogue, in Triton
#
# Write the body of `remove_own_value(out, own_v)`. Both are `(BLOCK_M, D)` tiles in the
# accumulator dtype: row $i$ of `out` is the finished output $y_i$, row $i$ of `own_v` its own value
# $v_i$. Return $y_i - (y_i\cdot v_i/\lVert v_i\rVert^2)\,v_i$ for every row, and leave a row
# unchanged where $\lVert v_i\rVert^2 \le$ `OWN_VALUE_EPS` (divide by
# `tl.where(has_direction, norm_sq, 1.0)`, so no row divides by zero). You need
# `tl.sum(x, axis=...)`, `tl.where` and broadcasting with `[:, None]`. Which axis runs along a
# row? The check launches the teaching kernel with your function as its epilogue on ragged shapes,
# causal and not, with more keys than queries, against float64 attention followed by the
# projection; then with float64 inputs, and with one query whose own value is zero.

# %%
import triton
import triton.language as tl

from rbf_tutorial import teaching

OWN_VALUE_EPS = teaching.OWN_VALUE_EPS  # a tl.constexpr: @triton.jit code may read it as a global

# %% nbgrader={"grade": false, "grade_id": "ch06-ex3-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
@triton.jit
def remove_own_value(out, own_v):
    """Each row of ``out`` minus its projection on the same row of ``own_v``; (BLOCK_M, D) tiles."""
    ### BEGIN SOLUTION
    along = tl.sum(out * own_v, axis=1)  # (BLOCK_M,): y_i . v_i
    norm_sq = tl.sum(own_v * own_v, axis=1)  # (BLOCK_M,): |v_i|^2
    has_direction = norm_sq > OWN_VALUE_EPS
    # Divide by 1 where there is no direction, so no row ever computes 0 / 0.
    coefficient = tl.where(has_direction, along / tl.where(has_direction, norm_sq, 1.0), 0.0)
    return out - coefficient[:, None] * own_v
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch06-ex3-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
checks.ch06.check_remove_own_value(remove_own_value)

# %% [markdown]
# Your epilogue inside the kernel, against the two-step route (the same kernel's plain output,
# then the PyTorch projection of exercise 1's library twin, `xsa.exclusive`), on a small batch
# with registers in front. What is left of each output along its own value, $\cos(z_i, v_i)$,
# should be zero up to float32 rounding:

# %%
EPILOGUE_DTYPE = sizes(cpu=torch.float32, gpu=torch.float16)  # the interpreter's tl.dot wants fp32
EPILOGUE_BLOCK = sizes(cpu=16, gpu=64)
epilogue_generator = torch.Generator().manual_seed(5)
n_registers_e, n_tokens_e = 2, sizes(cpu=30, gpu=500)
q_e, k_e, v_e = (torch.randn(2, 2, n, 16, generator=epilogue_generator).to(DEVICE, EPILOGUE_DTYPE)
                 for n in (n_tokens_e, n_registers_e + n_tokens_e, n_registers_e + n_tokens_e))

z_fused, _ = checks.learner_or_reference(
    lambda: teaching.flash_rbf_forward(q_e, k_e, v_e, True, block=EPILOGUE_BLOCK, exclusive=True,
                                       remove_own=remove_own_value),
    lambda: teaching.flash_rbf_forward(q_e, k_e, v_e, True, block=EPILOGUE_BLOCK, exclusive=True),
    uses="your `remove_own_value` (exercise 3)",
)
y_plain, _ = teaching.flash_rbf_forward(q_e, k_e, v_e, True, block=EPILOGUE_BLOCK)
own_e = xsa.own_values(v_e, n_tokens_e)
z_two_step = xsa.exclusive(y_plain, own_e)
checks.assert_close(z_fused, z_two_step, name="fused epilogue", reference="kernel, then xsa.exclusive",
                    **sizes(cpu=dict(atol=1e-5, rtol=1e-5), gpu=dict(atol=5e-3, rtol=5e-3)))
cos_before = xsa.similarity(y_plain.float(), own_e.float())
cos_after = xsa.similarity(z_fused.float(), own_e.float())
print(f"cos(y_i, v_i) before: mean {cos_before.mean().item():+.3f}, largest |.| {cos_before.abs().max().item():.3f}")
print(f"cos(z_i, v_i) after:  mean {cos_after.mean().item():+.1e}, largest |.| {cos_after.abs().max().item():.1e}")
assert cos_after.abs().max() < sizes(cpu=1e-4, gpu=1e-2)  # float32 rounding; fp16 stores on a GPU

# %% [markdown]
# ### The production route, forward and backward
#
# `xsa.exclusive_attention(q, k, v, backend="triton")` runs the fused kernel. It must agree with
# the unfused route, forward and backward. On a CPU both run tiny, the kernel through Triton's
# interpreter in float32:

# %%
FUSED_DTYPE = sizes(cpu=torch.float32, gpu=torch.bfloat16)
batch, heads, n_queries, n_registers, head_dim = sizes(cpu=(1, 2, 20, 1, 16), gpu=(2, 4, 500, 1, 64))
generator = torch.Generator().manual_seed(3)


def random_tensor(*shape):
    return torch.randn(*shape, generator=generator).to(device=DEVICE, dtype=FUSED_DTYPE).requires_grad_(True)


q_f = random_tensor(batch, heads, n_queries, head_dim)
k_f = random_tensor(batch, heads, n_registers + n_queries, head_dim)
v_f = random_tensor(batch, heads, n_registers + n_queries, head_dim)
upstream = torch.randn(batch, heads, n_queries, head_dim, generator=generator).to(DEVICE, FUSED_DTYPE)


def unfused_exclusive_attention(q, k, v):
    y = rbf_attention(q.float(), k.float(), v.float(), causal=True, backend="matmul")
    return xsa.exclusive(y, xsa.own_values(v.float(), q.shape[2]))


results = {}
for name, route in [("fused (triton)", lambda q, k, v: xsa.exclusive_attention(q, k, v, causal=True,
                                                                              backend="triton")),
                    ("unfused (matmul, fp32)", unfused_exclusive_attention)]:
    z = route(q_f, k_f, v_f)
    grads = torch.autograd.grad(z.float(), (q_f, k_f, v_f), upstream.float())
    results[name] = (z, *grads)

tolerance = sizes(cpu=dict(atol=1e-4, rtol=1e-4), gpu=dict(atol=3e-2, rtol=3e-2))
for index, label in enumerate(["z", "dq", "dk", "dv"]):
    checks.assert_close(results["fused (triton)"][index].float(), results["unfused (matmul, fp32)"][index],
                        name=f"fused vs unfused {label}", **tolerance)

# %% [markdown]
# On a GPU, the time it saves. `triton.testing.do_bench` (GPU only) times three things at a
# realistic size: plain RBF attention from the kernel, the kernel followed by `xsa.exclusive` as
# a separate step, and the fused epilogue.

# %%
if SMALL:
    print("Timings need a GPU (triton.testing.do_bench); on this CPU the kernel runs in the interpreter.")
else:
    from triton.testing import do_bench

    B, H, N, D = 4, 16, 4096, 64
    q_b, k_b, v_b = (torch.randn(B, H, N, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
                     for _ in range(3))
    grad_b = torch.randn(B, H, N, D, device=DEVICE, dtype=torch.bfloat16)
    routes = {
        "plain kernel": lambda: rbf_attention(q_b, k_b, v_b, causal=True, backend="triton"),
        "kernel + exclusive": lambda: xsa.exclusive(
            rbf_attention(q_b, k_b, v_b, causal=True, backend="triton"), v_b),
        "fused epilogue": lambda: xsa.exclusive_attention(q_b, k_b, v_b, causal=True, backend="triton"),
    }
    print(f"B={B}, H={H}, N={N}, D={D}, bf16, causal; median milliseconds")
    print(f"{'':<20}{'forward':>10}{'fwd+bwd':>10}")
    timings = {}
    for name, run in routes.items():
        forward_ms = do_bench(run)
        backward_ms = do_bench(lambda run=run: torch.autograd.grad(run(), (q_b, k_b, v_b), grad_b))
        timings[name] = (forward_ms, backward_ms)
        print(f"{name:<20}{forward_ms:>10.3f}{backward_ms:>10.3f}")
    for column, label in enumerate(["forward", "fwd+bwd"]):
        ratio = timings["fused epilogue"][column] / timings["kernel + exclusive"][column]
        overhead = timings["fused epilogue"][column] / timings["plain kernel"][column] - 1
        print(f"{label}: fused / unfused = {ratio:.2f}; fused costs {100 * overhead:+.1f}% over plain attention")

# %% [markdown]
# ## Summary
#
# - **Similarity bias:** attention outputs lean towards the token's own value,
#   $\cos(y_i, v_i) > 0$; the paper's Figure 1 measures it layer by layer in a trained language
#   model. In our tiny model it is there from initialisation (a mean of 0.46 over layers in the
#   CPU run), and training lowered it in every layer (to a mean of 0.32), peaking in layer 2.
# - **XSA** removes it with a projection, $z_i = y_i - (y_i\cdot v_i/\lVert v_i\rVert^2)\, v_i$: no
#   parameters, exact orthogonality. Its backward projects the incoming gradient the same way, so
#   attention gets no signal along $v_i$, and $v$ gets three extra terms on its own row.
# - **Own value** = key $i + N_k - N_q$, the bottom-right alignment that the causal mask uses;
#   registers in front are nobody's own value.
# - **Sinks:** under XSA, attending to yourself outputs zero, so the self position becomes a free
#   sink, and the trained model moved mass there from the register.
# - **Fused:** the projection lives in the kernel's epilogue (one extra row of $V$ per query and one
#   saved float per query). You wrote it in Triton for the teaching kernel; the production kernel's
#   forward and gradients agree with the unfused route.
#
# ## Where this breaks
#
# - **Tiny value vectors.** The projection divides by $\lVert v_i\rVert^2$. Where a value is
#   nearly zero its *direction* is noise, and XSA removes a random direction from $y_i$. The
#   library treats $\lVert v_i\rVert^2$ at or below about $10^{-19}$ as zero (leaves $y_i$ alone);
#   between that and "clearly non-zero" nothing special happens. Trained values are far from zero,
#   so this is a corner, not a common case.
# - **Half precision.** $z$ is computed in float32 and rounded to bfloat16 on the way out; the
#   rounding itself is not orthogonal to $v$:

# %%
generator = torch.Generator().manual_seed(4)
y_half = (torch.randn(1, 4, 256, 64, generator=generator) + torch.randn(1, 4, 256, 64, generator=generator))
v_half = torch.randn(1, 4, 256, 64, generator=generator)
for dtype in (torch.float32, torch.bfloat16):
    z_half = xsa.exclusive(y_half.to(dtype), v_half.to(dtype))
    residual = xsa.similarity(z_half.float(), v_half.to(dtype).float()).abs().max().item()
    print(f"{str(dtype):<16} largest |cos(z, v)| after rounding: {residual:.1e}")

# %% [markdown]
# ## What this chapter does not show
#
# - **What "own" means.** It needs self attention, with one key per query at the bottom-right
#   position. For decoding with a KV cache (one query, many keys) that is the newest key, as it
#   should be. For cross attention (queries and keys from different sequences) there is no own
#   value, and XSA does not apply.
# - **Repeated tokens.** As the hand example showed, a value equal to one's own is invisible after
#   XSA, which can cost a head that wants to detect repetition along that direction.
# - **Our evidence is small.** One seed, a four-layer model on a CPU (six layers on a GPU), a few
#   hundred to a few thousand steps of byte-level Python. The paper evaluates language models of up
#   to 2.7B parameters (its abstract); a difference in loss here says little either way. The sink
#   behaviour (point 3 above) was the clearest effect in our runs.
# - **A fused backward you wrote.** Exercise 3 fuses the forward only; the teaching backward knows
#   nothing of XSA. The production kernels (`kernels/exclusive.py`) do the backward of exercise 2
#   in a small preprocess kernel before the attention backward.

# %% [markdown]
# ## Sources and further reading
#
# - S. Zhai, *Exclusive Self Attention* (arXiv:2603.09078): the similarity bias, measured as
#   $\cos(y_i, v_i)$ per layer in its Figure 1, and the projection $z_i = y_i - (y_i\cdot v_i /
#   \lVert v_i\rVert^2)\, v_i$ this chapter trains with and fuses.
# - R. Pisoni, *Scaled RBF Attention: Trading Dot Products for Euclidean Distance*
#   (https://pisoni.ai/posts/scaled-rbf-attention) and its code
#   (https://github.com/4rtemi5/rbf_attention): RBF attention, the attention every model of this
#   chapter uses.
# - Dao, Fu, Ermon, Rudra and Ré, *FlashAttention* (arXiv:2205.14135): a fused kernel that
#   finishes each output tile in on-chip memory, so work on the finished rows (here XSA) belongs in
#   its epilogue, before the one write to HBM.
# - Triton's fused-attention tutorial
#   (https://triton-lang.org/main/getting-started/tutorials/06-fused-attention.html): the kernel
#   layout that chapter 03's teaching kernel, and so exercise 3's epilogue, follows.
