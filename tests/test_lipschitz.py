"""The Jacobian measurements behind chapter 04's Lipschitz section."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from rbf_tutorial import lipschitz


def weights(dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    draw = {"generator": generator, "dtype": torch.float64}
    return tuple(torch.randn(dim, dim, **draw) / math.sqrt(dim) for _ in range(3))


@pytest.mark.parametrize("score", lipschitz.SCORES)
def test_self_attention_matches_a_float64_reference(score):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    w_query, w_key = (torch.randn(5, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    w_value = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    out = lipschitz.self_attention(x, w_query, w_key, w_value, score=score)
    q, k, v = x @ w_query, x @ w_key, x @ w_value
    logits = q @ k.T if score == "dot" else -((q[:, None] - k[None]) ** 2).sum(-1)
    torch.testing.assert_close(out, torch.softmax(logits / math.sqrt(3), dim=-1) @ v, atol=1e-12, rtol=1e-12)


def test_exact_norm_of_a_linear_map_is_its_largest_singular_value():
    matrix = torch.randn(6, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64)
    expected = torch.linalg.svdvals(matrix)[0].item()
    assert lipschitz.jacobian_spectral_norm(lambda y: matrix @ y, x) == pytest.approx(expected, rel=1e-12)
    power = lipschitz.jacobian_spectral_norm(lambda y: matrix @ y, x, method="power", iterations=200,
                                             generator=torch.Generator().manual_seed(3))
    assert power == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("score", lipschitz.SCORES)
def test_power_iteration_agrees_with_the_exact_norm_on_attention(score):
    w_query, w_key, w_value = weights()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    layer = partial(lipschitz.self_attention, w_query=w_query, w_key=w_key, w_value=w_value, score=score)
    exact = lipschitz.jacobian_spectral_norm(layer, 2 * x)
    power = lipschitz.jacobian_spectral_norm(layer, 2 * x, method="power", iterations=80,
                                             generator=torch.Generator().manual_seed(5))
    assert power <= exact * (1 + 1e-9) and power == pytest.approx(exact, rel=1e-3)


def test_split_query_sequence_puts_the_query_halfway_between_two_nearer_keys():
    w_query, w_key, _ = weights()
    generator = torch.Generator().manual_seed(6)
    tokens = lipschitz.split_query_sequence(w_query, w_key, spread=0.25, generator=generator)
    query, keys = tokens[0] @ w_query, tokens @ w_key
    distances = (keys - query).norm(dim=-1)
    assert distances[1] == pytest.approx(distances[2].item(), rel=1e-10)
    assert distances[1] == pytest.approx(0.25 * distances[0].item(), rel=1e-10)


def test_dot_product_grows_on_the_origin_ray_and_tied_rbf_does_not():
    w_query, w_key, w_value = weights()
    x = lipschitz.origin_token_sequence(8, 4, generator=torch.Generator().manual_seed(7))
    dot = partial(lipschitz.self_attention, w_query=w_query, w_key=w_key, w_value=w_value, score="dot")
    tied = partial(lipschitz.self_attention, w_query=w_query, w_key=w_query, w_value=w_value, score="rbf")
    dot_norms = lipschitz.stretch_sweep(dot, x, [16.0, 64.0])
    tied_norms = lipschitz.stretch_sweep(tied, x, [16.0, 64.0])
    assert dot_norms[1] > 8 * dot_norms[0]  # c^2 growth: 16x for 4x the scale
    assert tied_norms[1] < 1.5 * tied_norms[0]


def test_untied_rbf_grows_on_the_split_query_ray_and_tied_rbf_does_not():
    w_query, w_key, w_value = weights()
    generator = torch.Generator().manual_seed(8)
    untied = partial(lipschitz.self_attention, w_query=w_query, w_key=w_key, w_value=w_value, score="rbf")
    tied = partial(lipschitz.self_attention, w_query=w_query, w_key=w_query, w_value=w_value, score="rbf")
    untied_input = lipschitz.split_query_sequence(w_query, w_key, generator=generator)
    tied_input = lipschitz.split_query_sequence(w_query, w_query, generator=generator)
    untied_norms = lipschitz.stretch_sweep(untied, untied_input, [16.0, 64.0])
    tied_norms = lipschitz.stretch_sweep(tied, tied_input, [16.0, 64.0])
    assert untied_norms[1] > 8 * untied_norms[0]
    assert tied_norms[1] < 1.5 * tied_norms[0]


def test_bad_arguments_are_named():
    w_query, w_key, w_value = weights()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="score"):
        lipschitz.self_attention(x, w_query, w_key, w_value, score="cosine")
    with pytest.raises(ValueError, match="w_key"):
        lipschitz.self_attention(x, w_query, w_key[:, :2], w_value, score="dot")
    with pytest.raises(ValueError, match="method"):
        lipschitz.jacobian_spectral_norm(lambda y: y, x, method="svd")
    with pytest.raises(ValueError, match="spread"):
        lipschitz.split_query_sequence(w_query, w_key, spread=1.5)
    with pytest.raises(ValueError, match="n_tokens"):
        lipschitz.origin_token_sequence(1, 4)
