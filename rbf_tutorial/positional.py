"""Position information for RBF attention: rotary (RoPE), additive sinusoids (SuSiE), learned.

Three ways to tell attention where a token is, and what each does to a *distance*:

* :func:`rope` rotates each pair of coordinates of a query or key by an angle proportional to its
  position. Rotations preserve lengths, and ``rope(q, m) . rope(k, n)`` depends only on ``n - m``,
  so ``-|q_m - k_n|^2 = 2 q.R(n-m) k - |q|^2 - |k|^2`` is well defined. But identical content at
  two different positions is rotated apart: it is no longer close, and closeness is what RBF
  attention scores.
* :class:`SuSiE` (Subspace Sinusoidal Embeddings, the name the RBF-attention experiment at
  https://github.com/4rtemi5/rbf_attention gives them) *adds* a sinusoid table ``P`` to queries
  and keys, with a learnable weight per head and frequency. With pairs ``(sin(w_f n), cos(w_f n))``
  of weight ``s_f`` the table's distances are ``|P_i - P_j|^2 = sum_f 4 s_f^2 sin^2(w_f (i - j) / 2)``:
  a penalty that depends only on the offset, never on the content (:func:`susie_distance_squared`).
  RoPE pushes two copies of a content ``x`` apart by the same formula, with ``x``'s own pair
  lengths as weights; :func:`rope_equivalent_scales` gives the SuSiE weights that match RoPE on
  average over contents.
* :class:`LearnedPositions` is the absolute learned embedding (as in GPT-2), for comparison.

Conventions shared by all three: the head dim ``D`` is split into ``D / 2`` consecutive pairs
``(x[2f], x[2f + 1])``, pair ``f`` has angular frequency ``w_f = base ** (-2f / D)``
(:func:`rope_frequencies`), angles are computed in float64 and the result is cast to the input's
dtype.

Inside a model every layer, every step, uses positions ``0 .. N - 1``, so the tables that depend
only on ``(N, D, base, dtype, device)`` are computed once and reused: :func:`rope_tables` (RoPE's
cos and sin) and the unit table of :class:`SuSiE` (its learnable scales still multiply it on
every call, so they get their gradient). The cached tensors hold no parameter and belong to no
autograd graph; under ``torch.compile`` they are computed inside the graph instead, so a
compiled graph never captures a cached tensor.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import nn

from .arguments import positive_float, positive_int
from .backends import as_dtype

__all__ = [
    "LearnedPositions",
    "SuSiE",
    "apply_rope",
    "rope",
    "rope_equivalent_scales",
    "rope_frequencies",
    "rope_tables",
    "susie_distance_squared",
    "susie_table",
]

_ANGLE_DTYPE = torch.float64
# Distinct (length, head dim, base, dtype, device) tables kept per kind: a model uses one or two;
# a bound keeps a loop over many lengths (generation, a sweep) from holding every table it met.
_CACHED_TABLES = 16


def _even_dim(name: str, value: object) -> int:
    value = positive_int(name, value)
    if value % 2:
        raise ValueError(
            f"{name}: expected an even size (coordinates are rotated or paired two by two), got {value}"
        )
    return value



def _check_positions(
    positions: object, length: int | None, length_name: str = "", name: str = "positions"
) -> torch.Tensor:
    """``positions`` as a 1-D int or float tensor (of ``length`` entries if given), else a clear error."""
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"{name}: expected a 1-D torch.Tensor of positions, got {type(positions).__name__}")
    if positions.dtype == torch.bool or positions.is_complex():
        raise TypeError(f"{name}: expected an integer or float tensor, got dtype {positions.dtype}")
    if positions.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(positions.shape)}")
    if length is not None and positions.shape[0] != length:
        raise ValueError(
            f"{name}: expected shape ({length},) to match {length_name}, got {tuple(positions.shape)}"
        )
    return positions


def rope_frequencies(
    d: int,
    base: float = 10000.0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``d / 2`` angular frequencies ``w_f = base ** (-2f / d)``, ``f = 0 .. d/2 - 1``.

    Pair 0 turns by one radian per position; the last pair turns by about ``1 / base``, so slow
    pairs tell far positions apart and fast pairs near ones. Shared by :func:`rope` and SuSiE.
    """
    d = _even_dim("d", d)
    base = positive_float("base", base)
    exponents = torch.arange(0, d, 2, dtype=_ANGLE_DTYPE, device=device) / d
    return (base**-exponents).to(dtype)


