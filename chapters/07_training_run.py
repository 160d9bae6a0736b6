# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · A small training run: does any of it matter?
#
# **What you will build.** Six byte-level language models that differ only in their attention —
# two dot-product baselines (with RoPE, and with RoPE and QK-norm) and four RBF variants from
# chapters 04–06, one of them at half the logit scale — trained with the same data, budget and seed;
# their whole loss curves, their gradient norms in the first steps, their speed, a results table;
# then a look inside the trained models: attention maps and the lengths of their keys.
#
# **What you need.** Chapters 03–06 (the kernel, registers, SuSiE, exclusive self attention);
# cross-entropy as a loss.
#
# **How long.** About 30 minutes to read; executes in about 45 s on a 2-core CPU (seven tiny
# models, 150 steps each). On a GPU the chapter trains seven 10 M-parameter models of about a
# minute each.
#
# **Exercises.** Solutions are inline, folded under each exercise; for the exercise-only version run
# `rbf-tutorial assignments OUT_DIR --chapters 07` and open `OUT_DIR/student/07_training_run.ipynb`.

# %%
import math
import tempfile
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display
from matplotlib.colors import PowerNorm

import rbf_tutorial  # noqa: F401  (first: with no GPU it switches Triton to its interpreter)
from rbf_tutorial import checks, compare, data, results, train, viz
from rbf_tutorial.attention import resolve_backend
from rbf_tutorial.device import DEVICE, SMALL, describe, sizes
from rbf_tutorial.model import GPT

# %matplotlib inline
viz.use_style()
print(describe())

# Every size in one place: the "smoke" preset on a CPU (seconds per model), "gpu10" on a GPU.
PRESET = sizes(cpu="smoke", gpu="gpu10")
VARIANT_NAMES = ["dot-rope", "dot-qknorm-rope", "rbf-rope", "rbf-susie-reg", "rbf-susie-reg-halfscale",
                 "rbf-susie-reg-xsa"]
SEED = 0
# On a CPU, 150 steps instead of the smoke preset's 200 (seven models must fit in CI); on both, the
# loss and the gradient norm are logged every few steps, so the first steps show in the traces.
OVERRIDES = sizes(cpu=dict(steps=150, log_every=5), gpu=dict(log_every=10))
# On a GPU, runs live in one folder that outlasts the kernel: a finished run is loaded, not trained
# again, when the notebook is re-run. On a CPU every run of the chapter starts from scratch.
RUNS_DIR = (Path(tempfile.mkdtemp(prefix="rbf-tutorial-ch07-")) if SMALL
            else Path(tempfile.gettempdir()) / "rbf-tutorial-ch07")
configs = {name: train.make_config(PRESET, name, seed=SEED, **OVERRIDES) for name in VARIANT_NAMES}
budget = configs["dot-rope"]
print(f"SMALL = {SMALL}: preset {PRESET!r}, {budget.steps} steps of {budget.batch_size} sequences of "
      f"{budget.model.context} bytes ({budget.steps * budget.tokens_per_step / 1e6:.2f} M tokens), "
      f"d_model {budget.model.d_model}, {budget.model.n_layers} layers, {budget.model.n_heads} heads; "
      f"runs in {RUNS_DIR}")

# %% [markdown]
# ## The question
#
# Every chapter so far fixed one failure and measured the fix on the mechanism itself: the bully
# key (00), the $N^2$ memory (01–03), the missing sink (04), the entangled rotations (05), the
# output that points at its own value (06). None of them showed that a model gets better at its
# job. That is the failure this chapter looks for: a set of local fixes that, put together, train
# no better — or slower — than the plain dot product they set out to improve.
#
# So: one job, one budget, four models. The job is predicting the next byte of Python source code
# (the running interpreter's standard library: offline, the same on every machine; the validation
# bytes come from files the model never trains on). The four models share every setting but the
# attention:

# %%
print(f"{'variant':<25}{'attention':<11}{'backend':<9}{'positional':<12}{'registers':<11}{'xsa':<7}"
      f"{'qk_norm':<9}{'scale':<12}{'parameters':>10}")
for name, config in configs.items():
    model = config.model
    parameters = GPT(model).num_parameters()
    scale = f"{model.scale_factor:g}/√hd"
    print(f"{name:<25}{model.attention:<11}{model.backend:<9}{model.positional:<12}{model.registers:<11}"
          f"{model.xsa!s:<7}{model.qk_norm!s:<9}{scale:<12}{parameters:>10,}")

# What "auto" runs here: the chapter 03 Triton kernel on a GPU, a materialised route on a CPU.
probe = torch.randn(1, 1, budget.model.context, budget.model.head_dim, device=DEVICE,
                    dtype=sizes(cpu=torch.float32, gpu=torch.bfloat16))
print(f"\nRBF backend 'auto' resolves to {resolve_backend('auto', probe)!r} on {DEVICE.type}")

