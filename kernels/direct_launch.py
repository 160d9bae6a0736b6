"""Launching a compiled Triton kernel again without Triton's per-call dispatch.

``kernel[grid](*args, **constexprs)`` does a lot of host work before the GPU sees anything: it binds
the arguments to the kernel's signature, specialises every one of them (its type, whether a pointer
is 16-byte aligned, whether an integer is 1 or a multiple of 16), hashes that into a cache key, finds
the compiled kernel and builds the launch hooks' metadata. For this package's kernels that is about
25 µs a launch with Triton 3.6, as long as a whole attention kernel takes on an H200 at N = 1024, and
an eager training step makes three launches per layer.

For one problem nearly all of that gives the same answer on every call. So the first launch goes
through Triton, which compiles if it must and hands back the compiled kernel. That kernel is
remembered under a key holding everything Triton specialises on: the kernel, the device, the tile,
the compile-time constants, the tensors' dtypes, the integer arguments themselves, and that every
pointer is 16-byte aligned. A later launch with the same key calls the compiled kernel's launcher directly,
with the arguments Triton would have passed it. Whatever the key does not cover takes Triton's own
path: a misaligned tensor, launch hooks (a profiler such as Proton installs them), the interpreter.

A caller that launches one kernel for one problem again and again can hold a :class:`PreparedLaunch`:
it keeps the compiled kernel and the launcher's fixed arguments itself, so a repeat does not even
rebuild and look up the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from operator import attrgetter, or_

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# Compiled kernels by launch key. Bounded like any cache keyed by user shapes: a program that runs
# thousands of different lengths pays Triton's dispatch again rather than growing without limit.
_COMPILED: dict[tuple, tuple] = {}
_MAX_ENTRIES = 4096
_data_ptr = torch.Tensor.data_ptr
_dtype = attrgetter("dtype")


def _hooks_installed() -> bool:
    """Whether anyone listens to kernel launches; then every launch must go through Triton's path."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        # Triton 3.6-3.9 keep a chain of hooks here (empty when nobody listens); older ones None.
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _aligned(tensors: Sequence[torch.Tensor]) -> bool:
    # (map and reduce with C-level callables: this runs on every launch, and generators cost µs here)
    return not reduce(or_, map(_data_ptr, tensors)) & 15


def launch(kernel, grid: tuple[int, ...], tensors: Sequence[torch.Tensor], ints: Sequence[int],
           floats: Sequence[float], constexprs: dict, num_warps: int, num_stages: int) -> tuple | None:
    """``kernel[grid](*tensors, *ints, *floats, **constexprs, num_warps=.., num_stages=..)``, cheaply.

    The kernel's parameters must come in that order: pointers, then integers, then floats, then the
    constexprs (passed by name, every one of them: defaults are not filled in here). Returns what a
    repeat of this launch on the current device can reuse, ``(compiled kernel, trailing arguments)``,
    or None when a repeat must take Triton's path again (see the module docstring).
    """
    args = (*tensors, *ints, *floats)
    if not isinstance(kernel, JITFunction):  # the CPU interpreter's kernels: nothing compiled to keep
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return None
    aligned = _aligned(tensors)
    # Triton launches on the current device, and a compiled kernel is loaded on one device only.
    device = driver.active.get_current_device()
    # id(kernel), not the kernel: hashing a JITFunction hashes its source key, microseconds a call
    # (the kernels are module globals, so an id is never reused for another one).
    key = (id(kernel), device, num_warps, num_stages, tuple(constexprs.items()),
           tuple(map(_dtype, tensors)), tuple(ints)) if aligned else None
    entry = _COMPILED.get(key) if key is not None else None
    if entry is None or _hooks_installed():
        compiled = kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        if key is None or _hooks_installed():
            return None
        return _remember(key, kernel, compiled, len(args), constexprs)
    _run(entry, device, grid, args)
    return entry


def _run(entry: tuple, device: int, grid: tuple[int, ...], args: tuple) -> None:
    """Call a compiled kernel's launcher with the arguments Triton's own path would give it."""
    compiled, trailing = entry
    stream = driver.active.get_current_stream(device)
    grid_0, grid_1, grid_2 = (*grid, 1, 1)[:3]
    compiled.run(grid_0, grid_1, grid_2, stream, compiled.function, compiled.packed_metadata,
                 None, None, None, *args, *trailing)


def _remember(key: tuple, kernel, compiled, n_args: int, constexprs: dict) -> tuple | None:
    """Keep ``compiled`` for ``key``, with the constexpr values in signature order for its launcher."""
    if hasattr(compiled, "result"):  # asynchronous compilation hands back a future
        compiled = compiled.result()
    names = kernel.arg_names[n_args:]
    if set(names) != set(constexprs):
        return None  # a parameter left to its default: not a launch this module can repeat exactly
    if len(_COMPILED) >= _MAX_ENTRIES:
        _COMPILED.clear()
    # Triton's launcher takes every parameter of the signature, constexprs included (it skips them).
    entry = _COMPILED[key] = (compiled, tuple(constexprs[name] for name in names))
    return entry


class PreparedLaunch:
    """One kernel with every argument but its tensors fixed, to launch again and again.

    Calling it with the tensors is :func:`launch` with the arguments given here; once a launch has
    found its compiled kernel, later calls on the same current device, with 16-byte aligned tensors
    and no launch hooks, hand them to the launcher straight away. The integer arguments are part of
    what Triton specialises on, which is why they are fixed here rather than passed per call.
    """

    __slots__ = ("_kernel", "_grid", "_ints", "_floats", "_constexprs", "_num_warps", "_num_stages",
                 "_entry", "_device")

    def __init__(self, kernel, grid: tuple[int, ...], ints: Sequence[int], floats: Sequence[float],
                 constexprs: dict, num_warps: int, num_stages: int):
        self._kernel, self._grid, self._ints, self._floats = kernel, grid, tuple(ints), tuple(floats)
        self._constexprs, self._num_warps, self._num_stages = constexprs, num_warps, num_stages
        self._entry: tuple | None = None
        self._device: int | None = None

    def __call__(self, tensors: Sequence[torch.Tensor]) -> None:
        entry = self._entry
        if entry is not None and _aligned(tensors) and not _hooks_installed():
            device = driver.active.get_current_device()
            if device == self._device:
                _run(entry, device, self._grid, (*tensors, *self._ints, *self._floats))
                return
        self._entry = launch(self._kernel, self._grid, tensors, self._ints, self._floats, self._constexprs,
                             self._num_warps, self._num_stages)
        if self._entry is not None:
            self._device = driver.active.get_current_device()
