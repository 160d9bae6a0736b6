"""The two pictures of chapter 03: the online softmax converging, and the tiles each kernel visits.

Both are drawn from what the kernels compute, never from a separate model of them: the online
softmax from the running state the teaching kernel writes after every key tile
(:func:`rbf_tutorial.teaching.online_softmax_trace`), the tile maps from the bounds that
``key_range`` and ``query_start`` return inside a kernel (:func:`rbf_tutorial.teaching.forward_bounds`,
:func:`rbf_tutorial.teaching.dkdv_bounds`). Change a bound formula and the picture changes with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

__all__ = ["TileVisits", "most_rescaled_row", "online_softmax_figure", "tile_visit_figure", "tile_visits"]

SKIPPED, MASKED, UNMASKED = 0, 1, 2
_COLOURS = ListedColormap(["#eeeeee", "#e0a030", "#2a7f9e"])
_LEGEND = [Patch(facecolor="#eeeeee", edgecolor="0.6", label="skipped (never loaded)"),
           Patch(facecolor="#e0a030", label="visited, masked"),
           Patch(facecolor="#2a7f9e", label="visited, no mask")]


# ------------------------------------------------------------------------------------------------
# (a) the online softmax, key tile by key tile


def most_rescaled_row(trace_max: torch.Tensor) -> int:
    """The query row whose running maximum rose most often (the row where the rescale works hardest)."""
    rises = (trace_max[1:] > trace_max[:-1]).sum(dim=0)
    return int(rises.argmax())


def online_softmax_figure(trace_max, trace_sum, trace_acc, exact_max, exact_sum, exact_out, *, row: int,
                          coordinates=(0, 1), title: str = ""):
    """Three panels for one query row: running max m, running sum l, and acc / l for two output
    coordinates, after each key tile, with the exact float64 values dashed.

    ``trace_*`` come from :func:`rbf_tutorial.teaching.online_softmax_trace` (tiles first);
    ``exact_max`` and ``exact_sum`` are the row's float64 max and sum over all keys (base 2),
    ``exact_out`` its attention output.
    """
    steps = np.arange(1, trace_max.shape[0] + 1)
    m = trace_max[:, row].double().cpu().numpy()
    total = trace_sum[:, row].double().cpu().numpy()
    out = (trace_acc[:, row] / trace_sum[:, row, None]).double().cpu().numpy()
    rose = np.flatnonzero(np.diff(m, prepend=-np.inf) > 0) + 1  # tiles after which m moved up

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), layout="constrained")
    axes[0].plot(steps, m, "o-", label="running max m")
    axes[0].axhline(float(exact_max), color="k", ls="--", lw=1, label="max over all keys (float64)")
    axes[0].set_ylabel("m (base-2 logit units)")
    axes[1].plot(steps, total, "o-", color="C1", label=r"running sum $\ell$")
    axes[1].axhline(float(exact_sum), color="k", ls="--", lw=1, label=r"$\sum_j 2^{s_j - m}$ (float64)")
    axes[1].set_ylabel(r"$\ell$ (relative to the running m)")
    for index, coordinate in enumerate(coordinates):
        colour = f"C{index + 2}"
        axes[2].plot(steps, out[:, coordinate], "o-", color=colour, label=f"acc/ℓ, coordinate {coordinate}")
        axes[2].axhline(float(exact_out[coordinate]), color=colour, ls="--", lw=1,
                        label=f"exact output {coordinate} (float64)")
    axes[2].set_ylabel(r"acc / $\ell$")
    for ax, panel in zip(axes, ("the running maximum", "the running sum", "the output so far"), strict=True):
        for step in rose[1:]:  # where m rose, the old terms were rescaled by alpha < 1
            ax.axvline(step, color="0.85", lw=4, zorder=0)
        ax.set_xlabel("key tiles seen")
        ax.set_xticks(steps)
        ax.set_title(panel)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"Online softmax for query row {row} (grey bands: m rose, old terms rescaled)")
    return fig


# ------------------------------------------------------------------------------------------------
# (b) which (query tile, key tile) pairs each kernel's programs visit


@dataclass(frozen=True)
class TileVisits:
    """For one kernel: per (query tile, key tile), what happens and at which step of its program."""

    kernel: str  # "forward", "dkdv" or "dq"
    kinds: np.ndarray  # (query tiles, key tiles): SKIPPED, MASKED or UNMASKED
    steps: np.ndarray  # (query tiles, key tiles): 1, 2, ... in the owning program's loop order; 0 if skipped
    programs: str  # what one program owns: "query tile" or "key tile"

    @property
    def visited_share(self) -> float:
        return float((self.kinds != SKIPPED).mean())


def tile_visits(n_queries: int, n_keys: int, block_m: int, block_n: int, *, key_range=None,
                causal: bool = True) -> dict[str, TileVisits]:
    """The visits of the forward, dK/dV and dQ teaching kernels, from their own bound functions.

    ``key_range`` is the forward's (and dQ's) bound piece, the reference one by default: pass the
    learner's to draw what their kernel would do.
    """
    from . import teaching

    key_range = key_range or teaching.key_range
    query_tiles, key_tiles = -(-n_queries // block_m), -(-n_keys // block_n)
    forward_bounds = teaching.forward_bounds(n_queries, n_keys, causal=causal, block_m=block_m,
                                             block_n=block_n, key_range=key_range)
    starts = teaching.dkdv_bounds(n_queries, n_keys, causal=causal, block_m=block_m, block_n=block_n)

    def empty():
        return np.zeros((query_tiles, key_tiles), dtype=int), np.zeros((query_tiles, key_tiles), dtype=int)

    kinds, steps = empty()
    dq_kinds, dq_steps = empty()
    for tile_m, (band_start, hi) in enumerate(forward_bounds):
        unmasked = list(range(0, band_start, block_n))
        masked = list(range(band_start, hi, block_n))
        for step, start in enumerate(unmasked + masked, start=1):
            kinds[tile_m, start // block_n] = UNMASKED if start in unmasked else MASKED
            steps[tile_m, start // block_n] = step
        for step, start in enumerate(range(0, hi, block_n), start=1):  # dQ: the same hi, every tile masked
            dq_kinds[tile_m, start // block_n] = MASKED
            dq_steps[tile_m, start // block_n] = step
    dkdv_kinds, dkdv_steps = empty()
    for tile_n, lo in enumerate(starts):
        for step, start in enumerate(range(lo, n_queries, block_m), start=1):
            dkdv_kinds[start // block_m, tile_n] = MASKED
            dkdv_steps[start // block_m, tile_n] = step
    return {
        "forward": TileVisits("forward", kinds, steps, "query tile"),
        "dkdv": TileVisits("dkdv", dkdv_kinds, dkdv_steps, "key tile"),
        "dq": TileVisits("dq", dq_kinds, dq_steps, "query tile"),
    }


_PANEL_TITLES = {
    "forward": "forward: one program per query tile,\nwalking right along its row",
    "dkdv": "dK, dV: one program per key tile,\nwalking down its column",
    "dq": "dQ: one program per query tile,\nwalking right along its row",
}


def tile_visit_figure(visits: dict[str, TileVisits], n_queries: int, n_keys: int, block_m: int, block_n: int,
                      *, kernels=("forward", "dkdv", "dq"), causal: bool = True, title: str = ""):
    """One panel per kernel: tiles coloured skipped / masked / unmasked, each visited tile numbered
    with its step in the owning program's loop, and the causal diagonal drawn over them."""
    fig, axes = plt.subplots(1, len(kernels), figsize=(4.2 * len(kernels) + 1.5, 4.2), layout="constrained",
                             squeeze=False)
    for ax, name in zip(axes[0], kernels, strict=True):
        tile_map = visits[name]
        rows, cols = tile_map.kinds.shape
        ax.imshow(tile_map.kinds, cmap=_COLOURS, vmin=0, vmax=2, extent=(0, cols, rows, 0))
        for i in range(rows):
            for j in range(cols):
                if tile_map.steps[i, j]:
                    colour = "white" if tile_map.kinds[i, j] == UNMASKED else "black"
                    ax.text(j + 0.5, i + 0.5, str(tile_map.steps[i, j]), ha="center", va="center",
                            fontsize=8, color=colour)
        if causal:  # the last key query i sees is i + Nk - Nq; in tile units
            queries = np.array([0, n_queries])
            ax.plot((queries + n_keys - n_queries) / block_n, queries / block_m, color="crimson", lw=1.2,
                    label="causal diagonal")
        ax.set_xlim(0, cols)
        ax.set_ylim(rows, 0)
        ax.set_xticks(np.arange(cols) + 0.5, [str(j) for j in range(cols)])
        ax.set_yticks(np.arange(rows) + 0.5, [str(i) for i in range(rows)])
        ax.grid(False)
        ax.set_xlabel(f"key tile ({block_n} keys each)")
        ax.set_ylabel(f"query tile ({block_m} queries each)")
        ax.set_title(f"{_PANEL_TITLES[name]} ({tile_map.visited_share:.0%} of tiles visited)", fontsize=10)
    handles = list(_LEGEND)
    if causal:
        handles.append(plt.Line2D([], [], color="crimson", lw=1.2, label="causal diagonal"))
    axes[0][-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.suptitle(title or f"Tiles each program visits (numbers: loop order), causal, Nq={n_queries}, "
                          f"Nk={n_keys}")
    return fig
