"""Every route to RBF attention against the float64 reference: outputs and gradients.

Errors are measured as ``|actual - reference| / |reference|`` (Frobenius norms) against the
reference evaluated in float64 on the *same* rounded inputs, so a tolerance only has to absorb
the route's own arithmetic. Any real mistake (a wrong sign, a missing norm, a mask off by one)
shows up as an error of order one, far above every tolerance below.
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_device import kernel_on_cpu_tensors

import rbf_tutorial
from rbf_tutorial import BACKENDS, rbf_attention
from rbf_tutorial.attention import resolve_backend
from rbf_tutorial.backends import (
    expanded_logits,
    flex_attention,
    sdpa_bias_attention,
    sdpa_padded_attention,
    sdpa_route,
)
from rbf_tutorial.reference import causal_visibility, rbf_attention_reference, rbf_logits_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Relative-error tolerances (output, input gradients), about 3x the worst seen on the CPU over
# the cases below. bfloat16 routes that round |k|^2 to bfloat16 (sdpa) are the loosest.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 2e-5),
    torch.float16: (3e-3, 8e-3),
    torch.bfloat16: (2.5e-2, 5e-2),
}




needs_kernel = kernel_on_cpu_tensors

# Every route, by name. The SDPA route functions are called directly so that both run on the CPU
# (backend="sdpa" picks the bias route there).
ROUTES = {
    "naive": functools.partial(rbf_attention, backend="naive"),
    "matmul": functools.partial(rbf_attention, backend="matmul"),
    "sdpa": functools.partial(rbf_attention, backend="sdpa"),
    "sdpa-bias": sdpa_bias_attention,
    "sdpa-padded": sdpa_padded_attention,
    "sdpa-padded-split": functools.partial(sdpa_padded_attention, split_norms=True),
    "flex": functools.partial(rbf_attention, backend="flex"),
    "triton": functools.partial(rbf_attention, backend="triton"),
    "auto": functools.partial(rbf_attention, backend="auto"),
}
# Routes PyTorch can only run forward on the CPU, where these tests' tensors live.
FORWARD_ONLY = {"flex"}

# (B, H, Nq, Nk, D, Dv) plus options. Odd lengths, Nq != Nk both ways round, head dims that are
# not powers of two, Dv != D, a custom scale, non-contiguous views, a single query.
CASES = {
    "square": dict(shape=(2, 3, 17, 17, 24, 24)),
    "cross-lengths": dict(shape=(1, 2, 7, 13, 40, 16), scale=0.3),
    "more-queries": dict(shape=(2, 1, 12, 5, 24, 24)),
    "causal-square": dict(shape=(2, 2, 11, 11, 16, 16), causal=True),
    "causal-rect": dict(shape=(1, 3, 5, 12, 24, 40), causal=True, scale=0.7),
    "non-contiguous": dict(shape=(2, 2, 9, 10, 32, 8), causal=True, contiguous=False),
    "one-query": dict(shape=(1, 1, 1, 6, 8, 8), causal=True),
    "wide-head": dict(shape=(1, 1, 30, 37, 64, 64), causal=True),
}
# The interpreter runs the Triton kernel slowly: a few small cases cover it.
TRITON_CASES = ("cross-lengths", "causal-rect", "non-contiguous")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|actual - expected| / |expected|``; the plain difference where ``expected`` is exactly zero
    (as ``dq`` is with a single key: softmax over one key is constant)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    difference = (actual - expected).norm().item()
    expected_norm = expected.norm().item()
    return difference / expected_norm if expected_norm > 0 else difference


def _params():
    for route, case, dtype in itertools.product(ROUTES, CASES, DTYPES):
        if route == "triton" and (case not in TRITON_CASES or dtype == torch.float64):
            continue
        marks = [needs_kernel] if route == "triton" else []
        dtype_name = str(dtype).removeprefix("torch.")
        yield pytest.param(route, case, dtype, marks=marks, id=f"{route}-{case}-{dtype_name}")


def check_against_reference(route, q, k, v, *, causal=False, scale=None, forward_only=False):
    """Run ``route`` and the reference; assert output (and gradient) errors are within tolerance."""
    output_tolerance, gradient_tolerance = TOLERANCES[q.dtype]
    options = dict(causal=causal, scale=scale)
    if forward_only:
        with torch.no_grad():
            out = route(q, k, v, **options)
    else:
        out = route(q, k, v, **options)
    assert out.dtype == q.dtype
    assert out.shape == (*q.shape[:3], v.shape[-1])

    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = rbf_attention_reference(*leaves, **options)
    error = relative_error(out, expected)
    assert error < output_tolerance, f"output relative error {error:.2e} >= {output_tolerance:.0e}"
    if forward_only:
        return

    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(q.dtype)
    grads = torch.autograd.grad(out, (q, k, v), cotangent)
    expected_grads = torch.autograd.grad(expected, leaves, cotangent.double())
    for name, grad, expected_grad in zip("qkv", grads, expected_grads, strict=True):
        error = relative_error(grad, expected_grad)
        assert error < gradient_tolerance, f"d{name} relative error {error:.2e} >= {gradient_tolerance:.0e}"


@pytest.mark.parametrize(("route", "case", "dtype"), list(_params()))
def test_route_matches_reference(route, case, dtype, make_qkv):
    options = CASES[case]
    forward_only = route in FORWARD_ONLY
    q, k, v = make_qkv(
        *options["shape"],
        dtype=dtype,
        seed=len(case),
        contiguous=options.get("contiguous", True),
        requires_grad=not forward_only,
    )
    check_against_reference(
        ROUTES[route],
        q,
        k,
        v,
        causal=options.get("causal", False),
        scale=options.get("scale"),
        forward_only=forward_only,
    )


# Random shapes on the cheap routes; hypothesis shrinks any failure to a small example.
@st.composite
def attention_problems(draw):
    query_len = draw(st.integers(1, 24))
    key_len = draw(st.integers(1, 24))
    causal = draw(st.booleans()) and query_len <= key_len
    return dict(
        shape=(
            draw(st.integers(1, 2)),
            draw(st.integers(1, 3)),
            query_len,
            key_len,
            draw(st.integers(1, 48)),
            draw(st.integers(1, 33)),
        ),
        causal=causal,
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        contiguous=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problem=attention_problems(), route=st.sampled_from(["naive", "matmul", "sdpa-bias", "sdpa-padded"]))
def test_random_shapes_match_reference(problem, route, make_qkv):
    q, k, v = make_qkv(
        *problem["shape"], seed=problem["seed"], contiguous=problem["contiguous"], requires_grad=True
    )
    check_against_reference(ROUTES[route], q, k, v, causal=problem["causal"], scale=problem["scale"])


@settings(max_examples=6, deadline=None, derandomize=True)
@given(problem=attention_problems())
def test_random_shapes_flex_forward(problem, make_qkv):
    q, k, v = make_qkv(*problem["shape"], seed=problem["seed"], contiguous=problem["contiguous"])
    check_against_reference(
        ROUTES["flex"], q, k, v, causal=problem["causal"], scale=problem["scale"], forward_only=True
    )


def test_expanded_logits_plus_query_norm_is_negative_squared_distance(make_qkv):
    q, k, _ = make_qkv(2, 3, 9, 14, 40, dtype=torch.float64, seed=3)
    scale = 0.37
    query_norm_term = scale * q.square().sum(dim=-1, keepdim=True)
    torch.testing.assert_close(
        expanded_logits(q, k, scale=scale) - query_norm_term,
        rbf_logits_reference(q, k, scale),
        rtol=1e-12,
        atol=1e-12,
    )


def test_softmax_ignores_the_query_norm(make_qkv):
    q, k, _ = make_qkv(1, 2, 6, 8, 16, dtype=torch.float64, seed=4)
    torch.testing.assert_close(
        torch.softmax(expanded_logits(q, k, scale=0.25), dim=-1),
        torch.softmax(rbf_logits_reference(q, k, 0.25), dim=-1),
    )


@pytest.mark.parametrize(("query_len", "key_len"), [(1, 1), (4, 4), (3, 7), (1, 5), (6, 2)])
def test_causal_visibility_is_bottom_right(query_len, key_len):
    visible = causal_visibility(query_len, key_len)
    for i, j in itertools.product(range(query_len), range(key_len)):
        assert bool(visible[i, j]) == (j <= i + key_len - query_len)
    if query_len <= key_len:
        assert visible[-1].all(), "the last query must see every key"


def test_reference_zeroes_queries_that_see_no_key(make_qkv):
    q, k, v = make_qkv(1, 2, 6, 4, 8, requires_grad=True)
    out = rbf_attention_reference(q, k, v, causal=True)
    hidden_queries = out[:, :, :2]  # Nq - Nk = 2 queries see nothing
    assert torch.equal(hidden_queries, torch.zeros_like(hidden_queries))
    assert out[:, :, 2:].abs().sum() > 0
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_causal_output_ignores_hidden_keys(make_qkv):
    q, k, v = make_qkv(1, 2, 4, 9, 16, seed=9)
    first = rbf_attention(q, k, v, causal=True, backend="matmul")
    # Keys after position i + Nk - Nq are hidden from query i; changing the last key only
    # affects the last query.
    k_changed, v_changed = k.clone(), v.clone()
    k_changed[..., -1, :] += 3.0
    v_changed[..., -1, :] -= 5.0
    second = rbf_attention(q, k_changed, v_changed, causal=True, backend="matmul")
    torch.testing.assert_close(first[..., :-1, :], second[..., :-1, :], rtol=0, atol=0)
    assert not torch.allclose(first[..., -1, :], second[..., -1, :])


@pytest.mark.parametrize("route", ["naive", "matmul", "sdpa"])
def test_self_attention_gradient_at_zero_distance(route, make_qkv):
    # q and k the same tensor: every query sits exactly on its own key, where |q - k| has no
    # derivative but |q - k|^2 does. cdist's backward must not turn that into NaN.
    x, _, v = make_qkv(2, 2, 7, 7, 12, seed=11, dtype=torch.float64, requires_grad=True)
    out = ROUTES[route](x, x, v, causal=True)
    (grad_x,) = torch.autograd.grad(out.square().sum(), (x,))
    x_ref = x.detach().requires_grad_()
    expected = rbf_attention_reference(x_ref, x_ref, v.detach(), causal=True)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), (x_ref,))
    torch.testing.assert_close(grad_x, expected_grad, rtol=1e-9, atol=1e-12)


def test_default_scale_is_inverse_sqrt_head_dim(make_qkv):
    q, k, v = make_qkv(1, 2, 5, 6, 24, 8)
    torch.testing.assert_close(
        rbf_attention(q, k, v, backend="matmul"),
        rbf_attention(q, k, v, backend="matmul", scale=1 / math.sqrt(24)),
        rtol=0,
        atol=0,
    )


def test_backends_tuple_lists_every_route():
    assert BACKENDS == ("naive", "matmul", "sdpa", "flex", "triton", "auto")
    assert rbf_tutorial.BACKENDS is BACKENDS


def test_auto_on_cpu_picks_matmul_and_sdpa_picks_bias(make_qkv):
    q, _, _ = make_qkv(1, 1, 2, 2, 8)
    assert resolve_backend("auto", q) == "matmul"
    assert resolve_backend("flex", q) == "flex"
    assert sdpa_route(q) == "bias"


def test_flex_backward_on_cpu_raises_clearly(make_qkv):
    q, k, v = make_qkv(1, 1, 3, 4, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backend 'flex'.*no backward pass on the CPU"):
        flex_attention(q, k, v)


def test_flex_under_no_grad_accepts_tensors_that_require_grad(make_qkv):
    q, k, v = make_qkv(1, 1, 3, 4, 16, requires_grad=True)
    with torch.no_grad():
        out = flex_attention(q, k, v)
    torch.testing.assert_close(out, rbf_attention(q, k, v, backend="matmul").detach())


def test_triton_route_without_kernel_raises_runtime_error(make_qkv, monkeypatch):
    monkeypatch.setitem(sys.modules, "rbf_tutorial.kernels", types.ModuleType("rbf_tutorial.kernels"))
    q, k, v = make_qkv(1, 1, 2, 2, 8)
    with pytest.raises(RuntimeError, match="backend 'triton'.*rbf_flash_attention"):
        rbf_attention(q, k, v, backend="triton")
