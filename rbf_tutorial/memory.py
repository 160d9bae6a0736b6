"""Measuring how much memory an attention call needs, and predicting where it runs out.

:func:`peak_memory` measures the *extra* bytes a call allocates at its highest point, beyond what
was already live when it started:

- on a CUDA device, from PyTorch's caching allocator (``torch.cuda.max_memory_allocated``);
- on the CPU, from the allocation and free events PyTorch's profiler records for every tensor
  the CPU allocator hands out (``profile_memory=True``), replayed in time order to find the peak.
  That counts the memory of every tensor (outputs, intermediates, buffers inside an operator),
  and nothing else: Python objects and the interpreter itself are not included.

:func:`fit_quadratic` and :func:`predict_oom_n` turn a few small measurements into a prediction
of the sequence length at which a device runs out; :func:`available_memory` says how much it has.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .arguments import positive_float

__all__ = [
    "QuadraticFit",
    "available_memory",
    "ensure_fits",
    "fit_quadratic",
    "format_bytes",
    "peak_memory",
    "predict_oom_n",
]


def _cuda_peak(fn: Callable[..., Any], args: tuple, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn(*args)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    del result
    return int(peak)


def _cpu_peak(fn: Callable[..., Any], args: tuple) -> int:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    # Kineto prints a start/stop banner to the process's stderr on every profile; level 6 keeps
    # it quiet (a user's own setting wins).
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args)
        del result  # freed inside the window, so its release is recorded too
    kineto_results = getattr(prof.profiler, "kineto_results", None)
    if kineto_results is None:
        raise RuntimeError(
            "peak_memory: this PyTorch build's profiler keeps no allocation events (no Kineto), "
            "so CPU peak memory cannot be measured here"
        )
    events = [
        (event.start_ns(), event.nbytes())
        for event in kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    ]
    live, peak = 0, 0
    for _, nbytes in sorted(events, key=lambda event: event[0]):  # stable: ties keep record order
        live += nbytes  # positive for an allocation, negative for a free
        peak = max(peak, live)
    return peak


def peak_memory(fn: Callable[..., Any], *args: Any, device: torch.device | str | None = None) -> int:
    """Bytes that ``fn(*args)`` allocates at its peak, beyond the memory live before the call.

    The result of ``fn`` counts (it is allocated during the call) and is then dropped. ``device``
    picks the allocator to watch; by default, that of the first tensor argument (the CPU if none).

    On CUDA the number comes from the caching allocator's peak statistic; on the CPU it comes
    from replaying the profiler's record of every tensor allocation and free (see the module
    docstring). Both count tensor memory only.
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    if device is None:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        device = tensors[0].device if tensors else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak(fn, args, device)
    if device.type != "cpu":
        raise ValueError(f"device: peak memory is measured on 'cuda' or 'cpu', got {device}")
    return _cpu_peak(fn, args)


class QuadraticFit(NamedTuple):
    """``bytes ≈ a·N² + b·N + c``, fitted by least squares."""

    a: float
    b: float
    c: float

    def __call__(self, n: float | np.ndarray) -> float | np.ndarray:
        return self.a * np.square(n) + self.b * np.asarray(n, dtype=float) + self.c


def fit_quadratic(ns: Sequence[float], measured_bytes: Sequence[float]) -> QuadraticFit:
    """Least-squares fit of ``measured_bytes ≈ a·N² + b·N + c``.

    The N² term is the score matrix; the N term is what grows linearly (q, k, v, the output);
    the constant soaks up fixed overheads. Needs at least three distinct N.
    """
    ns_array = np.asarray(ns, dtype=float)
    bytes_array = np.asarray(measured_bytes, dtype=float)
    if ns_array.ndim != 1 or ns_array.shape != bytes_array.shape:
        raise ValueError(
            f"ns and measured_bytes: expected two 1-D sequences of the same length, "
            f"got shapes {ns_array.shape} and {bytes_array.shape}"
        )
    if len(np.unique(ns_array)) < 3:
        raise ValueError(f"ns: need at least 3 distinct sizes to fit a·N² + b·N + c, got {ns_array.tolist()}")
    # Scale N to ~1 before solving, so the N² column does not swamp the others numerically.
    unit = ns_array.max()
    x = ns_array / unit
    design = np.stack([x**2, x, np.ones_like(x)], axis=1)
    (a, b, c), *_ = np.linalg.lstsq(design, bytes_array, rcond=None)
    return QuadraticFit(float(a / unit**2), float(b / unit), float(c))


def predict_oom_n(fit: QuadraticFit | Sequence[float], available_bytes: float) -> int:
    """The smallest N at which ``fit`` says the call needs more than ``available_bytes``.

    Solves ``a·N² + b·N + c = available_bytes`` for its positive root and rounds up.
    """
    a, b, c = (float(x) for x in fit)
    if a <= 0:
        raise ValueError(f"fit: the N² coefficient must be positive to predict running out, got a={a:.3g}")
    available_bytes = positive_float("available_bytes", available_bytes)
    discriminant = b * b - 4 * a * (c - available_bytes)
    return math.ceil((-b + math.sqrt(discriminant)) / (2 * a))


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file speaks kB
    except OSError:
        return None
    return None


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes a new allocation could use right now on ``device`` (default: the chapters' device).

    CUDA: the driver's free memory (``torch.cuda.mem_get_info``). CPU: ``MemAvailable`` from
    ``/proc/meminfo`` (memory the kernel can hand out without swapping); elsewhere, psutil's
    estimate of the same, if installed.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    available = _meminfo_available()
    if available is not None:
        return available
    try:
        import psutil
    except ImportError as error:
        raise RuntimeError("available_memory: no /proc/meminfo here; install psutil to measure") from error
    return int(psutil.virtual_memory().available)


def ensure_fits(nbytes: float, *, what: str, available_bytes: float | None = None) -> None:
    """Raise ``MemoryError`` if ``nbytes`` exceeds the memory available, before anything is allocated.

    On a GPU a too-large allocation fails at once with ``torch.OutOfMemoryError``. On a CPU it may
    not: the operating system can promise memory it does not have and then swap, or end processes,
    once the pages are touched. This guard refuses up front instead, with the numbers.
    """
    if available_bytes is None:
        available_bytes = available_memory("cpu")
    if nbytes > available_bytes:
        raise MemoryError(
            f"{what} needs {format_bytes(nbytes)}, but only {format_bytes(available_bytes)} is available: "
            f"refusing to allocate it (on a GPU this is where torch raises OutOfMemoryError)."
        )


def format_bytes(nbytes: float) -> str:
    """``1536 -> '1.5 KiB'``: binary units, three significant digits."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.3g} {unit}" if unit != "B" else f"{value:.0f} B"
        value /= 1024
    raise AssertionError("unreachable")
