# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · Set-up, and the bully problem
#
# **What you will build:** a check that your set-up works, then a picture (with a slider) of why
# dot-product attention lets a long, badly aligned key shout down a short, well aligned one, and
# how scoring keys by *distance* puts the close key back in charge.
#
# **What you need:** PyTorch tensors, the dot product and the length of a vector, and softmax.
#
# **How long:** about 20 minutes.

# %% [markdown]
# ## Set-up check
#
# One line tells you what this session runs on. On a machine with a CUDA GPU the Triton kernels
# of later chapters are *compiled*; without one, `rbf_tutorial` switches Triton to its CPU
# *interpreter* (correct, slow) and every chapter shrinks its sizes. `SMALL` is that switch: each
# chapter reads it once, at the top.

# %%
import io
import math

import ipywidgets as widgets
import matplotlib.pyplot as plt
import torch
from IPython.display import display
from matplotlib.figure import Figure

import rbf_tutorial
from rbf_tutorial import checks, viz
from rbf_tutorial.device import DEVICE, SMALL, describe
from rbf_tutorial.reference import rbf_attention_reference, rbf_logits_reference

viz.use_style()
print(describe())
print(f"SMALL = {SMALL}: chapters use {'small CPU' if SMALL else 'full GPU'} sizes")

# %% [markdown]
# A set-up check that only prints is easy to ignore, so this one asserts: a recent enough
# PyTorch, and the library's attention giving the same answer as its float64 reference on
# the device you will use.

# %%
torch_version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
assert torch_version >= (2, 5), f"PyTorch {torch.__version__} is too old: install 2.5 or newer"

generator = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 8, 16, generator=generator) for _ in range(3))
out = rbf_tutorial.rbf_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE))
checks.assert_close(out.cpu(), rbf_attention_reference(q, k, v), name="rbf_attention", atol=1e-4,
                    hint="The library disagrees with its own reference: is the install broken?")

# %% [markdown]
# ## The bully problem
#
# In attention, a query $q$ gives every key $k_j$ a score, and softmax turns the scores into
# weights that sum to one. The usual score is the dot product,
#
# $$ q \cdot k = \lVert q \rVert \, \lVert k \rVert \cos\theta . $$
#
# Length and alignment are *multiplied*. So a key can make up for pointing the wrong way by
# being long. Here is a query and three keys in two dimensions:
#
# | key | angle to the query | length |
# |---|---|---|
# | `close` | 10° | 1 |
# | `long` | 60° | 4 |
# | `away` | 130° | 1 |
#
# Which key *should* the query listen to? The close one: it is nearly the query itself.

# %%
def at_angle(degrees: float, length: float) -> torch.Tensor:
    """A 2-D vector of the given length, `degrees` anticlockwise from the x axis."""
    radians = math.radians(degrees)
    return length * torch.tensor([math.cos(radians), math.sin(radians)], dtype=torch.float64)


query = at_angle(0, 1.0)
key_angles = {"close": 10.0, "long": 60.0, "away": 130.0}
key_lengths = {"close": 1.0, "long": 4.0, "away": 1.0}
key_names = list(key_angles)
keys = torch.stack([at_angle(key_angles[name], key_lengths[name]) for name in key_names])

dot_scores = keys @ query
dot_weights = torch.softmax(dot_scores, dim=0)
for name, score, weight in zip(key_names, dot_scores, dot_weights, strict=True):
    print(f"{name:>6}: q·k = {score:+.3f}   weight = {weight:.3f}")

# %% [markdown]
# The long key takes 70% of the attention while pointing 60° away; the close key gets a quarter.
# Nothing about the long key is *relevant*; it is just loud. We will call it the bully.

# %%
figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), width_ratios=[1, 1.3])
viz.plot_query_and_keys(query, dict(zip(key_names, keys, strict=True)), ax=left,
                        title="A query and three keys")
viz.plot_softmax_bars(key_names, {"dot product": dot_weights}, ax=right,
                      title="Dot-product attention: the long key wins")
plt.show()

