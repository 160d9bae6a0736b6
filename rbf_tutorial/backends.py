"""The pure-PyTorch routes to RBF attention, from the obvious one to the ones that borrow fused kernels.

Every route computes ``softmax(-scale * |q_i - k_j|^2) @ v`` with ``q (B, H, Nq, D)``,
``k (B, H, Nk, D)``, ``v (B, H, Nk, Dv)``, returns ``(B, H, Nq, Dv)`` in ``q``'s dtype, supports
bottom-right causal masking, and is differentiable. They differ in what they materialise and in
which kernels they reach:

=================  =============================================  ==========================
route              how the distance enters                        memory
=================  =============================================  ==========================
naive              ``torch.cdist(q, k) ** 2``                     ``Nq x Nk`` distances
matmul             ``2 q.k - |k|^2`` as one matmul plus a row     ``Nq x Nk`` logits
sdpa (bias)        SDPA with ``-scale |k|^2`` as a float mask     mask; no flash kernel
sdpa (padded)      SDPA on ``[q, -1/2] . [k, |k|^2]``             ``O(N)``: flash kernels
flex               FlexAttention ``score_mod`` subtracting norms  ``O(N)`` when compiled
triton             the fused kernel in ``rbf_tutorial.kernels``   ``O(N)``
=================  =============================================  ==========================

The algebra behind all but the first:
``-|q - k|^2 = 2 q.k - |k|^2 - |q|^2``, and ``-|q|^2`` is the same for every key of a query, so
softmax ignores it. What is left is a dot product plus a per-key bias.

These functions trust their inputs: :func:`rbf_tutorial.rbf_attention` validates and then calls
them. Call them directly to compare routes (chapters, the benchmark).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import runtime
from .reference import causal_softmax, causal_visibility

__all__ = [
    "ROUTES",
    "compute_dtype",
    "default_scale",
    "expanded_logits",
    "flex_attention",
    "key_norms",
    "matmul_attention",
    "naive_attention",
    "sdpa_attention",
    "sdpa_bias_attention",
    "sdpa_padded_attention",
    "sdpa_route",
    "triton_attention",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def default_scale(head_dim: int) -> float:
    """``1 / sqrt(D)``: the same default as dot-product attention."""
    return 1.0 / math.sqrt(head_dim)


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``; ``x`` itself when it already is.

    A same-dtype ``x.to(dtype)`` returns ``x`` too, but still goes through the dispatcher: on paths
    that run in every layer of every step (and in the kernels' launches) that is host time for nothing.
    """
    return x if x.dtype == dtype else x.to(dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the materialising routes compute logits and softmax in: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def key_norms(k: torch.Tensor) -> torch.Tensor:
    """``|k_j|^2`` for every key, ``(B, H, Nk)``, in at least float32.

    Summed in float32 even for half-precision keys: a sum of D squares in bf16 would lose about
    three significant bits before the norm is ever used.
    """
    k_wide = k.to(compute_dtype(k.dtype))
    return k_wide.square().sum(dim=-1)


def expanded_logits(q: torch.Tensor, k: torch.Tensor, *, scale: float) -> torch.Tensor:
    """``scale * (2 q.k - |k|^2)``, ``(B, H, Nq, Nk)``: the RBF logits less the ``-scale |q|^2`` row term.

    Adding ``-scale * |q_i|^2`` back gives ``-scale * |q_i - k_j|^2`` exactly (in exact
    arithmetic); softmax does not need it. The product ``q @ k^T`` runs in the inputs' dtype,
    so half-precision inputs hit tensor cores (float32 accumulation on GPUs), but its result is
    rounded to that dtype (in bfloat16: about 3e-3 relative output error, against 2e-3 for a
    kernel that keeps the scores in float32). The key-norm subtraction and everything after it
    run in float32 or wider.
    """
    dots = q @ k.transpose(-2, -1)
    scaled_key_norms = (scale * key_norms(k))[..., None, :]
    # In place, so the route holds one Nq x Nk logits buffer rather than three. Safe under
    # autograd: neither matmul, the cast, nor these two ops need their outputs for backward.
    return dots.to(compute_dtype(q.dtype)).mul_(2.0 * scale).sub_(scaled_key_norms)


def _resolve_scale(scale: float | None, q: torch.Tensor) -> float:
    return default_scale(q.shape[-1]) if scale is None else float(scale)


def _softmax_times_values(
    logits: torch.Tensor, v: torch.Tensor, *, causal: bool, out_dtype: torch.dtype
) -> torch.Tensor:
    """Mask (bottom-right), softmax along keys in the logits' dtype, weight the values."""
    weights = causal_softmax(logits) if causal else torch.softmax(logits, dim=-1)
    return (weights.to(v.dtype) @ v).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Materialising routes
# ---------------------------------------------------------------------------------------------


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """The first thing anyone writes: ``softmax(-scale * cdist(q, k)**2) @ v``.

    Materialises the full ``(B, H, Nq, Nk)`` distance matrix, so memory grows as ``N^2``.
    ``torch.cdist`` has no float16/bfloat16 kernel on the CPU, and in half precision its
    large-input path (it switches to the matmul expansion above 25 rows) would cancel badly, so
    queries and keys are upcast to float32 first; the output is cast back to ``q``'s dtype.
    """
    scale = _resolve_scale(scale, q)
    wide = compute_dtype(q.dtype)
    distances = torch.cdist(q.to(wide), k.to(wide))
    logits = -scale * distances.square()
    return _softmax_times_values(logits, v, causal=causal, out_dtype=q.dtype)


def matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """Materialised logits ``scale * (2 q.k - |k|^2)`` (see :func:`expanded_logits`), float32 softmax.

    One batched matmul instead of a distance kernel: the fastest eager route at small sizes,
    but still ``N^2`` memory for the logits and the weights.
    """
    scale = _resolve_scale(scale, q)
    logits = expanded_logits(q, k, scale=scale)
    return _softmax_times_values(logits, v, causal=causal, out_dtype=q.dtype)


# ---------------------------------------------------------------------------------------------
# PyTorch SDPA with the key norms folded in
# ---------------------------------------------------------------------------------------------


def sdpa_bias_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """SDPA with the key norms as an additive float mask: ``-scale * |k|^2`` of shape ``(B, H, 1, Nk)``.

    SDPA computes ``softmax(scale' * q.k + mask) @ v``; with ``scale' = 2 * scale`` and that mask
    it is RBF attention. The catch: flash kernels take no arbitrary mask, so SDPA falls back to
    its memory-efficient kernel on CUDA (which may expand the broadcast mask) or to the math
    kernel. With ``causal`` the mask is materialised at ``(B, H, Nq, Nk)`` with ``-inf`` above
    the bottom-right diagonal.

    Precision: SDPA wants the mask in ``q``'s dtype, so in bfloat16 every ``scale * |k|^2`` is
    rounded to 8 significant bits before it is added. With ``|k|^2 ~ D`` that is an absolute
    logit error near ``scale * D * 2**-9``, far above the error of a float32-accumulated
    kernel (see :func:`sdpa_padded_attention`, same problem).
    """
    scale = _resolve_scale(scale, q)
    mask = (-scale * key_norms(k))[..., None, :]
    if causal:
        visible = causal_visibility(q.shape[-2], k.shape[-2], device=q.device)
        mask = mask.masked_fill(~visible, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=2.0 * scale)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def sdpa_padded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    split_norms: bool = False,
) -> torch.Tensor:
    """SDPA with the key norms hidden in an extra head-dim column, so flash kernels still run.

    With ``q' = [q, -1/2]`` and ``k' = [k, |k|^2]``, ``q'.k' = q.k - |k|^2 / 2``, so SDPA at scale
    ``2 * scale`` computes exactly the RBF logits (less the ``|q|^2`` term softmax ignores), with
    no mask at all. The head dim is zero-padded up to a multiple of 8 (flash kernels want that;
    at ``D = 256`` the extra column pushes past flash's limit of 256 and SDPA falls back),
    and ``v`` is padded to the same width because PyTorch's flash kernel needs ``q``, ``k`` and
    ``v`` to share one head dim; the output is sliced back to ``Dv``. Causal masking uses
    :func:`torch.nn.attention.bias.causal_lower_right`, which keeps the bottom-right mask on the
    flash/efficient kernels instead of materialising it.

    Precision: the ``|k|^2`` column is stored in the inputs' dtype. In bfloat16 it is rounded to
    8 significant bits, and since ``|k|^2`` is large (about ``D`` for unit-variance keys) while
    the logits that matter are differences of order one, the rounding shows up in the output:
    about 8e-3 relative error measured on an H100, against about 2e-3 for kernels
    that subtract a float32 ``|k|^2`` inside the loop.

    ``split_norms=True`` recovers most of that: ``|k|^2`` is split into its rounded value and the
    rounded remainder (``hi + lo``, together about twice the significant bits), stored in two
    columns that both meet a ``-1/2`` in ``q'``. Those products are exact and the kernel sums in
    float32, so the norm term is nearly float32-accurate. It usually costs nothing, since the
    padding to a multiple of 8 leaves spare columns anyway.
    """
    scale = _resolve_scale(scale, q)
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    norms = key_norms(k)
    if split_norms:
        norms_high = norms.to(k.dtype)
        norms_low = (norms - norms_high.to(norms.dtype)).to(k.dtype)
        key_columns = torch.stack([norms_high, norms_low], dim=-1)
    else:
        key_columns = norms.to(k.dtype)[..., None]
    extra = key_columns.shape[-1]
    query_columns = q.new_full((*q.shape[:-1], extra), -0.5)

    width = _round_up(max(head_dim + extra, value_dim), 8)
    q_padded = F.pad(torch.cat([q, query_columns], dim=-1), (0, width - head_dim - extra))
    k_padded = F.pad(torch.cat([k, key_columns], dim=-1), (0, width - head_dim - extra))
    v_padded = F.pad(v, (0, width - value_dim))

    mask = None
    if causal:
        from torch.nn.attention.bias import causal_lower_right  # imports the compiler: only when used

        mask = causal_lower_right(q.shape[-2], k.shape[-2])
    out = F.scaled_dot_product_attention(q_padded, k_padded, v_padded, attn_mask=mask, scale=2.0 * scale)
    return out[..., :value_dim]


