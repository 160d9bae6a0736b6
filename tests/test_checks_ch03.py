"""The chapter 03 checks pass the right Triton code and reject stubs and the usual wrong code by name.

The right code is the finished teaching kernels of rbf_tutorial.teaching (the chapters' copies are
held equal to them by tests/test_teaching.py); the wrong code lives in tests/ch03_wrong_solutions.py.
Every check launches Triton kernels (the interpreter here), so these tests call the checks
directly and never execute a chapter.
"""

from __future__ import annotations

import inspect

import ch03_wrong_solutions as wrong
import pytest

from rbf_tutorial import teaching
from rbf_tutorial.checks import ch03


def assert_one_pass_line(capsys, starts: str) -> None:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"✓ {starts}"), lines


# ---------------------------------------------------------------- 03a exercise 1: rbf_scores


def test_rbf_scores_accepts_the_solution(capsys):
    ch03.check_rbf_scores(teaching.rbf_scores)
    assert_one_pass_line(capsys, "rbf_scores matches float64")


@pytest.mark.parametrize(("piece", "named"), [
    (wrong.scores_norm_added, "weights favour long keys"),
    (wrong.scores_without_two, "lost its factor 2"),
    (wrong.scores_without_norms, "key norms are missing"),
    (wrong.scores_without_scale, "qk_scale is missing"),
    (wrong.scores_full_distance, "never forms"),
    (wrong.scores_norms_over_wrong_axis, "sum over axis 0"),
    (wrong.scores_always_float32, r"\.to\(ACC_DTYPE\)"),
])
def test_rbf_scores_names_the_mistake(piece, named):
    with pytest.raises(AssertionError, match=named):
        ch03.check_rbf_scores(piece)


def test_rbf_scores_stub_is_not_written_yet():
    not_yet = r"exercise 1 \(the key norms in `rbf_scores`\) is not written yet"
    with pytest.raises(NotImplementedError, match=not_yet):
        ch03.check_rbf_scores(wrong.scores_stub)


# ---------------------------------------------------------------- 03a exercise 2: online_softmax_update


def test_online_softmax_update_accepts_the_solution(capsys):
    ch03.check_online_softmax_update(teaching.online_softmax_update)
    assert_one_pass_line(capsys, "online_softmax_update matches float64")


@pytest.mark.parametrize(("piece", "named"), [
    (wrong.update_without_rescale, "rescale both row_sum and acc"),
    (wrong.update_acc_not_rescaled, "grows with the number of key tiles.*did you rescale acc by alpha"),
    (wrong.update_sum_not_rescaled, "did you rescale row_sum by alpha"),
    (wrong.update_alpha_inverted, "old minus new"),
    (wrong.update_without_guard, "see no key at all"),
    (wrong.update_keeps_old_max, "running maximum"),
    (wrong.update_without_max, "measured against 0"),
])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN arithmetic in the wrong code, under numpy
def test_online_softmax_update_names_the_mistake(piece, named):
    with pytest.raises(AssertionError, match=named):
        ch03.check_online_softmax_update(piece)


def test_online_softmax_update_stub_is_not_written_yet():
    with pytest.raises(NotImplementedError, match=r"exercise 2 .* is not written yet"):
        ch03.check_online_softmax_update(wrong.update_stub)


def test_rising_keys_raise_the_running_maximum():
    # The probe is only a test of the rescale if the maxima do rise from tile to tile.
    q, k, v = ch03._rising_keys(20, 6, seed=41)
    scores = ch03._scores_reference(q, k, 0.25)
    row_max = ch03._prefix_state(scores, v.double().cpu(), ch03.BLOCK_M)[0]
    rises = (row_max[1:] > row_max[:-1]).float().mean().item()
    assert rises > 0.5, f"only {rises:.0%} of tile steps raise a row's maximum"


# ---------------------------------------------------------------- 03a exercise 3: key_range


