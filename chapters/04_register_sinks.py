# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Register sinks: somewhere to put attention that has nowhere to go
#
# **What you will build:** the attention sink of dot-product attention, made by hand and measured;
# the reason RBF attention has none; registers at the origin that give it one, with the exact
# condition for a key to beat them; and a measurement of softmax's selectivity limit for both scores.
#
# **What you need:** chapter 00 (RBF scores), chapter 02 ($-\lVert q-k\rVert^2 = 2q\cdot k - \lVert k\rVert^2 - \lVert q\rVert^2$),
# softmax, and causal masks.
#
# **How long:** about 40 minutes.

# %%
import math

import matplotlib.pyplot as plt
import torch

from rbf_tutorial import checks, viz
from rbf_tutorial.device import SMALL, describe, sizes
from rbf_tutorial.reference import rbf_attention_reference
from rbf_tutorial.registers import RegisterTokens, attend_with_registers, attention_weights, register_weights

viz.use_style()
print(describe())

# All sizes in one place. Everything before the last section is a hand-built toy and runs in
# milliseconds anywhere; the selectivity experiment at the end grows on a GPU.
selectivity_keys, selectivity_trials = sizes(cpu=(256, 32), gpu=(2048, 64))
print(f"SMALL = {SMALL}: selectivity experiment with N = {selectivity_keys} keys, "
      f"{selectivity_trials} queries per point")

# %% [markdown]
# ## The sink in dot-product attention
#
# Softmax must hand out all of its mass. A head whose query finds nothing useful in the sequence
# still has to put 100% of its weight *somewhere*. Trained dot-product models settle this the
# same way again and again: one token (often the first) gets a key that is long and points
# roughly where the queries point. Its score $q \cdot k_\text{sink}$ is then high for *every*
# query, and a query with nothing better to do sends its mass there: an **attention sink**.
#
# We build that situation by hand, in $D = 32$ dimensions, with one head:
#
# - **12 queries** share a mean direction $m$ (length 2 along it) and each has its own
#   direction on top (length 6). Queries 0–5 are **busy**: each has a key of its own, a noisy copy
#   of itself. Queries 6–11 are **lonely**: nothing in the sequence is meant for them.
# - **16 keys**: the **sink**, a key of length 12 along $m$; the 6 busy keys; and 9 **junk** keys
#   of length 6 in directions of their own.
#
# The directions are orthonormal (from a QR decomposition), plus a little noise everywhere, so
# the numbers below are easy to reason about.

# %%
head_dim = 32
scale = head_dim**-0.5  # the usual 1/sqrt(D), for both scores
n_busy, n_lonely, n_junk = 6, 6, 9
mean_length, own_length, junk_length, sink_length, noise = 2.0, 6.0, 6.0, 12.0, 0.15

generator = torch.Generator().manual_seed(0)
directions = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64))[0].T
mean_direction = directions[0]
query_directions = directions[1 : 1 + n_busy + n_lonely]
junk_directions = directions[1 + n_busy + n_lonely : 1 + n_busy + n_lonely + n_junk]


def jitter(rows: int) -> torch.Tensor:
    return noise * torch.randn(rows, head_dim, generator=generator, dtype=torch.float64)


queries = mean_length * mean_direction + own_length * query_directions + jitter(n_busy + n_lonely)
busy_keys = queries[:n_busy] + jitter(n_busy)
junk_keys = junk_length * junk_directions + jitter(n_junk)
sink_key = sink_length * mean_direction + jitter(1)[0]
keys = torch.cat([sink_key[None], busy_keys, junk_keys])
values = torch.randn(len(keys), head_dim, generator=generator, dtype=torch.float64)

busy, lonely = slice(0, n_busy), slice(n_busy, n_busy + n_lonely)
SINK = 0
own_key = torch.arange(n_busy) + 1  # busy query i's key sits at index i + 1
query_labels = [f"busy {i}" for i in range(n_busy)] + [f"lonely {i}" for i in range(n_lonely)]
key_labels = ["sink"] + [f"busy {i}" for i in range(n_busy)] + [f"junk {i}" for i in range(n_junk)]
print(f"queries {tuple(queries.shape)}, keys {tuple(keys.shape)}, "
      f"|q| ≈ {queries.norm(dim=-1).mean():.2f}, |sink key| = {sink_key.norm():.2f}")

# %% [markdown]
# Dot-product attention, $\operatorname{softmax}_j(s\, q_i \cdot k_j)$ with $s = 1/\sqrt{D}$:

