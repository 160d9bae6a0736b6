"""Where the kernels run: compiled on a CUDA GPU, or through Triton's CPU interpreter.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported. So the decision has to be
made before anything imports triton, which is why ``rbf_tutorial/__init__.py`` calls
:func:`configure_triton` first thing. Deciding needs to know whether a GPU is visible; on a Linux
machine with no GPU device file at all that is known without importing torch, which keeps
``import rbf_tutorial`` (and ``rbf-tutorial --help``) quick there.

The decision is taken silently: :func:`announce_interpreter` says it once, when a Triton kernel is
first about to run through the interpreter, so commands that run no kernel print nothing about it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import sys

_INTERPRET = "TRITON_INTERPRET"
# Device files through which a GPU reaches torch on Linux: NVIDIA's driver, WSL2's GPU
# paravirtualisation, AMD's ROCm. Where none exists, torch.cuda.is_available() is False.
_GPU_DEVICE_FILES = ("/dev/nvidia*", "/dev/dxg", "/dev/kfd")
_announced = False
_set_by_us = False


def _no_gpu_device_file() -> bool:
    """True on Linux when no GPU device file exists, so no GPU can be visible (answered without torch)."""
    return platform.system() == "Linux" and not any(glob.glob(pattern) for pattern in _GPU_DEVICE_FILES)


def gpu_available() -> bool:
    """True when torch sees a CUDA device (checked without initialising a CUDA context)."""
    if "torch" not in sys.modules and _no_gpu_device_file():
        return False
    import torch

    return torch.cuda.is_available()


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter rather than compiled."""
    return os.environ.get(_INTERPRET, "0") not in ("", "0")


def kernel_mode() -> str:
    """``"compiled"``, ``"interpreted"`` or ``"unavailable"`` (no triton installed)."""
    if not triton_installed():
        return "unavailable"
    return "interpreted" if interpreting() else "compiled"


def configure_triton() -> None:
    """With no visible GPU, switch Triton to its interpreter before anyone imports triton.

    A user's own setting of ``TRITON_INTERPRET`` always wins. Silent, except when triton was
    imported too early to switch (then the kernels would fail on the CPU, and it says how to fix it).
    """
    global _set_by_us, _announced
    if _INTERPRET in os.environ or gpu_available():
        return
    if "triton" in sys.modules:
        # Too late to switch: triton has already read its environment.
        if not _announced:
            print(
                "rbf_tutorial: no GPU is visible and triton was imported before rbf_tutorial, so it is "
                "not in interpreter mode; set TRITON_INTERPRET=1 before importing triton to run the "
                "kernels on the CPU.",
                file=sys.stderr,
            )
            _announced = True
        return
    os.environ[_INTERPRET] = "1"
    _set_by_us = True


def announce_interpreter() -> None:
    """Say once per process that kernels run through the interpreter, if this package switched it on.

    Called where a Triton kernel is about to run (the ``"triton"`` backend), so the notice comes
    with the first kernel, not with every import or command.
    """
    global _announced
    if _set_by_us and not _announced and interpreting():
        print(
            "rbf_tutorial: no GPU is visible, so Triton kernels run through the CPU interpreter "
            "(TRITON_INTERPRET=1): correct but slow; keep sizes small.",
            file=sys.stderr,
        )
        _announced = True