# %% [markdown]
# A register adds one key and one value per head and layer (a few hundred parameters), SuSiE a
# learnable scale per frequency: the models are the same size to within a fraction of a percent.
# Every model also sees the *same batches in the same order*: `data.batch_at` draws batch number
# `step` as a pure function of `(seed, step)`, whatever the model. Only the initial weights differ,
# because the models have different parameters to draw.
#
# **The two baselines.** `dot-rope` is what a modern small GPT uses. `dot-qknorm-rope` adds QK-norm:
# every query and key RMS-normalised per head (with a learned gain) before RoPE, the usual cure for
# dot products that grow too large (Henry et al., arXiv:2010.04245; Dehghani et al. use layer
# normalisation of queries and keys to keep attention logits from growing in a 22-billion-parameter
# vision transformer, arXiv:2302.05442). It is the fair opponent for RBF, whose key-norm penalty
# answers the same problem another way.
#
# **The scale convention, stated.** Every variant multiplies its logits by the same
# $s = 1/\sqrt{hd}$ (head dim $hd$). For the dot product that is $s\,q\cdot k$. For RBF it is
# $-s\lVert q-k\rVert^2 = s\,(2\,q\cdot k - \lVert k\rVert^2) - s\lVert q\rVert^2$: the same
# $q\cdot k$ weighed **twice** as heavily, plus the penalty. So at equal $s$ an RBF head starts with
# sharper attention than a dot-product head with the same queries and keys (chapter 04 measured what
# that does to selectivity). `rbf-susie-reg-halfscale` is `rbf-susie-reg` at $s/2$, where $q\cdot k$
# weighs exactly what it does in the dot product: the ablation that tells the score from the scale.
#
# ## How a run is scored
#
# The loss is the cross-entropy of the next byte, in nats per byte: $-\frac1N\sum_t \ln p(x_{t+1}
# \mid x_{\le t})$. A model that knows nothing and spreads its bets evenly over the 256 byte values
# pays $\ln 256 \approx 5.545$ nats on every byte. Where do our models start, before the budget is
# spent? For a fair race, level with each other:

# %%
corpus = data.load_corpus()
print(corpus.source)
uniform = math.log(256)
initial_losses = {}
for name, config in configs.items():
    torch.manual_seed(SEED)
    untrained = GPT(config.model).to(DEVICE)
    initial_losses[name] = train.evaluate(untrained, corpus, config, DEVICE)
    print(f"{name:<25} untrained validation loss {initial_losses[name]:.4f} nats "
          f"(a uniform guess: {uniform:.4f})")
passes = budget.steps * budget.tokens_per_step / corpus.train.numel()
print(f"\nthe budget reads {budget.steps * budget.tokens_per_step / 1e6:.2f} M bytes: {passes:.2g} passes "
      f"over the {corpus.train.numel() / 1e6:.1f} MB of training bytes")
repeats = (corpus.val[1:] == corpus.val[:-1]).double().mean().item()
print(f"validation bytes equal to the byte before them: {repeats:.1%}")
torch.manual_seed(SEED)
untrained = GPT(budget.model).to(DEVICE).eval()  # the baseline, untrained
sample, _ = next(data.eval_windows(corpus.val, batch_size=4, context=budget.model.context, max_batches=1,
                                   device=DEVICE))
with torch.no_grad():
    probabilities = untrained(sample)[0].softmax(dim=-1)
same_again = probabilities.gather(-1, sample[..., None]).mean().item()
print(f"untrained dot-rope: probability that the next byte repeats the current one {same_again:.4f} "
      f"(uniform: {1 / 256:.4f})")
assert max(initial_losses.values()) - min(initial_losses.values()) < 0.1, "the models should start level"
assert all(abs(loss - uniform) < 0.5 for loss in initial_losses.values())

# %% [markdown]
# Level, yes — but a little *below* a uniform guess, before any training. The head shares its
# weights with the embedding, so an untrained model scores byte $b$ by how well $b$'s embedding
# agrees with the current byte's (the residual stream still holds little else): it gives "the same
# byte again" a few times the uniform probability, as printed above. In Python source that is a
# good bet about one time in five (runs of spaces in indentation, mostly), worth a few tenths of a
# nat.
#
# `train.evaluate` scores a model on fixed validation windows — `data.eval_windows` spreads them
# evenly over the validation bytes and returns the same ones on every call — so every model, at
# every step, is scored on exactly the same text. Two details decide whether such numbers can be
# compared at all: dropout must be off while scoring (`model.eval()`), and every *token* must
# count once, so a smaller last batch weighs less than a full one.
#
# ### Exercise 1: validation loss on fixed windows
#
# Write `validation_loss(model, tokens, *, batch_size, context, max_batches)`: the mean loss in
# nats per token of `model` over the windows of
# `data.eval_windows(tokens, batch_size=..., context=..., max_batches=...)`. `model(inputs,
# targets)` returns `(logits, loss)` with `loss` the mean over that batch's tokens. Turn dropout
# off while scoring, compute no gradients (`torch.no_grad()`), and hand the model back in the
# mode it came in (`was_training = model.training` … `model.train(was_training)`).

# %% nbgrader={"grade": false, "grade_id": "ch07-ex1-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
def validation_loss(model: GPT, tokens: torch.Tensor, *, batch_size: int, context: int,
                    max_batches: int) -> float:
    ### BEGIN SOLUTION
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for inputs, targets in data.eval_windows(tokens, batch_size=batch_size, context=context,
                                                 max_batches=max_batches, device=device):
            _, loss = model(inputs, targets)
            total_loss += loss.item() * targets.numel()  # the batch's mean, back to a sum
            total_tokens += targets.numel()
    model.train(was_training)
    return total_loss / total_tokens
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch07-ex1-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.ch07.check_validation_loss(validation_loss)

