"""The chapter 06 checks pass the right answers with one ✓ line and fail stubs and the usual wrong
ones by name; the Triton exercise's wrong solutions live in tests/ch06_wrong_solutions.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import ch06_wrong_solutions as wrong
import pytest
import torch

from rbf_tutorial import teaching, xsa
from rbf_tutorial.checks import ch06
from rbf_tutorial.kernels import launch

TESTS = Path(__file__).resolve().parent


def assert_one_pass_line(out: str) -> None:
    """A check that passes prints exactly one line, starting with ✓."""
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("✓ "), out

CHAPTER = Path(__file__).resolve().parent.parent / "chapters" / "06_exclusive_self_attention.py"
EXERCISES = {"ch06-ex1": "exclusive", "ch06-ex2": "exclusive_backward", "ch06-ex3": "remove_own_value"}
SOLUTION_REGION = re.compile(r"^( *)### BEGIN SOLUTION\n.*?^ *### END SOLUTION\n", re.S | re.M)


def _dots(y, v):
    return (y * v).sum(-1, keepdim=True), v.square().sum(-1, keepdim=True)


# ---------------------------------------------------------------- exercise 1: the projection


def exclusive(y, v):
    along, norm_sq = _dots(y, v)
    return y - along / norm_sq * v


def exclusive_unchanged(y, v):
    return y.clone()


def exclusive_projection_only(y, v):
    along, norm_sq = _dots(y, v)
    return along / norm_sq * v


def exclusive_divided_by_norm(y, v):
    along, norm_sq = _dots(y, v)
    return y - along / norm_sq.sqrt() * v


def exclusive_not_divided(y, v):
    along, _ = _dots(y, v)
    return y - along * v


def exclusive_over_tokens(y, v):
    return y - (y * v).sum(-2, keepdim=True) / v.square().sum(-2, keepdim=True) * v


def exclusive_roles_swapped(y, v):
    along = (y * v).sum(-1, keepdim=True)
    return v - along / y.square().sum(-1, keepdim=True) * y


def exclusive_detached(y, v):
    # Right values, but the coefficient is cut off from autograd: wrong gradients.
    along, norm_sq = _dots(y, v)
    return y - (along / norm_sq).detach() * v


def exclusive_float32(y, v):
    return exclusive(y.float(), v.float())


# ---------------------------------------------------------------- exercise 2: the gradients


def exclusive_backward(y, v, grad_z):
    _, norm_sq = _dots(y, v)
    c = (y * v).sum(-1, keepdim=True) / norm_sq
    d = (grad_z * v).sum(-1, keepdim=True) / norm_sq
    return grad_z - d * v, -c * grad_z - d * y + 2 * c * d * v


def backward_unprojected_grad_y(y, v, grad_z):
    return grad_z, exclusive_backward(y, v, grad_z)[1]


def backward_missing_norm_term(y, v, grad_z):
    _, norm_sq = _dots(y, v)
    c = (y * v).sum(-1, keepdim=True) / norm_sq
    d = (grad_z * v).sum(-1, keepdim=True) / norm_sq
    return grad_z - d * v, -c * grad_z - d * y


def backward_sign_flipped(y, v, grad_z):
    grad_y, grad_v = exclusive_backward(y, v, grad_z)
    return grad_y, -grad_v


def backward_single_tensor(y, v, grad_z):
    return exclusive_backward(y, v, grad_z)[0]


def stub(*args):
    raise NotImplementedError()


# ---------------------------------------------------------------- tests


def test_exclusive_accepts_solution(capsys):
    ch06.check_exclusive(exclusive)
    assert_one_pass_line(capsys.readouterr().out)


def test_exclusive_accepts_the_library_version(capsys):
    ch06.check_exclusive(xsa.exclusive)
    assert_one_pass_line(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (exclusive_unchanged, "nothing was removed"),
        (exclusive_projection_only, "the projection itself"),
        (exclusive_divided_by_norm, "divide by"),
        (exclusive_not_divided, "division"),
        (exclusive_over_tokens, "over tokens"),
        (exclusive_roles_swapped, "swapped"),
        (exclusive_detached, "gradients"),
        (exclusive_float32, "dtype"),
    ],
)
def test_exclusive_rejects_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ch06.check_exclusive(wrong)


def test_exclusive_backward_accepts_solution(capsys):
    ch06.check_exclusive_backward(exclusive_backward)
    assert_one_pass_line(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("wrong", "hint"),
    [
        (backward_unprojected_grad_y, "grad_z itself"),
        (backward_missing_norm_term, "2 c d v"),
        (backward_sign_flipped, "sign"),
        (backward_single_tensor, "pair"),
    ],
)
def test_exclusive_backward_rejects_wrong_answers(wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        ch06.check_exclusive_backward(wrong)


@pytest.mark.parametrize("check", [ch06.check_exclusive, ch06.check_exclusive_backward])
def test_checks_fail_on_the_student_stub(check):
    with pytest.raises(NotImplementedError):
        check(stub)


def test_backward_solution_matches_the_library_through_autograd():
    # The chapter's formula against rbf_tutorial.xsa.exclusive, independently of the check.
    generator = torch.Generator().manual_seed(0)
    y, v, grad_z = (torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64) for _ in range(3))
    y.requires_grad_(True)
    v.requires_grad_(True)
    expected = torch.autograd.grad(xsa.exclusive(y, v), (y, v), grad_z)
    for actual, wanted in zip(exclusive_backward(y.detach(), v.detach(), grad_z), expected, strict=True):
        torch.testing.assert_close(actual, wanted)


def student_version(text: str) -> str:
    """The chapter as a learner receives it: each solution region replaced by the stub."""
    stub_line = lambda match: f"{match.group(1)}raise NotImplementedError()\n"
    stubbed, count = SOLUTION_REGION.subn(stub_line, text)
    assert count == len(EXERCISES), f"expected {len(EXERCISES)} solution regions, found {count}"
    return stubbed


# ---------------------------------------------------------------- exercise 3: remove_own_value in Triton


def test_remove_own_value_accepts_the_solution(capsys):
    ch06.check_remove_own_value(teaching.remove_own_value)
    assert_one_pass_line(capsys.readouterr().out)


@pytest.mark.parametrize(("piece", "named"), [
    (wrong.remove_nothing, "nothing was subtracted"),
    (wrong.remove_projection_only, "the projection itself"),
    (wrong.remove_divided_by_norm, r"divide by \|v\|²"),
    (wrong.remove_not_divided, "division by"),
    (wrong.remove_sign_flipped, "sign is flipped"),
    (wrong.remove_roles_swapped, "roles of out and own_v are swapped"),
    (wrong.remove_along_output, "projection on y itself"),
    (wrong.remove_sum_over_rows, "axis=1"),
    (wrong.remove_without_guard, "Guard the division"),
    (wrong.remove_in_float32, "float64 inputs"),
])
def test_remove_own_value_rejects_wrong_pieces_by_name(piece, named, capsys):
    with pytest.raises(AssertionError, match=named):
        ch06.check_remove_own_value(piece)
    assert "✓" not in capsys.readouterr().out


def test_remove_own_value_stub_is_not_written_yet():
    with pytest.raises(NotImplementedError, match=r"exercise 3 .* is not written yet: `remove_stub`"):
        ch06.check_remove_own_value(wrong.remove_stub)


def test_the_guard_is_the_production_kernels():
    assert teaching.OWN_VALUE_EPS.value == launch.XSA_VALUE_EPS == xsa.FUSED_VALUE_EPS


def test_exclusive_forward_matches_the_library_and_plain_attention_is_unchanged():
    # Independently of the check: the fused teaching epilogue against xsa.exclusive_attention.
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator, dtype=torch.float64) for n in (23, 30, 30))
    for causal in (False, True):
        z, lse = teaching.flash_rbf_forward(q, k, v, causal, exclusive=True)
        expected = xsa.exclusive_attention(q, k, v, causal=causal, backend="naive")
        torch.testing.assert_close(z, expected, atol=1e-12, rtol=1e-12)
        plain, plain_lse = teaching.flash_rbf_forward(q, k, v, causal)
        torch.testing.assert_close(lse, plain_lse, atol=0, rtol=0)  # XSA leaves the weights alone
        assert (plain - z).abs().max() > 1e-2


def test_exclusive_forward_refuses_fewer_keys_than_queries_by_name():
    q, k, v = torch.randn(1, 1, 20, 16), torch.randn(1, 1, 10, 16), torch.randn(1, 1, 10, 16)
    with pytest.raises(ValueError, match="k: with exclusive=True each query needs its own key"):
        teaching.flash_rbf_forward(q, k, v, exclusive=True)


COMPILE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, {tests!r})
    import rbf_tutorial
    import ch06_wrong_solutions as wrong
    from gpu_compile import compile_kernel, teaching_kernels
    from rbf_tutorial import teaching
    from rbf_tutorial.checks.stubs import find_stub

    found = {{}}
    name, kernel, pointers, constexprs = teaching_kernels(head_dim=32, block=16)[1]
    for label, extra in [("default", {{}}), ("exclusive", {{"EXCLUSIVE": True,
                                                          "REMOVE_OWN": teaching.remove_own_value}}),
                         ("stub", {{"EXCLUSIVE": True, "REMOVE_OWN": wrong.remove_stub}})]:
        try:
            compiled = compile_kernel(kernel, pointers, {{**constexprs, **extra}})
            found[label] = compiled.asm["ptx"].count("\\n")
        except Exception as error:
            found[label] = [type(error).__name__, find_stub(error)]
    print(json.dumps(found))
""")


@pytest.mark.slow
def test_the_exclusive_epilogue_compiles_for_a_gpu_and_is_absent_by_default():
    """Compiles the forward kernel for sm_90 (no GPU needed): default, EXCLUSIVE=True, and with a stub."""
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT.format(tests=str(TESTS))], capture_output=True,
                         text=True, timeout=300, env=environment)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert isinstance(found["default"], int) and isinstance(found["exclusive"], int), found
    assert found["exclusive"] > found["default"], found  # the False branch left no code behind
    assert found["stub"] == ["CompilationError", "remove_stub"]


# The student version (stubs in place) failing only at its graded checks is tested for every chapter
# by tests/test_assignments.py.