# %% [markdown]
# ## Scoring by distance
#
# Score each key by how *close* it is to the query instead, with a radial basis function (RBF):
#
# $$ \text{score}(q, k) = -\gamma \, \lVert q - k \rVert^2 , \qquad
#    w_j = \frac{e^{-\gamma \lVert q - k_j \rVert^2}}{\sum_l e^{-\gamma \lVert q - k_l \rVert^2}} . $$
#
# The minus sign makes the nearest key score highest; $\gamma > 0$ sets how fast the score
# falls with distance (it plays the part of dot-product attention's $1/\sqrt{D}$). Length is no
# longer a free bonus: a key that grows past the query moves *away* from it.

# %% [markdown]
# ### Exercise 1: RBF scores
#
# Write `rbf_scores(query, keys, gamma)`: `query` has shape `(D,)`, `keys` has shape `(M, D)`,
# and the result has shape `(M,)`, one score $-\gamma \lVert q - k_j \rVert^2$ per key.
# Broadcasting does the pairing: `keys - query` subtracts the query from every row.

# %% nbgrader={"grade": false, "grade_id": "ch00-ex1-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def rbf_scores(query: torch.Tensor, keys: torch.Tensor, gamma: float) -> torch.Tensor:
    ### BEGIN SOLUTION
    return -gamma * (keys - query).square().sum(dim=-1)
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch00-ex1-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.ch00.check_rbf_scores(rbf_scores)

# %% [markdown]
# The library has the same computation for whole batches of queries,
# `rbf_tutorial.reference.rbf_logits_reference(q, k, scale)`, with `q` of shape `(..., Nq, D)`.
# The rest of the chapter uses it, so that it runs whether or not your exercise is done yet.

# %%
gamma = 1.0  # the same sharpness as the dot product above, which had no scale at all


def rbf_weights(query: torch.Tensor, keys: torch.Tensor, gamma: float) -> torch.Tensor:
    return torch.softmax(rbf_logits_reference(query[None], keys, gamma)[0], dim=0)


rbf_weights_now = rbf_weights(query, keys, gamma)
squared_distances = (keys - query).square().sum(dim=-1)
for name, distance, weight in zip(key_names, squared_distances, rbf_weights_now, strict=True):
    print(f"{name:>6}: |q - k|² = {distance:6.3f}   weight = {weight:.3f}")

viz.plot_softmax_bars(key_names, {"dot product": dot_weights, "RBF": rbf_weights_now},
                      title="Same keys, two scoring rules")
plt.show()

# %% [markdown]
# Same keys, same query: the RBF gives the close key 96% and the long key almost nothing
# (its squared distance is 13, against 0.03 for the close key).
#
# ## Slide the bully
#
# Drag the slider to change the long key's length (its direction stays at 60°). Watch the
# dot-product bars: the long key overtakes the close key somewhere near length 2 and then keeps
# taking more. The RBF bars barely move, and the long key never wins.

# %%
latest_weights = {}  # what the plot last drew, so a cell below can check that it moved


def draw_both(long_length: float) -> bytes:
    """Both panels for one length of the long key, as PNG bytes for the image under the slider."""
    moved_keys = keys.clone()
    moved_keys[key_names.index("long")] = at_angle(key_angles["long"], long_length)
    latest_weights["dot product"] = torch.softmax(moved_keys @ query, dim=0)
    latest_weights["RBF"] = rbf_weights(query, moved_keys, gamma)

    # A Figure of its own, not pyplot's current one: each redraw is drawn whole, then swapped in.
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[1, 1.3])
    viz.plot_query_and_keys(query, dict(zip(key_names, moved_keys, strict=True)), ax=left,
                            title=f"Long key at length {long_length:.2f}")
    viz.plot_softmax_bars(key_names, latest_weights, ax=right, title="Attention weights")
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=80)
    return png.getvalue()


long_length_slider = widgets.FloatSlider(value=4.0, min=0.25, max=8.0, step=0.05,
                                         description="|k_long|", continuous_update=True)
plot_image = widgets.Image(value=draw_both(long_length_slider.value), format="png")


def redraw(change: dict) -> None:
    plot_image.value = draw_both(change["new"])


