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
# **What you will build.** A check that your set-up works, then a picture (with a slider) of why
# dot-product attention lets a long, badly aligned key shout down a short, well aligned one, and
# how scoring keys by *distance* puts the close key back in charge.
#
# **What you need.** PyTorch tensors, the dot product and the length of a vector, and softmax.
#
# **How long.** About 20 minutes to work through; executes in about 10 s on a 2-core CPU.
#
# **Exercises.** Solutions are inline, folded under each exercise; for the exercise-only version run
# `rbf-tutorial assignments OUT_DIR --chapters 00` and open `OUT_DIR/student/00_setup_and_the_bully.ipynb`.

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
#
# Expanding the square shows what the RBF score contains:
#
# $$ -\gamma \lVert q - k \rVert^2 = 2\gamma\, q \cdot k - \gamma \lVert k \rVert^2 - \gamma \lVert q \rVert^2 . $$
#
# The dot product is still in there, with weight $2\gamma$, next to a penalty on the key's length
# (and a term of the query alone, which softmax ignores: chapter 02). So $\gamma = 1$ would not be
# "the same sharpness" as the plain dot product above: it would weigh $q\cdot k$ twice as heavily.
# For a fair comparison we take $\gamma = \tfrac12$, which gives $q \cdot k$ exactly the dot
# product's weight: whatever changes then comes from the penalty $-\gamma\lVert k\rVert^2$, not
# from sharper scores.

# %% [markdown]
# ### Exercise 1: RBF scores
#
# Write `rbf_scores(query, keys, gamma)`: `query` has shape `(D,)`, `keys` has shape `(M, D)`,
# and the result has shape `(M,)`, one score $-\gamma \lVert q - k_j \rVert^2$ per key.
# Broadcasting does the pairing: `keys - query` subtracts the query from every row.

# %% nbgrader={"grade": false, "grade_id": "ch00-ex1-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
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
gamma = 0.5  # -gamma |q - k|^2 contains 2 gamma q.k: at 1/2, q.k weighs what it did in the dot product


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
# Same keys, same query, the same weight on $q\cdot k$: the RBF gives the close key 84% and the
# long key 0.1% (its squared distance is 13, against 0.03 for the close key).
#
# ## Slide the bully
#
# Drag the slider to change the long key's length (its direction stays at 60°). Watch the
# dot-product bars: the long key overtakes the close key somewhere near length 2 and then keeps
# taking more. The RBF bars move too, the other way round: the long key's RBF weight is largest
# when the key is *short* (near length 0.5, where it passes closest to the query) and falls as the
# key grows. It never overtakes the close key; a cell below checks every length on the slider.

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

# %% nbgrader={"grade": false, "grade_id": "ch00-ex2-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
def crossover_magnitude(query: torch.Tensor, close_key: torch.Tensor, long_direction: torch.Tensor) -> float:
    ### BEGIN SOLUTION
    unit_direction = long_direction / long_direction.norm()
    return float(query @ close_key / (query @ unit_direction))
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch00-ex2-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.ch00.check_crossover_magnitude(crossover_magnitude)

# %% [markdown]
# For our keys the answer is $\cos 10° / \cos 60° \approx 1.97$: a key half as aligned needs only
# twice the length to win. Nothing in the dot product stops a key from growing, and trained models
# do develop a few loud tokens: Darcet et al. (arXiv:2309.16588) found high-norm tokens in trained
# vision transformers, sitting in uninformative background patches and repurposed for internal
# computation. Pisoni's write-up on RBF attention calls the effect "magnitude bullying".
#
# **Can the long key ever win under the RBF?** Its squared distance is
# $\lVert q - m u \rVert^2 = \lVert q \rVert^2 - 2m\, q \cdot u + m^2$, smallest at
# $m = q \cdot u = \cos 60° = 0.5$, where it is $\sin^2 60° = 0.75$: still far more than the close
# key's $0.03$. Try every length the slider offers, and check that the close key keeps more
# weight than the long one at each of them:

# %%
best_rbf_weight, best_length = 0.0, None
for length in torch.linspace(0.25, 8.0, 156).tolist():
    moved_keys = torch.stack([keys[0], at_angle(key_angles["long"], length), keys[2]])
    weights_now = rbf_weights(query, moved_keys, gamma)
    assert weights_now[long_index] < weights_now[0], f"the long key out-scored the close key at length {length}"
    if weights_now[long_index] > best_rbf_weight:
        best_rbf_weight, best_length = float(weights_now[long_index]), length
print(f"✓ the close key wins at every length; the most RBF weight the long key gets is "
      f"{best_rbf_weight:.3f}, at length {best_length:.2f}")

# %% [markdown]
# ## Summary
#
# - Dot-product scores multiply length by alignment, so a long, mediocre key beats a short,
#   aligned one: here at any length above 1.97, taking 70% of the weight at length 4.
# - RBF scores $-\gamma\lVert q - k\rVert^2 = 2\gamma\,q\cdot k - \gamma\lVert k\rVert^2 -
#   \gamma\lVert q\rVert^2$ reward closeness. With $\gamma = \tfrac12$, so that $q\cdot k$ weighs
#   what it does in the dot product, the same long key gets 0.1% of the weight at length 4, and at
#   most 37% at any length on the slider, always less than the close key.
#
# ## Where this breaks
#
# - **Memory.** Every query needs its distance to every key. Computed the obvious way, that is
#   an $N \times N$ matrix per head: at $N = 32\,768$ tokens, 4 GiB in float32 for *one* head
#   of one sequence. Chapter 01 runs into that wall and measures it.
# - **The sharpness $\gamma$ matters.** With these keys, $\gamma = 0.05$ leaves the weights
#   nearly flat (0.42 / 0.22 / 0.36); $\gamma = 2$ makes them nearly one-hot (0.999 on the close
#   key). The library's attention uses $\gamma = 1/\sqrt{D}$, the dot product's usual scale, for
#   both scores, so its RBF weighs $q\cdot k$ twice as heavily as its dot product does; training
#   tunes the rest through the lengths of $q$ and $k$, and chapter 07 trains both conventions.
# - **No free "sink".** A dot-product head with nothing to do can park its attention on one loud
#   key that every query scores highly (trained language models send much of their attention to
#   the first tokens: Xiao et al., arXiv:2309.17453). Under the RBF a huge key is far from everyone,
#   so that trick is gone: chapter 04 gives the model registers at the origin instead.

# %% [markdown]
# ## Sources and further reading
#
# - R. Pisoni, *Scaled RBF Attention: Trading Dot Products for Euclidean Distance*
#   (https://pisoni.ai/posts/scaled-rbf-attention/), with code at https://github.com/4rtemi5/rbf_attention:
#   the write-up that started this tutorial's story; the "magnitude bullying" of dot-product
#   attention and distance scoring as its cure come from there.
# - A. Vaswani et al., *Attention Is All You Need* (arXiv:1706.03762): scaled dot-product attention,
#   softmax of $q\cdot k/\sqrt{D}$, the score this chapter starts from.
# - T. Darcet, M. Oquab, J. Mairal, P. Bojanowski, *Vision Transformers Need Registers*
#   (arXiv:2309.16588): high-norm tokens in trained vision transformers, evidence that loud tokens
#   are not only a toy.
# - G. Xiao, Y. Tian, B. Chen, S. Han, M. Lewis, *Efficient Streaming Language Models with Attention
#   Sinks* (arXiv:2309.17453): attention sinks in trained language models, taken up in chapter 04.