# %% [markdown]
# ## Four runs, one budget
#
# `train.train` is the whole training loop of `rbf-tutorial train`: AdamW, warm-up then cosine
# decay, gradient clipping, bfloat16 autocast on a GPU; it writes a run folder (`config.json`,
# `metrics.jsonl`, `checkpoint.pt`, `summary.json`) and logs the validation loss every
# `eval_every` steps and the training speed in tokens per second. The same runs from a shell:
# `rbf-tutorial train --preset gpu10 --variant dot-rope` and so on.

# %%
def train_variant(name: str, seed: int = SEED) -> train.RunResult:
    """Train one variant with the chapter's budget (or load it, when its folder holds the finished run)."""
    config = train.make_config(PRESET, name, seed=seed, **OVERRIDES)
    out_dir = RUNS_DIR / f"{PRESET}-{name}-seed{seed}"
    already_started = (out_dir / "checkpoint.pt").is_file()  # resuming a finished run only loads it
    return train.train(config, out_dir, resume=already_started, progress=not SMALL)


trained: dict[str, train.RunResult] = {}

# %% [markdown]
# **The baseline**: dot-product attention with RoPE, through PyTorch's fused SDPA — what a modern
# small GPT uses.

# %%
trained["dot-rope"] = train_variant("dot-rope")

# %% [markdown]
# **Dot product with RoPE and QK-norm**: the baseline with the standard fix for loud keys.

# %%
trained["dot-qknorm-rope"] = train_variant("dot-qknorm-rope")

# %% [markdown]
# **RBF with SuSiE positions and one register** (chapters 04 and 05): scores $-\lVert q-k\rVert^2$,
# positions added rather than rotated, and a learnable key at the origin as a place to put
# attention that has nowhere better to go.

# %%
trained["rbf-susie-reg"] = train_variant("rbf-susie-reg")

# %% [markdown]
# **The same at half the logit scale**: $q\cdot k$ weighed as in the dot product.

# %%
trained["rbf-susie-reg-halfscale"] = train_variant("rbf-susie-reg-halfscale")

# %% [markdown]
# **The same as `rbf-susie-reg`, plus exclusive self attention** (chapter 06): each output loses its component along
# the token's own value.

# %%
trained["rbf-susie-reg-xsa"] = train_variant("rbf-susie-reg-xsa")

# %% [markdown]
# **RBF with RoPE and no register**: the smallest change from the baseline — only the score
# differs — to separate what the distance does from what SuSiE and the register do.

# %%
trained["rbf-rope"] = train_variant("rbf-rope")

# %% [markdown]
# ## Side by side
#
# `rbf_tutorial.compare` reads the run folders back (the same as `rbf-tutorial compare RUN_DIR...`):
# a results table, and the validation loss against steps (left: what each model learned from the
# same batches) and against training time (right: what it learned per second spent, evaluation
# included).

# %%
table, loss_figure = compare.compare([trained[name].out_dir for name in VARIANT_NAMES])
print(table)
display(loss_figure)

# %% [markdown]
# Speed first. Tokens per second is the median over the logged windows (the first window, which
# pays for warm-up, left out), and the ratio is each variant's over the baseline's:

# %%
baseline = trained["dot-rope"].summary
print(f"{'variant':<25}{'tokens/s':>12}{'vs dot-rope':>13}{'final val loss':>16}{'vs dot-rope':>13}")
for name in VARIANT_NAMES:
    summary = trained[name].summary
    speed_ratio = summary["tokens_per_s_median"] / baseline["tokens_per_s_median"]
    loss_change = summary["final_val_loss"] - baseline["final_val_loss"]
    print(f"{name:<25}{summary['tokens_per_s_median']:>12,.0f}{speed_ratio:>12.2f}x"
          f"{summary['final_val_loss']:>16.4f}{loss_change:>+13.4f}")

# What must hold whichever attention wins: every model learned (far below a uniform guess), and
# its validation loss fell from the first evaluation to the last.
for name, run in trained.items():
    evaluated = [row["val_loss"] for row in run.metrics if row.get("val_loss") is not None]
    assert math.isfinite(evaluated[-1]) and evaluated[-1] < uniform - 1.0, name
    assert evaluated[-1] < evaluated[0], f"{name}: validation loss did not fall"
    assert run.summary["tokens_per_s_median"] > 0, name

# %% [markdown]
# How to read these numbers depends on where they were made. **On a CPU** the models are tiny
# and every step is a handful of small matrix products: the speeds measure PyTorch's per-operation
# overhead more than attention, and the RBF models run a materialised route, not the kernel. **On
# a GPU** the RBF models run the chapter 03 Triton kernel; with a context of 512 bytes they sit
# in the short-sequence regime where chapter 03 measured the kernel at its worst relative to flash
# attention (its launches cost host time that a short sequence cannot hide), while the MLPs, the
# same in every model, take a large share of each step.
#
# The losses: how large a gap between variants must be before it means anything is measured at the
# end of the chapter, by training the baseline again with another seed. And a loss curve that is
# still falling steeply at the last step says the budget, not the architecture, set the final number.
#
# ## Early training: gradient norms and whole curves
#
# One claim made for RBF attention is about *how* it trains. Pisoni's write-up says the swap to
# distances aims "to stabilize training", and the repository's README reports that its RBF model
# "converged slightly faster" than dot-product attention on TinyStories. A mechanism is easy to
# name: before softmax drops the query term, an RBF logit is capped at zero,
# $-s\lVert q-k\rVert^2 \le 0$, so no key can raise its score by growing; gradients might then stay
# tamer in the first steps, where the weights move most. Dot product with QK-norm caps its logits
# too (normalised queries and keys), which is why it is the second baseline.
#
# Every run logs `grad_norm`: the global gradient norm *before* clipping, averaged over each logging
# window (`train.train` clips the update at norm 1, but the norm it logs is the raw one). Three
# panels per run: the gradient norm, the training loss at every logged window (the whole curve, not
# one point), and the validation loss.