# %%
dot_weights = torch.softmax(scale * queries @ keys.T, dim=-1)
dot_sink_mass = dot_weights[:, SINK]
dot_own_mass = dot_weights[busy].gather(1, own_key[:, None]).squeeze(1)
print("mass on the sink, lonely queries:", [round(x, 2) for x in dot_sink_mass[lonely].tolist()])
print("mass on the sink, busy queries:  ", [round(x, 2) for x in dot_sink_mass[busy].tolist()])
print("busy queries, mass on own key:   ", [round(x, 2) for x in dot_own_mass.tolist()])
assert (dot_sink_mass[lonely] > 0.5).all(), "every lonely query should put most of its mass on the sink"
assert (dot_own_mass > 0.9).all(), "every busy query should still attend to its own key"

# %% [markdown]
# Every lonely query puts more than half of its mass on the sink; the busy queries ignore it
# and attend to their own keys. That is what a sink is for: a default that costs nothing when
# there is real work. A heatmap shows it as one bright column:


# %%
def plot_weights(weights: torch.Tensor, columns: list[str], *, title: str, ax=None):
    """A queries × keys heatmap of attention weights, on a shared 0-to-1 colour scale."""
    ax = ax or plt.subplots(figsize=(7, 4))[1]
    image = ax.imshow(weights.detach().numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=8)
    ax.set_yticks(range(len(query_labels)), query_labels, fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)
    ax.grid(False)
    return image


figure, ax = plt.subplots(figsize=(7.5, 4.2))
image = plot_weights(dot_weights, key_labels, title="Dot-product attention: lonely queries use the sink", ax=ax)
figure.colorbar(image, ax=ax, label="attention weight")
plt.show()

# %% [markdown]
# ## The same tokens under RBF: no sink
#
# Now score the very same queries and keys by distance, $-s\lVert q_i - k_j \rVert^2$
# (`attention_weights` from `rbf_tutorial.registers` computes the map from the differences
# themselves). The sink key is long, so it is *far from everybody*:
#
# $$ \lVert q - L m \rVert^2 = \lVert q \rVert^2 - 2L\, q\cdot m + L^2 , $$
#
# and the $L^2$ grows faster than the $2L\,q\cdot m$ that made it attractive under the dot product.

# %%
rbf_weights = attention_weights(queries[None, None], keys[None, None], scale=scale)[0, 0]
sink_distance = (queries - sink_key).norm(dim=-1)
print(f"|q - k_sink| for the queries: {sink_distance.min():.1f} to {sink_distance.max():.1f} "
      f"(|q| is about {queries.norm(dim=-1).mean():.1f})")
print(f"largest RBF weight of the sink key, over all 12 queries: {rbf_weights[:, SINK].max():.1e}")
assert (rbf_weights[:, SINK] < 1e-3).all(), "the long key should be worthless to every query under RBF"

rbf_own_mass = rbf_weights[busy].gather(1, own_key[:, None]).squeeze(1)
lonely_largest = rbf_weights[lonely].max(dim=-1).values
print("busy queries, mass on own key:       ", [round(x, 3) for x in rbf_own_mass.tolist()])
print("lonely queries, their largest weight:", [round(x, 2) for x in lonely_largest.tolist()])
assert (rbf_own_mass > 0.99).all()
assert (lonely_largest < 0.5).all(), "with no sink, a lonely query's mass is spread over unrelated keys"

# %%
figure, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
plot_weights(dot_weights, key_labels, title="Dot product", ax=axes[0])
image = plot_weights(rbf_weights, key_labels, title="RBF: no sink, lonely rows smeared", ax=axes[1])
figure.colorbar(image, ax=axes, label="attention weight")
plt.show()

# %% [markdown]
# The busy queries are fine (even better: all of their mass is on their own keys). The lonely
# queries are the problem. They still have to spend their mass, and with no sink they spread it
# over junk and other queries' keys, none getting more than half. Their output is a blend of
# values that have nothing to do with them, and the layers above have to undo it.
#
# Could some *other* key serve as an RBF sink? Slide the sink along the mean direction, from the
# origin outwards, and measure the lonely queries' mass on it under both scores:

# %%
lengths = torch.linspace(0, 16, 33).tolist()
sink_mass_by_length = {"dot": [], "rbf": []}
for length in lengths:
    moved_keys = keys.clone()
    moved_keys[SINK] = length * mean_direction
    dot = torch.softmax(scale * queries[lonely] @ moved_keys.T, dim=-1)
    rbf = attention_weights(queries[None, None, lonely], moved_keys[None, None], scale=scale)[0, 0]
    sink_mass_by_length["dot"].append(dot[:, SINK].mean().item())
    sink_mass_by_length["rbf"].append(rbf[:, SINK].mean().item())

