"""Positions: RoPE rotates (norms kept, dot products depend on offset only); SuSiE adds sinusoids
whose distances depend on offset only; the scales and the learned embedding train."""

from __future__ import annotations

import math

import pytest
import torch

from rbf_tutorial.positional import (
    LearnedPositions,
    SuSiE,
    rope,
    rope_frequencies,
    susie_distance_squared,
    susie_table,
)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_positions(n: int, seed: int) -> torch.Tensor:
    """Distinct-ish float positions spread over a few hundred steps, in float64."""
    return torch.rand(n, generator=generator(seed), dtype=torch.float64) * 300 - 50


def pairwise_squared_distances(x: torch.Tensor) -> torch.Tensor:
    differences = x[..., :, None, :] - x[..., None, :, :]
    return differences.square().sum(-1)


# ---------------------------------------------------------------- RoPE


def test_rope_frequencies():
    frequencies = rope_frequencies(8, base=100.0)
    expected = torch.tensor([100.0 ** (-2 * f / 8) for f in range(4)], dtype=torch.float64)
    torch.testing.assert_close(frequencies, expected, rtol=1e-15, atol=0)
    assert rope_frequencies(8, dtype=torch.float32).dtype == torch.float32


def test_rope_matches_complex_multiplication():
    # An independent statement of RoPE: pair (a, b) is the complex number a + ib, multiplied by
    # exp(i * position * w_f).
    x = torch.randn(2, 3, 5, 8, generator=generator(0), dtype=torch.float64)
    positions = random_positions(5, seed=1)
    as_complex = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    turns = torch.polar(torch.ones(5, 4, dtype=torch.float64), positions[:, None] * rope_frequencies(8))
    expected = torch.view_as_real(as_complex * turns).flatten(-2)
    torch.testing.assert_close(rope(x, positions), expected, rtol=1e-13, atol=1e-13)


def test_rope_preserves_norms():
    x = torch.randn(2, 4, 9, 16, generator=generator(2), dtype=torch.float64)
    rotated = rope(x, random_positions(9, seed=3))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=0)
    # Pairwise: each pair of coordinates keeps its own length.
    torch.testing.assert_close(
        rotated.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1), rtol=1e-13, atol=0
    )


def test_rope_dot_products_depend_only_on_offset():
    q = torch.randn(2, 7, 16, generator=generator(4), dtype=torch.float64)
    k = torch.randn(2, 7, 16, generator=generator(5), dtype=torch.float64)
    query_positions, key_positions = random_positions(7, seed=6), random_positions(7, seed=7)
    scores = rope(q, query_positions) @ rope(k, key_positions).transpose(-1, -2)
    for shift in (1.0, -37.0, 1234.5):
        shifted = rope(q, query_positions + shift) @ rope(k, key_positions + shift).transpose(-1, -2)
        torch.testing.assert_close(shifted, scores, rtol=1e-9, atol=1e-9)
    # ...and they do depend on the offset: moving only the keys changes them.
    moved = rope(q, query_positions) @ rope(k, key_positions + 3.0).transpose(-1, -2)
    assert (moved - scores).abs().max() > 1e-2


def test_rope_position_zero_is_the_identity_and_dtypes_are_kept():
    x = torch.randn(3, 6, generator=generator(8))
    assert torch.equal(rope(x, torch.zeros(3, dtype=torch.long)), x)
    positions = torch.arange(3)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert rope(x.to(dtype), positions).dtype == dtype
    # Integer and float positions agree.
    torch.testing.assert_close(rope(x, positions), rope(x, positions.float()))


def test_rope_passes_gradcheck():
    x = torch.randn(1, 2, 4, 6, generator=generator(9), dtype=torch.float64, requires_grad=True)
    positions = random_positions(4, seed=10)
    assert torch.autograd.gradcheck(lambda x: rope(x, positions), (x,))


# ---------------------------------------------------------------- SuSiE table and distances