# %%
def logged(run: train.RunResult, column: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metrics column, over the rows that have it."""
    rows = [row for row in run.metrics if row.get(column) is not None]
    return [row["step"] for row in rows], [row[column] for row in rows]


run_colors = dict(zip(VARIANT_NAMES, [viz.COLORS["dot"], "#8172b2", "#55a868", viz.COLORS["rbf"], "#2a7f9e",
                                      "#e0a030"], strict=True))
run_styles = {name: {"color": run_colors[name], "ls": "--" if configs[name].model.attention == "dot" else "-"}
              for name in VARIANT_NAMES}
figure, axes = plt.subplots(1, 3, figsize=(16, 4.2))
for name in VARIANT_NAMES:
    for ax, column in zip(axes, ["grad_norm", "train_loss", "val_loss"], strict=True):
        steps, values = logged(trained[name], column)
        ax.plot(steps, values, marker="." if column == "val_loss" else None, label=name, lw=1.3, **run_styles[name])
axes[0].set_yscale("log")
for ax, ylabel in zip(axes, ["gradient norm before clipping (log scale)", "training loss (nats per byte)",
                             "validation loss (nats per byte)"], strict=True):
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
axes[0].axhline(budget.grad_clip, color="#8c8c8c", ls=":", label="clipping threshold")
axes[0].legend(fontsize=8)
figure.suptitle(f"Whole runs, preset {PRESET!r}: dashed = dot product, solid = RBF")
plt.show()

# %% [markdown]
# Two numbers per run make the claim testable. Over the first fifth of training: the mean gradient
# norm, and its **roughness**, the mean change of $\ln(\text{grad norm})$ from one logging window to
# the next (0 for a smooth trace, larger for a jumpy one). And the validation loss at the first
# evaluation, for "faster early training". The verdicts are computed, against *both* baselines:

# %%
early_steps = budget.steps // 5
early = {}
for name in VARIANT_NAMES:
    steps, norms = logged(trained[name], "grad_norm")
    assert norms and all(math.isfinite(norm) and norm > 0 for norm in norms), f"{name}: a bad gradient norm"
    window = [norm for step, norm in zip(steps, norms, strict=True) if step <= early_steps]
    jumps = [abs(math.log(b) - math.log(a)) for a, b in zip(window, window[1:], strict=False)]
    first_val = logged(trained[name], "val_loss")[1][0]
    early[name] = {"mean": sum(window) / len(window), "roughness": sum(jumps) / max(len(jumps), 1),
                   "first val": first_val}
print(f"first {early_steps} steps ({len(window)} logging windows); first evaluation at step "
      f"{logged(trained['dot-rope'], 'val_loss')[0][0]}")
print(f"{'variant':<25}{'mean grad norm':>15}{'roughness':>11}{'first val loss':>16}")
for name, numbers in early.items():
    print(f"{name:<25}{numbers['mean']:>15.3f}{numbers['roughness']:>11.3f}{numbers['first val']:>16.4f}")

dot_names = [name for name in VARIANT_NAMES if configs[name].model.attention == "dot"]
rbf_run_names = [name for name in VARIANT_NAMES if configs[name].model.attention == "rbf"]


def compared(metric: str, lower: str, higher: str) -> str:
    """Whether every RBF run is below (or above) every dot-product baseline on ``metric``."""
    best_dot, worst_dot = min(early[d][metric] for d in dot_names), max(early[d][metric] for d in dot_names)
    if all(early[r][metric] < best_dot for r in rbf_run_names):
        return f"every RBF run {lower} than both dot-product baselines"
    if all(early[r][metric] > worst_dot for r in rbf_run_names):
        return f"every RBF run {higher} than both dot-product baselines"
    return "mixed: the RBF runs do not sit on one side of the dot-product baselines"


print(f"early gradient norm:  {compared('mean', 'lower', 'higher')}")
print(f"early roughness:      {compared('roughness', 'smoother', 'rougher')}")
print(f"first val loss:       {compared('first val', 'ahead (lower)', 'behind (higher)')}")

# %% [markdown]
# On this CPU's tiny runs (150 steps of 16 × 64 bytes, one seed) the traces were close together:
# every run's gradient norm starts between 2 and 3, falls to about the clipping threshold by step
# 50, and the lines cross; the computed verdicts above say which side each run fell on (on this
# machine: mixed on all three measures). The
# honest reading is narrow: at this size the capped RBF logits do not produce a visibly tamer or
# faster start than the dot product, with or without QK-norm. On a GPU the same cells compare the
# `gpu10` runs, whose first 400 steps cover 40 logging windows; the recorded comparison below
# shows the GPU's loss curves.
#
# ### Exercise 2: bits per byte
#
# The table also reports **bits per byte**. Bits because information is counted in them (one bit
# is $\ln 2$ nats); per *byte* because that is what the text is made of, whatever the model's
# tokens are. A model with a tokeniser predicts fewer, longer tokens, and its loss per token is
# not comparable with ours; its loss per byte is. Write `bits_per_byte(loss_nats, n_tokens,
# n_bytes)`: a mean loss of `loss_nats` nats per token, over `n_tokens` tokens that spell
# `n_bytes` bytes of text, in bits per byte. (Here every token is one byte; a uniform guess over
# 256 bytes is exactly 8 bits per byte.)

# %% nbgrader={"grade": false, "grade_id": "ch07-ex2-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    ### BEGIN SOLUTION
    total_bits = loss_nats * n_tokens / math.log(2)
    return total_bits / n_bytes
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch07-ex2-check", "locked": true, "points": 1, "schema_version": 3, "solution": false, "task": false}
checks.ch07.check_bits_per_byte(bits_per_byte)

# %% [markdown]
# ## The real run, on a GPU
#
# A CPU can only train toys. The comparison this chapter is about — the `gpu10` preset: 10 M
# parameters, 2000 steps of 32 sequences of 512 bytes — was run on a GPU and recorded in the
# package (`rbf_tutorial.results.RECORDED_TRAINING`), with the device, the library versions, the
# date and the command that made it. Below is its table and its curves, read back by
# `rbf_tutorial.results` and shown by the same code as the runs above; the variants and every number
# come from the file, so a newer recording shows here as it is. (On a GPU the runs above *are* this
# experiment, on your machine: the recorded one is there to compare with.)

# %%
if results.RECORDED_TRAINING.is_file():
    recorded = results.load_recorded()
    print(results.describe(recorded))
    print()
    print(results.format_table(recorded))
else:
    recorded = None
    print(f"No recorded GPU comparison ships with this copy of the package ({results.RECORDED_TRAINING} "
          "is missing).\nMake one on a GPU: train the variants with `rbf-tutorial train --preset "
          "gpu10 --variant NAME`, then call rbf_tutorial.results.record_runs(run_folders, path, command=...).")

# %%
if recorded is not None:
    by_name = {run.name: run for run in recorded.runs}
    base_name = "dot-rope" if "dot-rope" in by_name else recorded.runs[0].name
    base = by_name[base_name].summary
    for run in recorded.runs:
        speed = run.summary["tokens_per_s_median"] / base["tokens_per_s_median"]
        change = run.summary["final_val_loss"] - base["final_val_loss"]
        print(f"{run.name:<25} final val loss {run.summary['final_val_loss']:.4f} nats ({change:+.4f} vs "
              f"{base_name}), {run.summary['tokens_per_s_median']:,.0f} tokens/s ({speed:.2f}x {base_name})")
    display(results.plot_recorded(recorded))

# %% [markdown]
# One final number per run hides most of a run. The whole validation curve of every recorded run,
# evaluation by evaluation, with the leader at each step; then, per run, where its curve was lowest
# and whether it turned up after that (a model that has begun to memorise its corpus):

# %%
if recorded is not None:
    curves = {run.name: {row["step"]: row["val_loss"] for row in run.metrics if row.get("val_loss") is not None}
              for run in recorded.runs}
    names = list(curves)
    eval_steps = sorted(set().union(*(curve.keys() for curve in curves.values())))
    print(f"{'step':>6}" + "".join(f"{name[:22]:>24}" for name in names) + f"{'lowest':>26}")
    for step in eval_steps:
        row = {name: curves[name].get(step) for name in names}
        present = {name: value for name, value in row.items() if value is not None}
        leader = min(present, key=present.get)
        print(f"{step:>6}" + "".join(f"{value:>24.4f}" if value is not None else f"{'':>24}" for value in row.values())
              + f"{leader[:24]:>26}")
    print()
    for name, curve in curves.items():
        lowest_step = min(curve, key=curve.get)
        last_step = max(curve)
        turned = curve[last_step] - curve[lowest_step]
        behind_base = [step for step in eval_steps if step in curve and curve[step] > curves[base_name].get(step, 1e9)]
        print(f"{name:<25} lowest {curve[lowest_step]:.4f} at step {lowest_step}, last {curve[last_step]:.4f}"
              + (f" (up {turned:.4f} since)" if turned > 0 else "")
              + (f"; behind {base_name} at steps {behind_base}" if name != base_name and behind_base else ""))
    with_grad_norms = [run.name for run in recorded.runs if any(row.get("grad_norm") is not None for row in run.metrics)]
    print("\ngradient norms recorded for: " + (", ".join(with_grad_norms) if with_grad_norms else
                                               "none (this recording keeps the validation rows only)"))

# %% [markdown]
# How to read the recorded comparison, whatever recording this package carries:
#
# - **Read whole curves.** A variant can be behind at the first evaluations and ahead at the end, or
#   the other way round; the table above says at which steps. The SuSiE variants have to learn their
#   positions through SuSiE's scales, which is one reason for a slow start (chapter 05 measured that
#   SuSiE starts an order of magnitude stronger than RoPE in a freshly initialised model). A single
#   point — the end, or step 300 — is not the comparison.
# - **One seed settles little.** Two runs of the same command and seed on a GPU drift apart by a few
#   hundredths of a nat (bf16 arithmetic, and the order of the GPU's atomic additions): two earlier
#   H100 recordings of this comparison disagreed by up to 0.04 nats on the gap between dot-rope and
#   the RBF variants, and agreed only on its sign. A gap smaller than that needs several seeds.
# - **A curve that turns up** at the end while the training loss keeps falling is memorising: the
#   corpus is an interpreter's standard library (a few MB), read several times within the budget.
# - **By wall time** the RBF runs start later (their first steps compile and autotune the Triton
#   kernels, which SDPA does not need) and run at the tokens per second printed above.
# - **The scale ablation and QK-norm** are in the recording when it lists `rbf-susie-reg-halfscale`
#   and `dot-qknorm-rope`: the first says how much of an RBF result is its doubled $q\cdot k$ weight,
#   the second whether the dot product with its standard fix for loud keys closes the gap.
#
# ## Inside the trained models: attention maps
#
# Losses say how well; captures say how. `model(inputs, capture=[])` records, per layer, the
# queries, keys and values attention saw, and `model.attention_weights(capture)` recomputes its
# softmax weights, register columns first. Here is one validation window:

# %%
context = budget.model.context
probe_batch, _ = next(data.eval_windows(corpus.val, batch_size=8, context=context, max_batches=1,
                                        device=DEVICE))
SHOWN_ROW = 4  # a window from the middle of the validation bytes
print(bytes(probe_batch[SHOWN_ROW, :sizes(cpu=64, gpu=160)].tolist()).decode("utf-8", errors="replace"))

captures = {}
for name, run in trained.items():
    run.model.eval()
    capture = []
    with torch.no_grad():
        run.model(probe_batch, capture=capture)
    captures[name] = capture

# %%
def one_window(capture, row: int):
    """The capture of one batch row. For RBF, attention_weights builds every q_i - k_j difference:
    (H, T, R + T, head_dim) numbers per row, so rows go one at a time."""
    return replace(capture, q=capture.q[row:row + 1], k=capture.k[row:row + 1])


shown_queries = min(context, 64)
layer = budget.model.n_layers - 1
map_columns = 3
map_rows = math.ceil(len(VARIANT_NAMES) / map_columns)
figure, axes = plt.subplots(map_rows, map_columns, figsize=(4.2 * map_columns, 4.2 * map_rows),
                            layout="constrained", squeeze=False)
for ax in axes.flat[len(VARIANT_NAMES):]:
    ax.set_visible(False)
for ax, name in zip(axes.flat, VARIANT_NAMES, strict=False):
    capture = one_window(captures[name][layer], SHOWN_ROW)
    weights = trained[name].model.attention_weights(capture)[0, 0].cpu()  # head 0: (T, R + T)
    registers = weights.shape[1] - weights.shape[0]
    image = ax.imshow(weights[:shown_queries, :registers + shown_queries].numpy(), cmap="viridis",
                      norm=PowerNorm(gamma=0.4, vmin=0, vmax=1), aspect="auto", interpolation="nearest")
    ax.set(title=f"{name}, layer {layer}, head 0", xlabel="key (registers first)" if registers else "key",
           ylabel="query")
    ax.grid(False)
    if registers:
        ax.axvline(registers - 0.5, color="white", linewidth=0.8)
figure.colorbar(image, ax=axes, shrink=0.8, label="attention weight (power scale, γ = 0.4)")
plt.show()

# %% [markdown]
# Two numbers summarise a map: how far back a head looks on average, $\sum_j a_{ij}\,(i-j)$ over
# the token keys, and how much weight goes to the registers. Averaged over every query, head and
# window of the batch:

# %%
print(f"{'variant':<25}" + "".join(f"{'layer ' + str(i):>24}" for i in range(budget.model.n_layers)))
print(f"{'':<25}" + f"{'look-back / register':>24}" * budget.model.n_layers)
for name in VARIANT_NAMES:
    cells = []
    for capture in captures[name]:
        look_back, register_share = 0.0, 0.0
        rows = capture.q.shape[0]
        for row in range(rows):
            weights = trained[name].model.attention_weights(one_window(capture, row))  # (1, H, T, R + T)
            registers = weights.shape[-1] - weights.shape[-2]
            token_weights = weights[..., registers:]
            positions = torch.arange(token_weights.shape[-1], device=token_weights.device)
            distance = (positions[:, None] - positions[None, :]).clamp(min=0)  # i - j for visible keys
            look_back += (token_weights * distance).sum(-1).mean().item() / rows
            register_share += weights[..., :registers].sum(-1).mean().item() / rows
        cells.append(f"{look_back:>11.1f} / {register_share:>5.2f}")
    print(f"{name:<25}" + "".join(f"{cell:>24}" for cell in cells))

# %% [markdown]
# ## Key lengths: did RBF keep its keys short?
#
# Chapter 00 started from the bully: under $q\cdot k$ a long key wins by being long, so training
# has a reason to let some keys grow. Under $-\lVert q-k\rVert^2$ length is no advantage — the
# score expands to $2\,q\cdot k - \lVert k\rVert^2$, a penalty on exactly that length (chapter
# 02). A natural guess is that the RBF models keep their keys shorter than the dot model. It is
# only a guess: RBF needs queries and keys *close*, not short, and nothing stops both from moving
# far out together. The captures can settle it.
#
# ### Exercise 3: the median key length per layer
#
# Write `key_norm_medians(captures)`: given a model's list of captures (one per layer; `capture.k`
# is `(B, H, T, head_dim)`), return a `(n_layers,)` tensor with, per layer, the median of the key
# lengths $\lVert k\rVert$ over every batch row, head and position. The median, because key lengths
# are skewed: a few long keys drag a mean far from the typical one. Register keys
# (`capture.register_k`) are not keys of tokens: leave them out.

# %% nbgrader={"grade": false, "grade_id": "ch07-ex3-solution", "locked": false, "schema_version": 3, "solution": true, "task": false} jupyter={"source_hidden": true}
def key_norm_medians(captures) -> torch.Tensor:
    ### BEGIN SOLUTION
    return torch.stack([capture.k.norm(dim=-1).flatten().median() for capture in captures])
    ### END SOLUTION


# %% nbgrader={"grade": true, "grade_id": "ch07-ex3-check", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
checks.ch07.check_key_norm_medians(key_norm_medians)

# %% [markdown]
# The distributions, one panel per layer, over the eight validation windows captured above. (For
# SuSiE models the key includes the position vector added to it: what attention saw. RoPE
# rotates and keeps lengths.)

# %%
key_lengths = {name: [capture.k.norm(dim=-1).flatten().cpu() for capture in captures[name]]
               for name in VARIANT_NAMES}
for name, per_layer in key_lengths.items():
    assert len(per_layer) == budget.model.n_layers
    assert all(bool(torch.isfinite(lengths).all() & (lengths > 0).all()) for lengths in per_layer), name

colors = run_colors
n_layers = budget.model.n_layers
figure, axes = plt.subplots(1, n_layers, figsize=(3.6 * n_layers, 3.4), layout="constrained", sharey=True,
                            squeeze=False)
axes = axes[0]
for layer, ax in enumerate(axes):
    everything = torch.cat([key_lengths[name][layer] for name in VARIANT_NAMES])
    bins = np.linspace(0, everything.max().item(), 60)
    for name in VARIANT_NAMES:
        ax.hist(key_lengths[name][layer].numpy(), bins=bins, histtype="step", density=True,
                color=colors[name], label=name, linewidth=1.4)
    ax.set(title=f"layer {layer}", xlabel="key length ‖k‖")
axes[0].set_ylabel("density")
axes[0].legend(frameon=False, fontsize=8)
figure.suptitle("Key lengths of the trained models (validation windows)")
plt.show()

# %%
medians = {name: torch.stack([lengths.median() for lengths in key_lengths[name]]) for name in VARIANT_NAMES}
print(f"{'median ‖k‖':<25}" + "".join(f"{'layer ' + str(i):>10}" for i in range(n_layers)) + f"{'vs dot':>10}")
for name in VARIANT_NAMES:
    ratio = (medians[name] / medians["dot-rope"]).mean().item()
    print(f"{name:<25}" + "".join(f"{m:>10.2f}" for m in medians[name].tolist()) + f"{ratio:>9.2f}x")

rbf_names = [name for name in VARIANT_NAMES if configs[name].model.attention == "rbf"]
shorter = {name: int((medians[name] < medians["dot-rope"]).sum()) for name in rbf_names}
print()
for name in rbf_names:
    print(f"{name}: median key shorter than dot-rope's in {shorter[name]} of {n_layers} layers")
if all(count == n_layers for count in shorter.values()):
    print("Here every RBF model kept its keys shorter than the dot model, in every layer.")
elif not any(shorter.values()):
    print("Here no RBF model kept its keys shorter than the dot model, in any layer: the guess was wrong.")
else:
    print("Mixed: RBF keys are shorter in some layers and models, not all — no single story here.")

# %% [markdown]
# Whatever came out above, it is one window batch of one seed of tiny models: a description of
# these models, not a law. Two things make the comparison subtler than it looks. Lengths are not
# comparable across score functions without thinking about scale: a dot model's logits grow with
# $\lVert q\rVert\lVert k\rVert$, an RBF model's with $\lVert q-k\rVert^2$, so the same logit
# range asks for different lengths. And in an RBF model what matters is where the queries sit
# relative to the keys, which the key length alone does not show.
#
# ## How much is chance?
#
# Every number above comes from one seed. Training the baseline again with another seed —
# other initial weights, another order of batches, everything else equal — shows how much of a
# difference between variants chance alone could make.

# %%
second = train_variant("dot-rope", seed=SEED + 1)
seed_gap = abs(second.summary["final_val_loss"] - baseline["final_val_loss"])
finals = [trained[name].summary["final_val_loss"] for name in VARIANT_NAMES]
print(f"dot-rope, seed {SEED} vs seed {SEED + 1}: final val loss {baseline['final_val_loss']:.4f} vs "
      f"{second.summary['final_val_loss']:.4f}, a gap of {seed_gap:.4f} nats")
spread = max(finals) - min(finals)
print(f"spread of the {len(finals)} variants' final val loss (one seed each): {spread:.4f} nats, "
      f"{spread / max(seed_gap, 1e-12):.1f} times the gap between the two seeds")

# %% [markdown]
# One extra seed is a single sample of that noise, not its size; a claim that one variant is better
# needs several seeds per variant and a gap well outside their spread.
#
# ## Summary
#
# - Six models that differ only in attention, trained on the same bytes in the same order with
#   the same budget, can be compared by validation loss **per step** (what they learn from the
#   data) and **per second** (what they learn from the hardware), and by tokens per second.
# - Validation loss is only comparable on fixed windows, with dropout off and every token counted
#   once; bits per byte ($\text{nats per token}\times\frac{\text{tokens}}{\text{bytes}}/\ln 2$) makes
#   it comparable across tokenisers.
# - `rbf_tutorial.train` and `rbf_tutorial.compare` are the same code as `rbf-tutorial train` and
#   `rbf-tutorial compare`; `rbf_tutorial.results` keeps a GPU comparison in the package with its
#   device, versions, date and command, so a CPU can show it.
# - At equal logit scale RBF weighs $q\cdot k$ twice as heavily as the dot product;
#   `rbf-susie-reg-halfscale` removes that difference, and `dot-qknorm-rope` gives the dot product
#   the standard fix for loud keys. Both belong in any comparison that credits the distance.
# - Gradient-norm traces (`grad_norm`, before clipping) and whole loss curves test the claim of a
#   smoother, faster start. In this CPU run the RBF runs did not sit on one side of the dot-product
#   baselines on any of the three early measures; the GPU recording's curves are read step by step.
# - Captures open the trained models: attention maps, how far back heads look, how much weight the
#   registers take, and the key lengths that chapter 00's bully was about.
#
# ## Where this breaks
#
# - **A tiny budget.** `gpu10` is 2000 steps of 32 × 512 bytes: 33 M bytes at 10 M parameters.
#   Models this small and this briefly trained are far from what they could learn; differences
#   between variants at the end of a short run can shrink, vanish or reverse with a longer one, and
#   nothing here says how they scale.
# - **A corpus that depends on the machine.** "The standard library" is whatever the interpreter
#   installed: `corpus.source`, printed near the top, says what this machine has; the H100 that made
#   the recording had 422 files, 7.6 MB. A smaller corpus is read several times over within the
#   budget, and a model that has begun to memorise (the recorded curves turn up at the end) is
#   compared on memory as much as on attention. Compare numbers only between runs on one corpus —
#   `data` in every run's summary says which.
# - **One seed, one learning rate.** Every variant got the baseline's recipe. An RBF model may
#   prefer another learning rate; the half-scale variant tests one other score scale, not the best
#   one. A comparison at one setting favours whichever model that setting happens to suit, and one
#   seed per variant cannot separate a small gap from noise.
# - **Gradient norms are a blunt instrument.** The logged norm is one number for the whole model,
#   averaged over a logging window; attention's share of it, and spikes within a window, do not show.
# - **A peculiar corpus.** Byte-level Python source is repetitive and formulaic (indentation,
#   keywords, docstrings). Bits per byte here are not comparable with numbers on natural language,
#   and what helps on code need not help elsewhere. The validation files are held out, but they
#   come from the same library, written in the same style.
# - **Speed at one size.** Tokens per second depends on the device, the context length, whether
#   the model is compiled (`--compile`), and on the MLPs that every variant shares. At context 512
#   the kernel's fixed launch cost weighs heavily (chapter 03); at long contexts attention takes a
#   larger share of each step and the picture can change.
# - **What the numbers can say:** whether, at this scale and budget, the RBF variants train about
#   as well as dot product with RoPE, and at what cost in speed; what the trained attention looks
#   like. **What they cannot say:** which attention is better in general, at scale, or on other
#   data.

# %% [markdown]
# ## Sources and further reading
#
# - R. Pisoni, *Scaled RBF Attention: Trading Dot Products for Euclidean Distance*
#   (https://pisoni.ai/posts/scaled-rbf-attention/) and https://github.com/4rtemi5/rbf_attention: the
#   small causal language model trained with RBF attention, SuSiE and registers against dot-product
#   attention, whose README reports the RBF model converging slightly faster on TinyStories; the
#   experiment this chapter repeats on another corpus, with more baselines and the scale ablation.
# - A. Henry, P. R. Dachapally, S. Pawar, Y. Chen, *Query-Key Normalization for Transformers*
#   (arXiv:2010.04245), and M. Dehghani et al., *Scaling Vision Transformers to 22 Billion
#   Parameters* (arXiv:2302.05442): normalised queries and keys, the `dot-qknorm-rope` baseline.
# - J. Su et al., *RoFormer* (arXiv:2104.09864): RoPE, the positional scheme of the baselines.
# - S. Zhai, *Exclusive Self Attention* (arXiv:2603.09078): XSA, the `rbf-susie-reg-xsa` variant.
# - T. Darcet, M. Oquab, J. Mairal, P. Bojanowski, *Vision Transformers Need Registers*
#   (arXiv:2309.16588): registers, here one per head at the origin.
# - PyTorch, `torch.nn.utils.clip_grad_norm_`
#   (https://docs.pytorch.org/docs/stable/generated/torch.nn.utils.clip_grad_norm_.html): the clipping that
#   returns the pre-clip gradient norm logged as `grad_norm`.
