"""The exercise checks of chapters 00-02 accept right answers with one line and reject known mistakes."""

from __future__ import annotations

import pytest
import torch

from rbf_tutorial.checks import ch00, ch01, ch02


def assert_one_pass_line(out: str) -> None:
    """A check that passes prints exactly one line, starting with ✓."""
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("✓ "), out


# ------------------------------------------------------------------------------ chapter 00


def rbf_scores(query, keys, gamma):
    return -gamma * (keys - query).square().sum(dim=-1)


def rbf_scores_expanded(query, keys, gamma):  # another right answer: the expansion
    return -gamma * (query @ query - 2 * keys @ query + keys.square().sum(-1))


def crossover_magnitude(query, close_key, long_direction):
    return float(query @ close_key / (query @ (long_direction / long_direction.norm())))


@pytest.mark.parametrize("solution", [rbf_scores, rbf_scores_expanded])
def test_rbf_scores_accepts_solutions(solution, capsys):
    ch00.check_rbf_scores(solution)
    assert_one_pass_line(capsys.readouterr().out)


@pytest.mark.parametrize(("wrong", "named"), [
    (lambda q, k, g: k @ q, "dot product"),
    (lambda q, k, g: g * (k - q).square().sum(-1), "sign is missing"),
    (lambda q, k, g: -g * (k - q).norm(dim=-1), "not squared"),
    (lambda q, k, g: -(k - q).square().sum(-1), "without gamma"),
    (lambda q, k, g: -g * (k - q).square().sum(-1, keepdim=True), "shape"),
])
def test_rbf_scores_rejects_mistakes(wrong, named):
    with pytest.raises(AssertionError, match=named):
        ch00.check_rbf_scores(wrong)


def test_crossover_magnitude_accepts_the_solution(capsys):
    ch00.check_crossover_magnitude(crossover_magnitude)
    out = capsys.readouterr().out
    assert_one_pass_line(out)
    assert "1.9696" in out


@pytest.mark.parametrize(("wrong", "named"), [
    (lambda q, c, d: float(q @ c / (q @ d)), "without normalising"),
    (lambda q, c, d: float(q @ (d / d.norm()) / (q @ c)), "Solve m"),
    (lambda q, c, d: "1.97", "off"),
])
def test_crossover_magnitude_rejects_mistakes(wrong, named):
    with pytest.raises(AssertionError, match=named):
        ch00.check_crossover_magnitude(wrong)


# ------------------------------------------------------------------------------ chapter 01


def score_matrix_bytes(batch, heads, n_queries, n_keys, bytes_per_element):
    return batch * heads * n_queries * n_keys * bytes_per_element


def naive_rbf_attention(q, k, v, scale):
    return torch.softmax(-scale * torch.cdist(q, k).square(), dim=-1) @ v


def test_score_matrix_bytes_accepts_the_solution(capsys):
    ch01.check_score_matrix_bytes(score_matrix_bytes)
    assert_one_pass_line(capsys.readouterr().out)