def test_susie_table_layout():
    positions = random_positions(5, seed=11)
    table = susie_table(5, 8, positions=positions, dtype=torch.float64)
    assert table.shape == (5, 8)
    angles = positions[:, None] * rope_frequencies(8)
    torch.testing.assert_close(table[:, 0::2], angles.sin(), rtol=0, atol=1e-15)
    torch.testing.assert_close(table[:, 1::2], angles.cos(), rtol=0, atol=1e-15)
    # Unit weights: every pair lies on the unit circle.
    torch.testing.assert_close(table.square().sum(-1), torch.full((5,), 4.0, dtype=torch.float64))
    assert susie_table(3, 4).dtype == torch.get_default_dtype()
    explicit = susie_table(6, 4, positions=torch.arange(6), dtype=torch.float64)
    torch.testing.assert_close(susie_table(6, 4, dtype=torch.float64), explicit)


def test_susie_distances_depend_only_on_offset():
    table = susie_table(40, 16, dtype=torch.float64)
    distances = pairwise_squared_distances(table)
    # Along every diagonal (fixed offset i - j) the distance is the same.
    for offset in range(-39, 40):
        diagonal = torch.diagonal(distances, offset=offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), rtol=1e-10, atol=1e-10)


def test_susie_distances_equal_the_closed_form():
    positions = random_positions(12, seed=12)
    table = susie_table(12, 16, base=500.0, positions=positions, dtype=torch.float64)
    offsets = positions[:, None] - positions[None, :]
    expected = susie_distance_squared(offsets, 16, base=500.0)
    torch.testing.assert_close(pairwise_squared_distances(table), expected, rtol=1e-10, atol=1e-10)
    assert expected.dtype == torch.float64
    # Unit weights by default; explicit weights scale each frequency's term by w_f^2.
    weights = torch.rand(8, generator=generator(13), dtype=torch.float64) + 0.1
    weighted_table = table * weights.repeat_interleave(2)
    torch.testing.assert_close(
        pairwise_squared_distances(weighted_table),
        susie_distance_squared(offsets, 16, weights, base=500.0),
        rtol=1e-10,
        atol=1e-10,
    )
    # A number works as an offset too; offset 0 is distance 0.
    assert susie_distance_squared(0, 16).item() == 0.0
    by_hand = sum(4 * math.sin(2.5 * 10000.0 ** (-2 * f / 4) / 2) ** 2 for f in range(2))
    assert math.isclose(susie_distance_squared(2.5, 4).item(), by_hand, rel_tol=1e-14)


# ---------------------------------------------------------------- the SuSiE module


def test_susie_scales_are_parameters_at_one_half():
    module = SuSiE(num_heads=3, head_dim=10)
    assert isinstance(module.scales, torch.nn.Parameter)
    assert module.scales.shape == (3, 5)
    assert torch.equal(module.scales, torch.full((3, 5), 0.5))
    assert [name for name, _ in module.named_parameters()] == ["scales"]


def test_susie_adds_the_scaled_table_to_queries_and_keys():
    module = SuSiE(2, 8).double()
    with torch.no_grad():
        module.scales.uniform_(0.1, 1.0, generator=generator(14))
    q = torch.randn(2, 2, 6, 8, generator=generator(15), dtype=torch.float64)
    k = torch.randn(2, 2, 6, 8, generator=generator(16), dtype=torch.float64)
    new_q, new_k = module(q, k)
    unit = susie_table(6, 8, dtype=torch.float64)
    # One scale per frequency, shared by its sin and cos coordinates.
    expected = module.scales.detach().repeat_interleave(2, dim=-1)[:, None, :] * unit
    torch.testing.assert_close(new_q - q, expected.expand_as(q))
    torch.testing.assert_close(new_k - k, expected.expand_as(k))
    assert new_q.dtype == new_k.dtype == torch.float64