best = max(range(len(lengths)), key=lambda i: sink_mass_by_length["rbf"][i])
print(f"RBF: the sink works best at length {lengths[best]:.1f} "
      f"(mass {sink_mass_by_length['rbf'][best]:.2f}); at length {sink_length:.0f} it gets "
      f"{sink_mass_by_length['rbf'][lengths.index(sink_length)]:.1e}")
print(f"dot: mass {sink_mass_by_length['dot'][0]:.2f} at length 0, "
      f"{sink_mass_by_length['dot'][-1]:.2f} at length {lengths[-1]:.0f}")
assert lengths[best] <= mean_length + 1, "under RBF, the good sink sits near the origin"
assert sink_mass_by_length["dot"] == sorted(sink_mass_by_length["dot"]), "dot: longer is always better"

fig, ax = plt.subplots()
ax.plot(lengths, sink_mass_by_length["dot"], color=viz.COLORS["dot"], label="dot product")
ax.plot(lengths, sink_mass_by_length["rbf"], color=viz.COLORS["rbf"], label="RBF")
ax.axvline(mean_length, color=viz.COLORS["fit"], ls=":", label="the queries' centre along m")
ax.set_xlabel("sink key length L along the mean query direction (unitless)")
ax.set_ylabel("lonely queries' mass on the sink")
ax.set_title("Where a sink key works")
ax.legend()
plt.show()

# %% [markdown]
# Two opposite shapes. Under the dot product the sink gets better the longer it is: length is
# free, so gradient descent finds it. Under RBF a sink only works *short*, in the middle of the
# queries, close to the origin; past that it drops to nothing. (Here the queries all have about
# the same length, $\sqrt{2^2 + 6^2} \approx 6.3$, so the origin is nearly as far from every
# one of them: no query is favoured.)
#
# ## The origin, and when a key beats it
#
# Chapter 02 split the RBF logit into three parts:
#
# $$ -s\lVert q - k \rVert^2 = s\,(2\,q\cdot k - \lVert k\rVert^2) - s\lVert q\rVert^2 , $$
#
# and softmax ignores the last one. So every key's *effective* logit is $s\,(2\,q\cdot k - \lVert k\rVert^2)$.
# For a key at the origin, $k = 0$, that is **exactly zero, for every query**. The origin is the
# one place whose score does not depend on the query at all: a fixed bar that each query's real
# keys either clear or not. (In the full form, its logit $-s\lVert q - 0\rVert^2 = -s\lVert q\rVert^2$
# is the query's own length: that is the distance the real keys must beat.)
#
# A key $k$ beats a register at the origin when its logit is higher:
#
# $$ -s\lVert q-k\rVert^2 > -s\lVert q\rVert^2
#    \iff \lVert q - k\rVert < \lVert q\rVert
#    \iff 2\,q\cdot k > \lVert k\rVert^2 . $$
#
# Geometrically: draw the ball centred on the query that passes through the origin. Keys inside
# it beat the register; keys outside lose to it. A query close to the origin (short) has a small
# ball and is easily satisfied with "nothing"; a long query has a large one.

# %%
query_2d = torch.tensor([2.0, 1.0], dtype=torch.float64)
keys_2d = torch.tensor([[2.6, 1.8], [1.0, 0.2], [3.8, -0.4], [-1.0, 1.5], [5.0, 3.5]], dtype=torch.float64)
inside = (keys_2d - query_2d).norm(dim=-1) < query_2d.norm()

fig, ax = plt.subplots(figsize=(5, 5))
ax.add_patch(plt.Circle(query_2d.tolist(), query_2d.norm().item(), color=viz.COLORS["rbf"], alpha=0.12,
                        label="|q − k| < |q|: beats the register"))
ax.plot(*query_2d.tolist(), "o", color=viz.COLORS["query"], ms=9, label="query q")
ax.plot(0, 0, "s", color=viz.COLORS["dot"], ms=9, label="register at the origin")
ax.plot(*keys_2d[inside].T.tolist(), "^", color="#55a868", ms=9, label="keys that win")
ax.plot(*keys_2d[~inside].T.tolist(), "v", color="#8c8c8c", ms=9, label="keys that lose")
ax.set_xlim(-2, 5.5)
ax.set_ylim(-2, 5.5)
ax.set_aspect("equal")
ax.set_xlabel("dimension 1 (unitless)")
ax.set_ylabel("dimension 2 (unitless)")
ax.set_title("The ball through the origin")
ax.legend(loc="upper left", fontsize=8)
plt.show()

