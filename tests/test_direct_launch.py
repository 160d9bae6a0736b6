"""The direct launch (kernels/direct_launch.py) hands the launcher exactly what Triton's own path does.

It cannot be seen under the CPU interpreter, which has no compiled kernels, so these tests compile the
real kernels for sm_90 in a subprocess and record the launches instead of making them (tests/fake_gpu.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["RBF_TUTORIAL_AUTOTUNE"] = "0"  # one tile per kernel: what is tested is the launch
    sys.path.insert(0, {tests!r})
    import torch
    import fake_gpu
    launches = fake_gpu.install()
    from triton import knobs
    from triton.runtime.jit import JITFunction
    import rbf_tutorial
    from rbf_tutorial.kernels import direct_launch, launch
    from rbf_tutorial.kernels.forward import rbf_forward_kernel

    through_triton = []
    triton_run = JITFunction.run
    def counted_run(self, *args, **kwargs):
        through_triton.append(self.fn.__name__)
        return triton_run(self, *args, **kwargs)
    JITFunction.run = counted_run

    found = {{}}
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 64, dtype=torch.bfloat16) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(2, 3, 40)

    def forward_launch(tensors, n_queries=40):
        constexprs = dict(launch._constexprs(torch.bfloat16, 64, 64, False), EXCLUSIVE=False,
                          KEY_NORMS_GIVEN=False, BLOCK_M=64, BLOCK_N=32)
        ints = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], 3, n_queries, 40, 0)
        direct_launch.launch(rbf_forward_kernel, (1, 6), tensors, ints, (0.36, 0.18, 1e-19), constexprs, 4, 1)

    tensors = (q, k, v, out, lse, lse, lse)
    for _ in range(3):
        forward_launch(tensors)
    found["same_problem"] = dict(triton=len(through_triton), calls=launches.calls[-3:])

    # A pointer that is not 16-byte aligned: Triton compiles another specialisation, every time.
    del through_triton[:]
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape).copy_(q)
    for _ in range(2):
        forward_launch((shifted, k, v, out, lse, lse, lse))
    found["misaligned_through_triton"] = len(through_triton)

    # Another length: once through Triton, then direct.
    del through_triton[:]
    for _ in range(3):
        forward_launch(tensors, n_queries=33)
    found["new_length_through_triton"] = len(through_triton)

    # Another current device: the kernel compiled for device 0 is not loaded there.
    del through_triton[:]
    fake_gpu.use_device(1)
    for _ in range(2):
        forward_launch(tensors)
    fake_gpu.use_device(0)
    found["other_device_through_triton"] = len(through_triton)

    # A launch hook (a profiler's): every launch goes through Triton, which hands the launcher the hook.
    del through_triton[:]
    hook = lambda metadata: None
    knobs.runtime.launch_enter_hook.add(hook)
    forward_launch(tensors)
    knobs.runtime.launch_enter_hook.remove(hook)
    found["hooked"] = dict(triton=len(through_triton), hooks_passed=launches.calls[-1][7])

    # The attention op end to end: the second identical call makes every launch directly. "long"
    # stands for a long sequence, whose forward reads key norms from their own kernel.
    short_sequences = launch.KEY_NORMS_MIN_QUERIES
    for variant, exclusive in (("plain", False), ("xsa", True), ("long", False)):
        launch.KEY_NORMS_MIN_QUERIES = 1 if variant == "long" else short_sequences
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        for step in range(2):
            del through_triton[:]
            del launches.calls[:]
            from rbf_tutorial.kernels import op
            y = op._FlashAttentionFunction.apply(*leaves, True, 0.125, exclusive)
            y.backward(torch.randn_like(y))
            found[f"op_{{variant}}_{{step}}"] = dict(triton=sorted(through_triton),
                                                    launches=len(launches.calls))
    print(json.dumps(found))
""")


@pytest.fixture(scope="module")
def found():
    environment = {**os.environ, "TRITON_INTERPRET": "0", "RBF_TUTORIAL_AUTOTUNE": "0"}
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(TESTS))], capture_output=True,
                         text=True, timeout=600, env=environment)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_repeated_launch_passes_the_launcher_what_triton_passed(found):
    result = found["same_problem"]
    assert result["triton"] == 1, "only the first launch should need Triton's path"
    first, second, third = result["calls"]
    assert second == third
    # Grid, stream, compiled function and metadata, then every argument: identical.
    assert first[:6] == second[:6] and first[9:] == second[9:]
    assert first[3] == 0x5EED
    # Where they differ: Triton builds hook metadata and passes its (empty) hook chains; the direct
    # launch, with nobody listening, passes None for all three, which the launcher skips.
    assert first[6] == ["object", "LazyDict"] and first[7:9] == [["hooks", 0], ["hooks", 0]]
    assert second[6:9] == [None, None, None]


@pytest.mark.slow
def test_what_the_launch_key_does_not_cover_goes_through_triton(found):
    assert found["misaligned_through_triton"] == 2
    assert found["new_length_through_triton"] == 1
    assert found["other_device_through_triton"] == 1
    assert found["hooked"] == {"triton": 1, "hooks_passed": ["hooks", 1]}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "xsa", "long"])
def test_the_attention_op_launches_directly_from_its_second_call(found, variant):
    first, second = found[f"op_{variant}_0"], found[f"op_{variant}_1"]
    # What the first call compiles: everything for "plain"; after it, only what is new to the variant
    # (the backward of "long" is the plain one, already compiled).
    new = {"plain": ["dkdv_kernel", "dq_kernel", "rbf_forward_kernel"],
           "xsa": ["dkdv_kernel", "dq_kernel", "exclusive_preprocess_kernel", "rbf_forward_kernel"],
           "long": ["key_norms_kernel", "rbf_forward_kernel"]}[variant]
    launched = 4 if variant != "plain" else 3
    assert first["triton"] == new
    assert second["triton"] == []
    assert first["launches"] == second["launches"] == launched