@pytest.mark.parametrize(("wrong", "named"), [
    (lambda b, h, nq, nk, e: b * h * nq * nk, "number of elements"),
    (lambda b, h, nq, nk, e: nq * nk * e, "batch and heads"),
    (lambda b, h, nq, nk, e: b * h * nq * nq * e // 1 + 1, "multiply all four"),
    (lambda b, h, nq, nk, e: str(b * h * nq * nk * e), "number of bytes"),
])
def test_score_matrix_bytes_rejects_mistakes(wrong, named):
    with pytest.raises(AssertionError, match=named):
        ch01.check_score_matrix_bytes(wrong)


def test_naive_rbf_attention_accepts_the_solution(capsys):
    ch01.check_naive_rbf_attention(naive_rbf_attention)
    assert_one_pass_line(capsys.readouterr().out)


@pytest.mark.parametrize(("wrong", "named"), [
    (lambda q, k, v, s: torch.softmax(s * torch.cdist(q, k).square(), -1) @ v, "minus sign"),
    (lambda q, k, v, s: torch.softmax(-s * torch.cdist(q, k), -1) @ v, "not its square"),
    (lambda q, k, v, s: torch.softmax(-torch.cdist(q, k).square(), -1) @ v, "scale is ignored"),
    (lambda q, k, v, s: torch.softmax(-s * torch.cdist(q, k).square(), -2) @ v, "query axis"),
    (lambda q, k, v, s: torch.softmax(-s * torch.cdist(q, k).square(), -1), "shape"),
])
def test_naive_rbf_attention_rejects_mistakes(wrong, named):
    with pytest.raises(AssertionError, match=named):
        ch01.check_naive_rbf_attention(wrong)


# ------------------------------------------------------------------------------ chapter 02


def key_norm_logits(q, k, scale):
    return scale * (2 * q @ k.transpose(-2, -1) - k.square().sum(-1)[..., None, :])


def padded_query_key(q, k):
    q_padded = torch.cat([2 * q, q.new_full((*q.shape[:-1], 1), -1.0)], dim=-1)
    k_padded = torch.cat([k, k.square().sum(-1, keepdim=True)], dim=-1)
    return q_padded, k_padded


def padded_query_key_other_constant(q, k):  # another right answer: c = 3 in every query
    q_padded = torch.cat([2 * q, q.new_full((*q.shape[:-1], 1), 3.0)], dim=-1)
    k_padded = torch.cat([k, -k.square().sum(-1, keepdim=True) / 3], dim=-1)
    return q_padded, k_padded


def test_key_norm_logits_accepts_the_solution(capsys):
    ch02.check_key_norm_logits(key_norm_logits)
    assert_one_pass_line(capsys.readouterr().out)


@pytest.mark.parametrize(("wrong", "named"), [
    (lambda q, k, s: -s * ((q[..., :, None, :] - k[..., None, :, :]) ** 2).sum(-1), "full distance logits"),
    (lambda q, k, s: s * 2 * q @ k.transpose(-2, -1), "penalty -|k|² is missing"),
    (lambda q, k, s: s * (q @ k.transpose(-2, -1) - k.square().sum(-1)[..., None, :]), "factor 2"),
    (lambda q, k, s: s * (2 * q @ k.transpose(-2, -1) - q.square().sum(-1)[..., :, None]), "Expected"),
])
def test_key_norm_logits_rejects_mistakes(wrong, named):
    with pytest.raises(AssertionError, match=named):
        ch02.check_key_norm_logits(wrong)


@pytest.mark.parametrize("solution", [padded_query_key, padded_query_key_other_constant])
def test_padded_query_key_accepts_solutions(solution, capsys):
    ch02.check_padded_query_key(solution)
    assert_one_pass_line(capsys.readouterr().out)


def padded_without_the_factor_two(q, k):
    q_padded = torch.cat([q, q.new_full((*q.shape[:-1], 1), -1.0)], dim=-1)
    return q_padded, torch.cat([k, k.square().sum(-1, keepdim=True)], dim=-1)


def padded_with_a_constant_from_k(q, k):
    """Right product, but the queries' extra column depends on k: a fused kernel could not build it."""
    constant = 1 + k.abs().mean()
    q_padded = torch.cat([2 * q, constant * q.new_ones((*q.shape[:-1], 1))], dim=-1)
    return q_padded, torch.cat([k, -k.square().sum(-1, keepdim=True) / constant], dim=-1)


@pytest.mark.parametrize(("wrong", "named"), [
    (padded_without_the_factor_two, "not 2 q"),
    (lambda q, k: (2 * q, k), "wider than D"),
    (lambda q, k: 2 * q, "pair"),
    (padded_with_a_constant_from_k, "build it from q alone"),
])
def test_padded_query_key_rejects_mistakes(wrong, named):
    with pytest.raises(AssertionError, match=named):
        ch02.check_padded_query_key(wrong)
