"""Bad input to ``rbf_attention`` fails early, with the right exception, naming the argument."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from rbf_tutorial import BACKENDS, rbf_attention
from rbf_tutorial.attention import validate_inputs


@pytest.fixture
def qkv(make_qkv):
    """Valid inputs: q (2, 4, 10, 64), k (2, 4, 12, 64), v (2, 4, 12, 32)."""
    return make_qkv(2, 4, 10, 12, 64, 32)


def _replace(qkv, **changes):
    arguments = dict(zip("qkv", qkv, strict=True))
    arguments.update(changes)
    return arguments["q"], arguments["k"], arguments["v"]


def test_valid_inputs_pass(qkv):
    validate_inputs(*qkv)
    validate_inputs(*qkv, causal=True, scale=0.5, backend="naive")
    validate_inputs(*qkv, scale=2, backend="auto")
    validate_inputs(*qkv, scale=np.float32(0.1))


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [[[1.0]], np.ones((2, 4, 10, 64)), None, 3.0])
def test_non_tensor_is_type_error(qkv, name, bad):
    with pytest.raises(TypeError, match=rf"^{name}: expected a torch.Tensor"):
        rbf_attention(*_replace(qkv, **{name: bad}))


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_non_float_dtype_is_type_error(qkv, name, dtype):
    index = "qkv".index(name)
    bad = qkv[index].to(dtype) if dtype != torch.complex64 else torch.complex(qkv[index], qkv[index])
    with pytest.raises(TypeError, match=rf"^{name}: expected a floating-point tensor.*{dtype}"):
        rbf_attention(*_replace(qkv, **{name: bad}))


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("reshape", [lambda x: x[0], lambda x: x[None], lambda x: x.flatten()])
def test_wrong_rank_is_value_error(qkv, name, reshape):
    bad = reshape(qkv["qkv".index(name)])
    with pytest.raises(ValueError, match=rf"^{name}: expected 4 dimensions .* got {bad.dim()}"):
        rbf_attention(*_replace(qkv, **{name: bad}))


@pytest.mark.parametrize(
    ("name", "shapes"),
    [
        ("q", ((2, 4, 0, 64), (2, 4, 12, 64), (2, 4, 12, 32))),  # no queries
        ("k", ((2, 4, 10, 64), (2, 4, 0, 64), (2, 4, 0, 32))),  # no keys
        ("q", ((0, 4, 10, 64), (0, 4, 12, 64), (0, 4, 12, 32))),  # empty batch
        ("q", ((2, 4, 10, 0), (2, 4, 12, 0), (2, 4, 12, 32))),  # no head dim
        ("v", ((2, 4, 10, 64), (2, 4, 12, 64), (2, 4, 12, 0))),  # no value dim
    ],
)
def test_empty_dimension_is_value_error(name, shapes):
    q, k, v = (torch.randn(shape) for shape in shapes)
    bad_shape = re.escape(str(shapes["qkv".index(name)]))
    with pytest.raises(ValueError, match=rf"^{name}: expected every dimension .* >= 1, got {bad_shape}"):
        rbf_attention(q, k, v)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((2, 4, 12, 32), r"D=64 to match q, got \(2, 4, 12, 32\)"),
        ((1, 4, 12, 64), r"B=2, H=4, D=64 to match q, got \(1, 4, 12, 64\)"),
        ((2, 3, 12, 64), r"H=4, D=64 to match q, got \(2, 3, 12, 64\)"),
    ],
)
def test_key_shape_mismatch_is_value_error(qkv, shape, expected):
    q, _, v = qkv
    with pytest.raises(ValueError, match=rf"^k: expected shape \(B, H, Nk, D\) with .*{expected}"):
        rbf_attention(q, torch.randn(shape), v)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((2, 4, 11, 32), r"Nk=12 to match k, got \(2, 4, 11, 32\)"),
        ((2, 1, 12, 32), r"H=4 to match q .* got \(2, 1, 12, 32\)"),
        ((3, 4, 12, 32), r"B=2, .* got \(3, 4, 12, 32\)"),
    ],
)
def test_value_shape_mismatch_is_value_error(qkv, shape, expected):
    q, k, _ = qkv
    with pytest.raises(ValueError, match=rf"^v: expected shape \(B, H, Nk, Dv\) with .*{expected}"):
        rbf_attention(q, k, torch.randn(shape))


@pytest.mark.parametrize("name", ["k", "v"])
def test_dtype_mismatch_is_type_error(qkv, name):
    bad = qkv["qkv".index(name)].to(torch.float16)
    with pytest.raises(
        TypeError, match=rf"^{name}: expected dtype torch.float32 to match q, got torch.float16"
    ):
        rbf_attention(*_replace(qkv, **{name: bad}))


@pytest.mark.parametrize("name", ["k", "v"])
def test_device_mismatch_is_value_error(qkv, name):
    # The meta device stands in for a second device on a machine with only a CPU.
    bad = qkv["qkv".index(name)].to("meta")
    with pytest.raises(ValueError, match=rf"^{name}: expected device cpu to match q, got meta"):
        rbf_attention(*_replace(qkv, **{name: bad}))


@pytest.mark.parametrize("causal", [1, 0, "yes", None, torch.tensor(True)])
def test_causal_not_bool_is_type_error(qkv, causal):
    with pytest.raises(TypeError, match=r"^causal: expected a bool"):
        rbf_attention(*qkv, causal=causal)


def test_causal_with_more_queries_than_keys_is_value_error(make_qkv):
    q, k, v = make_qkv(1, 2, 9, 5, 16)
    with pytest.raises(ValueError, match=r"^causal: .*Nq <= Nk.*Nq=9 \(q\) and Nk=5 \(k\).*first 4 queries"):
        rbf_attention(q, k, v, causal=True)
    rbf_attention(q, k, v, causal=False)  # without the mask every query has keys: fine


@pytest.mark.parametrize("scale", ["0.5", True, torch.tensor(0.5), [0.5]])
def test_scale_not_a_number_is_type_error(qkv, scale):
    with pytest.raises(TypeError, match=r"^scale: expected None or a positive number"):
        rbf_attention(*qkv, scale=scale)


@pytest.mark.parametrize("scale", [0, 0.0, -1.0, math.inf, math.nan, -math.inf])
def test_scale_not_positive_finite_is_value_error(qkv, scale):
    with pytest.raises(ValueError, match=r"^scale: expected a positive finite number"):
        rbf_attention(*qkv, scale=scale)


@pytest.mark.parametrize("backend", ["cuda", "Triton", "", None, 3, "sdpa-bias"])
def test_unknown_backend_is_value_error_listing_backends(qkv, backend):
    listed = ", ".join(repr(name) for name in BACKENDS)
    with pytest.raises(ValueError, match=rf"^backend: expected one of {re.escape(listed)}, got"):
        rbf_attention(*qkv, backend=backend)


def test_first_bad_argument_is_reported(qkv):
    # q is checked before k, so a bad q is named even when k is bad too.
    with pytest.raises(TypeError, match=r"^q: "):
        rbf_attention("not a tensor", "nor this", qkv[2])
