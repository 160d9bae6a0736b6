"""Exclusive self attention (XSA): remove from each output the part along the token's own value.

An attention output ``y_i = sum_j a_ij v_j`` tends to point along the token's *own* value ``v_i``
(queries are often closest to their own key, and the diagonal weight is large): ``cos(y_i, v_i)``
measured per layer (:func:`similarity`) grows with depth. That component carries nothing the
residual stream does not already have. XSA keeps only what is orthogonal to it:

    z_i = y_i - (y_i . v_i / |v_i|^2) v_i,

per token and per head (:func:`exclusive`), so ``z_i . v_i = 0`` up to rounding. A token whose
value is zero has no direction to remove; there ``z_i = y_i``, with finite gradients.
"""

from __future__ import annotations

import math

import torch

from .arguments import number

__all__ = ["FUSED_VALUE_EPS", "check_own_values", "exclusive", "exclusive_attention", "own_values",
           "similarity"]

# The fused kernel leaves outputs whose own value has |v|^2 at or below this unchanged (fp32's
# square root of the smallest normal number); rbf_attention(..., exclusive=True) uses the same
# threshold on every other backend, so all routes agree even for vanishing values.
FUSED_VALUE_EPS = math.sqrt(torch.finfo(torch.float32).tiny)


def _check_pair(y: object, v: object) -> None:
    for name, x in (("y", y), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor (B, H, N, D), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 4:
            # Per-head projection needs the heads split out: on (B, N, H*D) the projection would
            # mix heads and silently compute something else.
            raise ValueError(f"{name}: expected 4 dimensions (B, H, N, D), got shape {tuple(x.shape)}")
    if v.shape != y.shape:
        raise ValueError(f"v: expected the same shape as y {tuple(y.shape)}, got {tuple(v.shape)}")
    if v.dtype != y.dtype:
        raise TypeError(f"v: expected dtype {y.dtype} to match y, got {v.dtype}")
    if v.device != y.device:
        raise ValueError(f"v: expected device {y.device} to match y, got {v.device}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision dot products lose too much for an orthogonality we want to hold: compute in
    # at least float32, return in the input dtype.
    return torch.promote_types(dtype, torch.float32)


def exclusive(y: torch.Tensor, v: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """``y`` minus its projection on ``v``, per token and head: ``y - (y.v / |v|^2) v`` over the last dim.

    Args:
        y: attention outputs ``(B, H, N, D)``.
        v: the same tokens' values ``(B, H, N, D)`` (same shape, dtype and device as ``y``).
        eps: value rows with ``|v|^2 <= eps`` count as zero and leave ``y`` unchanged. Default:
            the square root of the smallest normal number of the compute dtype (about 1e-19 in
            float32, 1e-154 in float64), far below any real value yet large enough that
            ``1 / |v|^2`` and the gradients stay finite.

    Returns:
        ``z`` of ``y``'s shape and dtype with ``z . v = 0`` up to rounding. Computed in float32
        for half-precision inputs. Differentiable, with finite gradients everywhere, including
        at ``v = 0`` (the division only ever sees ``|v|^2 > eps``).
    """
    _check_pair(y, v)
    work_dtype = _work_dtype(y.dtype)
    eps = math.sqrt(torch.finfo(work_dtype).tiny) if eps is None else number("eps", eps, low=0.0)

    y_work, v_work = y.to(work_dtype), v.to(work_dtype)
    along = (y_work * v_work).sum(dim=-1, keepdim=True)
    value_norm_sq = v_work.square().sum(dim=-1, keepdim=True)
    has_direction = value_norm_sq > eps
    # Both branches of a where are differentiated; dividing by 1 where v is (near) zero keeps the
    # discarded branch finite, so its zero gradient does not turn into 0 * inf = NaN.
    safe_norm_sq = torch.where(has_direction, value_norm_sq, torch.ones_like(value_norm_sq))
    coefficient = torch.where(has_direction, along / safe_norm_sq, torch.zeros_like(along))
    return (y_work - coefficient * v_work).to(y.dtype)


def similarity(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``cos(y_i, v_i)`` per token and head: ``(B, H, N)``, in ``[-1, 1]``, in ``y``'s dtype.

    The similarity bias XSA removes: average it over tokens and heads to follow it across layers.
    A token where ``y`` or ``v`` is zero has no angle; its cosine is reported as 0.
    """
    _check_pair(y, v)
    work_dtype = _work_dtype(y.dtype)
    y_work, v_work = y.to(work_dtype), v.to(work_dtype)
    along = (y_work * v_work).sum(dim=-1)
    norms = y_work.norm(dim=-1) * v_work.norm(dim=-1)
    tiny = torch.finfo(work_dtype).tiny
    has_angle = norms > tiny
    safe_norms = torch.where(has_angle, norms, torch.ones_like(norms))
    cosine = torch.where(has_angle, along / safe_norms, torch.zeros_like(along))
    # Rounding can push |cos| a hair past 1.
    return cosine.clamp(-1.0, 1.0).to(y.dtype)


def check_own_values(n_queries: int, n_keys: int) -> None:
    """ValueError unless every query has its own key: exclusive self attention needs ``Nk >= Nq``."""
    if n_keys < n_queries:
        raise ValueError(
            f"k: exclusive self attention needs at least as many keys as queries (query i's own "
            f"value is key i + Nk - Nq), got Nq={n_queries}, Nk={n_keys}"
        )


def own_values(v: torch.Tensor, n_queries: int) -> torch.Tensor:
    """Each query's own value: ``v[..., i + Nk - Nq, :]`` for query ``i``, shape ``(B, H, Nq, Dv)``.

    The bottom-right alignment of the causal mask: the last ``Nq`` keys belong to the queries, one
    each, and any keys in front of them (register tokens) belong to nobody.
    """
    n_keys = v.shape[-2]
    check_own_values(n_queries, n_keys)
    return v[..., n_keys - n_queries :, :]


def exclusive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``rbf_attention(q, k, v, ..., exclusive=True)``: RBF attention, each output minus its part
    along its own value (see :func:`rbf_tutorial.rbf_attention` for the arguments)."""
    from .attention import rbf_attention  # attention imports this module

    return rbf_attention(q, k, v, causal=causal, scale=scale, backend=backend, exclusive=True)
