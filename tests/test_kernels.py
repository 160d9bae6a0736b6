"""The fused Triton kernel against the float64 reference, on the CPU through Triton's interpreter.

Shapes are drawn at random (seeded per case) from the awkward corners: odd lengths that end mid-tile,
Nq != Nk, bottom-right causal masks, head dims that are not powers of two, Dv != D, non-contiguous
views, a custom scale. Forward output and all three gradients are compared in relative norm.
"""

from __future__ import annotations

import random

import pytest
import torch
from kernel_device import KERNEL_DEVICE

from rbf_tutorial import xsa
from rbf_tutorial.kernels import rbf_flash_attention
from rbf_tutorial.reference import rbf_attention_reference

# Relative-error budgets per input dtype (the float64 reference is exact by comparison).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    if expected.norm() == 0:
        # A single visible key takes all the weight: dq and dk are exactly zero, so compare absolutely.
        return actual.norm().item()
    return ((actual - expected).norm() / expected.norm()).item()


def random_case(seed: int) -> dict:
    rng = random.Random(seed)
    causal = rng.random() < 0.5
    n_queries = rng.randint(1, 70)
    n_keys = rng.randint(n_queries if causal else 1, 90)
    return dict(
        batch=rng.randint(1, 2), heads=rng.randint(1, 3), n_queries=n_queries, n_keys=n_keys,
        head_dim=rng.choice([16, 24, 32, 40, 64]), value_dim=rng.choice([16, 20, 32]),
        causal=causal, scale=rng.choice([None, 0.05, 0.4]), transposed_layout=rng.random() < 0.5,
    )


def make_inputs(case: dict, dtype: torch.dtype, seed: int):
    """q, k, v as leaf tensors; transposed_layout makes them (B, N, H, D) memory viewed as (B, H, N, D)."""
    generator = torch.Generator().manual_seed(seed)
    b, h, d, dv = case["batch"], case["heads"], case["head_dim"], case["value_dim"]

    def draw(n: int, dim: int, spread: float) -> torch.Tensor:
        if case["transposed_layout"]:
            x = torch.randn(b, n, h, dim, generator=generator).mul(spread)
            x = x.to(KERNEL_DEVICE, dtype).transpose(1, 2)
        else:
            x = torch.randn(b, h, n, dim, generator=generator).mul(spread).to(KERNEL_DEVICE, dtype)
        return x.requires_grad_()

    # Keys spread wider than queries so that key norms matter to the weights.
    return draw(case["n_queries"], d, 1.0), draw(case["n_keys"], d, 1.5), draw(case["n_keys"], dv, 1.0)


def check_against_reference(case: dict, dtype: torch.dtype, seed: int) -> None:
    q, k, v = make_inputs(case, dtype, seed)
    out = rbf_flash_attention(q, k, v, causal=case["causal"], scale=case["scale"])
    assert out.dtype == dtype and out.shape == (*q.shape[:3], v.shape[-1])
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    grad_out = grad_out.to(KERNEL_DEVICE, dtype)
    out.backward(grad_out)

    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    expected = rbf_attention_reference(q64, k64, v64, causal=case["causal"], scale=case["scale"])
    expected.backward(grad_out.cpu().double())

    budget = TOLERANCE[dtype]
    errors = {name: relative_error(a, e) for name, a, e in
              [("out", out, expected), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
               ("dv", v.grad, v64.grad)]}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= budget, f"{worst} relative error {errors[worst]:.2e} > {budget:.0e} for {case}"


@pytest.mark.parametrize("seed", range(12))
def test_random_shapes_fp32(seed):
    check_against_reference(random_case(seed), torch.float32, seed)


@pytest.mark.parametrize("seed", range(100, 106))
def test_random_shapes_fp16(seed):
    check_against_reference(random_case(seed), torch.float16, seed)


@pytest.mark.parametrize("seed", range(200, 203))
def test_bf16_is_computed_correctly_under_the_interpreter(seed):
    check_against_reference(random_case(seed), torch.bfloat16, seed)


@pytest.mark.parametrize("seed", range(300, 306))
def test_precomputed_key_norms(seed, monkeypatch):
    """Long sequences read the key norms from their own kernel (kernels/key_norms.py): same answers."""
    from rbf_tutorial.kernels import launch

    monkeypatch.setattr(launch, "KEY_NORMS_MIN_QUERIES", 1)
    check_against_reference(random_case(seed), torch.float32 if seed % 2 else torch.float16, seed)


def test_one_shape_in_turn_in_several_layouts_scales_and_masks():
    """Each call's launches come from a plan cached per problem (kernels/launch.py): one shape called
    again with other strides, another scale, causal or not, and XSA must never reuse another's plan."""
    base = dict(batch=2, heads=2, n_queries=37, n_keys=37, head_dim=24, value_dim=20)
    variants = [dict(causal=False, scale=None, transposed_layout=False),
                dict(causal=False, scale=None, transposed_layout=True),
                dict(causal=True, scale=None, transposed_layout=False),
                dict(causal=False, scale=0.4, transposed_layout=False),
                dict(causal=False, scale=None, transposed_layout=False)]
    for seed, variant in enumerate(variants):
        check_against_reference({**base, **variant}, torch.float32, 500 + seed)
    # The same layout once more with XSA's epilogue: a different forward and backward for one shape.
    q, k, v = make_inputs({**base, **variants[0]}, torch.float32, 510)
    plain = rbf_flash_attention(q, k, v)
    exclusive = rbf_flash_attention(q, k, v, exclusive=True)
    expected = xsa.exclusive(plain.detach(), v.detach())
    assert relative_error(exclusive.detach(), expected) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("n_queries,n_keys", [(1, 1), (1, 33), (16, 16), (17, 17), (32, 48)])
def test_causal_tile_edges(n_queries, n_keys):
    case = dict(batch=1, heads=1, n_queries=n_queries, n_keys=n_keys, head_dim=16, value_dim=16,
                causal=True, scale=None, transposed_layout=False)
    check_against_reference(case, torch.float32, n_queries * 100 + n_keys)


def test_gradcheck_float64():
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 1, n, 16, generator=generator, dtype=torch.float64).to(KERNEL_DEVICE)
               .requires_grad_() for n in (5, 9, 9))
    assert torch.autograd.gradcheck(lambda q, k, v: rbf_flash_attention(q, k, v, causal=True), (q, k, v))


def test_deterministic():
    case = random_case(3)
    runs = []
    for _ in range(2):
        q, k, v = make_inputs(case, torch.float32, 3)
        out = rbf_flash_attention(q, k, v, causal=case["causal"])
        out.sum().backward()
        runs.append((out.detach(), q.grad, k.grad, v.grad))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_head_dim_limit_is_reported():
    q = torch.randn(1, 1, 4, 300, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="head dims up to 256"):
        rbf_flash_attention(q, q, q)


def test_custom_op_registration():
    """The operator torch.compile sees: schema, fake tensors and autograd registration all agree."""
    from rbf_tutorial.kernels.op import _forward_op

    generator = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator).to(KERNEL_DEVICE).requires_grad_()
               for n in (7, 19, 19))
    for exclusive in (False, True):
        torch.library.opcheck(_forward_op, (q, k, v, True, 0.3, exclusive))
        out, _, _ = _forward_op(q, k, v, True, 0.3, exclusive)
        eager = rbf_flash_attention(q, k, v, causal=True, scale=0.3, exclusive=exclusive)
        assert torch.equal(out, eager)
