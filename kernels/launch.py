"""Host side of the fused kernels: tile shapes, autotuning, grids and launches.

On a GPU each kernel is autotuned over a handful of tile shapes, per (lengths, head dims, causal,
dtype). ``RBF_TUTORIAL_AUTOTUNE=0`` skips the search and uses the first tile shape of each list, which
saves minutes of compiling when many shapes are run once (tests). Under the CPU interpreter there is
no GPU to time, so one small tile shape is used, and bf16 is computed in fp32 because the
interpreter's bf16 ``tl.dot`` gives wrong numbers.

Every launch goes one of two ways:

- **eager** (a plain call, or autograd's backward): the tile the autotuner picked for a problem is
  remembered, and later calls launch the compiled kernel with that tile directly, through its
  launcher (:mod:`.direct_launch`). Triton's autotuner and its ordinary launch path spend tens of
  microseconds per call finding their cache entries, as much as the whole kernel at N=1024.
- **traced** (inside the ``torch.library.triton_op`` of ``op.py``, under ``torch.compile``): the
  launch is wrapped with ``torch.library.wrap_triton`` so the compiler sees the kernel itself and calls
  it from its generated code (and can capture it in a CUDA graph). Nothing here may touch real data
  then: the same code also runs on fake tensors to tell the compiler the output shapes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import cache

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


def _tile_choices(tiles: tuple[Tile, ...]) -> tuple[Tile, ...]:
    """The tile shapes a launch may use on this machine, best guess first."""
    if interpreting():
        return (INTERPRETER_TILE,)
    if not _autotuning():
        return (tiles[0], SAFE_TILE)  # the safe tile only when the first does not fit
    return (*tiles, SAFE_TILE)


@cache
def _autotuned(kernel, choices: tuple[Tile, ...]):
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in choices]
    key = [name for name in TUNE_KEY if name in kernel.arg_names]
    return triton.autotune(configs=configs, key=key)(kernel)


# Tile shape the autotuner picked, per kernel and problem: (kernel, choices, shape_key) -> tile.
# Both paths share one compiled-kernel cache, so nothing is compiled twice.
_CHOSEN_TILES: dict[tuple, Tile] = {}


def _launch(kernel, tiles: tuple[Tile, ...], grid: Grid, tensors: tuple, ints: tuple, floats: tuple,
            constexprs: dict, shape_key: tuple, traced: bool) -> None:
    """Launch ``kernel[grid](*tensors, *ints, *floats, **constexprs)`` with a tile shape from ``tiles``.

    ``grid`` maps the tile (``{"BLOCK_M": .., "BLOCK_N": ..}``) to the launch grid. ``shape_key``
    (lengths, head dims, dtype, flags) identifies a problem for the remembered tile choice. The
    arguments come in three groups because that is the kernels' parameter order, which the direct
    launch of :mod:`.direct_launch` relies on.
    """
    choices = _tile_choices(tiles)
    args = (*tensors, *ints, *floats)
    if traced:
        if not _only_shapes(args):
            torch.library.wrap_triton(_autotuned(kernel, choices))[grid](*args, **constexprs)
        return
    launch = (kernel, grid, tensors, ints, floats, constexprs)
    if interpreting():
        _launch_with_tile(*launch, INTERPRETER_TILE)
        return
    if not _autotuning():
        # The first tile, or the safe one when the first does not fit on this GPU.
        try:
            _launch_with_tile(*launch, choices[0])
        except OutOfResources:
            _launch_with_tile(*launch, SAFE_TILE)
        return
    problem = (kernel, choices, shape_key)
    chosen = _CHOSEN_TILES.get(problem)
    if chosen is not None:
        _launch_with_tile(*launch, chosen)
        return
    autotuner = _autotuned(kernel, choices)
    autotuner[grid](*args, **constexprs)
    best = autotuner.best_config
    _CHOSEN_TILES[problem] = (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages)


def _launch_untiled(kernel, grid: tuple[int, int], tensors: tuple, ints: tuple, floats: tuple,
                    constexprs: dict, traced: bool) -> None:
    """Launch a kernel that has no tile shapes to choose from, with Triton's default warps and stages."""
    args = (*tensors, *ints, *floats)
    if traced:
        if not _only_shapes(args):
            torch.library.wrap_triton(kernel)[grid](*args, **constexprs)
    else:
        direct_launch.launch(kernel, grid, tensors, ints, floats, constexprs, *UNTILED_WARPS_AND_STAGES)