long_length_slider.observe(redraw, names="value")
display(widgets.VBox([long_length_slider, plot_image]))

# %% [markdown]
# Moving the slider from code does what your hand does: the plot above redraws. Here we move it
# to 1 and back, and confirm the dot-product weight of the long key followed it.

# %%
long_index = key_names.index("long")
long_length_slider.value = 1.0
weight_when_short = float(latest_weights["dot product"][long_index])
long_length_slider.value = 4.0
weight_when_long = float(latest_weights["dot product"][long_index])
print(f"long key's dot-product weight: {weight_when_short:.3f} at length 1, "
      f"{weight_when_long:.3f} at length 4")
assert weight_when_long > weight_when_short, "the plot did not follow the slider"

# %% [markdown]
# ### Exercise 2: when does the bully start winning?
#
# With the long key's direction fixed (unit vector $u$) and its length $m$ free, its dot score is
# $m \,(q \cdot u)$. Find the length at which it *equals* the close key's score $q \cdot k_\text{close}$;
# any longer and the long key wins. Write `crossover_magnitude(query, close_key, long_direction)`
# for any vectors (careful: `long_direction` need not have length one).

# %% nbgrader={"grade": false, "grade_id": "ch00-ex2-solution", "locked": false, "schema_version": 3, "solution": true, "task": false}
def crossover_magnitude(query: torch.Tensor, close_key: torch.Tensor, long_direction: torch.Tensor) -> float:
    ### BEGIN SOLUTION
    unit_direction = long_direction / long_direction.norm()
    return float(query @ close_key / (query @ unit_direction))
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch00-ex2-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.ch00.check_crossover_magnitude(crossover_magnitude)

# %% [markdown]
# For our keys the answer is $\cos 10° / \cos 60° \approx 1.97$: a key half as aligned needs only
# twice the length to win. In a trained model nothing stops keys from growing, so this is not a
# corner case: it is what gradient descent finds whenever loudness pays.
#
# **Can the long key ever win under the RBF?** Its squared distance is
# $\lVert q - m u \rVert^2 = \lVert q \rVert^2 - 2m\, q \cdot u + m^2$, smallest at
# $m = q \cdot u = \cos 60° = 0.5$, where it is $\sin^2 60° = 0.75$: still far more than the close
# key's $0.03$. Try every length the slider offers:

# %%
best_rbf_weight = 0.0
for length in torch.linspace(0.25, 8.0, 156).tolist():
    moved_keys = torch.stack([keys[0], at_angle(key_angles["long"], length), keys[2]])
    best_rbf_weight = max(best_rbf_weight, float(rbf_weights(query, moved_keys, gamma)[long_index]))
print(f"the most RBF weight the long key ever gets on the slider: {best_rbf_weight:.3f}")

# %% [markdown]
# ## Summary
#
# - Dot-product scores multiply length by alignment, so a long, mediocre key beats a short,
#   aligned one: here at any length above 1.97, taking 70% of the weight at length 4.
# - RBF scores $-\gamma\lVert q - k\rVert^2$ reward closeness. Growing a key past the query moves
#   it away, so the same long key gets 0.0002% of the weight, and at most 32% at any length.
#
# ## Where this breaks
#
# - **Memory.** Every query needs its distance to every key. Computed the obvious way, that is
#   an $N \times N$ matrix per head: at $N = 32\,768$ tokens, 4 GiB in float32 for *one* head
#   of one sequence. Chapter 01 runs into that wall and measures it.
# - **The sharpness $\gamma$ matters.** With these keys, $\gamma = 0.05$ leaves the weights
#   nearly flat (0.42 / 0.22 / 0.36); $\gamma = 2$ makes them nearly one-hot (0.999 on the close
#   key). Attention layers use $\gamma = 1/\sqrt{D}$, and training tunes the rest through the
#   lengths of $q$ and $k$.
# - **No free "sink".** Dot-product models park attention on a key with a huge norm when a head
#   has nothing to do. Under the RBF a huge key is far from everyone, so that trick is gone:
#   chapter 04 gives the model registers at the origin instead.
