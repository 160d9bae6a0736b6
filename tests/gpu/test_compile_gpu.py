"""The model under torch.compile on a GPU: no graph breaks, the kernels visible to Inductor, same numbers.

Every training variant is compiled with ``fullgraph=True`` (any graph break is an error), run forward
and backward, and compared with the eager model. For the RBF variants the code Inductor generates
must launch the fused kernels itself: that is what lets it fuse around them and capture the step in
a CUDA graph, instead of calling an opaque operator through the dispatcher.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rbf_tutorial.model import GPT, MODEL_PRESETS
from rbf_tutorial.train import VARIANTS

SMALL = replace(MODEL_PRESETS["smoke"], context=128, d_model=128, n_layers=2, n_heads=2)


def loss_and_grads(run, model, tokens, targets):
    """Loss of ``run(tokens, targets)`` and the gradients it leaves on ``model``'s parameters."""
    model.zero_grad(set_to_none=True)
    _, loss = run(tokens, targets)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_model_has_no_graph_breaks_and_matches_eager(variant):
    # Imported here: Inductor imports triton, which must not happen before rbf_tutorial has chosen
    # compiled or interpreted kernels for this machine (the whole suite is collected on CPUs too).
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(replace(SMALL, **VARIANTS[variant])).cuda()
    generator = torch.Generator(device="cuda").manual_seed(1)
    tokens = torch.randint(0, SMALL.vocab_size, (3, 100), device="cuda", generator=generator)
    targets = torch.randint(0, SMALL.vocab_size, (3, 100), device="cuda", generator=generator)

    eager_loss, eager_grads = loss_and_grads(model, model, tokens, targets)
    compiled = torch.compile(model, fullgraph=True)
    (compiled_loss, compiled_grads), code = run_and_get_code(loss_and_grads, compiled, model, tokens, targets)

    torch.testing.assert_close(compiled_loss, eager_loss, atol=2e-4, rtol=2e-4)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=2e-3, rtol=2e-3, msg=name)
    if VARIANTS[variant]["attention"] == "rbf":
        generated = "\n".join(code)
        for kernel in ("rbf_forward_kernel", "dq_kernel", "dkdv_kernel"):
            assert kernel in generated, f"{variant}: Inductor's code does not launch {kernel} itself"