def _only_shapes(args: tuple) -> bool:
    """True for a traced launch that has nothing to run: the interpreter given fake tensors.

    ``wrap_triton`` turns a compiled kernel's launch on fake tensors into a no-op that only records
    the call; an interpreted kernel it hands back unchanged, and the interpreter would try to read
    the fake tensors' memory. Only the outputs' shapes matter then, and those are already allocated.
    """
    return interpreting() and any(isinstance(a, torch.Tensor) and is_fake(a) for a in args)


def _launch_with_tile(kernel, grid: Grid, tensors: tuple, ints: tuple, floats: tuple, constexprs: dict,
                      tile: Tile) -> None:
    block_m, block_n, num_warps, num_stages = tile
    sizes = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    direct_launch.launch(kernel, grid(sizes), tensors, ints, floats, {**constexprs, **sizes}, num_warps,
                         num_stages)


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


def flash_forward(q, k, v, causal: bool, scale: float, exclusive: bool = False, *, traced: bool = False):
    """Run the forward kernel: (output in q's dtype, base-2 log-sum-exp per query, XSA coefficients).

    The log-sum-exp is fp32 (fp64 for fp64 inputs). With ``exclusive`` the output is XSA's ``z`` and
    the third result holds each query's coefficient ``c_i`` (same dtype as the log-sum-exp), which
    the backward pass needs; without it the third result is None. ``traced``: see the module docstring.
    """
    batch, heads, n_queries, _ = q.shape
    n_keys = k.shape[2]
    out_dtype = q.dtype
    compute = _compute_dtype(q.dtype)
    q, k, v = (_prepare(t, compute) for t in (q, k, v))
    out = torch.empty((batch, heads, n_queries, v.shape[-1]), device=q.device, dtype=compute)
    lse = torch.empty((batch, heads, n_queries), device=q.device, dtype=_accumulator_dtype(compute))
    own_coef = torch.empty_like(lse) if exclusive else None
    shared = _constexprs(compute, int(q.shape[-1]), int(v.shape[-1]), causal)
    norms_given = n_queries >= KEY_NORMS_MIN_QUERIES
    key_norms = _key_norms(k, lse.dtype, shared, traced) if norms_given else lse  # lse: never read
    dot_scale, norm_scale, _ = _scales(scale)
    tensors = (q, k, v, out, lse, lse if own_coef is None else own_coef, key_norms)
    ints = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            heads, n_queries, n_keys, n_keys - n_queries)
    constexprs = dict(shared, EXCLUSIVE=exclusive, KEY_NORMS_GIVEN=norms_given)

    def grid(tile):  # one program per query tile and (batch, head)
        return (_cdiv(n_queries, tile["BLOCK_M"]), batch * heads)

    _launch(rbf_forward_kernel, FORWARD_TILES, grid, tensors, ints, (dot_scale, norm_scale, XSA_VALUE_EPS),
            constexprs, (n_queries, n_keys, compute, *constexprs.values()), traced)
    return as_dtype(out, out_dtype), lse, own_coef


def _key_norms(k: torch.Tensor, dtype: torch.dtype, constexprs: dict, traced: bool) -> torch.Tensor:
    """|k_j|^2 per key, (B, H, Nk) in ``dtype`` (the accumulators'), for the forward kernel to read."""
    batch, heads, n_keys, _ = k.shape
    norms = torch.empty((batch, heads, n_keys), device=k.device, dtype=dtype)
    _launch_untiled(key_norms_kernel, (_cdiv(n_keys, KEY_NORMS_BLOCK_N), batch * heads), (k, norms),
                    (*k.stride()[:3], heads, n_keys), (),
                    dict(HEAD_DIM=constexprs["HEAD_DIM"], BLOCK_D=constexprs["BLOCK_D"],
                         PAD_D=constexprs["PAD_D"], FP64_INPUTS=constexprs["FP64_INPUTS"],
                         BLOCK_N=KEY_NORMS_BLOCK_N), traced)
    return norms


