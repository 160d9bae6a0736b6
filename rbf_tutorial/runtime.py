"""Where the kernels run: compiled on a CUDA GPU, or through Triton's CPU interpreter.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported. So the decision has to be
made before anything imports triton, which is why ``rbf_tutorial/__init__.py`` calls
:func:`configure_triton` first thing.
"""

from __future__ import annotations

import importlib.util
import os
import sys

_INTERPRET = "TRITON_INTERPRET"
_announced = False


def gpu_available() -> bool:
    """True when torch sees a CUDA device (checked without initialising a CUDA context)."""
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

    A user's own setting of ``TRITON_INTERPRET`` always wins. Says what it did, once.
    """
    global _announced
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
    if not _announced:
        print(
            "rbf_tutorial: no GPU is visible, so Triton kernels will run through the CPU interpreter "
            "(TRITON_INTERPRET=1): correct but slow; sizes are kept small.",
            file=sys.stderr,
        )
        _announced = True