def _angles(positions: torch.Tensor, d: int, base: float, device: torch.device) -> torch.Tensor:
    """``positions[n] * w_f`` in float64, shape ``(N, d / 2)``."""
    frequencies = rope_frequencies(d, base, device=device)
    return positions.to(device=device, dtype=_ANGLE_DTYPE)[:, None] * frequencies[None, :]


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding: rotate pair ``f`` of token ``n`` by the angle ``positions[n] * w_f``.

    Args:
        x: ``(..., N, D)`` queries or keys, ``D`` even; any leading dims (batch, heads).
        positions: ``(N,)`` integer or float positions of the ``N`` tokens.
        base: sets the frequencies, see :func:`rope_frequencies`.

    Returns:
        ``x``'s shape and dtype. Each pair is rotated, so norms are preserved exactly (up to
        rounding), and ``rope(q, m) . rope(k, n)`` depends on ``m`` and ``n`` only through
        ``n - m``. Differentiable with respect to ``x``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor (..., N, D), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x: expected at least 2 dimensions (..., N, D), got shape {tuple(x.shape)}")
    if x.shape[-1] % 2:
        raise ValueError(
            f"x: expected an even last dimension D (rotated two coordinates at a time), got D={x.shape[-1]}"
        )
    positions = _check_positions(positions, x.shape[-2], f"x.shape[-2]={x.shape[-2]}")
    angles = _angles(positions, x.shape[-1], positive_float("base", base), x.device)
    return apply_rope(x, angles.cos().to(x.dtype), angles.sin().to(x.dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pair ``f`` of token ``n`` of ``x (..., N, D)`` by the angle whose ``cos[n, f]``, ``sin[n, f]``
    are given (``(N, D / 2)`` each, in ``x``'s dtype): :func:`rope` once its angles are known.

    With :func:`rope_tables` for the angles of positions ``0 .. N - 1`` this is
    ``rope(x, torch.arange(N), base)``, bit for bit. The tables are trusted: :func:`rope` checks.
    """
    pairs = x.unflatten(-1, (-1, 2))
    first, second = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return rotated.flatten(-2)


def _reused(compute):
    """``compute(length, d, base, dtype, device)``, computed once per distinct arguments and then reused.

    For tables of positions ``0 .. length - 1``: parameter-free, so one copy serves every layer
    and step. Built outside inference mode and autograd (a table made under
    ``torch.inference_mode`` could not be saved for a later backward pass), so nothing cached ever
    requires grad. Under ``torch.compile`` the table is computed inside the graph instead, so a
    compiled graph never captures a cached tensor (nor guards on the cache's state).
    """
    cached = functools.lru_cache(maxsize=_CACHED_TABLES)(compute)

    def table(length: int, d: int, base: float, dtype: torch.dtype, device: torch.device):
        if torch.compiler.is_compiling():
            return compute(length, d, base, dtype, device)
        with torch.inference_mode(False), torch.no_grad():
            return cached(length, d, base, dtype, device)

    table.cache_clear = cached.cache_clear
    table.cache_info = cached.cache_info
    return table


@_reused
def _rope_tables(
    length: int, d: int, base: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    angles = _angles(torch.arange(length, device=device), d, base, device)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_tables(
    length: int,
    d: int,
    base: float = 10000.0,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of RoPE's angles for positions ``0 .. length - 1``: ``(length, d / 2)`` each.

    Computed in float64 and cast to ``dtype``, exactly as :func:`rope` does, once per distinct
    ``(length, d, base, dtype, device)``, then reused: shared by queries and keys, every layer and
    every step. Pass them to :func:`apply_rope`. The tables are shared: do not modify them in place.
    """
    length = positive_int("length", length)
    d = _even_dim("d", d)
    base = positive_float("base", base)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    return _rope_tables(length, d, base, dtype, torch.device(device))


def susie_table(
    n: int,
    d: int,
    base: float = 10000.0,
    positions: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The additive sinusoid table with unit weights: ``(n, d)``.

    Row ``i`` (position ``p = positions[i]``, default ``i``) holds, for each frequency ``w_f``,
    the pair ``table[i, 2f] = sin(w_f p)``, ``table[i, 2f + 1] = cos(w_f p)``. Every pair is a
    point on the unit circle, so ``|table[i]|^2 = d / 2`` for every position, and
    ``|table[i] - table[j]|^2 = sum_f 4 sin^2(w_f (p_i - p_j) / 2)``.

    ``dtype`` defaults to torch's default dtype; angles are computed in float64 regardless.
    """
    n = positive_int("n", n)
    d = _even_dim("d", d)
    base = positive_float("base", base)
    if positions is None:
        positions = torch.arange(n, device=device)
    positions = _check_positions(positions, n, f"n={n}")
    device = positions.device if device is None else torch.device(device)
    angles = _angles(positions, d, base, device)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
    return table.to(torch.get_default_dtype() if dtype is None else dtype)


@_reused
def _susie_unit_table(
    length: int, d: int, base: float, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return susie_table(length, d, base, torch.arange(length, device=device), dtype=dtype, device=device)


def susie_distance_squared(
    offset: torch.Tensor | float,
    d: int,
    weights: torch.Tensor | None = None,
    base: float = 10000.0,
) -> torch.Tensor:
    """``|P_i - P_j|^2`` for a SuSiE table with per-frequency weights, as a function of the offset alone.

    ``sum_f 4 weights[f]^2 sin^2(w_f * offset / 2)``, from
    ``(s sin a - s sin b)^2 + (s cos a - s cos b)^2 = 2 s^2 (1 - cos(a - b)) = 4 s^2 sin^2((a - b) / 2)``.

    Args:
        offset: ``i - j``, a number or a tensor of any shape.
        d: the head dim (even); there are ``d / 2`` frequencies.
        weights: ``(d / 2,)`` per-frequency weights; ``None`` means unit weights (``susie_table``).
        base: sets the frequencies, see :func:`rope_frequencies`.

    Returns:
        A tensor of ``offset``'s shape: in ``weights``' dtype (differentiable with respect to
        them) when given, else float64.
    """
    d = _even_dim("d", d)
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real | torch.Tensor):
        raise TypeError(f"offset: expected a number or a torch.Tensor, got {type(offset).__name__}")
    device = weights.device if isinstance(weights, torch.Tensor) else None
    offset = torch.as_tensor(offset, device=device)
    if offset.dtype == torch.bool or offset.is_complex():
        raise TypeError(f"offset: expected an integer or float tensor, got dtype {offset.dtype}")
    if weights is not None:
        if not isinstance(weights, torch.Tensor):
            raise TypeError(
                f"weights: expected a torch.Tensor ({d // 2},) or None, got {type(weights).__name__}"
            )
        if weights.shape != (d // 2,):
            raise ValueError(
                f"weights: expected shape ({d // 2},), one weight per frequency for d={d}, "
                f"got {tuple(weights.shape)}"
            )
    frequencies = rope_frequencies(d, base, device=offset.device)
    half_angles = offset.to(_ANGLE_DTYPE)[..., None] * frequencies / 2
    per_frequency = 4 * half_angles.sin().square()
    if weights is None:
        return per_frequency.sum(dim=-1)
    return (per_frequency.to(weights.dtype) * weights.square()).sum(dim=-1)


def rope_equivalent_scales(contents: torch.Tensor) -> torch.Tensor:
    """SuSiE weights ``(D / 2,)`` whose position penalty equals RoPE's, averaged over ``contents``.

    A content ``x`` placed ``offset`` tokens apart is pushed away from itself by RoPE by
    ``sum_f 4 r_f^2 sin^2(w_f offset / 2)``, with ``r_f^2 = x[2f]^2 + x[2f+1]^2`` its energy in pair
    ``f``; SuSiE's table by ``sum_f 4 s_f^2 sin^2(w_f offset / 2)``. With ``s_f^2`` the mean of
    ``r_f^2`` over the contents, the two agree, on average over those contents, at every offset
    exactly: the same positional strength. Rotations keep each pair's energy, so queries or keys
    taken after RoPE work as well as before it.

    Args:
        contents: ``(..., D)`` vectors (queries or keys), ``D`` even; every leading dim is averaged.
    """
    if not isinstance(contents, torch.Tensor) or not contents.is_floating_point():
        raise TypeError("contents: expected a floating-point torch.Tensor (..., D)")
    _even_dim("contents.shape[-1]", contents.shape[-1] if contents.dim() else 0)
    pair_energy = contents.detach().unflatten(-1, (-1, 2)).square().sum(dim=-1)  # (..., D / 2)
    return pair_energy.reshape(-1, pair_energy.shape[-1]).mean(dim=0).sqrt()


class SuSiE(nn.Module):
    """Additive sinusoids with a learnable per-head, per-frequency scale, added to queries and keys.

    Args:
        num_heads: ``H``.
        head_dim: ``D``, even; there are ``D / 2`` frequencies.
        base: sets the frequencies, see :func:`rope_frequencies`.
        init_scale: initial value of every scale (default 0.5).

    Parameters:
        scales: ``(H, D / 2)``: ``scales[h, f]`` multiplies both the sin and the cos coordinate of
            frequency ``f`` in head ``h``, so within a head the table's distances are
            :func:`susie_distance_squared` with ``weights = scales[h]``.

    ``forward(q, k)`` returns ``(q + P_q, k + P_k)``. Positions: keys are at ``positions``
    (default ``0 .. Nk - 1``); queries are aligned with the **end** of the keys, so query ``i`` is
    at the position of key ``i + Nk - Nq``: the same alignment as the bottom-right causal mask of
    :func:`rbf_tutorial.rbf_attention` (the last query is the newest token). With ``Nq == Nk``
    queries and keys share positions. Pass ``query_positions`` to place the queries elsewhere.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        base: float = 10000.0,
        init_scale: float = 0.5,
    ) -> None:
        super().__init__()
        self.num_heads = positive_int("num_heads", num_heads)
        self.head_dim = _even_dim("head_dim", head_dim)
        self.base = positive_float("base", base)
        if isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real):
            raise TypeError(f"init_scale: expected a number, got {type(init_scale).__name__}")
        if not math.isfinite(init_scale):
            raise ValueError(f"init_scale: expected a finite number, got {init_scale!r}")
        self.scales = nn.Parameter(torch.full((self.num_heads, self.head_dim // 2), float(init_scale)))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, base={self.base}"

    def table(self, positions: torch.Tensor) -> torch.Tensor:
        """The scaled table for each head: ``(H, N, D)`` in the scales' dtype, differentiable."""
        positions = _check_positions(positions, None)
        unit = susie_table(
            positions.shape[0],
            self.head_dim,
            self.base,
            positions,
            dtype=self.scales.dtype,
            device=self.scales.device,
        )
        return self._scaled(unit)

    def _scaled(self, unit: torch.Tensor) -> torch.Tensor:
        # One scale per frequency, shared by its sin and its cos coordinate.
        per_coordinate = self.scales.repeat_interleave(2, dim=-1)
        return per_coordinate[:, None, :] * unit[None, :, :]

    def _unit_table(self, length: int) -> torch.Tensor:
        """``susie_table(length, D, base)`` in the scales' dtype and device, reused across calls."""
        return _susie_unit_table(length, self.head_dim, self.base, self.scales.dtype, self.scales.device)

    def distance_squared(self, offset: torch.Tensor | float) -> torch.Tensor:
        """``|P_i - P_j|^2`` per head for offset ``i - j``: ``(H, *offset.shape)``."""
        return torch.stack(
            [susie_distance_squared(offset, self.head_dim, weights, self.base) for weights in self.scales]
        )

    def _check_qk(self, name: str, x: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor (B, H, N, D), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[3] != self.head_dim:
            raise ValueError(
                f"{name}: expected shape (B, H={self.num_heads}, N, D={self.head_dim}), got {tuple(x.shape)}"
            )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        positions: torch.Tensor | None = None,
        query_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q + P_q, k + P_k)`` for ``q (B, H, Nq, D)`` and ``k (B, H, Nk, D)``; same shapes and dtypes.

        ``positions``: ``(Nk,)`` key positions, default ``arange(Nk)``. ``query_positions``:
        ``(Nq,)``, default the last ``Nq`` key positions (end-aligned, see the class docstring);
        needed when ``Nq > Nk``.
        """
        self._check_qk("q", q)
        self._check_qk("k", k)
        query_len, key_len = q.shape[2], k.shape[2]
        if positions is None and query_positions is None and query_len <= key_len:
            # Positions 0 .. Nk - 1, queries at the last Nq of them: the unit table is reused.
            # Scaled once per use: one product shared by q and k would sum their two gradients
            # before the reduction to the scales, the same value but not the same bits.
            key_unit = self._unit_table(key_len)
            query_unit = key_unit if query_len == key_len else key_unit[key_len - query_len :]
            query_table, key_table = self._scaled(query_unit), self._scaled(key_unit)
            return q + as_dtype(query_table, q.dtype), k + as_dtype(key_table, k.dtype)
        if positions is None:
            positions = torch.arange(key_len, device=k.device)
        positions = _check_positions(positions, key_len, f"k.shape[2]={key_len}")
        if query_positions is None:
            if query_len > key_len:
                raise ValueError(
                    f"query_positions: queries are aligned with the end of the keys by default, "
                    f"which needs Nq <= Nk, got Nq={query_len} and Nk={key_len}; pass "
                    f"query_positions of shape ({query_len},)"
                )
            query_positions = positions[key_len - query_len :]
        query_positions = _check_positions(
            query_positions, query_len, f"q.shape[2]={query_len}", name="query_positions"
        )
        query_table = self.table(query_positions)
        key_table = self.table(positions)
        return q + as_dtype(query_table, q.dtype), k + as_dtype(key_table, k.dtype)


class LearnedPositions(nn.Module):
    """Absolute learned position embedding, added to the model's input ``(B, N, d_model)``.

    Added once to the token embeddings (as in GPT-2), not to queries and keys: it is the
    baseline that gives every position its own freely learned vector, with no built-in notion
    of offset. ``weight`` is ``(max_len, d_model)``, initialised from ``N(0, init_std^2)``;
    sequences longer than ``max_len`` are refused.
    """

    def __init__(self, max_len: int, d_model: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.max_len = positive_int("max_len", max_len)
        self.d_model = positive_int("d_model", d_model)
        init_std = positive_float("init_std", init_std)
        self.weight = nn.Parameter(torch.randn(self.max_len, self.d_model) * init_std)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, d_model={self.d_model}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + weight[:N]`` for ``x (B, N, d_model)``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor (B, N, d_model), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 3 or x.shape[2] != self.d_model:
            raise ValueError(f"x: expected shape (B, N, d_model={self.d_model}), got {tuple(x.shape)}")
        if x.shape[1] > self.max_len:
            raise ValueError(f"x: sequence length {x.shape[1]} exceeds max_len={self.max_len}")
        return x + self.weight[: x.shape[1]].to(x.dtype)
