"""Run the compiled-kernel launch path on a machine without a GPU: Triton compiles, nothing executes.

Triton's front end and its bundled PTX/cubin tool chain need no GPU (see gpu_compile.py); only loading
a binary and launching it do. :func:`install` puts a stand-in driver in place that reports an sm_90
device, skips loading, and records every launch its launcher would have made instead of making it.
That is enough to exercise the host side of a launch exactly as on a GPU: argument binding,
specialisation, the compiled-kernel cache, this package's direct launches (kernels/direct_launch.py),
and to time them. Tensors are CPU tensors; their memory is never touched.

Import this module, and call :func:`install`, in a process where ``TRITON_INTERPRET=0`` was set before
triton was imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import compiler
from triton.runtime import driver

STREAM = 0x5EED  # what the fake driver calls the current stream, recognisable in a recorded launch


class _Driver:
    device = 0  # the current device's index, as torch.cuda.current_device() would say

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return STREAM

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_device_interface(self):
        return torch.cuda

    def get_active_torch_device(self):
        return torch.device("cpu")

    def __getattr__(self, name):
        raise AttributeError(name)


@dataclass
class Launches:
    """Every launch the launcher was asked to make, as plain values (a tensor becomes its address)."""

    calls: list[tuple] = field(default_factory=list)

    def __call__(self, *arguments):
        self.calls.append(tuple(_plain(a) for a in arguments))


def _plain(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", value.data_ptr())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "calls"):  # Triton's chain of launch hooks
        return ("hooks", len(value.calls))
    return ("object", type(value).__name__)


def use_device(index: int) -> None:
    """Make device ``index`` the current one, as ``torch.cuda.set_device`` would."""
    _Driver.device = index


def install() -> Launches:
    """Put the fake driver in place; returns the record that every later launch is appended to."""
    driver.set_active(_Driver())
    launches = Launches()
    compiler.CompiledKernel._init_handles = lambda self: None
    # Triton 3.6 reads ``run`` as an attribute, 3.9 through a property: a property serves both.
    compiler.CompiledKernel.run = property(lambda self: launches)
    return launches
