"""Register tokens: learnable keys and values, placed at the origin, that every query can attend to.

Dot-product attention has a built-in "nothing to attend to" option: a key that is long and points
roughly where the queries point out-scores everything, and a head that has nothing useful to do
dumps its mass there (the attention sink). RBF attention has no such key. A long key is *far* from
every query, so it scores badly for all of them; under RBF a key is only ever attractive to the
queries near it.

One point is special, though: the origin. A register key ``r = 0`` scores

    -scale * |q - 0|^2 = -scale * |q|^2,

which depends on the query alone, not on any other key. Each query ``q`` compares that fixed price
with how close its real keys are: a key closer to ``q`` than ``q`` is to the origin
(``|q - k| < |q|``) beats the register, and a query with no key that close sends most of its
mass to the register. So the origin is the natural sink for RBF: the one place whose score
measures "how much is there to attend to" for every query at once, with no preference between
queries. :class:`RegisterTokens` starts its keys *and* values at zero, so at initialisation a
register is a pure sink (it adds nothing to the output), and training is free to move both.

Registers are extra keys and values only (no register queries), put in *front* of the key
sequence. :func:`rbf_tutorial.rbf_attention`'s causal mask is bottom-right aligned (query ``i``
sees key ``j`` iff ``j <= i + Nk - Nq``), so keys at the front are visible to every query,
including the first one, with no change to the mask. The output has one row per query, as
without registers: nothing needs removing.
"""

from __future__ import annotations

import torch
from torch import nn

from .arguments import positive_int
from .attention import rbf_attention, validate_inputs
from .backends import compute_dtype, default_scale
from .reference import causal_visibility, rbf_logits_reference

__all__ = ["RegisterTokens", "attend_with_registers", "attention_weights", "register_weights"]


