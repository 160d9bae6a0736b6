"""Squared key norms |k_j|^2, computed once per call for the forward kernel to read.

The forward kernel needs the penalty ``scale |k_j|^2`` of every key tile it visits. Computed inside
the loop, that is a square-and-sum over the head dim for each key, on the CUDA cores and in fp32,
redone by *every* query tile: ``Nq / BLOCK_M`` times the same numbers. At long sequences that work
costs as much as a good part of the exponentials. Reading a precomputed fp32 vector instead costs one
small load per key tile; the price is this extra launch, which only pays when there are many query
tiles (see ``launch.KEY_NORMS_MIN_QUERIES``).
"""

import triton
import triton.language as tl

from .tiles import load_tile, squared_norms


@triton.jit
def key_norms_kernel(
    K, NORMS,                              # k (B, H, Nk, D); NORMS (B, H, Nk), contiguous, fp32 (fp64)
    stride_kb, stride_kh, stride_kn,
    n_heads, n_keys,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
    FP64_INPUTS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    ACC_DTYPE: tl.constexpr = tl.float64 if FP64_INPUTS else tl.float32
    batch_head = tl.program_id(1)
    batch = (batch_head // n_heads).to(tl.int64)
    head = (batch_head % n_heads).to(tl.int64)
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = load_tile(K + batch * stride_kb + head * stride_kh, keys, tl.arange(0, BLOCK_D), stride_kn,
                  n_keys, HEAD_DIM, True, PAD_D)
    tl.store(NORMS + batch_head.to(tl.int64) * n_keys + keys, squared_norms(k, ACC_DTYPE), mask=keys < n_keys)
