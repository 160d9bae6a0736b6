"""Host side of the fused kernels: tile shapes, autotuning, grids and launches.

On a GPU each kernel is autotuned over a handful of tile shapes, per (lengths, head dims, causal,
dtype). ``RBF_TUTORIAL_AUTOTUNE=0`` skips the search and uses the first tile shape of each list, which
saves minutes of compiling when many shapes are run once (tests). Under the CPU interpreter there is
no GPU to time, so one small tile shape is used, and bf16 is computed in fp32 because the
interpreter's bf16 ``tl.dot`` gives wrong numbers.
"""

from __future__ import annotations

import math
import os
from functools import cache

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from rbf_tutorial.runtime import interpreting

from .backward import delta_kernel, dkdv_kernel, dq_kernel
from .exclusive import exclusive_preprocess_kernel
from .forward import rbf_forward_kernel

LOG2_E = math.log2(math.e)
MAX_HEAD_DIM = 256

# (BLOCK_M, BLOCK_N, num_warps, num_stages). In every kernel M indexes queries and N keys; the
# forward and dq kernels own a query tile and walk over keys, dkdv owns a key tile and walks queries.
FORWARD_TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
DKDV_TILES = [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2)]
# dq runs without software pipelining (num_stages=1). Measured on triton 3.6 / H100 in fp16 and bf16:
# pipelined dq tiles gave run-to-run different dq, and 128-row ones wrong dq (0.04-0.23 relative
# error), while fp32, the interpreter and unpipelined tiles were right and bitwise repeatable.
# tests/gpu/test_kernels_gpu.py pins every tile shape listed here in turn and checks repeatability.
DQ_TILES = [(64, 64, 4, 1), (128, 64, 4, 1), (64, 128, 8, 1), (128, 128, 8, 1), (128, 32, 4, 1)]
# Small enough for every head dim and dtype (fp32 at D=256 overflows shared memory with the tiles
# above): the autotuner always has it to fall back on, and the fixed-tile mode retries with it.
SAFE_TILE = (32, 32, 4, 1)
INTERPRETER_TILE = (16, 16, 1, 1)
DELTA_BLOCK_M = 64
# XSA leaves an output unchanged when its own value has |u|^2 <= this: fp32's sqrt(smallest normal),
# the default of rbf_tutorial.xsa.exclusive in fp32 (a kernel float argument is fp32 even for fp64 data).
XSA_VALUE_EPS = math.sqrt(torch.finfo(torch.float32).tiny)
TUNE_KEY = ["n_queries", "n_keys", "HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "FP32_DOT"]


@cache
def _autotuned(kernel, tiles: tuple):
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in (*tiles, SAFE_TILE)]
    return triton.autotune(configs=configs, key=TUNE_KEY)(kernel)


# Tile shape the autotuner picked, per kernel and problem: (kernel, tiles, shape_key, constexprs) ->
# (BLOCK_M, BLOCK_N, num_warps, num_stages). After the first call of a problem, launches skip the
# autotuner's per-call bookkeeping (it rebuilds dicts of all ~35 arguments to find its cache key:
# tens of microseconds per launch, measured as much as the kernel itself at N=1024) and launch the
# chosen tile directly. Both paths share one compiled-kernel cache, so nothing is compiled twice.
_CHOSEN_TILES: dict[tuple, tuple[int, int, int, int]] = {}


def _launch(kernel, tiles, length: int, tile_of_length: str, programs: int, args, constexprs,
            shape_key: tuple) -> None:
    """Launch ``kernel`` over ``length`` rows split into tiles (``"BLOCK_M"`` or ``"BLOCK_N"``).

    ``shape_key`` (lengths and dtype) with the compile-time constants identifies a problem for the
    tile choice, as the autotuner's own key does.
    """
    fixed_tile = INTERPRETER_TILE if interpreting() else None
    if fixed_tile is None and os.environ.get("RBF_TUTORIAL_AUTOTUNE", "1") == "0":
        fixed_tile = tiles[0]
    if fixed_tile is not None:
        try:
            _launch_with_tile(kernel, fixed_tile, length, tile_of_length, programs, args, constexprs)
        except OutOfResources:
            _launch_with_tile(kernel, SAFE_TILE, length, tile_of_length, programs, args, constexprs)
        return

    constants = tuple((name, str(value)) for name, value in constexprs.items())
    problem = (kernel, tuple(tiles), shape_key, constants)
    chosen = _CHOSEN_TILES.get(problem)
    if chosen is not None:
        _launch_with_tile(kernel, chosen, length, tile_of_length, programs, args, constexprs)
        return

    def grid(meta):
        return (triton.cdiv(length, meta[tile_of_length]), programs)

    autotuner = _autotuned(kernel, tuple(tiles))
    autotuner[grid](*args, **constexprs)
    best = autotuner.best_config
    _CHOSEN_TILES[problem] = (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages)


def _launch_with_tile(kernel, tile, length, tile_of_length, programs, args, constexprs) -> None:
    block_m, block_n, num_warps, num_stages = tile
    grid = (triton.cdiv(length, block_m if tile_of_length == "BLOCK_M" else block_n), programs)
    kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages,
                 **constexprs)


def _block_dim(dim: int) -> int:
    # tl.dot wants every tile dimension to be a power of two, at least 16.
    return max(16, triton.next_power_of_2(dim))


