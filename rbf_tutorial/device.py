"""Which device the chapters run on, and sizes that fit it.

Every chapter sets its sizes once, at the top, from :data:`SMALL`: tiny on a CPU (so a chapter
executes in seconds, as CI does), real on a GPU (so the measurements mean something)::

    from rbf_tutorial.device import DEVICE, SMALL, sizes
    n_tokens = sizes(cpu=256, gpu=8192)
"""

from __future__ import annotations

from typing import TypeVar

import torch

from . import runtime

__all__ = ["DEVICE", "SMALL", "describe", "sizes"]

#: Where the chapters put their tensors: the first CUDA GPU if there is one, else the CPU.
DEVICE: torch.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: True on a machine without a CUDA GPU: chapters then shrink their sizes to run in seconds.
SMALL: bool = not torch.cuda.is_available()

T = TypeVar("T")


def sizes(*, cpu: T, gpu: T) -> T:
    """Return ``cpu`` when running without a GPU (:data:`SMALL`), else ``gpu``.

    Both are keyword-only so a call reads as a small table: ``sizes(cpu=256, gpu=8192)``.
    """
    return cpu if SMALL else gpu


def _device_name() -> str:
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        return f"cuda ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    return "cpu (no CUDA GPU visible)"


def _kernel_description() -> str:
    mode = runtime.kernel_mode()
    if mode == "unavailable":
        return "Triton not installed: kernel chapters will not run"
    import triton  # safe: rbf_tutorial set TRITON_INTERPRET (or not) before anyone imported triton

    if mode == "interpreted":
        return f"Triton {triton.__version__} kernels interpreted on the CPU (TRITON_INTERPRET=1)"
    return f"Triton {triton.__version__} kernels compiled"


def describe() -> str:
    """One line saying what this session runs on: torch, device, and how Triton kernels run."""
    return f"torch {torch.__version__} · device: {_device_name()} · {_kernel_description()}"
