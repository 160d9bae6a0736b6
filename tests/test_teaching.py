"""rbf_tutorial.teaching: the finished teaching kernels are the chapters' solutions, and they are right.

The chapters define their Triton kernels in cells, the exercises among them; the library holds the
same kernels finished, for the checks (which run a learner's piece inside them) and for the cells
that fall back to the reference while an exercise is a stub. A kernel defined in a chapter under
the name of a library kernel must be that kernel, statement for statement (docstrings and comments
may differ), so the two cannot drift apart.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import jupytext
import pytest
import torch

from rbf_tutorial import teaching
from rbf_tutorial.reference import rbf_attention_reference

CHAPTERS_DIR = Path(__file__).resolve().parent.parent / "chapters"
# Chapter -> the library kernels it must define (its exercises first).
DEFINED_IN = {
    "03a_triton_forward.py": ["rbf_scores", "online_softmax_update", "key_range", "dot_scores",
                              "scores_tile_kernel", "flash_rbf_kernel"],
    "03b_triton_backward.py": ["rbf_dkdv_kernel", "rbf_dq_kernel", "probabilities_and_ds", "query_start"],
    "06_exclusive_self_attention.py": ["remove_own_value"],
}


def _without_docstring(function: ast.FunctionDef) -> str:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    # Name, arguments, statements and decorators; ast.FunctionDef's other fields vary by Python version.
    nodes = [function.args, *body, *function.decorator_list]
    return function.name + "\n" + "\n".join(ast.dump(node) for node in nodes)


def _is_triton_jit(function: ast.FunctionDef) -> bool:
    return any(ast.unparse(decorator) in ("triton.jit", "jit") for decorator in function.decorator_list)


def chapter_kernels(chapter: Path) -> dict[str, ast.FunctionDef]:
    notebook = jupytext.read(chapter, fmt="py:percent")
    kernels = {}
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        for node in ast.parse(cell.source).body:
            if isinstance(node, ast.FunctionDef) and _is_triton_jit(node):
                kernels[node.name] = node
    return kernels


def library_kernel(name: str) -> ast.FunctionDef:
    source = textwrap.dedent(inspect.getsource(getattr(teaching, name).fn))
    return ast.parse(source).body[0]


@pytest.mark.parametrize(("chapter", "name"), [(chapter, name) for chapter, names in DEFINED_IN.items()
                                               for name in names])
def test_the_chapter_defines_the_library_kernel(chapter, name):
    kernels = chapter_kernels(CHAPTERS_DIR / chapter)
    assert name in kernels, f"{chapter} defines no @triton.jit {name}"
    assert _without_docstring(kernels[name]) == _without_docstring(library_kernel(name)), (
        f"{chapter}'s {name} differs from rbf_tutorial.teaching.{name}: change both, or neither"
    )


def test_a_changed_statement_is_noticed():
    changed = library_kernel("rbf_scores")
    changed.body[-1] = ast.parse("return 0").body[0]
    assert _without_docstring(changed) != _without_docstring(library_kernel("rbf_scores"))


# ------------------------------------------------------------------------------------------------
# The teaching operator itself


def test_the_operator_matches_float64_forward_and_backward():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=generator, requires_grad=True) for n in (37, 45, 45))
    grad_out = torch.randn(1, 2, 37, 16, generator=generator)
    out = teaching.rbf_attention(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = rbf_attention_reference(*leaves, causal=True)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
    for got, want in zip(grads, torch.autograd.grad(expected, leaves, grad_out.double()), strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_float64_inputs_accumulate_in_float64_so_gradcheck_tests_the_kernels():
    generator = torch.Generator().manual_seed(4)
    inputs = [torch.randn(1, 1, n, 16, generator=generator, dtype=torch.float64, requires_grad=True)
              for n in (5, 20, 20)]
    out, lse = teaching.flash_rbf_forward(*(x.detach() for x in inputs), causal=True)
    assert out.dtype == lse.dtype == torch.float64
    expected = rbf_attention_reference(*inputs, causal=True).detach()
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda q, k, v: teaching.rbf_attention(q, k, v, causal=True), inputs,
                                    fast_mode=True)


@pytest.mark.parametrize(("change", "error", "named"), [
    (lambda q, k, v: (q[0], k, v), ValueError, "q: expected 4 dimensions"),
    (lambda q, k, v: (q, k.double(), v), ValueError, "k: expected batch, heads, head dim and dtype of q"),
    (lambda q, k, v: (q, k, v[..., :7, :]), ValueError, "v: expected as many rows as k"),
    (lambda q, k, v: (q[..., :12], k[..., :12], v[..., :12]), ValueError, "power-of-two head dim"),
    (lambda q, k, v: (q.int(), k, v), TypeError, "q: expected float16, float32 or float64"),
    (lambda q, k, v: (q.tolist(), k, v), TypeError, "q: expected a torch.Tensor"),
])
def test_bad_inputs_are_refused_by_name(change, error, named):
    q, k, v = (torch.randn(1, 1, 9, 16) for _ in range(3))
    with pytest.raises(error, match=named):
        teaching.rbf_attention(*change(q, k, v))