def sdpa_route(q: torch.Tensor) -> str:
    """Which SDPA route :func:`sdpa_attention` takes for these inputs: ``"padded"`` or ``"bias"``.

    On CUDA in float16/bfloat16/float32 the padded route keeps SDPA on its flash or
    memory-efficient kernels (an arbitrary float mask would rule flash out and can make the
    efficient kernel expand the mask to ``Nq x Nk``). Elsewhere (CPU, float64) those kernels do
    not run anyway, and the bias route avoids copying ``q``, ``k`` and ``v`` into wider tensors.
    """
    fused_kernels_apply = q.is_cuda and q.dtype in (*_HALF_DTYPES, torch.float32)
    return "padded" if fused_kernels_apply else "bias"


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """RBF attention through PyTorch SDPA; the route is picked by :func:`sdpa_route`."""
    route = sdpa_padded_attention if sdpa_route(q) == "padded" else sdpa_bias_attention
    return route(q, k, v, causal=causal, scale=scale)


# ---------------------------------------------------------------------------------------------
# FlexAttention
# ---------------------------------------------------------------------------------------------


def _torch_flex():
    # Imported on first use: FlexAttention pulls in the compiler stack (about 1.5 s), which every
    # other route and every command-line `--help` can do without.
    from torch.nn.attention import flex_attention as torch_flex

    return torch_flex


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    # As FlexAttention's own documentation uses it: compiled once per process, with static shapes
    # (dynamic=False), so each new shape compiles a kernel specialised to it (torch.compile caches
    # them) instead of a slower kernel generic over sequence length.
    return torch.compile(_torch_flex().flex_attention, dynamic=False)


