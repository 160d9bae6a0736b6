"""The chapter 03 checks pass the right answers and fail stubs and the usual wrong ones.

And the chapter keeps its exercise contract: with every solution replaced by the stub a learner
starts from, only the graded check cells fail.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import jupytext
import pytest
import torch

from rbf_tutorial.checks import ch03

CHAPTER = Path(__file__).resolve().parent.parent / "chapters" / "03_triton_kernel.py"
EXERCISES = {
    "ch03-ex1": "online_softmax_step",
    "ch03-ex2": "rbf_logits_tile",
    "ch03-ex3": "last_key_tile",
    "ch03-ex4": "dk_key_norm_term",
}
SOLUTION_REGION = re.compile(r"^( *)### BEGIN SOLUTION\n.*?^ *### END SOLUTION\n", re.S | re.M)

# ---------------------------------------------------------------- online softmax step


def online_softmax_step(row_max, row_sum, acc, scores_tile, v_tile):
    new_max = torch.maximum(row_max, scores_tile.max(dim=1).values)
    alpha = torch.exp2(row_max - new_max)
    weights = torch.exp2(scores_tile - new_max[:, None])
    return new_max, row_sum * alpha + weights.sum(dim=1), acc * alpha[:, None] + weights @ v_tile


def online_softmax_step_without_rescale(row_max, row_sum, acc, scores_tile, v_tile):
    new_max = torch.maximum(row_max, scores_tile.max(dim=1).values)
    weights = torch.exp2(scores_tile - new_max[:, None])
    return new_max, row_sum + weights.sum(dim=1), acc + weights @ v_tile


def online_softmax_step_natural_exp(row_max, row_sum, acc, scores_tile, v_tile):
    new_max = torch.maximum(row_max, scores_tile.max(dim=1).values)
    alpha = torch.exp(row_max - new_max)
    weights = torch.exp(scores_tile - new_max[:, None])
    return new_max, row_sum * alpha + weights.sum(dim=1), acc * alpha[:, None] + weights @ v_tile


def online_softmax_step_rescale_inverted(row_max, row_sum, acc, scores_tile, v_tile):
    new_max = torch.maximum(row_max, scores_tile.max(dim=1).values)
    alpha = torch.exp2(new_max - row_max).nan_to_num(0.0, posinf=0.0)
    weights = torch.exp2(scores_tile - new_max[:, None])
    return new_max, row_sum * alpha + weights.sum(dim=1), acc * alpha[:, None] + weights @ v_tile


def online_softmax_step_no_max(row_max, row_sum, acc, scores_tile, v_tile):
    # Mathematically right, but exp2 of large scores overflows float32.
    weights = torch.exp2(scores_tile)
    new_max = torch.maximum(row_max, scores_tile.max(dim=1).values)
    return new_max, row_sum + weights.sum(dim=1), acc + weights @ v_tile


# ---------------------------------------------------------------- key-norm logits


def rbf_logits_tile(q_tile, k_tile, scale):
    q_tile, k_tile = q_tile.float(), k_tile.float()
    key_norms = k_tile.square().sum(dim=1)
    return scale * (2 * q_tile @ k_tile.T - key_norms[None, :])


def rbf_logits_tile_no_two(q_tile, k_tile, scale):
    q_tile, k_tile = q_tile.float(), k_tile.float()
    return scale * (q_tile @ k_tile.T - k_tile.square().sum(dim=1)[None, :])


def rbf_logits_tile_norm_over_keys(q_tile, k_tile, scale):
    q_tile, k_tile = q_tile.float(), k_tile.float()
    return scale * (2 * q_tile @ k_tile.T - k_tile.square().sum(dim=0)[: k_tile.shape[0]][None, :])


def rbf_logits_tile_in_input_dtype(q_tile, k_tile, scale):
    return scale * (2 * q_tile @ k_tile.T - k_tile.square().sum(dim=1)[None, :])


def rbf_logits_tile_dot_only(q_tile, k_tile, scale):
    return scale * (q_tile.float() @ k_tile.float().T)


def rbf_logits_tile_full_distance(q_tile, k_tile, scale):
    # Same softmax, but not the logits the kernel computes (it never forms |q|^2).
    return -scale * torch.cdist(q_tile.float(), k_tile.float()) ** 2


# ---------------------------------------------------------------- causal tile bound


def last_key_tile(query_tile_start, block_m, block_n, nq, nk):
    last_query = min(query_tile_start + block_m, nq) - 1
    last_key = min(last_query + nk - nq, nk - 1)
    return max(last_key, -1) // block_n


def last_key_tile_top_left(query_tile_start, block_m, block_n, nq, nk):
    last_query = min(query_tile_start + block_m, nq) - 1
    return min(last_query, nk - 1) // block_n


def last_key_tile_unclipped(query_tile_start, block_m, block_n, nq, nk):
    # Forgets that the last query tile may stick out past nq: visits a tile past the last key.
    last_key = query_tile_start + block_m - 1 + nk - nq
    return max(last_key, -1) // block_n


def last_key_tile_never_empty(query_tile_start, block_m, block_n, nq, nk):
    last_query = min(query_tile_start + block_m, nq) - 1
    return max(last_query + nk - nq, 0) // block_n


def last_key_tile_truncating_division(query_tile_start, block_m, block_n, nq, nk):
    last_query = min(query_tile_start + block_m, nq) - 1
    last_key = min(last_query + nk - nq, nk - 1)
    return int(max(last_key, -1) / block_n)  # truncates toward zero, as C and Triton do


def last_key_tile_float(query_tile_start, block_m, block_n, nq, nk):
    return float(last_key_tile(query_tile_start, block_m, block_n, nq, nk))


# ---------------------------------------------------------------- dk key-norm term


def dk_key_norm_term(ds, k, scale):
    return -2 * scale * ds.sum(dim=0)[:, None] * k


def dk_key_norm_term_wrong_axis(ds, k, scale):
    return -2 * scale * ds.sum(dim=1)[: k.shape[0], None] * k


def dk_key_norm_term_no_two(ds, k, scale):
    return -scale * ds.sum(dim=0)[:, None] * k


def dk_key_norm_term_wrong_sign(ds, k, scale):
    return 2 * scale * ds.sum(dim=0)[:, None] * k


def stub(*args):
    raise NotImplementedError()


# ---------------------------------------------------------------- tests


def test_online_softmax_step_accepts_solution(capsys):
    ch03.check_online_softmax_step(online_softmax_step)
    out = capsys.readouterr().out
    assert "allclose: True" in out and "max difference" in out


@pytest.mark.parametrize(
    "wrong",
    [online_softmax_step_without_rescale, online_softmax_step_natural_exp,
     online_softmax_step_rescale_inverted, online_softmax_step_no_max],
)
def test_online_softmax_step_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError):
        ch03.check_online_softmax_step(wrong)


def test_online_softmax_step_rejects_wrong_return_shape():
    with pytest.raises(AssertionError, match="tuple"):
        ch03.check_online_softmax_step(lambda m, s, acc, scores, v: acc)


def test_rbf_logits_tile_accepts_solution(capsys):
    ch03.check_rbf_logits_tile(rbf_logits_tile)
    assert "allclose: True" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong",
    [rbf_logits_tile_no_two, rbf_logits_tile_norm_over_keys, rbf_logits_tile_in_input_dtype,
     rbf_logits_tile_dot_only, rbf_logits_tile_full_distance],
)
def test_rbf_logits_tile_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError):
        ch03.check_rbf_logits_tile(wrong)


def test_last_key_tile_accepts_solution(capsys):
    ch03.check_last_key_tile(last_key_tile)
    assert "exact: True" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong",
    [last_key_tile_top_left, last_key_tile_unclipped, last_key_tile_never_empty,
     last_key_tile_truncating_division, last_key_tile_float],
)
def test_last_key_tile_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError):
        ch03.check_last_key_tile(wrong)


def test_last_key_tile_cases_cover_the_edges():
    cases = ch03._last_key_tile_cases()
    answers = [ch03._last_key_tile_by_brute_force(*case) for case in cases]
    assert -1 in answers, "some query tile must see no key at all (nq > nk)"
    assert any(nq != nk for _, _, _, nq, nk in cases)
    assert any(nq % 16 for _, _, _, nq, _ in cases), "odd lengths"
    assert any(bm != bn for _, bm, bn, _, _ in cases), "unequal blocks"


def test_dk_key_norm_term_accepts_solution(capsys):
    ch03.check_dk_key_norm_term(dk_key_norm_term)
    assert "allclose: True" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong", [dk_key_norm_term_wrong_axis, dk_key_norm_term_no_two, dk_key_norm_term_wrong_sign]
)
def test_dk_key_norm_term_rejects_wrong_answers(wrong):
    with pytest.raises(AssertionError):
        ch03.check_dk_key_norm_term(wrong)


@pytest.mark.parametrize(
    "check",
    [ch03.check_online_softmax_step, ch03.check_rbf_logits_tile, ch03.check_last_key_tile,
     ch03.check_dk_key_norm_term],
)
def test_checks_fail_on_the_student_stub(check):
    with pytest.raises(NotImplementedError):
        check(stub)


def test_rbf_logits_solution_is_rbf_softmax():
    # The chapter's claim, independently: softmax of these logits is the RBF weighting.
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 8, generator=gen), torch.randn(5, 8, generator=gen)
    scale = 1 / math.sqrt(8)
    expected = torch.softmax(-scale * torch.cdist(q, k) ** 2, dim=1)
    torch.testing.assert_close(torch.softmax(rbf_logits_tile(q, k, scale), dim=1), expected)


def student_version(text: str) -> str:
    """The chapter as a learner receives it: each solution region replaced by the stub."""
    stub_line = lambda match: f"{match.group(1)}raise NotImplementedError()\n"
    stubbed, count = SOLUTION_REGION.subn(stub_line, text)
    assert count == len(EXERCISES), f"expected {len(EXERCISES)} solution regions, found {count}"
    return stubbed


@pytest.mark.slow
def test_student_version_fails_only_at_the_graded_checks():
    nbclient = pytest.importorskip("nbclient")
    notebook = jupytext.reads(student_version(CHAPTER.read_text(encoding="utf-8")), fmt="py:percent")
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", allow_errors=True).execute()
    failing = [
        cell.metadata.get("nbgrader", {}).get("grade_id", f"cell {index}")
        for index, cell in enumerate(notebook.cells)
        if any(output.get("output_type") == "error" for output in cell.get("outputs", []))
    ]
    assert failing == [f"{exercise}-check" for exercise in EXERCISES]