# %% [markdown]
# ### Exercise 1: which keys beat the register?
#
# Write `key_beats_register(q, k)`: `q` has shape `(..., Nq, D)`, `k` has shape `(..., Nk, D)`;
# return a **bool** tensor of shape `(..., Nq, Nk)`, True where key $j$ scores higher than a
# register at the origin for query $i$. (Either form of the condition works; pairing every query
# with every key is `q[..., :, None, :] - k[..., None, :, :]`.)

# %% nbgrader={"grade": false, "grade_id": "ch04-ex1-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def key_beats_register(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    ### BEGIN SOLUTION
    distances = (q[..., :, None, :] - k[..., None, :, :]).norm(dim=-1)  # (..., Nq, Nk)
    return distances < q.norm(dim=-1)[..., :, None]
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch04-ex1-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.ch04.check_key_beats_register(key_beats_register)

# %% [markdown]
# On our tokens, with the condition written out (so that the rest of the chapter runs whether
# or not the exercise is done): the busy queries' own keys clear the bar, and for the lonely
# queries no key does.

# %%
beats = (queries[:, None, :] - keys[None, :, :]).norm(dim=-1) < queries.norm(dim=-1)[:, None]
print("keys that beat the register, per query:", beats.sum(dim=-1).tolist())
assert beats[busy].gather(1, own_key[:, None]).all(), "each busy query's own key beats the register"
assert not beats[lonely].any(), "no key beats the register for a lonely query"

nearest_key = (queries[:, None, :] - keys[None, :, :]).norm(dim=-1).min(dim=-1).values
margin = nearest_key[lonely] / queries[lonely].norm(dim=-1)
print(f"lonely queries: nearest key {margin.min():.2f}× to {margin.max():.2f}× as far as the origin")
assert (margin > 1.2).all()

# %% [markdown]
# ## How much mass the register gets
#
# Put one register $r = 0$ in front of the keys. In effective logits the register scores $0$ and
# key $j$ scores $s\,(2\,q\cdot k_j - \lVert k_j\rVert^2)$, so the register's weight is
#
# $$ w_\text{reg}(q) = \frac{e^{0}}{e^{0} + \sum_j e^{\,s\,(2\,q\cdot k_j - \lVert k_j\rVert^2)}}
#    = \frac{1}{1 + \sum_j e^{-s\,(\lVert q-k_j\rVert^2 - \lVert q\rVert^2)}} . $$
#
# Each key that loses to the register (farther than $\lVert q\rVert$) adds less than 1 to the
# denominator, and much less once it is clearly farther; each key that wins adds more than 1.
#
# ### Exercise 2: the register's weight, in closed form
#
# Write `register_weight(q, k, scale)`: `q (B, H, Nq, D)`, `k (B, H, Nk, D)`, returning
# `(B, H, Nq)`, the softmax weight of one register at the origin in front of the keys. The check
# compares it with the library's `register_weights`, which materialises the whole map.

# %% nbgrader={"grade": false, "grade_id": "ch04-ex2-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def register_weight(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    ### BEGIN SOLUTION
    key_logits = scale * (2 * q @ k.transpose(-2, -1) - k.square().sum(dim=-1)[..., None, :])
    return 1 / (1 + torch.exp(key_logits).sum(dim=-1))
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch04-ex2-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.ch04.check_register_weight(register_weight)

# %% [markdown]
# (The closed form overflows when a key is very close to a very long query: `exp` of a large
# effective logit. Written as a softmax over `[0, logits]`, it cannot. Softmax subtracts the
# largest logit first.)
#
# ## Registers at the origin, on our tokens
#
# `RegisterTokens(num_heads, head_dim)` holds one key and one value per head, both zero at
# initialisation, and `attention_weights(q, k, registers)` returns the map with the register as
# column 0. Same tokens as before, plus one register:

# %%
registers = RegisterTokens(num_heads=1, head_dim=head_dim).double()
# .detach(): the register is a trainable parameter, so its weights carry autograd history.
with_register = attention_weights(queries[None, None], keys[None, None], registers, scale=scale)[0, 0].detach()
register_mass = with_register[:, 0]
own_mass_with_register = with_register[busy].gather(1, own_key[:, None] + 1).squeeze(1)
print("register mass, lonely queries:  ", [round(x, 3) for x in register_mass[lonely].tolist()])
print("register mass, busy queries:    ", [round(x, 4) for x in register_mass[busy].tolist()])
print("busy queries, mass on own key:  ", [round(x, 3) for x in own_mass_with_register.tolist()])
print(f"sink key's weight, largest: {with_register[:, 1 + SINK].max():.1e}")
assert (register_mass[lonely] > 0.9).all(), "lonely queries should park their mass on the register"
assert (register_mass[busy] < 0.01).all() and (own_mass_with_register > 0.99).all()