def _eager_flex(*args, **kwargs) -> torch.Tensor:
    # Eager FlexAttention warns that it is not fused. On the CPU that is the only option, and
    # the warning would only be noise in a notebook.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _torch_flex().flex_attention(*args, **kwargs)


@functools.lru_cache(maxsize=32)
def _causal_block_mask(query_len: int, key_len: int, device: str):
    """Block mask for bottom-right causal attention; cached because building it costs a pass."""
    offset = key_len - query_len

    def bottom_right_causal(batch, head, query_index, key_index):
        return key_index <= query_index + offset

    return _torch_flex().create_block_mask(
        bottom_right_causal, B=None, H=None, Q_LEN=query_len, KV_LEN=key_len, device=device
    )


def flex_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, scale: float | None = None
) -> torch.Tensor:
    """RBF attention through FlexAttention: a ``score_mod`` subtracts ``scale * |k_j|^2``.

    FlexAttention computes ``scale' * q.k``, lets ``score_mod`` rewrite each score, then runs a
    fused online softmax. With ``scale' = 2 * scale`` and ``score - scale * |k_j|^2`` the scores are
    the RBF logits (less ``|q|^2``). The key norms are a precomputed float32 ``(B, H, Nk)`` tensor
    the ``score_mod`` captures; FlexAttention differentiates through captured tensors, so the
    gradient reaches ``k`` through its norms too. Causal masking is a block mask, so fully hidden
    blocks are skipped.

    On CUDA the call is compiled (``torch.compile(flex_attention)``, built once per process);
    elsewhere it runs eagerly, which materialises the scores and, as of PyTorch 2.13, has no
    backward pass on the CPU: calling it there with inputs that require grad raises.
    """
    scale = _resolve_scale(scale, q)
    if q.device.type == "cpu":
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        if needs_grad:
            raise NotImplementedError(
                "backend 'flex': FlexAttention has no backward pass on the CPU; use backend='matmul' "
                "(or run under torch.no_grad()) there, or move the tensors to a CUDA device"
            )
        # FlexAttention refuses CPU inputs that merely *could* need grad, even under no_grad.
        q, k, v = q.detach(), k.detach(), v.detach()

    scaled_key_norms = scale * key_norms(k)

    def subtract_key_norm(score, batch, head, query_index, key_index):
        return score - scaled_key_norms[batch, head, key_index]

    block_mask = _causal_block_mask(q.shape[-2], k.shape[-2], str(q.device)) if causal else None
    run = _compiled_flex() if q.is_cuda else _eager_flex
    out = run(q, k, v, score_mod=subtract_key_norm, block_mask=block_mask, scale=2.0 * scale)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------
