"""One look for every chapter's figures, and the plots more than one chapter draws.

Call :func:`use_style` once at the top of a chapter. Every helper takes an optional ``ax`` (so
figures can be composed) and returns the axes it drew on; every figure gets a title, axis labels
with units, and a legend where there is more than one thing to tell apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from .memory import QuadraticFit, format_bytes

__all__ = [
    "COLORS",
    "plot_bars",
    "plot_memory_curve",
    "plot_query_and_keys",
    "plot_softmax_bars",
    "use_style",
]

#: The same idea gets the same colour in every chapter.
COLORS: dict[str, str] = {
    "dot": "#c44e52",  # dot-product attention
    "rbf": "#2a7f9e",  # distance (RBF) attention
    "query": "#333333",
    "measured": "#2a7f9e",
    "fit": "#8c8c8c",
    "limit": "#c44e52",
}
_CYCLE = ["#2a7f9e", "#c44e52", "#e0a030", "#55a868", "#8172b2", "#8c8c8c"]
_KEY_COLORS = ["#55a868", "#e0a030", "#8172b2", "#937860", "#da8bc3"]


def use_style() -> None:
    """Set a clean, consistent matplotlib style: light grid, no top/right frame, readable fonts."""
    mpl.rcParams.update(
        {
            "figure.figsize": (7.0, 4.0),
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "figure.constrained_layout.use": True,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.titlesize": 12,
            "axes.titleweight": "bold",
            "axes.labelsize": 11,
            "legend.frameon": False,
            "legend.fontsize": 10,
            "axes.prop_cycle": mpl.cycler(color=_CYCLE),
        }
    )


def _axes(ax: Axes | None, figsize: tuple[float, float] | None = None) -> Axes:
    if ax is not None:
        return ax
    _, new_ax = plt.subplots(figsize=figsize)
    return new_ax


def plot_softmax_bars(
    labels: Sequence[str],
    distributions: Mapping[str, Sequence[float]],
    *,
    ax: Axes | None = None,
    title: str = "Attention weights",
    colors: Mapping[str, str] | None = None,
) -> Axes:
    """Grouped bars: one group per key, one bar per scoring rule (e.g. ``{"dot": p, "rbf": p}``).

    Each distribution is a softmax over the keys, so bars are probabilities in [0, 1] and are
    labelled with their value.
    """
    ax = _axes(ax)
    names = list(distributions)
    width = 0.8 / max(len(names), 1)
    positions = np.arange(len(labels))
    for i, name in enumerate(names):
        probs = np.asarray(distributions[name], dtype=float)
        if probs.shape != (len(labels),):
            raise ValueError(
                f"distributions[{name!r}]: expected {len(labels)} weights, got shape {probs.shape}"
            )
        color = (colors or {}).get(name) or COLORS.get(name.split()[0].lower())
        bars = ax.bar(positions + (i - (len(names) - 1) / 2) * width, probs, width, label=name, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=9, padding=2)
    ax.set_xticks(positions, labels)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("attention weight (probability)")
    ax.set_xlabel("key")
    ax.set_title(title)
    if len(names) > 1:
        ax.legend(loc="upper left")
    return ax


def plot_query_and_keys(
    query: Sequence[float],
    keys: Mapping[str, Sequence[float]],
    *,
    ax: Axes | None = None,
    title: str = "Query and keys",
) -> Axes:
    """Draw a 2-D query and keys as arrows from the origin, each labelled at its tip."""
    ax = _axes(ax, figsize=(4.5, 4.5))
    vectors = {"query": np.asarray(query, dtype=float)}
    vectors.update({name: np.asarray(vector, dtype=float) for name, vector in keys.items()})
    # Keys get colours of their own, so they are never mistaken for a scoring rule's colour.
    for (name, vec), color in zip(vectors.items(), [COLORS["query"], *_KEY_COLORS], strict=False):
        if vec.shape != (2,):
            raise ValueError(f"{name}: expected a 2-D vector, got shape {vec.shape}")
        ax.annotate("", xy=vec, xytext=(0, 0), arrowprops={"arrowstyle": "-|>", "color": color, "lw": 2})
        ax.plot([], [], color=color, lw=2, label=f"{name}  |v| = {np.linalg.norm(vec):.2f}")
    points = np.vstack([np.zeros(2), *vectors.values()])
    margin = 0.15 * max(float(np.ptp(points, axis=0).max()), 1.0)
    low, high = points.min(axis=0) - margin, points.max(axis=0) + margin
    side = float((high - low).max())  # a square window, so angles look like angles
    ax.set_xlim(low[0], low[0] + side)
    ax.set_ylim(low[1], low[1] + side)
    ax.set_aspect("equal")
    ax.set_xlabel("dimension 1 (unitless)")
    ax.set_ylabel("dimension 2 (unitless)")
    ax.set_title(title)
    ax.legend(loc="lower right")  # keys in these chapters point up and right of the origin
    return ax


_BYTES_AXIS = FuncFormatter(lambda value, _pos: format_bytes(value))


def plot_memory_curve(
    ns: Sequence[float],
    measured: Sequence[float],
    fit: QuadraticFit | None = None,
    oom_n: float | None = None,
    *,
    available_bytes: float | None = None,
    ax: Axes | None = None,
    title: str = "Peak memory of naive RBF attention",
    label: str = "measured peak",
) -> Axes:
    """Measured peak memory against sequence length on log-log axes, with the N² fit.

    A quadratic is a straight line of slope 2 here. With ``oom_n`` (and ``available_bytes``)
    the fit is extended to where it meets the device's memory, and that point is marked.
    """
    ax = _axes(ax)
    ns_array = np.asarray(ns, dtype=float)
    ax.loglog(ns_array, measured, "o", color=COLORS["measured"], label=label, zorder=3)
    if fit is not None:
        right = max(ns_array.max(), oom_n or 0) * 1.3
        grid = np.geomspace(ns_array.min(), right, 200)
        ax.loglog(grid, fit(grid), "-", color=COLORS["fit"], label=f"fit: {fit.a:.3g}·N² + {fit.b:.3g}·N + …")
    if available_bytes is not None:
        ax.axhline(available_bytes, color=COLORS["limit"], ls="--",
                   label=f"available memory ({format_bytes(available_bytes)})")
    if oom_n is not None:
        ax.axvline(oom_n, color=COLORS["limit"], ls=":", label=f"predicted out of memory: N ≈ {oom_n:,.0f}")
    # Ticks at powers of 4 bytes land on round binary sizes (1 MiB, 4 MiB, ..., 1 GiB, 4 GiB).
    ax.yaxis.set_major_locator(LogLocator(base=4))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(_BYTES_AXIS)
    ax.set_xlabel("sequence length N (tokens, log scale)")
    ax.set_ylabel("peak memory (bytes, log scale)")
    ax.set_title(title)
    ax.legend(loc="upper left")
    return ax


def plot_bars(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    ylabel: str,
    title: str,
    reference_lines: Mapping[str, float] | None = None,
    log: bool = False,
    value_format: str = "%.3g",
    colors: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """One bar per label (e.g. per attention route), optional dashed reference lines with names.

    Bars take neutral colours by default (not the dot/RBF pair), or ``colors``, one per bar.
    """
    ax = _axes(ax)
    values_array = np.asarray(values, dtype=float)
    if values_array.shape != (len(labels),):
        raise ValueError(f"values: expected {len(labels)} numbers, got shape {values_array.shape}")
    palette = list(colors) if colors is not None else (_KEY_COLORS * len(labels))[: len(labels)]
    bars = ax.bar(np.arange(len(labels)), values_array, color=palette)
    ax.bar_label(bars, fmt=value_format, fontsize=9, padding=2)
    line_colors = [COLORS["limit"], COLORS["rbf"], "#333333"]
    for (name, level), color in zip((reference_lines or {}).items(), line_colors, strict=False):
        ax.axhline(level, ls="--", color=color, label=name)
    ax.set_xticks(np.arange(len(labels)), labels)
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, max(values_array.max(), *(reference_lines or {}).values(), 0) * 1.2 or 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if reference_lines:
        # Below the axes, where it cannot cover a bar or its label.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1)
    return ax