def _prepare(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The kernels take any batch, head and sequence strides, but read the head dim contiguously.
    x = x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype


def _constexprs(q: torch.Tensor, v: torch.Tensor, causal: bool) -> dict:
    return dict(
        HEAD_DIM=q.shape[-1], HEAD_DIM_V=v.shape[-1], CAUSAL=causal,
        # fp32 inputs get fp32-accurate products: three tf32 tensor-core products (tf32x3) rather than
        # Triton's default single tf32 product (~1e-3 error) or plain fp32 FMAs (slow to run and to compile).
        FP32_DOT=q.dtype == torch.float32,
        BLOCK_D=_block_dim(q.shape[-1]), BLOCK_DV=_block_dim(v.shape[-1]),
        ACC_DTYPE=_accumulator_dtype(q.dtype)[1],
    )


def _accumulator_dtype(dtype: torch.dtype):
    """(torch, triton) accumulator dtype: fp32, except fp64 all the way for float64 inputs (gradcheck)."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _scales(scale: float) -> tuple[float, float, float]:
    """(dot_scale, norm_scale, grad_scale) for logits scale * (2 q.k - |k|^2) taken in base 2."""
    return 2.0 * scale * LOG2_E, scale * LOG2_E, 2.0 * scale


def flash_forward(q, k, v, causal: bool, scale: float, exclusive: bool = False):
    """Run the forward kernel: (output in q's dtype, base-2 log-sum-exp per query, XSA coefficients).

    The log-sum-exp is fp32 (fp64 for fp64 inputs). With ``exclusive`` the output is XSA's ``z`` and
    the third result holds each query's coefficient ``c_i`` (same dtype as the log-sum-exp), which
    the backward pass needs; without it the third result is None.
    """
    batch, heads, n_queries, _ = q.shape
    n_keys = k.shape[2]
    out_dtype = q.dtype
    compute = _compute_dtype(q.dtype)
    q, k, v = (_prepare(t, compute) for t in (q, k, v))
    out = torch.empty((batch, heads, n_queries, v.shape[-1]), device=q.device, dtype=compute)
    lse = torch.empty((batch, heads, n_queries), device=q.device, dtype=_accumulator_dtype(compute)[0])
    own_coef = torch.empty_like(lse) if exclusive else None
    dot_scale, norm_scale, _ = _scales(scale)
    args = (q, k, v, out, lse, lse if own_coef is None else own_coef,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            heads, n_queries, n_keys, n_keys - n_queries, dot_scale, norm_scale, XSA_VALUE_EPS)
    _launch(rbf_forward_kernel, FORWARD_TILES, n_queries, "BLOCK_M", batch * heads, args,
            dict(_constexprs(q, v, causal), EXCLUSIVE=exclusive), (n_queries, n_keys, compute))
    return out.to(out_dtype), lse, own_coef


def flash_backward(grad_out, q, k, v, out, lse, causal: bool, scale: float, own_coef=None):
    """Run the backward kernels: (dq, dk, dv), each in its input's dtype.

    ``own_coef`` (from :func:`flash_forward` with ``exclusive=True``) means ``out`` is XSA's ``z`` and
    ``grad_out`` its gradient: the gradient is first taken back through XSA, then through attention.
    """
    batch, heads, n_queries, _ = q.shape
    n_keys = k.shape[2]
    dtypes = (q.dtype, k.dtype, v.dtype)
    compute = _compute_dtype(q.dtype)
    acc_dtype = _accumulator_dtype(compute)[1]
    q, k, v, out, grad_out = (_prepare(t, compute) for t in (q, k, v, out, grad_out))
    exclusive = own_coef is not None
    dims_v = v.shape[-1]

    delta = torch.empty_like(lse)
    preprocess_grid = (triton.cdiv(n_queries, DELTA_BLOCK_M), batch * heads)
    if exclusive:
        grad_y = torch.empty_like(out)
        grad_own_value = torch.empty(out.shape, device=out.device, dtype=lse.dtype)
        exclusive_preprocess_kernel[preprocess_grid](
            out, grad_out, v, own_coef, grad_y, delta, grad_own_value,
            *out.stride()[:3], *grad_out.stride()[:3], *v.stride()[:3], *grad_y.stride()[:3],
            *grad_own_value.stride()[:3], heads, n_queries, n_keys, n_keys - n_queries, XSA_VALUE_EPS,
            HEAD_DIM_V=dims_v, BLOCK_M=DELTA_BLOCK_M, BLOCK_DV=_block_dim(dims_v), ACC_DTYPE=acc_dtype)
        # From here on the attention backward is the plain one, driven by dL/dy instead of dL/dz.
        grad_out = grad_y
    else:
        grad_own_value = delta  # never read: a placeholder pointer with zero strides below
        delta_kernel[preprocess_grid](out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3],
                                      heads, n_queries, HEAD_DIM_V=dims_v, BLOCK_M=DELTA_BLOCK_M,
                                      BLOCK_DV=_block_dim(dims_v), ACC_DTYPE=acc_dtype)

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dot_scale, norm_scale, grad_scale = _scales(scale)
    constexprs = _constexprs(q, v, causal)
    input_strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    sizes_and_scales = (heads, n_queries, n_keys, n_keys - n_queries, dot_scale, norm_scale, grad_scale)
    own_strides = grad_own_value.stride()[:3] if exclusive else (0, 0, 0)
    _launch(dkdv_kernel, DKDV_TILES, n_keys, "BLOCK_N", batch * heads,
            (q, k, v, grad_out, lse, delta, dk, dv, grad_own_value, *input_strides, *dk.stride()[:3],
             *dv.stride()[:3], *own_strides, *sizes_and_scales),
            dict(constexprs, EXCLUSIVE=exclusive), (n_queries, n_keys, compute))
    _launch(dq_kernel, DQ_TILES, n_queries, "BLOCK_M", batch * heads,
            (q, k, v, grad_out, lse, delta, dq, *input_strides, *dq.stride()[:3], *sizes_and_scales),
            constexprs, (n_queries, n_keys, compute))
    return tuple(g.to(dtype) for g, dtype in zip((dq, dk, dv), dtypes, strict=True))