def test_susie_module_distances_follow_its_scales():
    module = SuSiE(3, 12, base=1000.0).double()
    with torch.no_grad():
        module.scales.uniform_(0.1, 2.0, generator=generator(17))
    positions = random_positions(9, seed=18)
    tables = module.table(positions)
    assert tables.shape == (3, 9, 12)
    offsets = positions[:, None] - positions[None, :]
    expected = module.distance_squared(offsets)
    assert expected.shape == (3, 9, 9)
    torch.testing.assert_close(pairwise_squared_distances(tables), expected.detach(), rtol=1e-10, atol=1e-10)


def test_susie_queries_align_with_the_end_of_the_keys():
    module = SuSiE(1, 4).double()
    q = torch.randn(1, 1, 3, 4, generator=generator(19), dtype=torch.float64)
    k = torch.randn(1, 1, 7, 4, generator=generator(20), dtype=torch.float64)
    new_q, new_k = module(q, k)
    unit = 0.5 * susie_table(7, 4, dtype=torch.float64)
    torch.testing.assert_close(new_k - k, unit.expand_as(k))
    torch.testing.assert_close(new_q - q, unit[4:].expand_as(q))  # positions 4, 5, 6
    # Explicit positions: keys at those positions, queries at the last three of them.
    positions = random_positions(7, seed=21)
    new_q, _ = module(q, k, positions)
    expected = 0.5 * susie_table(3, 4, positions=positions[4:], dtype=torch.float64)
    torch.testing.assert_close(new_q - q, expected.expand_as(q))
    # And explicit query positions, needed when there are more queries than keys.
    many_queries = torch.randn(1, 1, 9, 4, generator=generator(22), dtype=torch.float64)
    query_positions = torch.arange(9) - 2
    new_q, _ = module(many_queries, k, query_positions=query_positions)
    expected = 0.5 * susie_table(9, 4, positions=query_positions, dtype=torch.float64)
    torch.testing.assert_close(new_q - many_queries, expected.expand_as(many_queries))


def test_susie_scales_receive_gradients():
    module = SuSiE(2, 8)
    q = torch.randn(2, 2, 5, 8, generator=generator(23))
    k = torch.randn(2, 2, 5, 8, generator=generator(24))
    new_q, new_k = module(q, k)
    # A distance-shaped loss, as RBF attention would produce.
    (new_q[..., :, None, :] - new_k[..., None, :, :]).square().sum(-1).exp().neg().sum().backward()
    assert module.scales.grad is not None
    assert torch.isfinite(module.scales.grad).all()
    assert module.scales.grad.abs().gt(0).all(), "some (head, frequency) scale got no gradient"


def test_susie_passes_gradcheck():
    module = SuSiE(2, 4).double()
    q = torch.randn(1, 2, 3, 4, generator=generator(25), dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, generator=generator(26), dtype=torch.float64, requires_grad=True)
    positions = random_positions(5, seed=27)

    def add_positions(scales, q, k):
        # gradcheck perturbs its inputs, so the scales come in as an argument in place of the parameter.
        return torch.func.functional_call(module, {"scales": scales}, (q, k, positions))

    scales = module.scales.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(add_positions, (scales, q, k))


# ---------------------------------------------------------------- learned positions


