"""The fused kernel as a PyTorch operator: autograd, torch.compile and fake tensors all work.

``torch.library.triton_op`` registers the forward and the backward as operators whose bodies launch
the kernels through ``torch.library.wrap_triton``. Under ``torch.compile`` the compiler traces into
those bodies: it sees the Triton kernels themselves, launches them from its generated code next to
the kernels it fuses around them, and ``mode="reduce-overhead"`` can capture the whole step in a CUDA
graph. The same bodies, run on fake tensors, tell the compiler the output shapes, and
``register_autograd`` wires the backward to the forward.

Outside the compiler the same launches run through a plain ``torch.autograd.Function``: calling an
operator costs tens of microseconds of dispatch, as much as the whole kernel at N=1024; and a call
with nothing to differentiate (inference, ``torch.no_grad``) skips the autograd layer as well. All
routes call the same ``flash_forward`` / ``flash_backward``, so their numbers are identical.
"""

from __future__ import annotations

import math

import torch

from .launch import MAX_HEAD_DIM, flash_backward, flash_forward, interpreting


def _kernel_operator(name: str):
    """Register a function that launches kernels as the operator ``name``.

    On a GPU: ``torch.library.triton_op``, which the compiler traces into (see the module docstring).
    Under the CPU interpreter there is no compiled kernel to show a compiler, and a traced graph would
    lose the launch: there it is a plain, opaque ``custom_op`` whose fake implementation is the same
    function (its launches do nothing on fake tensors, see ``launch._only_shapes``).
    """

    def register(fn):
        if interpreting():
            operator = torch.library.custom_op(name, fn, mutates_args=())
            operator.register_fake(fn)
            return operator
        return torch.library.triton_op(name, fn, mutates_args=())

    return register


@_kernel_operator("rbf_tutorial::flash_forward")
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                exclusive: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse, own_coef = flash_forward(q, k, v, causal, scale, exclusive, traced=True)
    # An operator returns tensors only: "no XSA coefficients" travels as an empty tensor.
    return out, lse, own_coef if exclusive else lse.new_empty(0)


@_kernel_operator("rbf_tutorial::flash_backward")
def _backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, own_coef: torch.Tensor, causal: bool,
                 scale: float, exclusive: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_backward(grad_out, q, k, v, out, lse, causal, scale, own_coef if exclusive else None,
                          traced=True)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, exclusive = inputs
    out, lse, own_coef = output
    ctx.save_for_backward(q, k, v, out, lse, own_coef)
    ctx.causal, ctx.scale, ctx.exclusive = causal, scale, exclusive
    ctx.mark_non_differentiable(lse, own_coef)


def _backward(ctx, grad_out, _grad_lse, _grad_own_coef):
    q, k, v, out, lse, own_coef = ctx.saved_tensors
    dq, dk, dv = _backward_op(grad_out, q, k, v, out, lse, own_coef, ctx.causal, ctx.scale,
                              ctx.exclusive)
    return dq, dk, dv, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _FlashAttentionFunction(torch.autograd.Function):
    """The eager route: the same kernels as the operator, with far less dispatch overhead."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, exclusive):
        out, lse, own_coef = flash_forward(q, k, v, causal, scale, exclusive)
        ctx.save_for_backward(q, k, v, out, lse, own_coef)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, own_coef = ctx.saved_tensors
        dq, dk, dv = flash_backward(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale, own_coef)
        return dq, dk, dv, None, None, None


def rbf_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                        scale: float | None = None, exclusive: bool = False) -> torch.Tensor:
    """Fused RBF attention: softmax(-scale |q_i - k_j|^2) v, never materialising the Nq x Nk matrix.

    q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) -> (B, H, Nq, Dv) in q's dtype. ``causal`` is
    bottom-right aligned (query i sees key j iff j <= i + Nk - Nq). ``scale`` defaults to 1/sqrt(D).
    ``exclusive`` applies exclusive self attention in the kernel's epilogue: each output loses its
    component along its own value ``v[i + Nk - Nq]`` (needs Nk >= Nq; see kernels/exclusive.py).
    Inputs are validated by :func:`rbf_tutorial.rbf_attention`; this entry point checks only what the
    kernel itself needs.
    """
    head_dim = q.shape[-1]
    if not interpreting() and not all(t.is_cuda for t in (q, k, v)):
        devices = ", ".join(f"{name} on {t.device}" for name, t in zip("qkv", (q, k, v), strict=True))
        raise ValueError(f"q/k/v: the compiled Triton kernel runs on CUDA tensors, got {devices}; move "
                         "them to the GPU, or use a pure-torch backend: rbf_attention(..., backend='matmul')")
    if head_dim > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"q/v: the fused kernel supports head dims up to {MAX_HEAD_DIM}, "
                         f"got D={head_dim}, Dv={v.shape[-1]}")
    if exclusive and k.shape[-2] < q.shape[-2]:
        raise ValueError(f"k: exclusive self attention needs at least as many keys as queries (query i's "
                         f"own value is key i + Nk - Nq), got Nq={q.shape[-2]}, Nk={k.shape[-2]}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if torch.compiler.is_compiling():
        out, _, _ = _forward_op(q, k, v, bool(causal), float(scale), bool(exclusive))
        return out
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # Nothing to differentiate (inference, no_grad): the autograd layer would only cost host time.
        return flash_forward(q, k, v, bool(causal), float(scale), bool(exclusive))[0]
    return _FlashAttentionFunction.apply(q, k, v, bool(causal), float(scale), bool(exclusive))
