"""RBF attention, the one entry point: check the inputs, pick a backend, run it.

``rbf_attention(q, k, v)`` computes ``softmax(-scale * |q_i - k_j|^2) @ v``: each query attends to
the keys *closest* to it, where dot-product attention favours keys that are merely long and
roughly aligned. The routes that compute it live in :mod:`rbf_tutorial.backends` (pure PyTorch)
and :mod:`rbf_tutorial.kernels` (Triton); everything else in the package (chapters, model,
benchmark) comes through here.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from . import backends
from .runtime import kernel_mode

__all__ = ["BACKENDS", "rbf_attention", "resolve_backend", "validate_inputs"]

BACKENDS: tuple[str, ...] = ("naive", "matmul", "sdpa", "flex", "triton", "auto")
"""Backend names :func:`rbf_attention` accepts; ``"auto"`` picks one of the others."""

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Dtypes the Triton kernel is built for; float64 stays on the pure-torch routes.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def validate_inputs(
    q: object,
    k: object,
    v: object,
    *,
    causal: object = False,
    scale: object = None,
    backend: object = "auto",
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first bad argument and what was expected.

    Expected: ``q (B, H, Nq, D)``, ``k (B, H, Nk, D)``, ``v (B, H, Nk, Dv)``, all non-empty, one
    float dtype (float16, bfloat16, float32 or float64), one device; ``causal`` a bool, and
    with ``causal`` ``Nq <= Nk``; ``scale`` ``None`` or a positive finite number; ``backend``
    one of :data:`BACKENDS`.
    """
    layouts = {"q": "(B, H, Nq, D)", "k": "(B, H, Nk, D)", "v": "(B, H, Nk, Dv)"}
    tensors = {"q": q, "k": k, "v": v}
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{name}: expected a torch.Tensor of shape {layouts[name]}, got {type(x).__name__}"
            )
        if x.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
                f"got dtype {x.dtype}"
            )
        if x.dim() != 4:
            raise ValueError(
                f"{name}: expected 4 dimensions {layouts[name]}, got {x.dim()} with shape {_shape(x)}"
            )
        if x.numel() == 0:
            raise ValueError(
                f"{name}: expected every dimension of {layouts[name]} to be >= 1, got {_shape(x)}"
            )

    batch, heads, query_len, head_dim = q.shape
    key_len = k.shape[2]
    if (k.shape[0], k.shape[1], k.shape[3]) != (batch, heads, head_dim):
        raise ValueError(
            f"k: expected shape (B, H, Nk, D) with B={batch}, H={heads}, D={head_dim} to match q, "
            f"got {_shape(k)}"
        )
    if tuple(v.shape[:3]) != (batch, heads, key_len):
        raise ValueError(
            f"v: expected shape (B, H, Nk, Dv) with B={batch}, H={heads} to match q and Nk={key_len} "
            f"to match k, got {_shape(v)}"
        )
    for name in ("k", "v"):
        x = tensors[name]
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} to match q, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} to match q, got {x.device}")

    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__} {causal!r}")
    if causal and query_len > key_len:
        raise ValueError(
            f"causal: bottom-right causal attention needs Nq <= Nk (query i sees key j iff "
            f"j <= i + Nk - Nq), got Nq={query_len} (q) and Nk={key_len} (k): the first "
            f"{query_len - key_len} queries would see no key at all"
        )

    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale: expected None or a positive number, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: expected a positive finite number, got {scale!r}")

    if not isinstance(backend, str) or backend not in BACKENDS:
        choices = ", ".join(repr(name) for name in BACKENDS)
        raise ValueError(f"backend: expected one of {choices}, got {backend!r}")


@functools.cache
def _triton_kernel_available() -> bool:
    try:
        from rbf_tutorial.kernels import rbf_flash_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_kernel_fits(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the head dims are within what the fused kernel supports (if it says)."""
    import rbf_tutorial.kernels

    max_head_dim = getattr(rbf_tutorial.kernels, "MAX_HEAD_DIM", None)
    return max_head_dim is None or max(q.shape[-1], v.shape[-1]) <= max_head_dim


def resolve_backend(backend: str, q: torch.Tensor, v: torch.Tensor | None = None) -> str:
    """The backend that will actually run: ``backend`` itself, or what ``"auto"`` picks for ``q, v``.

    ``"auto"``: on CUDA, the compiled Triton kernel when it is importable and takes these head
    dims (float16, bfloat16, float32), else compiled FlexAttention; float64 on CUDA, and anything
    on the CPU, takes ``"matmul"``, the fastest eager route at the small sizes a CPU handles (the
    Triton interpreter and eager FlexAttention are far slower there). Without ``v``, ``Dv = D``
    is assumed.
    """
    if backend != "auto":
        return backend
    v = q if v is None else v
    if not q.is_cuda or q.dtype not in _KERNEL_DTYPES:
        return "matmul"
    if kernel_mode() == "compiled" and _triton_kernel_available() and _triton_kernel_fits(q, v):
        return "triton"
    return "flex"


def rbf_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """RBF attention: ``softmax(-scale * |q_i - k_j|^2) @ v``.

    Args:
        q: queries ``(B, H, Nq, D)``.
        k: keys ``(B, H, Nk, D)``.
        v: values ``(B, H, Nk, Dv)``.
        causal: bottom-right aligned mask: query ``i`` sees key ``j`` iff ``j <= i + Nk - Nq``
            (so keys prepended to the sequence, such as registers, stay visible to every query).
            Needs ``Nq <= Nk``.
        scale: how sharply weight falls off with squared distance; defaults to ``1 / sqrt(D)``.
        backend: one of :data:`BACKENDS`; see :mod:`rbf_tutorial.backends` and
            :func:`resolve_backend` for what ``"auto"`` picks.

    Returns:
        ``(B, H, Nq, Dv)`` in ``q``'s dtype, differentiable with respect to ``q``, ``k``, ``v``
        (except ``"flex"`` on the CPU, which PyTorch can only run forward).

    Raises:
        TypeError, ValueError: a bad argument, named in the message with what was expected.
    """
    validate_inputs(q, k, v, causal=causal, scale=scale, backend=backend)
    if scale is None:
        scale = backends.default_scale(q.shape[-1])
    route = backends.ROUTES[resolve_backend(backend, q, v)]
    out = route(q, k, v, causal=causal, scale=float(scale))
    return out.to(q.dtype)
