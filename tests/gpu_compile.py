"""Compile ``@triton.jit`` kernels for an NVIDIA GPU on a machine without one.

Triton's front end and its PTX/cubin back end need no GPU, only its own bundled tool chain. This
catches what the CPU interpreter cannot: code the compiler rejects (a ``raise`` statement, a
loop-carried value that changes type, an unsupported dtype). Run it in a process where
``TRITON_INTERPRET=0`` was set before ``rbf_tutorial`` (and so triton) was imported: under the
interpreter ``@triton.jit`` makes interpreted functions, which cannot be compiled.

    python tests/gpu_compile.py     # compiles every teaching kernel for sm_90, prints one line each
"""

from __future__ import annotations

import inspect
import os

if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)  # an H100 / H200

_TYPES = {tl.float16: "fp16", tl.float32: "fp32", tl.float64: "fp64"}


def compile_kernel(kernel, pointers: dict[str, str], constexprs: dict, target: GPUTarget = TARGET):
    """Compile ``kernel`` with the given pointer types (``"*fp16"``...) and constexprs; the other
    parameters are taken as 32-bit integers, or fp32 when their name contains ``scale``."""
    # Constexpr parameters left out take their defaults, as a launch would (EXCLUSIVE=False).
    defaults = {param.name: param.default for param in kernel.params
                if param.is_constexpr and param.default is not inspect.Parameter.empty}
    constexprs = {**defaults, **constexprs}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if "scale" in name else "i32"
    return triton.compile(ASTSource(kernel, signature, constexprs), target=target)


def teaching_kernels(dtype=tl.float16, head_dim=64, block=64, causal=True, pieces=None):
    """(name, kernel, pointer types, constexprs) for every teaching kernel at one configuration."""
    from rbf_tutorial import teaching

    data = "*" + _TYPES[dtype]
    acc = tl.float64 if dtype == tl.float64 else tl.float32
    acc_ptr = "*" + _TYPES[acc]
    pieces = {**teaching.REFERENCE_PIECES, **(pieces or {})}
    shape = dict(HEAD_DIM=head_dim, BLOCK_M=block, BLOCK_N=block, ACC_DTYPE=acc)
    forward = {**shape, "CAUSAL": causal, **pieces}
    backward = {**shape, "CAUSAL": causal}
    return [
        ("scores_tile_kernel", teaching.scores_tile_kernel,
         {"Q": data, "K": data, "Scores": acc_ptr}, {**shape, "SCORES": pieces["SCORES"]}),
        ("flash_rbf_kernel", teaching.flash_rbf_kernel,
         {"Q": data, "K": data, "V": data, "Out": data, "Lse": acc_ptr}, forward),
        ("rbf_dkdv_kernel", teaching.rbf_dkdv_kernel,
         {"Q": data, "K": data, "V": data, "dO": data, "Lse": acc_ptr, "Delta": acc_ptr, "dK": data,
          "dV": data}, backward),
        ("rbf_dq_kernel", teaching.rbf_dq_kernel,
         {"Q": data, "K": data, "V": data, "dO": data, "Lse": acc_ptr, "Delta": acc_ptr, "dQ": data},
         backward),
        ("key_range_probe_kernel", teaching.key_range_probe_kernel, {"Bounds": "*i32"},
         dict(BLOCK_M=block, BLOCK_N=block, CAUSAL=causal, KEY_RANGE=pieces["KEY_RANGE"])),
        ("query_start_probe_kernel", teaching.query_start_probe_kernel, {"Starts": "*i32"},
         dict(BLOCK_M=block, BLOCK_N=block, CAUSAL=causal)),
        ("online_softmax_trace_kernel", teaching.online_softmax_trace_kernel,
         {"Q": data, "K": data, "V": data, "TraceMax": acc_ptr, "TraceSum": acc_ptr, "TraceAcc": acc_ptr},
         dict(HEAD_DIM=head_dim, BLOCK_M=block, BLOCK_N=block, ACC_DTYPE=acc, SCORES=pieces["SCORES"],
              UPDATE=pieces["UPDATE"])),
    ]


if __name__ == "__main__":
    import time

    import rbf_tutorial  # noqa: F401  (TRITON_INTERPRET=0 is already set, so nothing is interpreted)

    for dtype, head_dim, block in ((tl.float16, 64, 64), (tl.float32, 16, 16), (tl.float64, 16, 16)):
        for causal in (False, True):
            for name, kernel, pointers, constexprs in teaching_kernels(dtype, head_dim, block, causal):
                started = time.perf_counter()
                compiled = compile_kernel(kernel, pointers, constexprs)
                print(f"{name:<28} {_TYPES[dtype]} D={head_dim} block={block} causal={causal}: "
                      f"{len(compiled.asm['cubin'])} bytes of cubin in {time.perf_counter() - started:.1f} s")