def test_learned_positions_add_a_trainable_row_per_position():
    torch.manual_seed(0)
    module = LearnedPositions(max_len=10, d_model=6)
    assert module.weight.shape == (10, 6)
    x = torch.randn(2, 4, 6, generator=generator(26))
    out = module(x)
    torch.testing.assert_close(out - x, module.weight[:4].detach().expand_as(x))
    out.sum().backward()
    assert torch.equal(module.weight.grad[:4], torch.full((4, 6), 2.0))
    assert torch.count_nonzero(module.weight.grad[4:]) == 0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "error", "name"),
    [
        (lambda: rope(torch.randn(4, 5), torch.arange(4)), ValueError, "x"),
        (lambda: rope(torch.randn(4, 6), torch.arange(5)), ValueError, "positions"),
        (lambda: rope(torch.randn(4, 6), torch.arange(4)[None]), ValueError, "positions"),
        (lambda: rope(torch.randn(4, 6), [0, 1, 2, 3]), TypeError, "positions"),
        (lambda: rope(torch.randn(4, 6), torch.ones(4, dtype=torch.bool)), TypeError, "positions"),
        (lambda: rope(torch.arange(24).view(4, 6), torch.arange(4)), TypeError, "x"),
        (lambda: rope(torch.randn(6), torch.arange(1)), ValueError, "x"),
        (lambda: rope(torch.randn(4, 6), torch.arange(4), base=-1.0), ValueError, "base"),
        (lambda: rope_frequencies(7), ValueError, "d"),
        (lambda: susie_table(5, 7), ValueError, "d"),
        (lambda: susie_table(0, 8), ValueError, "n"),
        (lambda: susie_table(5, 8, positions=torch.arange(4)), ValueError, "positions"),
        (lambda: susie_distance_squared(1.0, 9), ValueError, "d"),
        (lambda: susie_distance_squared(1.0, 8, torch.ones(3)), ValueError, "weights"),
        (lambda: susie_distance_squared("1", 8), TypeError, "offset"),
        (lambda: SuSiE(2, 7), ValueError, "head_dim"),
        (lambda: SuSiE(0, 8), ValueError, "num_heads"),
        (lambda: SuSiE(2, 8)(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 6)), ValueError, "k"),
        (lambda: SuSiE(2, 8)(torch.randn(1, 3, 3, 8), torch.randn(1, 2, 3, 8)), ValueError, "q"),
        (
            lambda: SuSiE(2, 8)(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.arange(4)),
            ValueError,
            "positions",
        ),
        (
            lambda: SuSiE(2, 8)(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 3, 8)),
            ValueError,
            "query_positions",
        ),
        (
            lambda: SuSiE(2, 8)(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), None, torch.arange(2)),
            ValueError,
            "query_positions",
        ),
        (lambda: LearnedPositions(4, 6)(torch.randn(1, 5, 6)), ValueError, "x"),
        (lambda: LearnedPositions(4, 6)(torch.randn(1, 3, 5)), ValueError, "x"),
        (lambda: LearnedPositions(0, 6), ValueError, "max_len"),
    ],
)
def test_bad_input_is_named(call, error, name):
    with pytest.raises(error, match=f"^{name}: "):
        call()


def test_rope_equivalent_scales_match_ropes_mean_penalty_at_every_offset():
    from rbf_tutorial.positional import rope_equivalent_scales

    generator = torch.Generator().manual_seed(21)
    # Contents with unequal energy per pair, as a trained model's keys have.
    contents = torch.randn(50, 16, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3.0, 16)
    scales = rope_equivalent_scales(contents)
    assert scales.shape == (8,)
    offsets = torch.tensor([1.0, 3.0, 17.0, 250.0])
    for offset in offsets:
        moved = rope(contents, torch.full((50,), 7.0) + offset)
        rope_penalty = (moved - rope(contents, torch.full((50,), 7.0))).square().sum(-1).mean()
        expected = susie_distance_squared(offset, 16, scales)
        torch.testing.assert_close(rope_penalty, expected, rtol=1e-10, atol=1e-10)
    # Rotating the contents first changes nothing: each pair keeps its energy.
    torch.testing.assert_close(rope_equivalent_scales(rope(contents, torch.arange(50))), scales)


def test_rope_equivalent_scales_rejects_odd_or_integer_contents():
    from rbf_tutorial.positional import rope_equivalent_scales

    with pytest.raises(ValueError, match="contents"):
        rope_equivalent_scales(torch.randn(3, 5))
    with pytest.raises(TypeError, match="contents"):
        rope_equivalent_scales(torch.ones(3, 4, dtype=torch.int64))
