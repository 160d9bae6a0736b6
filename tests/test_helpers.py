"""The chapters' helpers: device sizes, memory measurement and prediction, plots, exercise checks.

Every exercise check is called with a correct answer (it must pass) and with wrong ones,
including the stub a learner starts from (it must fail, and say why).
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # no display in CI; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import rbf_tutorial  # noqa: E402, F401  (sets up Triton's mode before device.describe imports it)
from rbf_tutorial import checks, device, memory, viz  # noqa: E402

# ---------------------------------------------------------------------------------------------
# device
# ---------------------------------------------------------------------------------------------


def test_device_matches_what_torch_sees():
    assert device.SMALL == (not torch.cuda.is_available())
    assert device.DEVICE.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_sizes_picks_by_device():
    expected = "small" if device.SMALL else "large"
    assert device.sizes(cpu="small", gpu="large") == expected
    with pytest.raises(TypeError):
        device.sizes("small", "large")  # keyword-only, so calls read as a table


def test_describe_is_one_line_with_torch_device_and_kernel_mode():
    line = device.describe()
    assert "\n" not in line
    assert torch.__version__ in line
    assert device.DEVICE.type in line
    mode = rbf_tutorial.runtime.kernel_mode()
    expected_words = {"interpreted": "interpreted", "compiled": "compiled", "unavailable": "not installed"}
    assert expected_words[mode] in line


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------


def test_peak_memory_counts_a_known_allocation_exactly():
    assert memory.peak_memory(lambda: torch.empty(1000, 1000)) == 1000 * 1000 * 4


def test_peak_memory_sees_temporaries_that_are_freed_before_returning():
    def two_temporaries_then_small_result():
        first = torch.ones(256, 1024)  # 1 MiB
        second = first * 2  # another 1 MiB, both live here
        del first, second
        return torch.zeros(16)

    peak = memory.peak_memory(two_temporaries_then_small_result)
    assert peak == pytest.approx(2 * 2**20, abs=1024)  # plus a few bytes for the scalar 2


def test_peak_memory_excludes_what_was_live_before():
    already_live = torch.randn(2048, 2048)  # 16 MiB that must not be counted
    peak = memory.peak_memory(lambda x: x[:8].clone(), already_live)
    assert peak == 8 * 2048 * 4


def test_peak_memory_of_naive_attention_grows_quadratically():
    def naive(q, k, v):
        return torch.softmax(-torch.cdist(q, k).square(), dim=-1) @ v

    peaks = [memory.peak_memory(naive, *(torch.randn(1, 2, n, 8) for _ in range(3))) for n in (128, 256)]
    assert peaks[1] / peaks[0] == pytest.approx(4, rel=0.05)


def test_peak_memory_rejects_bad_arguments():
    with pytest.raises(TypeError, match="fn"):
        memory.peak_memory(42)
    with pytest.raises(ValueError, match="device"):
        memory.peak_memory(lambda: None, device="meta")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_memory_on_cuda_counts_a_known_allocation():
    assert memory.peak_memory(lambda: torch.empty(1024, 1024, device="cuda"), device="cuda") == 4 * 2**20


def test_fit_quadratic_recovers_known_coefficients():
    ns = np.array([128, 256, 512, 1024, 2048])
    fit = memory.fit_quadratic(ns, 12.0 * ns**2 + 512.0 * ns + 4096.0)
    assert (fit.a, fit.b, fit.c) == pytest.approx((12.0, 512.0, 4096.0), rel=1e-6, abs=1e-3)
    assert fit(3000) == pytest.approx(12.0 * 3000**2 + 512.0 * 3000 + 4096.0)


def test_fit_quadratic_rejects_too_few_points_and_mismatched_lengths():
    with pytest.raises(ValueError, match="at least 3"):
        memory.fit_quadratic([1, 2, 2], [1, 4, 4])
    with pytest.raises(ValueError, match="same length"):
        memory.fit_quadratic([1, 2, 3], [1, 4])


@pytest.mark.parametrize("coeffs", [(1.0, 0.0, 0.0), (12.0, 512.0, 4096.0), (3.5, -10.0, 100.0)])
@pytest.mark.parametrize("available", [1e4, 7.3e9, 24 * 2**30])
def test_predict_oom_n_is_the_first_length_that_does_not_fit(coeffs, available):
    fit = memory.QuadraticFit(*coeffs)
    n = memory.predict_oom_n(fit, available)
    assert fit(n) >= available
    assert fit(n - 1) < available


def test_predict_oom_n_rejects_a_fit_that_never_runs_out():
    with pytest.raises(ValueError, match="N²"):
        memory.predict_oom_n((0.0, 1.0, 0.0), 1e9)
    with pytest.raises(ValueError, match="available_bytes"):
        memory.predict_oom_n((1.0, 0.0, 0.0), 0)


def test_available_memory_is_positive_and_below_total():
    available = memory.available_memory("cpu")
    assert available > 0
    with open("/proc/meminfo") as meminfo:
        total_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    assert available <= total_kib * 1024


def test_ensure_fits_refuses_with_the_numbers_and_allows_what_fits():
    with pytest.raises(MemoryError, match=r"the big matrix needs 2 GiB, but only 1 GiB is available"):
        memory.ensure_fits(2 * 2**30, what="the big matrix", available_bytes=2**30)
    memory.ensure_fits(2**20, what="a small matrix", available_bytes=2**30)


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 * 2**30, "3 GiB"), (2**50, "1.02e+03 TiB")],
)
def test_format_bytes(nbytes, text):
    assert memory.format_bytes(nbytes) == text


# ---------------------------------------------------------------------------------------------
# viz
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def styled():
    viz.use_style()
    yield
    plt.close("all")


def _assert_labelled(ax, *, legend: bool):
    assert ax.get_title(), "every figure needs a title"
    assert ax.get_xlabel() or ax.get_xticklabels(), "x axis needs a label"
    assert ax.get_ylabel(), "y axis needs a label"
    assert (ax.get_legend() is not None) == legend


def test_use_style_sets_a_consistent_look(styled):
    assert plt.rcParams["axes.spines.top"] is False
    assert plt.rcParams["axes.grid"] is True


def test_plot_softmax_bars_draws_one_bar_per_key_and_rule(styled):
    ax = viz.plot_softmax_bars(["a", "b", "c"], {"dot product": [0.2, 0.7, 0.1], "RBF": [0.9, 0.05, 0.05]})
    _assert_labelled(ax, legend=True)
    heights = sorted(round(patch.get_height(), 2) for patch in ax.patches)
    assert heights == sorted([0.2, 0.7, 0.1, 0.9, 0.05, 0.05])
    with pytest.raises(ValueError, match="expected 3 weights"):
        viz.plot_softmax_bars(["a", "b", "c"], {"dot": [0.5, 0.5]})


def test_plot_query_and_keys_labels_every_vector(styled):
    ax = viz.plot_query_and_keys([1.0, 0.0], {"close": [0.9, 0.2], "long": [2.0, 3.5]})
    _assert_labelled(ax, legend=True)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert [label.split()[0] for label in labels] == ["query", "close", "long"]
    with pytest.raises(ValueError, match="2-D"):
        viz.plot_query_and_keys([1.0, 0.0, 0.0], {})


def test_plot_memory_curve_marks_fit_and_limit(styled):
    ns = [128, 256, 512, 1024]
    measured = [48.0 * n * n for n in ns]
    fit = memory.fit_quadratic(ns, measured)
    ax = viz.plot_memory_curve(ns, measured, fit, memory.predict_oom_n(fit, 2**30), available_bytes=2**30)
    _assert_labelled(ax, legend=True)
    assert ax.get_xscale() == ax.get_yscale() == "log"
    legend = " ".join(text.get_text() for text in ax.get_legend().get_texts())
    assert "fit" in legend and "available memory (1 GiB)" in legend and "out of memory" in legend


def test_plot_bars_with_reference_lines(styled):
    ax = viz.plot_bars(["bias", "padded"], [8e-3, 8e-3], ylabel="relative error", title="errors",
                       reference_lines={"fp32 kernel": 2e-3})
    _assert_labelled(ax, legend=True)
    with pytest.raises(ValueError, match="expected 2 numbers"):
        viz.plot_bars(["bias", "padded"], [1.0], ylabel="y", title="t")


# ---------------------------------------------------------------------------------------------
# checks: each passes a correct answer and fails wrong ones with a message that says what is wrong
# ---------------------------------------------------------------------------------------------


def stub(*args, **kwargs):
    raise NotImplementedError()


def test_checks_are_reachable_from_the_package():
    for module in (checks.ch00, checks.ch01, checks.ch02):
        assert module.__all__ and all(callable(getattr(module, name)) for name in module.__all__)


def correct_rbf_scores(query, keys, gamma):
    return -gamma * (keys - query).square().sum(dim=-1)


def test_check_rbf_scores_passes_a_correct_answer(capsys):
    checks.ch00.check_rbf_scores(correct_rbf_scores)
    out = capsys.readouterr().out
    assert out.startswith("✓ rbf_scores") and out.count("\n") == 1, out  # one pass line, nothing else


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda q, keys, g: keys @ q, "dot product"),
        (lambda q, keys, g: g * (keys - q).square().sum(-1), "sign is missing"),
        (lambda q, keys, g: -g * (keys - q).norm(dim=-1), "not squared"),
        (lambda q, keys, g: -(keys - q).square().sum(-1), "without gamma"),
        (lambda q, keys, g: -g * (keys - q).square().sum(0), "shape"),
        (lambda q, keys, g: -g * (keys - q).abs().sum(-1), "Expected -gamma"),
    ],
)
def test_check_rbf_scores_fails_wrong_answers(wrong, message):
    with pytest.raises(AssertionError, match=message):
        checks.ch00.check_rbf_scores(wrong)


def test_check_rbf_scores_fails_the_stub():
    with pytest.raises(NotImplementedError):
        checks.ch00.check_rbf_scores(stub)


def correct_crossover(query, close_key, long_direction):
    return float(query @ close_key / (query @ (long_direction / long_direction.norm())))


def test_check_crossover_magnitude_passes_a_correct_answer(capsys):
    checks.ch00.check_crossover_magnitude(correct_crossover)
    assert "1.9696" in capsys.readouterr().out  # cos 10° / cos 60° for the chapter's keys


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda q, c, d: float(q @ c / (q @ d)), "normalising"),
        (lambda q, c, d: math.cos(math.radians(10)) / math.cos(math.radians(60)), "off for"),  # hard-coded
        (lambda q, c, d: "two", "return a number"),
    ],
)
def test_check_crossover_magnitude_fails_wrong_answers(wrong, message):
    with pytest.raises(AssertionError, match=message):
        checks.ch00.check_crossover_magnitude(wrong)


def test_check_crossover_magnitude_fails_the_stub():
    with pytest.raises(NotImplementedError):
        checks.ch00.check_crossover_magnitude(stub)


def correct_naive_attention(q, k, v, scale):
    return torch.softmax(-scale * torch.cdist(q, k).square(), dim=-1) @ v


def test_check_naive_rbf_attention_passes_a_correct_answer():
    checks.ch01.check_naive_rbf_attention(correct_naive_attention)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda q, k, v, s: torch.softmax(s * torch.cdist(q, k).square(), -1) @ v, "minus sign"),
        (lambda q, k, v, s: torch.softmax(-s * torch.cdist(q, k), -1) @ v, "not its square"),
        (lambda q, k, v, s: torch.softmax(-torch.cdist(q, k).square(), -1) @ v, "scale is ignored"),
        (lambda q, k, v, s: torch.softmax(-s * torch.cdist(q, k).square(), -2) @ v, "query axis"),
        (lambda q, k, v, s: torch.softmax(s * q @ k.transpose(-2, -1), -1) @ v, "Expected softmax"),
        (lambda q, k, v, s: torch.softmax(-s * torch.cdist(q, k).square(), -1), "shape"),
        (lambda q, k, v, s: correct_naive_attention(q.float(), k.float(), v.float(), s), "does not match"),
    ],
)
def test_check_naive_rbf_attention_fails_wrong_answers(wrong, message):
    with pytest.raises(AssertionError, match=message):
        checks.ch01.check_naive_rbf_attention(wrong)


def test_check_naive_rbf_attention_fails_the_stub():
    with pytest.raises(NotImplementedError):
        checks.ch01.check_naive_rbf_attention(stub)


def test_check_score_matrix_bytes_passes_a_correct_answer():
    checks.ch01.check_score_matrix_bytes(lambda b, h, nq, nk, e: b * h * nq * nk * e)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda b, h, nq, nk, e: b * h * nq * nk, "number of elements"),
        (lambda b, h, nq, nk, e: nq * nk * e, "every batch element and every head"),
        (lambda b, h, nq, nk, e: b * h * nq * nq * e, "multiply all four"),
        (lambda b, h, nq, nk, e: str(b * h * nq * nk * e), "return a number"),
    ],
)
def test_check_score_matrix_bytes_fails_wrong_answers(wrong, message):
    with pytest.raises(AssertionError, match=message):
        checks.ch01.check_score_matrix_bytes(wrong)


def test_check_score_matrix_bytes_fails_the_stub():
    with pytest.raises(NotImplementedError):
        checks.ch01.check_score_matrix_bytes(stub)


def correct_key_norm_logits(q, k, scale):
    return scale * (2 * q @ k.transpose(-2, -1) - k.square().sum(-1)[..., None, :])


def test_check_key_norm_logits_passes_a_correct_answer():
    checks.ch02.check_key_norm_logits(correct_key_norm_logits)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda q, k, s: -s * torch.cdist(q, k).square(), "leave \\|q\\|² out"),
        (lambda q, k, s: s * 2 * q @ k.transpose(-2, -1), "penalty -\\|k\\|² is missing"),
        (lambda q, k, s: s * (q @ k.transpose(-2, -1) - k.square().sum(-1)[..., None, :]), "factor 2"),
        (lambda q, k, s: correct_key_norm_logits(q, k, s)[..., :1], "shape"),
    ],
)
def test_check_key_norm_logits_fails_wrong_answers(wrong, message):
    with pytest.raises(AssertionError, match=message):
        checks.ch02.check_key_norm_logits(wrong)


def test_check_key_norm_logits_fails_when_norms_broadcast_along_the_wrong_axis():
    def norms_per_query_row(q, k, scale):
        return scale * (2 * q @ k.transpose(-2, -1) - k.square().sum(-1)[..., :, None])

    # Nq != Nk in the first case, so torch itself refuses the broadcast.
    with pytest.raises(RuntimeError, match="must match"):
        checks.ch02.check_key_norm_logits(norms_per_query_row)


def test_check_key_norm_logits_fails_the_stub():
    with pytest.raises(NotImplementedError):
        checks.ch02.check_key_norm_logits(stub)


def correct_padded(q, k):
    return (torch.cat([q, q.new_full((*q.shape[:-1], 1), -0.5)], dim=-1) * 2,
            torch.cat([k, k.square().sum(-1, keepdim=True)], dim=-1))


def test_check_padded_query_key_passes_correct_answers():
    checks.ch02.check_padded_query_key(correct_padded)

    def padded_to_multiple_of_8(q, k):  # what the library does for flash kernels: also right
        q_padded, k_padded = correct_padded(q, k)
        extra = -q_padded.shape[-1] % 8
        return torch.nn.functional.pad(q_padded, (0, extra)), torch.nn.functional.pad(k_padded, (0, extra))

    checks.ch02.check_padded_query_key(padded_to_multiple_of_8)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (lambda q, k: (q, k), "wider"),
        (lambda q, k: (torch.cat([2 * q, torch.ones_like(q[..., :1])], -1),
                       torch.cat([k, k.square().sum(-1, keepdim=True)], -1)), "is not 2 q·kᵀ"),
        (lambda q, k: (torch.cat([q, -torch.ones_like(q[..., :1])], -1),
                       torch.cat([k, k.square().sum(-1, keepdim=True)], -1)), "is not 2 q·kᵀ"),
        (lambda q, k: correct_padded(q, k)[0], "pair"),
        (lambda q, k: (correct_padded(q, k)[0][..., :1, :], correct_padded(q, k)[1]), "leading dims"),
    ],
)
def test_check_padded_query_key_fails_wrong_answers(wrong, message):
    with pytest.raises(AssertionError, match=message):
        checks.ch02.check_padded_query_key(wrong)


def _query_side_uses_keys(q, k):
    # The product is right, but q_padded needs the keys: no kernel could build it one tile at a time.
    constant = k.abs().mean()
    return (torch.cat([2 * q, -constant * torch.ones_like(q[..., :1])], -1),
            torch.cat([k, k.square().sum(-1, keepdim=True) / constant], -1))


def _key_side_uses_queries(q, k):
    constant = q.abs().mean()
    return (torch.cat([2 * q * constant, -torch.ones_like(q[..., :1])], -1),
            torch.cat([k / constant, k.square().sum(-1, keepdim=True)], -1))


@pytest.mark.parametrize(
    ("leaky", "message"),
    [(_query_side_uses_keys, "q_padded changed when only k changed"),
     (_key_side_uses_queries, "k_padded changed when only q changed")],
)
def test_check_padded_query_key_fails_when_one_side_depends_on_the_other(leaky, message):
    with pytest.raises(AssertionError, match=message):
        checks.ch02.check_padded_query_key(leaky)


def test_check_padded_query_key_fails_the_stub():
    with pytest.raises(NotImplementedError):
        checks.ch02.check_padded_query_key(stub)
