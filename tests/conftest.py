"""Shared test helpers: seeded, random (never zero) attention inputs."""

from __future__ import annotations

import pytest
import torch


def random_qkv(
    batch: int,
    heads: int,
    query_len: int,
    key_len: int,
    head_dim: int,
    value_dim: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    contiguous: bool = True,
    requires_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard-normal ``q (B,H,Nq,D)``, ``k (B,H,Nk,D)``, ``v (B,H,Nk,Dv)`` from a seeded generator.

    ``contiguous=False`` returns views of ``(B, N, H, D)`` tensors transposed to ``(B, H, N, D)``,
    the layout a model produces when it splits heads without copying. With ``requires_grad`` the
    underlying storage requires grad; take gradients with ``torch.autograd.grad``, which works
    for views too.
    """
    value_dim = head_dim if value_dim is None else value_dim
    generator = torch.Generator().manual_seed(seed)

    def draw(length: int, dim: int) -> torch.Tensor:
        layout = (batch, heads, length, dim) if contiguous else (batch, length, heads, dim)
        x = torch.randn(layout, generator=generator).to(dtype).requires_grad_(requires_grad)
        return x if contiguous else x.transpose(1, 2)

    return draw(query_len, head_dim), draw(key_len, head_dim), draw(key_len, value_dim)


@pytest.fixture(scope="session")
def make_qkv():
    """The :func:`random_qkv` factory, as a fixture (session-scoped, so hypothesis tests may use it)."""
    return random_qkv
