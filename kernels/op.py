"""The fused kernel as a PyTorch operator: autograd, torch.compile and fake tensors all work.

``torch.library.custom_op`` makes the Triton launches one opaque operator, so ``torch.compile``
traces through a model that calls it without a graph break; ``register_fake`` tells the compiler
the output shapes without running anything, and ``register_autograd`` wires the backward kernels.

Outside the compiler the same launches run through a plain ``torch.autograd.Function``: a Python
custom op costs tens of microseconds of dispatch per call, as much as the whole kernel at N=1024.
Both routes call the same ``flash_forward`` / ``flash_backward``, so their numbers are identical.
"""

from __future__ import annotations

import math

import torch

from .launch import MAX_HEAD_DIM, flash_backward, flash_forward


@torch.library.custom_op("rbf_tutorial::flash_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return flash_forward(q, k, v, causal, scale)


@_forward_op.register_fake
def _(q, k, v, causal, scale):
    batch, heads, n_queries, _ = q.shape
    out = q.new_empty((batch, heads, n_queries, v.shape[-1]))
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = q.new_empty((batch, heads, n_queries), dtype=lse_dtype)
    return out, lse


@torch.library.custom_op("rbf_tutorial::flash_backward", mutates_args=())
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, causal: bool,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_backward(grad_out, q, k, v, out, lse, causal, scale)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _FlashAttentionFunction(torch.autograd.Function):
    """The eager route: the same kernels as the custom op, with far less dispatch overhead."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        out, lse = flash_forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def rbf_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        scale: float | None = None) -> torch.Tensor:
    """Fused RBF attention: softmax(-scale |q_i - k_j|^2) v, never materialising the Nq x Nk matrix.

    q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) -> (B, H, Nq, Dv) in q's dtype. ``causal`` is
    bottom-right aligned (query i sees key j iff j <= i + Nk - Nq). ``scale`` defaults to 1/sqrt(D).
    Inputs are validated by :func:`rbf_tutorial.rbf_attention`; this entry point checks only what the
    kernel itself needs.
    """
    head_dim = q.shape[-1]
    if head_dim > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"q/v: the fused kernel supports head dims up to {MAX_HEAD_DIM}, "
                         f"got D={head_dim}, Dv={v.shape[-1]}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if torch.compiler.is_compiling():
        out, _ = _forward_op(q, k, v, bool(causal), float(scale))
        return out
    return _FlashAttentionFunction.apply(q, k, v, bool(causal), float(scale))
