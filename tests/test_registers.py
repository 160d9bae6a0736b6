"""Register tokens: initialised at the origin, in front of the keys, seen by every query, trainable."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_device import kernel_on_cpu_tensors

from rbf_tutorial import rbf_attention
from rbf_tutorial.reference import rbf_attention_reference
from rbf_tutorial.registers import (
    RegisterTokens,
    attend_with_registers,
    attention_weights,
    register_weights,
)

needs_kernel = kernel_on_cpu_tensors


def hand_register_mass(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """Mass on one register at the origin, written out in float64: ``(B, H, Nq)``.

    ``exp(-scale |q|^2) / (exp(-scale |q|^2) + sum over visible j of exp(-scale |q - k_j|^2))``,
    with query ``i`` seeing real key ``j`` iff ``j <= i + Nk - Nq``.
    """
    q, k = q.double(), k.double()
    batch, heads, query_len, _ = q.shape
    key_len = k.shape[2]
    mass = torch.empty(batch, heads, query_len, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(query_len):
                register_term = math.exp(-scale * q[b, h, i].square().sum().item())
                last_visible = i + key_len - query_len if causal else key_len - 1
                key_terms = sum(
                    math.exp(-scale * (q[b, h, i] - k[b, h, j]).square().sum().item())
                    for j in range(last_visible + 1)
                )
                mass[b, h, i] = register_term / (register_term + key_terms)
    return mass


def test_registers_start_at_the_origin():
    registers = RegisterTokens(num_heads=3, head_dim=8, num_registers=2, value_dim=5)
    assert isinstance(registers.keys, torch.nn.Parameter)
    assert isinstance(registers.values, torch.nn.Parameter)
    assert registers.keys.shape == (3, 2, 8)
    assert registers.values.shape == (3, 2, 5)
    assert torch.count_nonzero(registers.keys) == 0
    assert torch.count_nonzero(registers.values) == 0
    assert RegisterTokens(num_heads=2, head_dim=4).num_registers == 1
    assert RegisterTokens(num_heads=2, head_dim=4).values.shape == (2, 1, 4)


def test_prepend_puts_registers_first(make_qkv):
    q, k, v = make_qkv(2, 3, 5, 7, 8, 6, seed=1)
    registers = RegisterTokens(num_heads=3, head_dim=8, num_registers=2, value_dim=6)
    with torch.no_grad():
        registers.keys.normal_()
        registers.values.normal_()
    extended_keys, extended_values = registers.prepend(k, v)
    assert extended_keys.shape == (2, 3, 9, 8)
    assert extended_values.shape == (2, 3, 9, 6)
    for b in range(2):
        assert torch.equal(extended_keys[b, :, :2], registers.keys)
        assert torch.equal(extended_values[b, :, :2], registers.values)
    assert torch.equal(extended_keys[:, :, 2:], k)
    assert torch.equal(extended_values[:, :, 2:], v)


def test_a_register_at_the_origin_scores_minus_scale_times_the_query_norm(make_qkv):
    q, k, _ = make_qkv(1, 2, 4, 6, 8, dtype=torch.float64, seed=2)
    scale = 0.3
    weights = attention_weights(q, k, RegisterTokens(num_heads=2, head_dim=8), scale=scale)
    # log(w_register / w_key_j) = -scale |q|^2 + scale |q - k_j|^2: the register's logit is
    # -scale |q|^2, set by the query alone.
    log_ratio = weights[..., :1].log() - weights[..., 1:].log()
    expected = -scale * q.square().sum(-1, keepdim=True) + scale * torch.cdist(q, k).square()
    torch.testing.assert_close(log_ratio, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 4, dtype=torch.float64))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_register_weights_match_a_hand_computation(causal, make_qkv):
    q, k, _ = make_qkv(2, 2, 5, 7, 8, dtype=torch.float64, seed=3)
    registers = RegisterTokens(num_heads=2, head_dim=8).double()
    mass = register_weights(q, k, registers, causal=causal, scale=0.4)
    assert mass.shape == (2, 2, 5, 1)
    torch.testing.assert_close(mass[..., 0], hand_register_mass(q, k, 0.4, causal), rtol=1e-12, atol=0)


# (B, H, Nq, Nk, D): square (the first query sees one real key) and fewer queries than keys.
VISIBILITY_SHAPES = {"square": (2, 2, 6, 6, 8), "rect": (1, 3, 3, 7, 8)}
VISIBILITY_BACKENDS = [
    pytest.param("naive", torch.float64, id="naive"),
    pytest.param("matmul", torch.float64, id="matmul"),
    pytest.param("sdpa", torch.float64, id="sdpa"),
    pytest.param("triton", torch.float32, id="triton", marks=needs_kernel),
]


@pytest.mark.parametrize("shape", VISIBILITY_SHAPES.values(), ids=VISIBILITY_SHAPES.keys())
@pytest.mark.parametrize(("backend", "dtype"), VISIBILITY_BACKENDS)
def test_every_query_sees_the_registers_under_causal_masking(backend, dtype, shape, make_qkv):
    batch, heads, query_len, key_len, head_dim = shape
    q, k, v = make_qkv(batch, heads, query_len, key_len, head_dim, dtype=dtype, seed=4)
    num_registers = 2
    # An extra value channel marks the registers: 0 for real values, 1 for registers, so the
    # output's last channel is exactly the mass each query puts on the registers.
    registers = RegisterTokens(heads, head_dim, num_registers, value_dim=head_dim + 1).to(dtype)
    with torch.no_grad():
        registers.values[..., -1] = 1.0
    v = torch.cat([v, torch.zeros(*v.shape[:3], 1, dtype=dtype)], dim=-1)

    out = attend_with_registers(q, k, v, registers, causal=True, backend=backend)
    assert out.shape == (batch, heads, query_len, head_dim + 1)
    assert out.dtype == dtype

    register_mass = out[..., -1].double()
    assert (register_mass > 1e-3).all(), f"some query puts no weight on the registers: {register_mass}"
    # Two identical registers at the origin split the mass that a single one would get.
    expected_mass = register_weights(q.double(), k.double(), registers.double(), causal=True).sum(-1)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(register_mass, expected_mass, rtol=tolerance, atol=tolerance)

    # The whole output against the float64 reference on explicitly extended keys and values.
    extended_keys, extended_values = registers.prepend(k, v)
    expected = rbf_attention_reference(q, extended_keys, extended_values, causal=True)
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def test_without_registers_the_helper_is_plain_attention(make_qkv):
    q, k, v = make_qkv(1, 2, 4, 5, 8, dtype=torch.float64, seed=5)
    torch.testing.assert_close(
        attend_with_registers(q, k, v, None, causal=True, backend="matmul"),
        rbf_attention(q, k, v, causal=True, backend="matmul"),
    )


def test_forward_is_attend_with_registers(make_qkv):
    q, k, v = make_qkv(2, 2, 4, 5, 8, dtype=torch.float64, seed=6)
    registers = RegisterTokens(2, 8, num_registers=3).double()
    with torch.no_grad():
        registers.keys.normal_()
        registers.values.normal_()
    torch.testing.assert_close(
        registers(q, k, v, causal=True, scale=0.2, backend="naive"),
        attend_with_registers(q, k, v, registers, causal=True, scale=0.2, backend="naive"),
    )


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [
        pytest.param("matmul", torch.float64, id="matmul"),
        pytest.param("triton", torch.float32, id="triton", marks=needs_kernel),
    ],
)
def test_gradients_reach_the_register_parameters(backend, dtype, make_qkv):
    q, k, v = make_qkv(1, 2, 5, 5, 8, dtype=dtype, seed=7)
    registers = RegisterTokens(2, 8, num_registers=2).to(dtype)
    out = attend_with_registers(q, k, v, registers, causal=True, backend=backend)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(8), dtype=dtype)
    (out * cotangent).sum().backward()
    for name in ("keys", "values"):
        grad = getattr(registers, name).grad
        assert grad is not None, f"no gradient reached registers.{name}"
        assert torch.isfinite(grad).all()
        assert grad.abs().amax(dim=-1).gt(0).all(), f"registers.{name} has a register with zero gradient"


def test_register_gradients_pass_gradcheck(make_qkv):
    q, k, v = make_qkv(1, 2, 3, 4, 4, dtype=torch.float64, seed=9)
    registers = RegisterTokens(2, 4, num_registers=2).double()
    generator = torch.Generator().manual_seed(10)
    with torch.no_grad():
        registers.keys.normal_(generator=generator)
        registers.values.normal_(generator=generator)

    def attend(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # gradcheck perturbs its own inputs, so take the register tensors as arguments and swap
        # them in for the module's parameters for the duration of the call.
        parameters = {"keys": keys, "values": values}
        return torch.func.functional_call(
            registers, parameters, (q, k, v), dict(causal=True, backend="matmul")
        )

    keys = registers.keys.detach().clone().requires_grad_()
    values = registers.values.detach().clone().requires_grad_()
    torch.testing.assert_close(attend(keys, values), registers(q, k, v, causal=True, backend="matmul"))
    assert torch.autograd.gradcheck(attend, (keys, values))


def test_float32_registers_follow_the_inputs_dtype(make_qkv):
    q, k, v = make_qkv(1, 2, 3, 4, 8, dtype=torch.float64, seed=11)
    registers = RegisterTokens(2, 8)
    out = attend_with_registers(q, k, v, registers, backend="naive")
    assert out.dtype == torch.float64
    out.sum().backward()
    assert registers.keys.grad.dtype == torch.float32


@pytest.mark.parametrize(
    ("arguments", "error", "name"),
    [
        (dict(num_heads=2, head_dim=4, num_registers=0), ValueError, "num_registers"),
        (dict(num_heads=2, head_dim=4, num_registers=1.5), TypeError, "num_registers"),
        (dict(num_heads=0, head_dim=4), ValueError, "num_heads"),
        (dict(num_heads=2, head_dim=True), TypeError, "head_dim"),
        (dict(num_heads=2, head_dim=4, value_dim=-1), ValueError, "value_dim"),
    ],
)
def test_bad_constructor_arguments_are_named(arguments, error, name):
    with pytest.raises(error, match=name):
        RegisterTokens(**arguments)


def test_bad_inputs_are_named(make_qkv):
    q, k, v = make_qkv(1, 2, 5, 4, 8, seed=12)
    registers = RegisterTokens(2, 8)
    with pytest.raises(ValueError, match="^k: .*H=3"):
        RegisterTokens(3, 8).prepend(k, v)
    with pytest.raises(ValueError, match="^v: .*value_dim=8"):
        registers.prepend(k, v[..., :5])
    with pytest.raises(TypeError, match="^k: "):
        registers.prepend(k.long(), v)
    with pytest.raises(TypeError, match="^registers: "):
        attend_with_registers(q, k, v, "registers")
    with pytest.raises(ValueError, match="^causal: .*Nq=5.*Nk=4"):
        attend_with_registers(q, k, v, registers, causal=True)
    with pytest.raises(ValueError, match="^backend: "):
        attend_with_registers(q, k, v, registers, backend="fastest")
    with pytest.raises(TypeError, match="^registers: "):
        register_weights(q, k, None)
