"""Exclusive self attention: the output loses its component along the token's own value, safely."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rbf_tutorial import rbf_attention
from rbf_tutorial.reference import rbf_attention_reference
from rbf_tutorial.xsa import exclusive, exclusive_attention, similarity


def random_pair(shape=(2, 3, 7, 16), dtype=torch.float64, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    v = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return y.requires_grad_(requires_grad), v.requires_grad_(requires_grad)


def relative_overlap(z: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``|z . v| / (|y| |v|)`` per token: 0 for an exact projection, up to 1 for none at all."""
    z, y, v = z.double(), y.double(), v.double()
    return (z * v).sum(-1).abs() / (y.norm(dim=-1) * v.norm(dim=-1))


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float64, 1e-14), (torch.float32, 1e-6), (torch.bfloat16, 2e-2)],
    ids=["float64", "float32", "bfloat16"],
)
def test_output_is_orthogonal_to_the_value(dtype, tolerance):
    y, v = random_pair(dtype=dtype, seed=1)
    z = exclusive(y, v)
    assert z.shape == y.shape
    assert z.dtype == dtype
    overlap = relative_overlap(z, y, v)
    assert overlap.max() < tolerance, f"max |z.v| / (|y||v|) = {overlap.max():.1e}"
    # Without XSA the overlap is far from zero: the check above is not passing by accident.
    assert relative_overlap(y, y, v).max() > 0.1


