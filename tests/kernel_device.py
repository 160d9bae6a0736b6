"""Where tests run the Triton kernel: compiled on a GPU when one is visible, else the CPU interpreter."""

from __future__ import annotations

import pytest
import torch


def _kernel_importable() -> bool:
    try:
        from rbf_tutorial.kernels import rbf_flash_attention  # noqa: F401
    except ImportError:
        return False
    return True


# For tests that hand the Triton kernel CPU tensors: they run it through the interpreter, which is
# what a machine without a GPU does. With a GPU visible the kernel is compiled and takes CUDA tensors
# only; tests/gpu/ covers it there.
kernel_on_cpu_tensors = pytest.mark.skipif(
    torch.cuda.is_available() or not _kernel_importable(),
    reason="runs the Triton kernel on CPU tensors through the interpreter (no GPU visible); "
    "with a GPU, tests/gpu/ tests the compiled kernel",
)

# Where the kernel tests put their tensors: the GPU when there is one (compiled kernel), else the
# CPU (interpreter).
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
