"""The selectivity measurement of chapter 04: softmax over a planted key and a growing pool of random keys."""

from __future__ import annotations

import math

import pytest
import torch

from rbf_tutorial import selectivity


def problem(n_queries=5, pool_size=300, dim=12, seed=0):
    return selectivity.planted_keys(n_queries, pool_size, dim, generator=torch.Generator().manual_seed(seed))


def test_planted_keys_are_near_copies_of_their_queries():
    keys = problem()
    assert keys.queries.shape == keys.planted.shape == (5, 12) and keys.pool.shape == (300, 12)
    offsets = (keys.planted - keys.queries).norm(dim=-1)
    assert (offsets > 0).all() and (offsets < 0.2 * keys.queries.norm(dim=-1)).all()


@pytest.mark.parametrize("score", selectivity.SCORES)
def test_score_logits_match_their_definitions_in_float64(score):
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(7, 13, generator=generator, dtype=torch.float64)
    keys = 3 * torch.randn(11, 13, generator=generator, dtype=torch.float64)
    logits = selectivity.score_logits(queries, keys, score, 0.37)
    if score == "dot":
        expected = 0.37 * torch.einsum("td,md->tm", queries, keys)
    else:
        expected = -0.37 * ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    torch.testing.assert_close(logits, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("score", selectivity.SCORES)
def test_planted_weight_can_only_fall_as_keys_are_added(score):
    curve = selectivity.selectivity_curve(problem(), [1, 2, 5, 17, 64, 301], score=score, scale=0.3)
    assert curve.planted_weight[0] == pytest.approx(1.0) and curve.normalized_entropy[0] == 0.0
    weights = curve.planted_weight
    assert all(later < earlier for earlier, later in zip(weights, weights[1:], strict=False))
    for weight, largest, entropy, on_top in zip(curve.planted_weight, curve.max_weight,
                                                curve.normalized_entropy, curve.planted_on_top, strict=True):
        assert 0 < weight <= largest <= 1 and -1e-12 <= entropy <= 1 + 1e-12 and 0 <= on_top <= 1


@pytest.mark.parametrize("score", selectivity.SCORES)
def test_a_tiny_scale_gives_uniform_weights(score):
    curve = selectivity.selectivity_curve(problem(), [10, 100], score=score, scale=1e-9)
    assert curve.planted_weight == pytest.approx([0.1, 0.01], rel=1e-6)
    assert curve.normalized_entropy == pytest.approx([1.0, 1.0], abs=1e-6)


def test_curve_matches_a_direct_softmax():
    keys = problem(n_queries=3, pool_size=40, dim=8, seed=3)
    curve = selectivity.selectivity_curve(keys, [41], score="rbf", scale=0.5)
    all_keys = torch.cat([keys.planted[:, None, :], keys.pool.expand(3, 40, 8)], dim=1)  # (T, N, D)
    weights = torch.softmax(-0.5 * ((keys.queries[:, None, :] - all_keys) ** 2).sum(-1), dim=-1)
    entropy = -(weights * weights.log()).sum(-1) / math.log(41)
    assert curve.planted_weight[0] == pytest.approx(weights[:, 0].mean().item(), rel=1e-10)
    assert curve.max_weight[0] == pytest.approx(weights.max(-1).values.mean().item(), rel=1e-10)
    assert curve.normalized_entropy[0] == pytest.approx(entropy.mean().item(), rel=1e-9)


def test_bad_arguments_are_named():
    keys = problem()
    with pytest.raises(ValueError, match="score"):
        selectivity.selectivity_curve(keys, [2, 4], score="cosine", scale=1.0)
    with pytest.raises(ValueError, match="n_keys"):
        selectivity.selectivity_curve(keys, [4, 2], score="dot", scale=1.0)
    with pytest.raises(ValueError, match="n_keys"):
        selectivity.selectivity_curve(keys, [2, 302], score="dot", scale=1.0)
    with pytest.raises(ValueError, match="scale"):
        selectivity.selectivity_curve(keys, [2], score="dot", scale=0.0)
    with pytest.raises(TypeError, match="n_queries"):
        selectivity.planted_keys(2.5, 10, 4)
    with pytest.raises(TypeError, match="keys"):
        selectivity.score_logits(keys.queries, [[1.0]], "dot", 1.0)
