"""XSA fused into the Triton kernel's epilogue, against attention followed by the unfused projection.

Runs the kernel through Triton's interpreter (no GPU here). The reference is float64: the reference
attention, then :func:`rbf_tutorial.xsa.exclusive` against each query's own value. Forward output and
all three gradients are compared, on shapes with Nq < Nk (register-like key prefixes), causal masks,
odd lengths and Dv != D.
"""

from __future__ import annotations

import random

import pytest
import torch
from kernel_device import KERNEL_DEVICE

from rbf_tutorial.kernels import rbf_flash_attention
from rbf_tutorial.reference import rbf_attention_reference
from rbf_tutorial.xsa import exclusive, exclusive_attention, own_values

# float64 under the interpreter is exact to rounding; compiled on a GPU, Triton's exp2 in float64 is
# good to about 1e-8 relative (measured 1.3e-8 on an H200), which is still far below float32's 2e-5.
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12 if KERNEL_DEVICE == "cpu" else 1e-7}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.detach().cpu().double() - expected).norm() / expected.norm()).item()


def random_inputs(seed: int, dtype: torch.dtype):
    rng = random.Random(seed)
    n_queries = rng.randint(1, 40)
    n_keys = n_queries + rng.choice([0, 0, 1, 4, 9])  # extra keys sit in front, like registers
    batch, heads = rng.randint(1, 2), rng.randint(1, 2)
    head_dim, value_dim = rng.choice([16, 24, 40]), rng.choice([16, 20, 48])
    generator = torch.Generator().manual_seed(seed)

    def draw(n, dim, spread):
        x = torch.randn(batch, heads, n, dim, generator=generator, dtype=torch.float64)
        return (x * spread).to(KERNEL_DEVICE, dtype)

    q, k, v = draw(n_queries, head_dim, 1.0), draw(n_keys, head_dim, 1.3), draw(n_keys, value_dim, 1.0)
    return q, k, v, rng.random() < 0.5


def unfused_float64(q, k, v, causal, grad_out):
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    y = rbf_attention_reference(q, k, v, causal=causal)
    z = exclusive(y, own_values(v, q.shape[-2]))
    z.backward(grad_out.cpu().double())
    return z.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("key_norms", ["in-kernel", "precomputed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("seed", range(6))
def test_fused_epilogue_matches_unfused(seed, dtype, key_norms, monkeypatch):
    if key_norms == "precomputed":  # what long sequences do (kernels/key_norms.py)
        from rbf_tutorial.kernels import launch

        monkeypatch.setattr(launch, "KEY_NORMS_MIN_QUERIES", 1)
    q, k, v, causal = random_inputs(seed, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    z = rbf_flash_attention(*leaves, causal=causal, exclusive=True)
    grad_out = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=dtype)
    grad_out = grad_out.to(KERNEL_DEVICE)
    z.backward(grad_out)
    expected = unfused_float64(q, k, v, causal, grad_out)
    for name, actual, exact in zip(("z", "dq", "dk", "dv"), (z, *(t.grad for t in leaves)), expected,
                                   strict=True):
        assert actual.dtype == dtype and actual.shape == exact.shape, name
        error = relative_error(actual, exact)
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e} (causal={causal})"
    # z . u = 0 up to rounding, relative to the size of what was projected: |y| |u|.
    own = own_values(v, q.shape[-2]).cpu().double()
    y = rbf_flash_attention(q, k, v, causal=causal).cpu().double()
    overlap = (z.detach().cpu().double() * own).sum(-1).abs() / (own.norm(dim=-1) * y.norm(dim=-1))
    assert overlap.max() <= 1e-5


def test_fused_epilogue_passes_gradcheck():
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, n, 16, generator=generator, dtype=torch.float64).to(KERNEL_DEVICE)
               .requires_grad_() for n in (6, 8, 8))
    assert torch.autograd.gradcheck(lambda q, k, v: rbf_flash_attention(q, k, v, causal=True, exclusive=True),
                                    (q, k, v))


def test_zero_own_values_leave_outputs_unchanged_in_the_kernel():
    q, k, v, _ = random_inputs(3, torch.float32)
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    v = v.clone()
    v[..., n_keys - n_queries, :] = 0  # query 0's own value vanishes: nothing to remove for it
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    z = rbf_flash_attention(*leaves, exclusive=True)
    y = rbf_flash_attention(q, k, v)
    assert torch.allclose(z[..., 0, :], y[..., 0, :], rtol=0, atol=1e-6)
    z.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_every_backend_route_agrees():
    q, k, v, causal = random_inputs(8, torch.float64)
    fused = exclusive_attention(q, k, v, causal=causal, backend="triton")
    for backend in ("naive", "matmul", "sdpa"):
        unfused = exclusive_attention(q, k, v, causal=causal, backend=backend)  # on the same device
        error = relative_error(fused, unfused.detach().cpu().double())
        assert error <= TOLERANCE[torch.float64], f"{backend}: relative error {error:.2e}"


@pytest.mark.parametrize("call", [
    lambda q, k, v: exclusive_attention(q, k[..., :3, :], v[..., :3, :]),
    lambda q, k, v: rbf_flash_attention(q, k[..., :3, :], v[..., :3, :], exclusive=True),
])
def test_fewer_keys_than_queries_is_refused(call):
    q = torch.randn(1, 1, 5, 16, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="^k: exclusive self attention needs"):
        call(q, q, q)
