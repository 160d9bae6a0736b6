"""checks.stubs tells nbgrader's stub apart from every other error, interpreted or compiled.

The student version of a chapter has `raise NotImplementedError()` where each solution was. Under
Triton's interpreter that surfaces as NotImplementedError wrapped in InterpreterError; compiled for
a GPU, Triton rejects the `raise` statement (CompilationError). Both must read as "not written
yet"; anything else, a NotImplementedError with a message included, is a real error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ch03_wrong_solutions as wrong
import pytest
import torch

from rbf_tutorial import teaching
from rbf_tutorial.checks import stubs

TESTS = Path(__file__).resolve().parent


def stub_function():
    # YOUR CODE HERE
    raise NotImplementedError()


def caught(function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001  (the test inspects whatever comes out)
        return error
    raise AssertionError(f"{function} raised nothing")


def test_a_python_stub_is_found_by_name():
    assert stubs.find_stub(caught(stub_function)) == "stub_function"


@pytest.mark.parametrize("error", [NotImplementedError("only tuple comprehensions are supported"),
                                   ValueError("x"), RuntimeError(), AssertionError("wrong")])
def test_other_errors_are_not_stubs(error):
    assert stubs.find_stub(error) is None


def test_an_interpreted_triton_stub_is_found_inside_the_kernel_that_calls_it():
    q = torch.randn(1, 1, 20, 16)
    error = caught(teaching.tile_scores, q, q, 0.5, scores=wrong.scores_stub)
    assert type(error).__name__ == "InterpreterError"
    assert stubs.find_stub(error) == "scores_stub"


def test_an_interpreted_triton_error_that_is_not_the_stub_propagates():
    q, k = torch.randn(1, 1, 20, 16), torch.randn(1, 1, 40, 16)
    error = caught(teaching.tile_scores, q, k, 0.5, scores=wrong.scores_norms_over_wrong_axis, block_n=32)
    assert stubs.find_stub(error) is None


COMPILE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, {tests!r})
    import rbf_tutorial
    import ch03_wrong_solutions as wrong
    from gpu_compile import compile_kernel, teaching_kernels
    from rbf_tutorial.checks.stubs import find_stub

    found = {{}}
    for label, piece in [("stub", wrong.scores_stub), ("wrong axis", wrong.scores_norms_over_wrong_axis),
                         ("message", wrong.scores_raising_with_a_message), ("right", None)]:
        pieces = {{"SCORES": piece}} if piece is not None else None
        name, kernel, pointers, constexprs = teaching_kernels(head_dim=32, block=16, pieces=pieces)[1]
        try:
            compile_kernel(kernel, pointers, constexprs)
            found[label] = "compiled"
        except Exception as error:
            found[label] = [type(error).__name__, find_stub(error)]
    print(json.dumps(found))
""")


@pytest.mark.slow
def test_a_compiled_triton_stub_is_found_and_other_compile_errors_are_not():
    """Compiles the forward kernel for sm_90 (no GPU needed) with a stub, a wrong and a right piece."""
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    script = COMPILE_SCRIPT.format(tests=str(TESTS))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=environment)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["stub"] == ["CompilationError", "scores_stub"]
    assert found["wrong axis"][0] == "CompilationError" and found["wrong axis"][1] is None
    assert found["message"][0] == "CompilationError" and found["message"][1] is None
    assert found["right"] == "compiled"


def test_not_written_yet_names_the_exercise_and_lets_other_errors_through():
    not_yet = r"exercise 9 \(something\) is not written yet: `stub_function`"
    with pytest.raises(NotImplementedError, match=not_yet):
        with stubs.not_written_yet("exercise 9 (something)"):
            stub_function()
    with pytest.raises(ValueError, match="real"):
        with stubs.not_written_yet("exercise 9 (something)"):
            raise ValueError("real")


def test_learner_or_reference_falls_back_only_for_the_stub(capsys):
    assert stubs.learner_or_reference(lambda: 1, lambda: 2, uses="your thing") == 1
    assert capsys.readouterr().out == ""
    assert stubs.learner_or_reference(stub_function, lambda: 2, uses="your `thing` (exercise 9)") == 2
    out = capsys.readouterr().out
    assert out.startswith("⚠ this cell runs your `thing` (exercise 9), and `stub_function` is still a stub")
    assert "reference" in out
    with pytest.raises(ZeroDivisionError):
        stubs.learner_or_reference(lambda: 1 / 0, lambda: 2, uses="your thing")