def test_key_range_accepts_the_solution(capsys):
    ch03.check_key_range(teaching.key_range)
    assert_one_pass_line(capsys, "key_range visits exactly the tiles")


@pytest.mark.parametrize(("piece", "named"), [
    (wrong.key_range_hi_from_first_query, "is hi computed from the tile's last real query"),
    (wrong.key_range_top_left, "bottom-right"),
    (wrong.key_range_unclamped_below, "truncates toward zero"),
    (wrong.key_range_band_from_last_query, r"take them from its \*first\* query"),
    (wrong.key_range_unclipped_above, "which no query of the tile sees"),
    (wrong.key_range_masks_everything, "correct, but it masks"),
])
def test_key_range_names_the_mistake(piece, named):
    with pytest.raises(AssertionError, match=named):
        ch03.check_key_range(piece)


def test_key_range_stub_is_not_written_yet():
    with pytest.raises(NotImplementedError, match=r"exercise 3 \(the causal bounds in `key_range`\)"):
        ch03.check_key_range(wrong.key_range_stub)


def test_key_range_cases_cover_the_edges():
    cases = ch03._key_range_cases()
    assert any(nq > nk for nq, nk, *_ in cases) and any(nq < nk for nq, nk, *_ in cases)
    assert any(nq % bm for nq, _, bm, _, _ in cases), "a ragged last query tile"
    assert any(bm != bn for _, _, bm, bn, _ in cases), "unequal blocks"
    assert any(not causal for *_, causal in cases)


# ---------------------------------------------------------------- 03b: the backward kernels


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kernel_variants")
    return lambda kernel, old, new: wrong.kernel_variant(kernel, old, new, folder)


def test_dkdv_kernel_accepts_the_solution(capsys):
    ch03.check_dkdv_kernel(teaching.rbf_dkdv_kernel)
    assert_one_pass_line(capsys, "rbf_dkdv_kernel: dK and dV match float64")


@pytest.mark.parametrize("mistake", [name for name in wrong.DKDV_WRONG if name != "stub"])
def test_dkdv_kernel_names_the_mistake(mistake, variants):
    kernel = variants(teaching.rbf_dkdv_kernel, wrong.DKDV_LINE, wrong.DKDV_WRONG[mistake])
    with pytest.raises(AssertionError, match=mistake):
        ch03.check_dkdv_kernel(kernel)


def test_dkdv_kernel_stub_is_not_written_yet(variants):
    kernel = variants(teaching.rbf_dkdv_kernel, wrong.DKDV_LINE, wrong.DKDV_WRONG["stub"])
    with pytest.raises(NotImplementedError, match=r"exercise 1 of 03b .* is not written yet"):
        ch03.check_dkdv_kernel(kernel)


def test_dq_kernel_accepts_the_solution(capsys):
    ch03.check_dq_kernel(teaching.rbf_dq_kernel)
    assert_one_pass_line(capsys, "rbf_dq_kernel: dQ matches float64")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("mistake", list(wrong.DQ_WRONG))
def test_dq_kernel_names_the_mistake(mistake, variants):
    old, new = wrong.DQ_WRONG[mistake]
    with pytest.raises(AssertionError, match=mistake):
        ch03.check_dq_kernel(variants(teaching.rbf_dq_kernel, old, new))


def test_dq_kernel_stub_is_not_written_yet(variants):
    # The student version of the exercise: the whole loop body is the stub.
    body_start = "        keys = start_n + tl.arange(0, BLOCK_N)\n        kv_offsets"
    source_tail = f"        {wrong.DQ_LINE}\n"
    source = inspect.getsource(teaching.rbf_dq_kernel.fn)
    body = source[source.index(body_start):source.index(source_tail) + len(source_tail)]
    stub = "        # YOUR CODE HERE\n        raise NotImplementedError()\n"
    kernel = variants(teaching.rbf_dq_kernel, body, stub)
    with pytest.raises(NotImplementedError, match=r"exercise 2 of 03b .* is not written yet"):
        ch03.check_dq_kernel(kernel)