def flash_backward(grad_out, q, k, v, out, lse, causal: bool, scale: float, own_coef=None, *,
                   traced: bool = False):
    """Run the backward kernels: (dq, dk, dv), each in its input's dtype.

    ``own_coef`` (from :func:`flash_forward` with ``exclusive=True``) means ``out`` is XSA's ``z`` and
    ``grad_out`` its gradient: the gradient is first taken back through XSA, then through attention.
    """
    batch, heads, n_queries, _ = q.shape
    n_keys = k.shape[2]
    dtypes = (q.dtype, k.dtype, v.dtype)
    compute = _compute_dtype(q.dtype)
    q, k, v, out, grad_out = (_prepare(t, compute) for t in (q, k, v, out, grad_out))
    exclusive = own_coef is not None
    constexprs = _constexprs(compute, int(q.shape[-1]), int(v.shape[-1]), causal)

    delta = torch.empty_like(lse)
    if exclusive:
        grad_y = torch.empty_like(out)
        grad_own_value = torch.empty(out.shape, device=out.device, dtype=lse.dtype)
        # A handful of row-wise sums: no tiles to tune, one fixed block of query rows per program.
        _launch_untiled(
            exclusive_preprocess_kernel, (_cdiv(n_queries, XSA_PREPROCESS_BLOCK_M), batch * heads),
            (out, grad_out, v, own_coef, grad_y, delta, grad_own_value),
            (*out.stride()[:3], *grad_out.stride()[:3], *v.stride()[:3], *grad_y.stride()[:3],
             *grad_own_value.stride()[:3], heads, n_queries, n_keys, n_keys - n_queries),
            (XSA_VALUE_EPS,),
            dict(HEAD_DIM_V=constexprs["HEAD_DIM_V"], BLOCK_DV=constexprs["BLOCK_DV"],
                 PAD_DV=constexprs["PAD_DV"], FP64_INPUTS=constexprs["FP64_INPUTS"],
                 BLOCK_M=XSA_PREPROCESS_BLOCK_M),
            traced)
        # From here on the attention backward is the plain one, driven by dL/dy instead of dL/dz,
        # with Delta already computed.
        grad_out = grad_y
    else:
        grad_own_value = delta  # never read: a placeholder pointer with zero strides below

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dot_scale, norm_scale, grad_scale = _scales(scale)
    sizes = (heads, n_queries, n_keys, n_keys - n_queries)
    scales = (dot_scale, norm_scale, grad_scale)
    shape_key = (n_queries, n_keys, compute, exclusive, *constexprs.values())

    def query_tiles(tile):  # dq: one program per query tile and (batch, head)
        return (_cdiv(n_queries, tile["BLOCK_M"]), batch * heads)

    def key_tiles(tile):  # dkdv: one program per key tile and (batch, head)
        return (_cdiv(n_keys, tile["BLOCK_N"]), batch * heads)

    # dq first: without XSA it computes Delta = rowsum(dO * O), which dkdv then reads.
    _launch(dq_kernel, DQ_TILES, query_tiles, (q, k, v, out, grad_out, lse, delta, dq),
            (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *grad_out.stride()[:3],
             *dq.stride()[:3], *sizes), scales,
            dict(constexprs, COMPUTE_DELTA=not exclusive), shape_key, traced)
    own_strides = grad_own_value.stride()[:3] if exclusive else (0, 0, 0)
    _launch(dkdv_kernel, DKDV_TILES, key_tiles, (q, k, v, grad_out, lse, delta, dk, dv, grad_own_value),
            (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dk.stride()[:3],
             *dv.stride()[:3], *own_strides, *sizes), scales,
            dict(constexprs, EXCLUSIVE=exclusive), shape_key, traced)
    return tuple(as_dtype(g, dtype) for g, dtype in zip((dq, dk, dv), dtypes, strict=True))