# the library's per-register helper gives the same column
library_column = register_weights(queries[None, None], keys[None, None], registers, scale=scale)[0, 0, :, 0]
assert torch.allclose(library_column.detach(), register_mass)

# %%
figure, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
plot_weights(rbf_weights, key_labels, title="RBF, no register", ax=axes[0])
image = plot_weights(with_register, ["register"] + key_labels, title="RBF with a register at the origin",
                     ax=axes[1])
figure.colorbar(image, ax=axes, label="attention weight")
plt.show()

# %% [markdown]
# The lonely rows now go to the register, the busy rows are unchanged: a sink that takes only
# what is left over, as the dot-product sink did, but placed by the geometry rather than by a key
# learning to be loud.
#
# What do lonely queries *output*? The register's value starts at zero, so the mass they give it
# contributes nothing: their output shrinks towards zero ("I found nothing") instead of being a
# blend of junk. Training may later give the register a value of its own.

# %%
q4, k4, v4 = queries[None, None], keys[None, None], values[None, None]
output_without = rbf_attention_reference(q4, k4, v4, scale=scale)[0, 0]
output_with = attend_with_registers(q4, k4, v4, registers, scale=scale, backend="naive")[0, 0].detach()
value_size = values.norm(dim=-1).mean()
print(f"typical |value|: {value_size:.2f}")
print("lonely outputs |y|, no register:  ", [round(x, 2) for x in output_without[lonely].norm(dim=-1).tolist()])
print("lonely outputs |y|, with register:", [round(x, 2) for x in output_with[lonely].norm(dim=-1).tolist()])
print(f"busy outputs, largest change from the register: {(output_with - output_without)[busy].abs().max():.1e}")
assert (output_with[lonely].norm(dim=-1) < 0.1 * value_size).all()
assert torch.allclose(output_with[busy], output_without[busy], atol=0.05 * value_size)

# %% [markdown]
# ## Registers and the causal mask
#
# In a language model query $i$ may only see keys $j \le i$. Registers go *in front* of the keys,
# and the library's causal mask is bottom-right aligned: with $N_k$ keys and $N_q$ queries,
# query $i$ sees key $j$ iff $j \le i + N_k - N_q$. Put $R$ registers in front and $N_k$ grows
# by $R$: every query's window grows by $R$ at the front, so the registers are visible to every
# query, *including the first*, and the real keys' mask is unchanged.
#
# ### Exercise 3: attention with a register, by hand
#
# Write `attention_with_register(q, k, v, register_key, register_value, *, scale, causal)`:
# `q (B, H, Nq, D)`, `k (B, H, Nk, D)`, `v (B, H, Nk, Dv)`, one register key `(D,)` and value
# `(Dv,)` shared by all batches and heads. Put the register in front (`expand` and `torch.cat`
# on dim 2), compute $-s\lVert q - k'\rVert^2$, mask with the bottom-right rule when `causal`
# (hidden logits to `-inf`), softmax, multiply by the values. Return `(B, H, Nq, Dv)`. The check
# tries $N_q < N_k$ too, where a top-left mask goes wrong.

