"""RBF attention, the one entry point: check the inputs, pick a backend, run it.

``rbf_attention(q, k, v)`` computes ``softmax(-scale * |q_i - k_j|^2) @ v``: each query attends to
the keys *closest* to it, where dot-product attention favours keys that are merely long and
roughly aligned. The routes that compute it live in :mod:`rbf_tutorial.backends` (pure PyTorch)
and :mod:`rbf_tutorial.kernels` (Triton); everything else in the package (chapters, model,
benchmark) comes through here.
"""

from __future__ import annotations

import functools

import torch

from . import backends, xsa
from .arguments import boolean, positive_float
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
    exclusive: object = False,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first bad argument and what was expected.

    Expected: ``q (B, H, Nq, D)``, ``k (B, H, Nk, D)``, ``v (B, H, Nk, Dv)``, all non-empty, one
    float dtype (float16, bfloat16, float32 or float64), one device; ``causal`` a bool, and
    with ``causal`` ``Nq <= Nk``; ``scale`` ``None`` or a positive finite number; ``backend``
    one of :data:`BACKENDS`; ``exclusive`` a bool, and with ``exclusive`` ``Nk >= Nq`` (every
    query has its own key and value).
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

    boolean("causal", causal)
    if causal and query_len > key_len:
        raise ValueError(
            f"causal: bottom-right causal attention needs Nq <= Nk (query i sees key j iff "
            f"j <= i + Nk - Nq), got Nq={query_len} (q) and Nk={key_len} (k): the first "
            f"{query_len - key_len} queries would see no key at all"
        )

    positive_float("scale", scale, none_allowed=True)

    if not isinstance(backend, str) or backend not in BACKENDS:
        choices = ", ".join(repr(name) for name in BACKENDS)
        raise ValueError(f"backend: expected one of {choices}, got {backend!r}")

    if boolean("exclusive", exclusive):
        xsa.check_own_values(query_len, key_len)


@functools.cache
def _compiled_kernel_head_dim_limit() -> int | None:
    """The largest head dim the compiled Triton kernel takes, or None when it cannot run here.

    Reads the environment and imports the kernels, so it is answered once per process and kept out
    of ``torch.compile`` graphs (see :func:`_kernel_limit`).
    """
    if kernel_mode() != "compiled":
        return None
    try:
        import rbf_tutorial.kernels as kernels
    except ImportError:
        return None
    if not hasattr(kernels, "rbf_flash_attention"):
        return None
    return getattr(kernels, "MAX_HEAD_DIM", 2**31)


@torch.compiler.assume_constant_result
def _kernel_limit() -> int:
    # A constant for the compiler: tracing the import and os.environ lookups above would break the
    # graph of every compiled model that calls attention with backend="auto". 0: no compiled kernel.
    limit = _compiled_kernel_head_dim_limit()
    return 0 if limit is None else limit


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
    if max(q.shape[-1], v.shape[-1]) <= _kernel_limit():
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
    exclusive: bool = False,
) -> torch.Tensor:
    """RBF attention: ``softmax(-scale * |q_i - k_j|^2) @ v``, optionally with exclusive self attention.

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
        exclusive: exclusive self attention (:mod:`rbf_tutorial.xsa`): each output ``y_i`` minus
            its component along query ``i``'s own value ``u_i = v[..., i + Nk - Nq, :]`` (so keys
            in front, such as registers, are nobody's own). Needs ``Nk >= Nq``. The ``"triton"``
            backend does it in the kernel's epilogue, forward and backward; every other backend
            computes attention, then :func:`rbf_tutorial.xsa.exclusive`.

    Returns:
        ``(B, H, Nq, Dv)`` in ``q``'s dtype, differentiable with respect to ``q``, ``k``, ``v``
        (except ``"flex"`` on the CPU, which PyTorch can only run forward).

    Raises:
        TypeError, ValueError: a bad argument, named in the message with what was expected.
    """
    validate_inputs(q, k, v, causal=causal, scale=scale, backend=backend, exclusive=exclusive)
    scale = backends.default_scale(q.shape[-1]) if scale is None else float(scale)
    route = resolve_backend(backend, q, v)
    if route == "triton":
        out = backends.triton_attention(q, k, v, causal=causal, scale=scale, exclusive=exclusive)
    else:
        out = backends.ROUTES[route](q, k, v, causal=causal, scale=scale)
        if exclusive:
            out = xsa.exclusive(out, xsa.own_values(v, q.shape[-2]), eps=xsa.FUSED_VALUE_EPS)
    return backends.as_dtype(out, q.dtype)  # every route already returns q's dtype: usually out itself
