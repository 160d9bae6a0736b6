"""Host side of the fused kernels: tile shapes, autotuning, grids and launches.

On a GPU each kernel is autotuned over a handful of tile shapes, per (lengths, head dims, causal,
dtype). ``RBF_TUTORIAL_AUTOTUNE=0`` skips the search and uses the first tile shape of each list, which
saves minutes of compiling when many shapes are run once (tests). Under the CPU interpreter there is
no GPU to time, so one small tile shape is used, and bf16 is computed in fp32 because the
interpreter's bf16 ``tl.dot`` gives wrong numbers.

Every launch goes one of two ways:

- **eager** (a plain call, or autograd's backward): a call looks up the *plan* of its problem (the
  layouts of its inputs, dtype and flags; see "Plans" below), which holds its launches with every
  argument but the tensors worked out once and, after the first call, the tile the autotuner
  picked; each launch then goes straight to the compiled kernel's launcher (:mod:`.direct_launch`).
  Triton's autotuner and its ordinary launch path spend tens of microseconds per call finding their
  cache entries, as much as the whole kernel at N=1024.
- **traced** (inside the ``torch.library.triton_op`` of ``op.py``, under ``torch.compile``): the
  launch is wrapped with ``torch.library.wrap_triton`` so the compiler sees the kernel itself and calls
  it from its generated code (and can capture it in a CUDA graph). Nothing here may touch real data
  then: the same code also runs on fake tensors to tell the compiler the output shapes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import cache, lru_cache
from typing import NamedTuple

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from triton.runtime.errors import OutOfResources

from rbf_tutorial.backends import as_dtype
from rbf_tutorial.runtime import interpreting as _interpreting_now
from rbf_tutorial.xsa import FUSED_VALUE_EPS

from . import direct_launch
from .backward import dkdv_kernel, dq_kernel
from .exclusive import exclusive_preprocess_kernel
from .forward import rbf_forward_kernel
from .key_norms import key_norms_kernel

# Triton reads TRITON_INTERPRET when the kernels below are decorated, at import: how they run is fixed
# from then on, so the answer is read once rather than from the environment on every launch.
_INTERPRETING = _interpreting_now()


def interpreting() -> bool:
    """Whether the kernels of this module run through the CPU interpreter (decided at import)."""
    return _INTERPRETING


LOG2_E = math.log2(math.e)
MAX_HEAD_DIM = 256

# (BLOCK_M, BLOCK_N, num_warps, num_stages). In every kernel M indexes queries and N keys; the
# forward and dq kernels own a query tile and walk over keys, dkdv owns a key tile and walks queries.
FORWARD_TILES = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2))
DKDV_TILES = ((32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2))
# dq runs without software pipelining (num_stages=1). Measured on triton 3.6 / H100 in fp16 and bf16:
# pipelined dq tiles gave run-to-run different dq, and 128-row ones wrong dq (0.04-0.23 relative
# error), while fp32, the interpreter and unpipelined tiles were right and bitwise repeatable.
# tests/gpu/test_kernels_gpu.py pins every tile shape listed here in turn and checks repeatability.
DQ_TILES = ((64, 64, 4, 1), (128, 64, 4, 1), (64, 128, 8, 1), (128, 128, 8, 1), (128, 32, 4, 1))
# Small enough for every head dim and dtype (fp32 at D=256 overflows shared memory with the tiles
# above): the autotuner always has it to fall back on, and the fixed-tile mode retries with it.
SAFE_TILE = (32, 32, 4, 1)
INTERPRETER_TILE = (16, 16, 1, 1)
XSA_PREPROCESS_BLOCK_M = 64
# From this many queries on, the forward kernel reads key norms computed once by their own small kernel
# (kernels/key_norms.py) instead of recomputing them in every query tile; below it, with few query
# tiles, the extra launch costs more host time than it saves GPU time. Measured on an H200 (bf16,
# batch 4, heads x D = 1024, forward): at N = 1024 reading them left the GPU time unchanged and made
# the eager time worse in two of four cells (0.052 -> 0.083 ms at D = 64 causal); at N = 2048 it saved
# 5% (0.219 -> 0.209 ms, D = 64), side by side; at N = 16384 the non-causal forward went from 12.6 to
# 11.7 ms between two recordings (D = 64; docs/results/kernel-benchmark-h200.md).
KEY_NORMS_MIN_QUERIES = 2048
KEY_NORMS_BLOCK_N = 64
# Triton's own defaults for CUDA (num_warps, num_stages), for kernels launched without a tile choice.
UNTILED_WARPS_AND_STAGES = (4, 3)
# XSA leaves an output unchanged when its own value has |u|^2 <= this: fp32's sqrt(smallest normal),
# the default of rbf_tutorial.xsa.exclusive in fp32 (a kernel float argument is fp32 even for fp64 data).
XSA_VALUE_EPS = FUSED_VALUE_EPS  # the one threshold, defined in rbf_tutorial.xsa
# What a tile choice depends on (Triton's autotuner adds the tensors' dtypes itself), plus the flags of
# the kernels that have them: EXCLUSIVE (forward, dkdv), COMPUTE_DELTA (dq) and KEY_NORMS_GIVEN
# (forward) change the work per tile.
TUNE_KEY = ["n_queries", "n_keys", "HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "EXCLUSIVE", "COMPUTE_DELTA",
            "KEY_NORMS_GIVEN"]

Tile = tuple[int, int, int, int]
Grid = Callable[[dict], tuple[int, int]]


def _autotuning() -> bool:
    """Whether launches search over tile shapes; ``RBF_TUTORIAL_AUTOTUNE=0`` turns that off."""
    return os.environ.get("RBF_TUTORIAL_AUTOTUNE", "1") != "0"


def _tile_choices(tiles: tuple[Tile, ...], autotuning: bool) -> tuple[Tile, ...]:
    """The tile shapes a launch may use on this machine, best guess first."""
    if interpreting():
        return (INTERPRETER_TILE,)
    if not autotuning:
        return (tiles[0], SAFE_TILE)  # the safe tile only when the first does not fit
    return (*tiles, SAFE_TILE)


def _searching(autotuning: bool) -> bool:
    """Whether a first launch times its tile choices (never under the interpreter: no GPU to time)."""
    return autotuning and not interpreting()


@cache
def _autotuned(kernel, choices: tuple[Tile, ...]):
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in choices]
    key = [name for name in TUNE_KEY if name in kernel.arg_names]
    return triton.autotune(configs=configs, key=key)(kernel)


# Tile shape the autotuner picked, per kernel and problem: (kernel id, choices, shape_key) -> tile.
# Both paths share one compiled-kernel cache, so nothing is compiled twice.
_CHOSEN_TILES: dict[tuple, Tile] = {}


class _KernelLaunch:
    """One kernel's launch for one problem: every argument but the tensors, fixed once.

    ``tiles`` are the tile shapes it may use (see :func:`_tile_choices`), ``search`` whether the
    first launch times them all or takes the first that fits, and ``grid`` maps a tile
    (``{"BLOCK_M": .., "BLOCK_N": ..}``) to the launch grid; a kernel without tile shapes has
    ``tiles=None``, a fixed ``grid`` tuple, and Triton's default warps and stages. ``shape_key``
    (lengths, head dims, dtype, flags) identifies the problem for the remembered tile choice. The
    arguments come in three groups because that is the kernels' parameter order, which the direct
    launch of :mod:`.direct_launch` relies on.

    The first eager call picks the tile (autotuning, or the first tile with the safe one to fall back
    on) and keeps a :class:`~.direct_launch.PreparedLaunch` of it; every later call is that launch.
    """

    __slots__ = ("kernel", "tiles", "search", "grid", "ints", "floats", "constexprs", "shape_key",
                 "_prepared")

    def __init__(self, kernel, tiles: tuple[Tile, ...] | None, grid: Grid | tuple[int, int], ints: tuple,
                 floats: tuple, constexprs: dict, shape_key: tuple = (), search: bool = False):
        self.kernel, self.tiles, self.search, self.grid = kernel, tiles, search, grid
        self.ints, self.floats, self.constexprs, self.shape_key = ints, floats, constexprs, shape_key
        self._prepared: direct_launch.PreparedLaunch | None = None

    def __call__(self, tensors: tuple, traced: bool) -> None:
        if traced:
            self._launch_traced(tensors)
        elif self._prepared is not None:
            self._prepared(tensors)
        else:
            self._prepared = self._first_launch(tensors)

    def _launch_traced(self, tensors: tuple) -> None:
        args = (*tensors, *self.ints, *self.floats)
        if not _only_shapes(args):
            kernel = self.kernel if self.tiles is None else _autotuned(self.kernel, self.tiles)
            torch.library.wrap_triton(kernel)[self.grid](*args, **self.constexprs)

    def _with_tile(self, tile: Tile | None) -> direct_launch.PreparedLaunch:
        if tile is None:
            return direct_launch.PreparedLaunch(self.kernel, self.grid, self.ints, self.floats,
                                                self.constexprs, *UNTILED_WARPS_AND_STAGES)
        block_m, block_n, num_warps, num_stages = tile
        sizes = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        return direct_launch.PreparedLaunch(self.kernel, self.grid(sizes), self.ints, self.floats,
                                            {**self.constexprs, **sizes}, num_warps, num_stages)

    def _first_launch(self, tensors: tuple) -> direct_launch.PreparedLaunch:
        """Launch once, choosing the tile; return the prepared launch of the tile chosen."""
        if self.tiles is None:
            prepared = self._with_tile(None)
        elif not self.search:  # the first tile, or the safe one when the first does not fit on this GPU
            prepared = self._with_tile(self.tiles[0])
            try:
                prepared(tensors)
                return prepared
            except OutOfResources:
                prepared = self._with_tile(SAFE_TILE)
        else:
            problem = (id(self.kernel), self.tiles, self.shape_key)
            if problem not in _CHOSEN_TILES:
                autotuner = _autotuned(self.kernel, self.tiles)
                autotuner[self.grid](*tensors, *self.ints, *self.floats, **self.constexprs)
                best = autotuner.best_config
                _CHOSEN_TILES[problem] = (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps,
                                          best.num_stages)
                return self._with_tile(_CHOSEN_TILES[problem])  # the autotuner ran it with that tile
            prepared = self._with_tile(_CHOSEN_TILES[problem])
        prepared(tensors)
        return prepared


def _only_shapes(args: tuple) -> bool:
    """True for a traced launch that has nothing to run: the interpreter given fake tensors.

    ``wrap_triton`` turns a compiled kernel's launch on fake tensors into a no-op that only records
    the call; an interpreted kernel it hands back unchanged, and the interpreter would try to read
    the fake tensors' memory. Only the outputs' shapes matter then, and those are already allocated.
    """
    return interpreting() and any(isinstance(a, torch.Tensor) and is_fake(a) for a in args)


def _cdiv(a: int, b: int) -> int:
    # Not triton.cdiv: on the host that is a constexpr function whose wrapper costs microseconds a call.
    return -(-a // b)


def _block_dim(dim: int) -> int:
    # tl.dot wants every tile dimension to be a power of two, at least 16.
    return max(16, triton.next_power_of_2(dim))


def _prepare(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The kernels take any batch, head and sequence strides, but read the head dim contiguously.
    x = as_dtype(x, dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulator dtype: fp32, except fp64 all the way for float64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@cache
def _constexprs(dtype: torch.dtype, head_dim: int, head_dim_v: int, causal: bool) -> dict:
    """Compile-time constants shared by the attention kernels, decided once per problem kind.

    Head dims are plain ints even when the compiler traces with symbolic shapes: they size the tiles.
    """
    block_d, block_dv = _block_dim(head_dim), _block_dim(head_dim_v)
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, CAUSAL=causal,
        # fp32 inputs get fp32-accurate products: three tf32 tensor-core products (tf32x3) rather than
        # Triton's default single tf32 product (~1e-3 error) or plain fp32 FMAs (slow to run and to
        # compile); fp64 inputs accumulate in fp64. (Plain flags, not dtypes or strings, so that
        # torch.compile can pass them to the kernels from its generated code.)
        FP32_INPUTS=dtype == torch.float32, FP64_INPUTS=dtype == torch.float64,
        BLOCK_D=block_d, BLOCK_DV=block_dv, PAD_D=block_d != head_dim, PAD_DV=block_dv != head_dim_v,
    )


def _scales(scale: float) -> tuple[float, float, float]:
    """(dot_scale, norm_scale, grad_scale) for logits scale * (2 q.k - |k|^2) taken in base 2."""
    return 2.0 * scale * LOG2_E, scale * LOG2_E, 2.0 * scale


# ---------------------------------------------------------------------------------------------
# Plans: everything about one call that its tensors' shapes, strides and dtype decide
# ---------------------------------------------------------------------------------------------
#
# A plan holds the shapes of the tensors a call allocates and its kernel launches, every argument
# but the tensors computed once. Eager calls look theirs up by (shape, strides) of every input,
# dtype, flags and the tile lists, so a training loop pays for this Python once per problem rather
# than in every layer of every step. Traced calls (torch.compile) build theirs afresh: their shapes
# may be symbolic, and the compiler runs this code only while tracing.

Layout = tuple[tuple[int, ...], tuple[int, ...]]  # (shape, strides) of a (B, H, N, D) tensor
MAX_PLANS = 1024  # per direction; a program running many lengths rebuilds the oldest ones


def _layout(x: torch.Tensor) -> Layout:
    return x.shape, x.stride()


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides ``torch.empty(shape)`` gives: row-major, innermost dimension unit-stride."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class _ForwardPlan(NamedTuple):
    out_shape: tuple[int, ...]           # (B, H, Nq, Dv), allocated in the compute dtype
    lse_shape: tuple[int, ...]           # (B, H, Nq): log-sum-exp, and XSA's coefficients, if any
    accumulator: torch.dtype
    key_norms: _KernelLaunch | None      # |k_j|^2 into a (B, H, Nk) vector, at long sequences
    attention: _KernelLaunch


def _forward_plan(q: Layout, k: Layout, v: Layout, compute: torch.dtype, causal: bool, scale: float,
                  exclusive: bool, norms_given: bool, tiles: tuple[Tile, ...],
                  autotuning: bool) -> _ForwardPlan:
    (batch, heads, n_queries, head_dim), q_strides = q
    (_, _, n_keys, _), k_strides = k
    (_, _, _, head_dim_v), v_strides = v
    out_shape, lse_shape = (batch, heads, n_queries, head_dim_v), (batch, heads, n_queries)
    shared = _constexprs(compute, int(head_dim), int(head_dim_v), causal)
    key_norms = None
    if norms_given:
        key_norms = _KernelLaunch(
            key_norms_kernel, None, (_cdiv(n_keys, KEY_NORMS_BLOCK_N), batch * heads),
            (*k_strides[:3], heads, n_keys), (),
            dict(HEAD_DIM=shared["HEAD_DIM"], BLOCK_D=shared["BLOCK_D"], PAD_D=shared["PAD_D"],
                 FP64_INPUTS=shared["FP64_INPUTS"], BLOCK_N=KEY_NORMS_BLOCK_N))
    dot_scale, norm_scale, _ = _scales(scale)
    constexprs = dict(shared, EXCLUSIVE=exclusive, KEY_NORMS_GIVEN=norms_given)

    def grid(tile):  # one program per query tile and (batch, head)
        return (_cdiv(n_queries, tile["BLOCK_M"]), batch * heads)

    attention = _KernelLaunch(
        rbf_forward_kernel, _tile_choices(tiles, autotuning), grid,
        (*q_strides[:3], *k_strides[:3], *v_strides[:3], *_contiguous_strides(out_shape)[:3],
         heads, n_queries, n_keys, n_keys - n_queries),
        (dot_scale, norm_scale, XSA_VALUE_EPS), constexprs,
        (n_queries, n_keys, compute, *constexprs.values()), _searching(autotuning))
    return _ForwardPlan(out_shape, lse_shape, _accumulator_dtype(compute), key_norms, attention)


_cached_forward_plan = lru_cache(maxsize=MAX_PLANS)(_forward_plan)


def flash_forward(q, k, v, causal: bool, scale: float, exclusive: bool = False, *, traced: bool = False):
    """Run the forward kernel: (output in q's dtype, base-2 log-sum-exp per query, XSA coefficients).

    The log-sum-exp is fp32 (fp64 for fp64 inputs). With ``exclusive`` the output is XSA's ``z`` and
    the third result holds each query's coefficient ``c_i`` (same dtype as the log-sum-exp), which
    the backward pass needs; without it the third result is None. ``traced``: see the module docstring.
    """
    out_dtype = q.dtype
    compute = _compute_dtype(q.dtype)
    q, k, v = (_prepare(t, compute) for t in (q, k, v))
    problem = (_layout(q), _layout(k), _layout(v), compute, causal, scale, exclusive,
               q.shape[2] >= KEY_NORMS_MIN_QUERIES, FORWARD_TILES, _autotuning())
    plan = _forward_plan(*problem) if traced else _cached_forward_plan(*problem)
    out = torch.empty(plan.out_shape, device=q.device, dtype=compute)
    lse = torch.empty(plan.lse_shape, device=q.device, dtype=plan.accumulator)
    own_coef = torch.empty_like(lse) if exclusive else None
    key_norms = lse  # never read unless the plan computes them
    if plan.key_norms is not None:
        key_norms = torch.empty(k.shape[:3], device=q.device, dtype=plan.accumulator)
        plan.key_norms((k, key_norms), traced)
    plan.attention((q, k, v, out, lse, lse if own_coef is None else own_coef, key_norms), traced)
    return as_dtype(out, out_dtype), lse, own_coef


class _BackwardPlan(NamedTuple):
    accumulator: torch.dtype
    exclusive_preprocess: _KernelLaunch | None  # XSA: dL/dz -> dL/dy, Delta and dL/d(own value)
    dq: _KernelLaunch                           # also computes Delta = rowsum(dO * O) without XSA
    dkdv: _KernelLaunch


def _backward_plan(grad_out: Layout, q: Layout, k: Layout, v: Layout, out: Layout, compute: torch.dtype,
                   causal: bool, scale: float, exclusive: bool, dq_tiles: tuple[Tile, ...],
                   dkdv_tiles: tuple[Tile, ...], autotuning: bool) -> _BackwardPlan:
    (batch, heads, n_queries, head_dim), q_strides = q
    (_, _, n_keys, _), k_strides = k
    (_, _, _, head_dim_v), v_strides = v
    out_shape, out_strides = out
    constexprs = _constexprs(compute, int(head_dim), int(head_dim_v), causal)
    sizes = (heads, n_queries, n_keys, n_keys - n_queries)
    # Gradients (and XSA's intermediate buffers) are allocated contiguous, shaped like their tensor.
    dq_strides, dk_strides, dv_strides = (_contiguous_strides(shape) for shape, _ in (q, k, v))
    grad_strides = grad_out[1]
    exclusive_preprocess = None
    if exclusive:
        buffer_strides = _contiguous_strides(out_shape)  # dL/dy and dL/d(own value)
        # A handful of row-wise sums: no tiles to tune, one fixed block of query rows per program.
        exclusive_preprocess = _KernelLaunch(
            exclusive_preprocess_kernel, None, (_cdiv(n_queries, XSA_PREPROCESS_BLOCK_M), batch * heads),
            (*out_strides[:3], *grad_strides[:3], *v_strides[:3], *buffer_strides[:3], *buffer_strides[:3],
             *sizes), (XSA_VALUE_EPS,),
            dict(HEAD_DIM_V=constexprs["HEAD_DIM_V"], BLOCK_DV=constexprs["BLOCK_DV"],
                 PAD_DV=constexprs["PAD_DV"], FP64_INPUTS=constexprs["FP64_INPUTS"],
                 BLOCK_M=XSA_PREPROCESS_BLOCK_M))
        # From here on the attention backward is the plain one, driven by dL/dy instead of dL/dz.
        grad_strides = own_strides = buffer_strides
    else:
        own_strides = (0, 0, 0, 0)  # no own-value gradient: a placeholder pointer, never read
    scales = _scales(scale)
    shape_key = (n_queries, n_keys, compute, exclusive, *constexprs.values())

    def query_tiles(tile):  # dq: one program per query tile and (batch, head)
        return (_cdiv(n_queries, tile["BLOCK_M"]), batch * heads)

    def key_tiles(tile):  # dkdv: one program per key tile and (batch, head)
        return (_cdiv(n_keys, tile["BLOCK_N"]), batch * heads)

    dq = _KernelLaunch(
        dq_kernel, _tile_choices(dq_tiles, autotuning), query_tiles,
        (*q_strides[:3], *k_strides[:3], *v_strides[:3], *out_strides[:3], *grad_strides[:3],
         *dq_strides[:3], *sizes), scales, dict(constexprs, COMPUTE_DELTA=not exclusive), shape_key,
        _searching(autotuning))
    dkdv = _KernelLaunch(
        dkdv_kernel, _tile_choices(dkdv_tiles, autotuning), key_tiles,
        (*q_strides[:3], *k_strides[:3], *v_strides[:3], *grad_strides[:3], *dk_strides[:3],
         *dv_strides[:3], *own_strides[:3], *sizes), scales, dict(constexprs, EXCLUSIVE=exclusive), shape_key,
        _searching(autotuning))
    return _BackwardPlan(_accumulator_dtype(compute), exclusive_preprocess, dq, dkdv)


_cached_backward_plan = lru_cache(maxsize=MAX_PLANS)(_backward_plan)


def flash_backward(grad_out, q, k, v, out, lse, causal: bool, scale: float, own_coef=None, *,
                   traced: bool = False):
    """Run the backward kernels: (dq, dk, dv), each in its input's dtype.

    ``own_coef`` (from :func:`flash_forward` with ``exclusive=True``) means ``out`` is XSA's ``z`` and
    ``grad_out`` its gradient: the gradient is first taken back through XSA, then through attention.
    """
    dtypes = (q.dtype, k.dtype, v.dtype)
    compute = _compute_dtype(q.dtype)
    grad_out, q, k, v, out = (_prepare(t, compute) for t in (grad_out, q, k, v, out))
    exclusive = own_coef is not None
    problem = (_layout(grad_out), _layout(q), _layout(k), _layout(v), _layout(out), compute, causal, scale,
               exclusive, DQ_TILES, DKDV_TILES, _autotuning())
    plan = _backward_plan(*problem) if traced else _cached_backward_plan(*problem)
    device = q.device

    delta = torch.empty(lse.shape, device=device, dtype=plan.accumulator)
    grad_own_value = delta  # without XSA: a placeholder pointer, never read
    if plan.exclusive_preprocess is not None:
        grad_y = torch.empty(out.shape, device=device, dtype=compute)
        grad_own_value = torch.empty(out.shape, device=device, dtype=plan.accumulator)
        plan.exclusive_preprocess((out, grad_out, v, own_coef, grad_y, delta, grad_own_value), traced)
        grad_out = grad_y  # the attention backward below is driven by dL/dy, with Delta computed
    dq, dk, dv = (torch.empty(t.shape, device=device, dtype=compute) for t in (q, k, v))
    # dq first: without XSA it computes Delta, which dkdv then reads.
    plan.dq((q, k, v, out, grad_out, lse, delta, dq), traced)
    plan.dkdv((q, k, v, grad_out, lse, delta, dk, dv, grad_own_value), traced)
    return tuple(as_dtype(g, dtype) for g, dtype in zip((dq, dk, dv), dtypes, strict=True))