def test_exclusive_is_the_projection_removal():
    y, v = random_pair(seed=2)
    z = exclusive(y, v)
    coefficient = (y * v).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True)
    torch.testing.assert_close(z + coefficient * v, y, rtol=1e-13, atol=1e-13)
    # Idempotent, blind to v's length and sign, and it leaves a y already orthogonal to v alone.
    torch.testing.assert_close(exclusive(z, v), z, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(exclusive(y, -3.5 * v), z, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(exclusive(v, v), torch.zeros_like(v), rtol=0, atol=1e-13)


def test_zero_values_leave_the_output_unchanged_with_finite_gradients():
    y, v = random_pair(seed=3)
    zero_rows = torch.zeros(v.shape[:-1], dtype=torch.bool)
    zero_rows[0, 1, 2] = zero_rows[1, 0, :3] = zero_rows[1, 2, -1] = True
    v = v.masked_fill(zero_rows[..., None], 0.0)
    y.requires_grad_()
    v.requires_grad_()

    z = exclusive(y, v)
    assert torch.isfinite(z).all()
    assert torch.equal(z[zero_rows], y[zero_rows])
    assert relative_overlap(z[~zero_rows], y[~zero_rows], v[~zero_rows]).max() < 1e-14

    cotangent = torch.randn(z.shape, generator=torch.Generator().manual_seed(4), dtype=z.dtype)
    grad_y, grad_v = torch.autograd.grad(z, (y, v), cotangent)
    assert torch.isfinite(grad_y).all() and torch.isfinite(grad_v).all()
    # Where v = 0 the map is the identity in y.
    assert torch.equal(grad_y[zero_rows], cotangent[zero_rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tiny_values_stay_finite(dtype):
    y, v = random_pair(dtype=dtype, seed=5, requires_grad=False)
    v = (v.float() * torch.tensor([0.0, 1e-30, 1e-20, 1.0]).repeat(4)[:7, None]).to(dtype).requires_grad_()
    y.requires_grad_()
    z = exclusive(y, v)
    grads = torch.autograd.grad(z.float().square().sum(), (y, v))
    assert torch.isfinite(z).all()
    assert all(torch.isfinite(grad).all() for grad in grads)


def test_exclusive_passes_gradcheck():
    y, v = random_pair(shape=(1, 2, 3, 5), seed=6, requires_grad=True)
    assert torch.autograd.gradcheck(exclusive, (y, v))
    assert torch.autograd.gradgradcheck(exclusive, (y, v))


def test_similarity_is_the_per_token_cosine():
    y, v = random_pair(seed=7)
    cosine = similarity(y, v)
    assert cosine.shape == y.shape[:-1]
    torch.testing.assert_close(cosine, F.cosine_similarity(y, v, dim=-1), rtol=1e-12, atol=1e-12)
    assert cosine.min() >= -1 and cosine.max() <= 1
    torch.testing.assert_close(similarity(v, v), torch.ones_like(cosine))
    torch.testing.assert_close(similarity(-2 * v, v), -torch.ones_like(cosine))
    # XSA removes exactly the similarity it measures.
    assert similarity(exclusive(y, v), v).abs().max() < 1e-14


def test_similarity_stays_in_range_and_reports_zero_without_an_angle():
    y, v = random_pair(dtype=torch.float32, seed=8)
    v[0, 0, 0] = 0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cosine = similarity(y.to(dtype), (3 * y + 1e-3 * v).to(dtype))
        assert cosine.dtype == dtype
        assert cosine.min() >= -1 and cosine.max() <= 1
    assert similarity(y, v)[0, 0, 0] == 0
    assert torch.isfinite(similarity(y, v)).all()


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda y, v: exclusive(y, v[..., :-1]), ValueError, "v"),
        (lambda y, v: exclusive(y[0], v[0]), ValueError, "y"),
        (lambda y, v: exclusive(y, v.float()), TypeError, "v"),
        (lambda y, v: exclusive(y.long(), v), TypeError, "y"),
        (lambda y, v: exclusive(y.numpy(), v), TypeError, "y"),
        (lambda y, v: exclusive(y, v, eps=-1.0), ValueError, "eps"),
        (lambda y, v: exclusive(y, v, eps="small"), TypeError, "eps"),
        (lambda y, v: similarity(y, v[:, :1]), ValueError, "v"),
    ],
)
def test_bad_input_is_named(call, error, name):
    y, v = random_pair(seed=9)
    with pytest.raises(error, match=f"^{name}: "):
        call(y, v)


# ---------------------------------------------------------------------------------------------------
# rbf_attention(..., exclusive=True): attention and XSA through the one entry point


@pytest.mark.parametrize("backend", ["naive", "matmul", "sdpa", "auto"])
@pytest.mark.parametrize(("n_queries", "n_keys", "causal"), [(5, 5, True), (3, 8, True), (4, 7, False)])
def test_exclusive_attention_is_attention_then_xsa_on_the_own_values(backend, n_queries, n_keys, causal):
    generator = torch.Generator().manual_seed(n_queries * 10 + n_keys)
    q, k = (torch.randn(2, 3, n, 12, generator=generator, dtype=torch.float64) for n in (n_queries, n_keys))
    v = torch.randn(2, 3, n_keys, 10, generator=generator, dtype=torch.float64)  # Dv != D on purpose
    z = rbf_attention(q, k, v, causal=causal, backend=backend, exclusive=True)
    y = rbf_attention_reference(q, k, v, causal=causal)
    own = v[..., n_keys - n_queries :, :]  # query i's own value is key i + Nk - Nq
    torch.testing.assert_close(z, exclusive(y, own), atol=1e-12, rtol=1e-10)
    assert relative_overlap(z, y, own).max() < 1e-12
    torch.testing.assert_close(exclusive_attention(q, k, v, causal=causal, backend=backend), z)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda q, k: rbf_attention(q, k[..., :3, :], k[..., :3, :], exclusive=True), ValueError,
         "^k: exclusive self attention needs"),
        (lambda q, k: rbf_attention(q, k, k, exclusive=1), TypeError, "^exclusive: expected a bool"),
    ],
)
def test_exclusive_argument_is_checked(call, error, message):
    q = torch.randn(1, 1, 5, 8)
    with pytest.raises(error, match=message):
        call(q, torch.randn(1, 1, 6, 8))
