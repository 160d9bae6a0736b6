"""The float64 reference for RBF attention: the definition, written out with no tricks.

Everything else in the package (the pure-torch routes, FlexAttention, the Triton kernel) is checked
against :func:`rbf_attention_reference`. So it is written to be obviously right rather than fast:
distances are taken as plain differences ``q_i - k_j`` (never through the expansion
``|q|^2 - 2 q.k + |k|^2``, which cancels badly), in float64, on the CPU, and the whole
``(B, H, Nq, Nk, D)`` difference tensor is materialised. Use it on small inputs only.

It is differentiable: tests push gradients through it to get float64 gradients for ``q``, ``k``, ``v``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "causal_softmax",
    "causal_visibility",
    "masked_softmax",
    "rbf_attention_reference",
    "rbf_logits_reference",
]


def causal_visibility(query_len: int, key_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bottom-right causal mask: ``visible[i, j]`` is True iff query ``i`` may see key ``j``.

    Query ``i`` sees key ``j`` iff ``j <= i + key_len - query_len``: the last query sees every
    key, and queries are aligned with the *end* of the key sequence. With prefix tokens (registers,
    a cached prompt) in front of the keys, that is what makes the newest query see all of them.
    Shape ``(query_len, key_len)``, bool, on ``device``.
    """
    query_index = torch.arange(query_len, device=device)[:, None]
    key_index = torch.arange(key_len, device=device)[None, :]
    return key_index <= query_index + (key_len - query_len)


def masked_softmax(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of ``logits``, where ``visible`` (broadcast to it) is False weight 0.

    Hidden logits become ``-inf`` before the softmax, so they take no mass and no gradient. A row
    with nothing visible would be all ``-inf`` and come out NaN: every caller here keeps at least
    one key visible per query (see :func:`rbf_attention_reference` for the one that must not).
    """
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)


def causal_softmax(logits: torch.Tensor) -> torch.Tensor:
    """:func:`masked_softmax` under the bottom-right causal mask of ``logits``' last two dims (Nq, Nk)."""
    visible = causal_visibility(logits.shape[-2], logits.shape[-1], device=logits.device)
    return masked_softmax(logits, visible)


def rbf_logits_reference(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``-scale * |q_i - k_j|^2`` for every query/key pair, shape ``(B, H, Nq, Nk)``.

    Computed from the difference itself, in whatever dtype ``q`` and ``k`` have (float64 in the
    reference). Memory is ``B*H*Nq*Nk*D`` elements.
    """
    differences = q[..., :, None, :] - k[..., None, :, :]
    return -scale * differences.square().sum(dim=-1)


def rbf_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """RBF attention ``softmax(-scale * |q_i - k_j|^2) @ v`` in float64 on the CPU.

    Args:
        q: queries, ``(B, H, Nq, D)``, any float dtype and device.
        k: keys, ``(B, H, Nk, D)``.
        v: values, ``(B, H, Nk, Dv)``.
        causal: bottom-right aligned causal mask (see :func:`causal_visibility`).
        scale: the RBF sharpness; defaults to ``1 / sqrt(D)``.

    Returns:
        ``(B, H, Nq, Dv)`` float64 tensor on the CPU. Gradients flow back to ``q``, ``k``, ``v``
        through the casts, so ``.backward()`` on the result fills their ``.grad`` (in their dtype).

    A causal query that sees no key at all (only possible when ``Nq > Nk``: the first
    ``Nq - Nk`` queries) has no softmax to take; its output is defined here as zeros, and its
    gradient is zero. :func:`rbf_tutorial.rbf_attention` refuses such inputs instead.
    """
    q, k, v = (x.to(device="cpu", dtype=torch.float64) for x in (q, k, v))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = rbf_logits_reference(q, k, scale)
    if not causal:
        return torch.softmax(logits, dim=-1) @ v

    visible = causal_visibility(q.shape[-2], k.shape[-2])
    sees_some_key = visible.any(dim=-1, keepdim=True)
    # A fully hidden row would be softmax over nothing (all -inf -> NaN, and NaN gradients).
    # Leave such rows unmasked so the softmax stays finite, then zero their weights.
    weights = masked_softmax(logits, visible | ~sees_some_key) * sees_some_key
    return weights @ v