# %% nbgrader={"grade": false, "grade_id": "ch04-ex3-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def attention_with_register(q, k, v, register_key, register_value, *, scale, causal):
    ### BEGIN SOLUTION
    batch, heads, query_len, _ = q.shape
    k = torch.cat([register_key.expand(batch, heads, 1, -1), k], dim=2)
    v = torch.cat([register_value.expand(batch, heads, 1, -1), v], dim=2)
    logits = -scale * (q[..., :, None, :] - k[..., None, :, :]).square().sum(dim=-1)
    if causal:
        key_len = k.shape[2]
        query_index = torch.arange(query_len)[:, None]
        key_index = torch.arange(key_len)[None, :]
        logits = logits.masked_fill(key_index > query_index + key_len - query_len, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch04-ex3-check", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
checks.ch04.check_attention_with_register(attention_with_register)

# %% [markdown]
# The library does the same with `attend_with_registers(q, k, v, registers, causal=True)`, on any
# backend, the fused kernel included. Here is a causal map with one register on 8 tokens: the
# even tokens' keys are close to their own queries, the odd tokens' keys are long and random (so an odd
# query finds nothing close among the keys it may see). Query 0 sees only the register and key 0.

# %%
causal_generator = torch.Generator().manual_seed(1)
q_causal = torch.randn(1, 1, 8, 16, generator=causal_generator, dtype=torch.float64)
q_causal = 6 * q_causal / q_causal.norm(dim=-1, keepdim=True)  # all of length 6, as in the toy above
k_causal = 3 * torch.randn(1, 1, 8, 16, generator=causal_generator, dtype=torch.float64)
k_causal[..., ::2, :] = q_causal[..., ::2, :] + 0.1 * k_causal[..., ::2, :]
causal_registers = RegisterTokens(num_heads=1, head_dim=16).double()
causal_map = attention_weights(q_causal, k_causal, causal_registers, causal=True)[0, 0].detach()
print("query 0's weights (register, key 0, key 1, ...):", [round(x, 2) for x in causal_map[0].tolist()])
print("register mass per query:", [round(x, 2) for x in causal_map[:, 0].tolist()])
assert (causal_map[:, 0] > 0).all(), "every query sees the register"
assert torch.allclose(causal_map[0, :2].sum(), torch.tensor(1.0, dtype=torch.float64))
assert (causal_map[:, 1:].triu(diagonal=1) == 0).all(), "no query sees a future key"
assert (causal_map[1::2, 0] > 0.9).all() and (causal_map[0::2, 0] < 0.1).all()

fig, ax = plt.subplots(figsize=(5, 4))
image = ax.imshow(causal_map.numpy(), vmin=0, vmax=1, cmap="viridis")
ax.set_xticks(range(9), ["reg"] + [str(j) for j in range(8)])
ax.set_xlabel("key (register first)")
ax.set_ylabel("query")
ax.set_title("Causal RBF attention with a register")
ax.grid(False)
fig.colorbar(image, ax=ax, label="attention weight")
plt.show()

# %% [markdown]
# ## Softmax's selectivity limit
#
# A register fixes the case of *nothing* to attend to. The opposite case, *many* things to
# attend to, is a limit of softmax itself. Mudarisov, Burtsev, Petrova and State, *Limitations of
# Normalization in Attention Mechanism* (arXiv 2508.17821, NeurIPS 2025), bound what softmax
# normalisation can select. Their abstract reports that, in experiments with a pre-trained GPT-2,
# the model's ability to distinguish informative tokens declines as the number of selected
# tokens grows, often converging toward a uniform selection; in their GPT-2 measurements only
# about 70–85% of the selected tokens remained distinguishable.
#
# The simplest part of this is plain arithmetic. Weights sum to one, so if $n$ keys are equally
# relevant, each gets at most $1/n$:
#
# $$ w_\text{relevant} = \frac{e^{\Delta}}{n\,e^{\Delta} + \sum_\text{irrelevant} e^{l_j}} \le \frac1n , $$
#
# whatever the logit gap $\Delta$. Each selected token's influence on the output ($\partial y / \partial v_j = w_j$)
# falls like $1/n$, and the output is an average of $n$ values, in which any one of them is
# harder to make out.
#
# **The experiment.** $N$ keys in $D = 64$ dimensions, $n$ of them relevant to a query, the rest
# random. For the dot product the relevant keys point along the query; for RBF they sit at a
# fixed small distance from it. Each score gets its own temperature, chosen so that the mean
# logit gap between relevant and irrelevant keys is the same, $\Delta = \ln N + 2.5$ (8.0 at
# $N = 256$; it grows with $N$ so that one relevant key still takes most of the mass): the two scores are
# compared at **matched logit gaps**. We measure, against $n$:
#
# - the largest weight (against the $1/n$ bound);
# - the mass on the relevant keys;
# - **distinguishability**: with random values $v_j$, how often the output $y = \sum_j w_j v_j$
#   lines up better with a relevant token's value than with an irrelevant one's, i.e. the
#   fraction of (relevant, irrelevant) pairs with $y\cdot v_\text{rel} > y\cdot v_\text{irr}$
#   (1: the output tells the selected tokens apart perfectly; 0.5: not at all).

# %%
selectivity_dim = 64
logit_gap = math.log(selectivity_keys) + 2.5
relevant_counts = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if n <= selectivity_keys // 4]


def relevant_and_irrelevant_keys(queries, n_relevant, scoring, generator):
    """(T, N, D) keys: the first n_relevant are relevant to each query, the rest random."""
    trials, dim = queries.shape
    offsets = torch.randn(trials, n_relevant, dim, generator=generator, dtype=torch.float64)
    if scoring == "dot":
        # Along the query (same dot product for all of them), plus a part orthogonal to it.
        unit = queries / queries.norm(dim=-1, keepdim=True)
        offsets = offsets - (offsets * unit[:, None]).sum(-1, keepdim=True) * unit[:, None]
        relevant = 2 * queries[:, None] + offsets
    else:
        # A fixed small distance (2) from the query, in a random direction.
        relevant = queries[:, None] + 2 * offsets / offsets.norm(dim=-1, keepdim=True)
    irrelevant = torch.randn(trials, selectivity_keys - n_relevant, dim, generator=generator, dtype=torch.float64)
    return torch.cat([relevant, irrelevant], dim=1)


def selectivity(n_relevant, scoring, seed):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(selectivity_trials, selectivity_dim, generator=generator, dtype=torch.float64)
    keys = relevant_and_irrelevant_keys(queries, n_relevant, scoring, generator)
    if scoring == "dot":
        logits = torch.einsum("td,tnd->tn", queries, keys)
    else:
        logits = -(queries[:, None] - keys).square().sum(-1)
    gap = logits[:, :n_relevant].mean() - logits[:, n_relevant:].mean()
    weights = torch.softmax(logit_gap / gap * logits, dim=-1)  # the temperature that matches the gap
    values = torch.randn(selectivity_trials, selectivity_keys, selectivity_dim, generator=generator,
                         dtype=torch.float64)
    outputs = torch.einsum("tn,tnd->td", weights, values)
    alignment = torch.einsum("td,tnd->tn", outputs, values)
    pairs_in_order = alignment[:, :n_relevant, None] > alignment[:, None, n_relevant:]
    return {
        "max weight": weights.max(dim=-1).values.mean().item(),
        "relevant mass": weights[:, :n_relevant].sum(-1).mean().item(),
        "distinguishability": pairs_in_order.double().mean().item(),
        "irrelevant logit spread": (logit_gap / gap * logits[:, n_relevant:]).std().item(),
    }


results = {scoring: [selectivity(n, scoring, seed=1000 * offset + n) for n in relevant_counts]
           for offset, scoring in enumerate(("dot", "rbf"))}
print(f"N = {selectivity_keys} keys, D = {selectivity_dim}, matched logit gap Δ = {logit_gap:.1f}")
print(f"{'n':>5} | {'max weight':^15} | {'n × max':^13} | {'relevant mass':^15} | {'distinguishable':^15}")
print(f"{'':>5} | {'dot':>6}  {'rbf':>6} | {'dot':>5} {'rbf':>5} | {'dot':>6}  {'rbf':>6} | {'dot':>6}  {'rbf':>6}")
for i, n in enumerate(relevant_counts):
    dot, rbf = results["dot"][i], results["rbf"][i]
    print(f"{n:>5} | {dot['max weight']:6.3f}  {rbf['max weight']:6.3f} | "
          f"{n * dot['max weight']:5.2f} {n * rbf['max weight']:5.2f} | "
          f"{dot['relevant mass']:6.3f}  {rbf['relevant mass']:6.3f} | "
          f"{dot['distinguishability']:6.3f}  {rbf['distinguishability']:6.3f}")
print("spread (std) of the irrelevant logits: "
      f"dot {results['dot'][0]['irrelevant logit spread']:.2f}, rbf {results['rbf'][0]['irrelevant logit spread']:.2f}")

# %%
figure, axes = plt.subplots(1, 3, figsize=(15, 4))
for scoring, label in (("dot", "dot product"), ("rbf", "RBF")):
    column = {metric: [row[metric] for row in results[scoring]] for metric in results[scoring][0]}
    axes[0].loglog(relevant_counts, column["max weight"], "o-", color=viz.COLORS[scoring], label=label)
    axes[1].semilogx(relevant_counts, column["relevant mass"], "o-", color=viz.COLORS[scoring], label=label)
    axes[2].semilogx(relevant_counts, column["distinguishability"], "o-", color=viz.COLORS[scoring],
                     label=label)
axes[0].loglog(relevant_counts, [1 / n for n in relevant_counts], "--", color=viz.COLORS["fit"],
               label="1/n bound")
axes[2].axhline(0.5, ls=":", color=viz.COLORS["fit"], label="chance")
for ax, ylabel, title in zip(axes, ["largest weight", "mass on the n relevant keys",
                                    "P(y·v_rel > y·v_irr)"],
                             ["Each selected token's share", "Mass on the relevant keys", "Distinguishability"],
                             strict=True):
    ax.set_xlabel("number of relevant keys n (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
figure.suptitle(f"Selectivity at a matched logit gap Δ = {logit_gap:.1f}, N = {selectivity_keys}, D = {selectivity_dim}")
plt.show()

# %% [markdown]
# What the numbers say, and what they do not:
#
# - **The $1/n$ ceiling holds for both scores.** The largest weight follows the $1/n$ line
#   ($n \times$ max weight stays between 0.7 and 1, checked below). Softmax cannot give $n$
#   relevant tokens more than $1/n$ each, however well the score separates them.
# - **The mass on relevant keys does not suffer.** With the gap fixed it *rises* with $n$: the
#   limit is not that attention wanders off to irrelevant keys, it is that it must *share*.
# - **Distinguishability falls.** With $n = 1$ the output names its token perfectly; at the
#   largest $n$ a sizeable fraction of pairs is out of order (the table has this device's
#   numbers; on a CPU, at $n = 64$, about one pair in four). Part of this is softmax's sharing,
#   part is superposition: $n$ values averaged in $D = 64$ dimensions interfere, whatever the
#   weights. This experiment does not separate the two.
# - **Dot product and RBF behave alike at matched logit gaps.** Softmax sees only logits. Here
#   the relevant keys all get the same logit under either score and the irrelevant ones are
#   $\Delta$ below (their spread differs, printed under the table, and barely matters at this gap),
#   so the weights and everything computed from them coincide up to sampling noise. Changing
#   the score does not lift the normalisation's limit, and neither do registers: they add a
#   "none of these" option, not more than one unit of mass to share.
# - This reproduces the *shape* of the effect on synthetic data. It is not a reproduction of
#   the paper's GPT-2 measurements or of its bounds, and it says nothing about trained models.

# %%
for scoring in ("dot", "rbf"):
    shares = [n * row["max weight"] for n, row in zip(relevant_counts, results[scoring], strict=True)]
    assert all(0.7 <= share <= 1.0 + 1e-9 for share in shares[1:]), (scoring, shares)
    distinguishability = [row["distinguishability"] for row in results[scoring]]
    assert distinguishability[0] > 0.99 and distinguishability[-1] < 0.85, (scoring, distinguishability)
    masses = [row["relevant mass"] for row in results[scoring]]
    assert masses == sorted(masses), "at a fixed gap, the relevant mass grows with n"
gaps_between_scores = [abs(d["distinguishability"] - r["distinguishability"])
                       for d, r in zip(results["dot"], results["rbf"], strict=True)]
print(f"largest difference in distinguishability between the scores: {max(gaps_between_scores):.3f}")
assert max(gaps_between_scores) < 0.1

# %% [markdown]
# ## Summary
#
# - Dot-product attention has a free sink: one long key along the queries' mean direction. In
#   our hand-built case every query with nothing to attend to put more than half of its mass
#   on it, while the busy queries kept theirs on their own keys.
# - Under RBF the same long key is far from everyone: its weight stayed below $10^{-3}$ for all
#   12 queries. Lonely queries then smear their mass over unrelated keys.
# - A sink under RBF works only near the origin. There a key's effective logit
#   $s\,(2\,q\cdot k - \lVert k\rVert^2)$ is zero for every query: a fixed bar. A key beats it
#   iff $\lVert q - k\rVert < \lVert q\rVert$, the ball around the query through the origin.
# - One register at the origin (key and value zero) took more than 90% of every lonely query's
#   mass, left the busy queries' attention unchanged, and shrank the lonely outputs to near zero.
#   In front of the keys, under a bottom-right causal mask, every query sees it.
# - Softmax shares one unit of mass: with $n$ relevant keys each gets at most $1/n$, and the
#   output's ability to tell them apart falls, for dot product and RBF alike.
#
# ## Where this breaks
#
# - **"Lonely" is relative to $\lVert q\rVert$.** The bar is the query's own length: a long query
#   clears it with keys that are not very close, a query near the origin sends almost everything
#   to the register. Training controls this through the lengths of $q$ and $k$, and may move the
#   register away from the origin, where it is no longer the same bar for everyone.
# - **The toy is built to be clean.** Orthonormal directions make the margins wide (a lonely
#   query's nearest key is more than 1.2× as far as the origin). In real heads keys and
#   queries overlap and the split between "register" and "key" is softer.
# - **A register holds mass, not information.** With its value at zero it only says "nothing
#   here"; more registers (`num_registers`) or trained values are needed before they can carry
#   anything.
# - **Selectivity stays a limit.** Neither the score nor registers change the $1/n$ sharing. With
#   256 keys on a CPU, distinguishability fell from 1.0 at one relevant key to about 0.77 at 64,
#   for both scores; other normalisations than softmax are outside this tutorial.