def _like(parameter: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``parameter`` in ``x``'s dtype and device; itself when it already is (a no-op ``.to()`` still
    costs a dispatch, in every layer of every step)."""
    if parameter.dtype == x.dtype and parameter.device == x.device:
        return parameter
    return parameter.to(dtype=x.dtype, device=x.device)


class RegisterTokens(nn.Module):
    """``num_registers`` learnable key/value pairs per head, initialised at the origin.

    Args:
        num_heads: ``H``, the number of attention heads; each head gets its own registers.
        head_dim: ``D``, the key (and query) size per head.
        num_registers: ``R``, registers per head (default 1).
        value_dim: ``Dv``, the value size per head; defaults to ``head_dim``.

    Parameters:
        keys: ``(H, R, D)``, zeros at initialisation (the RBF sink; see the module docstring).
        values: ``(H, R, Dv)``, zeros at initialisation, so an untrained register contributes
            nothing to the output: the mass a query puts on it is simply withheld from the
            real values.

    ``forward(q, k, v, causal=..., scale=..., backend=...)`` is RBF attention with the registers
    in front of the keys (see :func:`attend_with_registers`); :meth:`prepend` returns the
    extended keys and values themselves.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_registers: int = 1,
        value_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = positive_int("num_heads", num_heads)
        self.head_dim = positive_int("head_dim", head_dim)
        self.num_registers = positive_int("num_registers", num_registers)
        self.value_dim = self.head_dim if value_dim is None else positive_int("value_dim", value_dim)
        self.keys = nn.Parameter(torch.zeros(self.num_heads, self.num_registers, self.head_dim))
        self.values = nn.Parameter(torch.zeros(self.num_heads, self.num_registers, self.value_dim))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"num_registers={self.num_registers}, value_dim={self.value_dim}"
        )

    def _check_keys_values(self, k: object, v: object) -> None:
        for name, x, size, size_name in (
            ("k", k, self.head_dim, "head_dim"),
            ("v", v, self.value_dim, "value_dim"),
        ):
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"{name}: expected a torch.Tensor (B, H, N, {size_name}), got {type(x).__name__}"
                )
            if not x.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
            if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[3] != size:
                raise ValueError(
                    f"{name}: expected shape (B, H={self.num_heads}, N, {size_name}={size}) to match the "
                    f"registers, got {tuple(x.shape)}"
                )
        if tuple(k.shape[:3]) != tuple(v.shape[:3]):
            raise ValueError(
                f"v: expected the same batch, heads and length as k {tuple(k.shape[:3])}, "
                f"got {tuple(v.shape)}"
            )

    def prepend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put the registers in front of the keys and values: ``(B, H, R + Nk, D)``, ``(B, H, R + Nk, Dv)``.

        The registers are cast to ``k``'s and ``v``'s dtype and device (differentiably, so
        float32 parameters train under bfloat16 activations) and shared across the batch.
        """
        self._check_keys_values(k, v)
        batch = k.shape[0]
        register_keys = _like(self.keys, k).expand(batch, -1, -1, -1)
        register_values = _like(self.values, v).expand(batch, -1, -1, -1)
        return torch.cat([register_keys, k], dim=2), torch.cat([register_values, v], dim=2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        scale: float | None = None,
        backend: str = "auto",
    ) -> torch.Tensor:
        """RBF attention with these registers in front of the keys; ``(B, H, Nq, Dv)``."""
        return attend_with_registers(q, k, v, self, causal=causal, scale=scale, backend=backend)


def _check_registers(registers: object) -> None:
    if registers is not None and not isinstance(registers, RegisterTokens):
        raise TypeError(
            f"registers: expected a RegisterTokens module or None, got {type(registers).__name__}"
        )


def attend_with_registers(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    registers: RegisterTokens | None,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`rbf_tutorial.rbf_attention` over ``registers`` followed by the real keys and values.

    Args:
        q: queries ``(B, H, Nq, D)``.
        k: keys ``(B, H, Nk, D)``.
        v: values ``(B, H, Nk, Dv)``.
        registers: the :class:`RegisterTokens` to prepend; ``None`` means plain attention.
        causal: bottom-right aligned, as in :func:`rbf_tutorial.rbf_attention`; the registers sit
            at key positions ``0 .. R-1``, so every query sees all of them. ``Nq <= Nk`` is
            required, as without registers: query ``i`` sees real key ``j`` iff
            ``j <= i + Nk - Nq``, unchanged by the registers.
        scale: the RBF sharpness; defaults to ``1 / sqrt(D)``.
        backend: any backend of :func:`rbf_tutorial.rbf_attention`.

    Returns:
        ``(B, H, Nq, Dv)``: one row per query (registers are never queries).
    """
    _check_registers(registers)
    # Validate the caller's tensors first, so errors name their shapes rather than the extended
    # ones, and the causal rule Nq <= Nk applies to the real keys, as without registers.
    validate_inputs(q, k, v, causal=causal, scale=scale, backend=backend)
    if registers is not None:
        k, v = registers.prepend(k, v)
    return rbf_attention(q, k, v, causal=causal, scale=scale, backend=backend)


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    registers: RegisterTokens | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """The full RBF attention map, registers first: ``(B, H, Nq, R + Nk)``, rows summing to one.

    Computed from explicit differences (as :mod:`rbf_tutorial.reference` does) in ``q``'s dtype,
    or float32 for half-precision inputs, and returned in that dtype. It materialises
    ``(B, H, Nq, R + Nk, D)``: for small inputs and pictures (heatmaps), not for training.
    Columns ``0 .. R-1`` are the registers; hidden (future) keys get weight 0.
    """
    _check_registers(registers)
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"k: expected a torch.Tensor (B, H, Nk, D), got {type(k).__name__}")
    # Values do not change the weights; k stands in for v so the shape checks are shared.
    validate_inputs(q, k, k, causal=causal, scale=scale, backend="naive")
    if registers is not None:
        k, _ = registers.prepend(k, k.new_zeros(*k.shape[:3], registers.value_dim))
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    work_dtype = compute_dtype(q.dtype)
    logits = rbf_logits_reference(q.to(work_dtype), k.to(work_dtype), scale)
    if causal:
        visible = causal_visibility(q.shape[2], k.shape[2], device=q.device)
        logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1)


def register_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    registers: RegisterTokens,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """The attention mass each query puts on each register: ``(B, H, Nq, R)``.

    Sum over the last dim for the total mass a query withholds from the real keys. See
    :func:`attention_weights` for how it is computed (small inputs only).
    """
    if not isinstance(registers, RegisterTokens):
        raise TypeError(f"registers: expected a RegisterTokens module, got {type(registers).__name__}")
    weights = attention_weights(q, k, registers, causal=causal, scale=scale)
    return weights[..., : registers.num_registers]