# The fused Triton kernel
# ---------------------------------------------------------------------------------------------


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    exclusive: bool = False,
) -> torch.Tensor:
    """The fused Triton kernel, :func:`rbf_tutorial.kernels.rbf_flash_attention`.

    Imported on first use, so the pure-torch routes work where triton is missing. With no GPU
    the kernel runs through Triton's interpreter (slow; keep inputs small). ``exclusive`` turns on
    the kernel's exclusive-self-attention epilogue (``rbf_attention(..., exclusive=True)``).
    """
    runtime.announce_interpreter()
    try:
        from rbf_tutorial.kernels import rbf_flash_attention
    except ImportError as err:
        raise RuntimeError(
            "backend 'triton': rbf_tutorial.kernels.rbf_flash_attention could not be imported "
            f"({err}); is triton installed? The pure-torch backends ('matmul', 'sdpa', 'flex') "
            "need no triton."
        ) from err
    return rbf_flash_attention(q, k, v, causal=causal, scale=scale, exclusive=exclusive)


ROUTES: dict[str, Callable[..., torch.Tensor]] = {
    "naive": naive_attention,
    "matmul": matmul_attention,
    "sdpa": sdpa_attention,
    "flex": flex_attention,
    "triton": triton_attention,
}
"""Backend name -> function ``(q, k, v, *, causal, scale) -> out``; ``"auto"`` picks one of these."""
