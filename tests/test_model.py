"""The small GPT: every attention variant trains, stays causal, captures what it saw, and agrees
across backends; bad configs are refused by name."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch
from kernel_device import _kernel_importable, kernel_on_cpu_tensors

from rbf_tutorial import xsa
from rbf_tutorial.model import GPT, MODEL_PRESETS, AttentionCapture, ModelConfig
from rbf_tutorial.reference import causal_visibility
from rbf_tutorial.train import VARIANTS as TRAIN_VARIANTS

# Small enough that all variants together take seconds on two CPU cores.
TINY = ModelConfig(vocab_size=32, context=12, d_model=16, n_layers=2, n_heads=2)

VARIANTS = list(
    itertools.product(("dot", "rbf"), ("rope", "susie", "learned", "none"), (0, 2), (False, True))
)
VARIANT_IDS = [f"{a}-{p}-reg{r}-{'xsa' if x else 'plain'}" for a, p, r, x in VARIANTS]


def tiny_model(attention="rbf", positional="rope", registers=0, use_xsa=False, *, seed=0, **overrides):
    torch.manual_seed(seed)
    config = replace(
        TINY, attention=attention, positional=positional, registers=registers, xsa=use_xsa, **overrides
    )
    return GPT(config)


def random_tokens(batch: int, length: int, *, vocab: int = TINY.vocab_size, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)


def perturb_registers(model: GPT, seed: int = 2) -> None:
    """Move registers off the origin: zero registers would hide mistakes in how they are used."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            registers = block.attention.registers
            if registers is not None:
                registers.keys.copy_(torch.randn(registers.keys.shape, generator=generator))
                registers.values.copy_(torch.randn(registers.values.shape, generator=generator))


@pytest.mark.parametrize(("attention", "positional", "registers", "use_xsa"), VARIANTS, ids=VARIANT_IDS)
def test_variant_forward_and_one_step_lowers_the_loss(attention, positional, registers, use_xsa):
    model = tiny_model(attention, positional, registers, use_xsa)
    idx = random_tokens(4, TINY.context)
    targets = random_tokens(4, TINY.context, seed=3)
    logits, loss = model(idx, targets)
    assert logits.shape == (4, TINY.context, TINY.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(loss)
    # An untrained model predicts nearly uniformly: the loss starts near ln(vocab).
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.5

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    _, loss_after = model(idx, targets)
    assert loss_after.item() < loss.item()


@pytest.mark.parametrize(("attention", "positional", "registers", "use_xsa"), VARIANTS, ids=VARIANT_IDS)
def test_variant_is_causal(attention, positional, registers, use_xsa):
    model = tiny_model(attention, positional, registers, use_xsa).double()
    perturb_registers(model)
    base = random_tokens(1, TINY.context)
    changed_at = [0, 5, TINY.context - 1]
    variants = base.repeat(len(changed_at) + 1, 1)
    for row, position in enumerate(changed_at, start=1):
        variants[row, position] = (base[0, position] + 1) % TINY.vocab_size
    with torch.no_grad():
        logits, _ = model(variants)
    for row, position in enumerate(changed_at, start=1):
        earlier = slice(0, position)
        torch.testing.assert_close(logits[row, earlier], logits[0, earlier], atol=1e-12, rtol=0)
        # Not vacuous: the changed token itself does change the prediction at its position.
        assert not torch.allclose(logits[row, position], logits[0, position])


@pytest.mark.parametrize("attention", ["dot", "rbf"])
def test_registers_start_at_the_origin(attention):
    model = tiny_model(attention, registers=3)
    for block in model.blocks:
        registers = block.attention.registers
        assert registers.keys.shape == (TINY.n_heads, 3, TINY.head_dim)
        assert torch.count_nonzero(registers.keys) == 0
        assert torch.count_nonzero(registers.values) == 0
    assert tiny_model(attention).blocks[0].attention.registers is None


@pytest.mark.parametrize(("attention", "use_xsa"), [("rbf", True), ("dot", True), ("rbf", False)])
def test_capture_shapes_and_xsa_orthogonality(attention, use_xsa):
    model = tiny_model(attention, "susie", 2, use_xsa)
    perturb_registers(model)
    capture: list[AttentionCapture] = []
    batch, length = 3, 10
    with torch.no_grad():
        model(random_tokens(batch, length), capture=capture)
    assert len(capture) == TINY.n_layers
    split = (batch, TINY.n_heads, length, TINY.head_dim)
    for layer in capture:
        for name in ("q", "k", "v", "y", "z"):
            tensor = getattr(layer, name)
            assert tensor.shape == split, name
            assert tensor.dtype == torch.float32 and not tensor.requires_grad, name
        assert layer.register_k.shape == layer.register_v.shape == (TINY.n_heads, 2, TINY.head_dim)
        along_own_value = (layer.z * layer.v).sum(-1)
        if use_xsa:
            scale = layer.y.norm(dim=-1) * layer.v.norm(dim=-1)
            assert (along_own_value.abs() <= 1e-5 * scale + 1e-7).all()
            assert not torch.allclose(layer.z, layer.y)
            torch.testing.assert_close(layer.z, xsa.exclusive(layer.y, layer.v))
        else:
            assert torch.equal(layer.z, layer.y)


@pytest.mark.parametrize(("attention", "registers"), [("rbf", 0), ("rbf", 2), ("dot", 0), ("dot", 2)])
def test_attention_weights_are_causal_distributions_that_reproduce_the_output(attention, registers):
    model = tiny_model(attention, "rope", registers)
    perturb_registers(model)
    capture: list[AttentionCapture] = []
    length = 9
    with torch.no_grad():
        model(random_tokens(2, length), capture=capture)
    for layer in capture:
        weights = model.attention_weights(layer)
        assert weights.shape == (2, TINY.n_heads, length, registers + length)
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
        hidden = ~causal_visibility(length, registers + length)
        assert torch.count_nonzero(weights[..., hidden]) == 0
        if registers:
            assert (weights[..., :registers] > 0).all(), "every query sees every register"
        # The weights are the ones the model used: they rebuild the captured output y.
        values = layer.v
        if registers:
            values = torch.cat([layer.register_v.expand(values.shape[0], -1, -1, -1), values], dim=2)
        torch.testing.assert_close(weights @ values, layer.y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("use_xsa", [False, True])
def test_rbf_backends_agree(use_xsa):
    idx, targets = random_tokens(2, 10), random_tokens(2, 10, seed=4)
    results = {}
    for backend in ("matmul", "naive"):
        model = tiny_model("rbf", "rope", 2, use_xsa, backend=backend).double()
        perturb_registers(model)
        logits, loss = model(idx, targets)
        loss.backward()
        results[backend] = (logits, model.blocks[0].attention.qkv.weight.grad)
    torch.testing.assert_close(results["naive"][0], results["matmul"][0], atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(results["naive"][1], results["matmul"][1], atol=1e-10, rtol=1e-8)


@kernel_on_cpu_tensors
def test_rbf_triton_backend_agrees_with_matmul():
    idx, targets = random_tokens(1, 8), random_tokens(1, 8, seed=4)
    results = {}
    for backend in ("matmul", "triton"):
        model = tiny_model("rbf", "susie", 1, True, backend=backend, n_layers=1)
        perturb_registers(model)
        logits, loss = model(idx, targets)
        loss.backward()
        results[backend] = (logits, model.blocks[0].attention.qkv.weight.grad)
    torch.testing.assert_close(results["triton"][0], results["matmul"][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results["triton"][1], results["matmul"][1], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("registers", [0, 2])
def test_dot_backends_agree(registers):
    idx = random_tokens(2, 10)
    logits = {}
    for backend in ("sdpa", "matmul"):
        model = tiny_model("dot", "rope", registers, backend=backend).double()
        perturb_registers(model)
        with torch.no_grad():
            logits[backend], _ = model(idx)
    torch.testing.assert_close(logits["sdpa"], logits["matmul"], atol=1e-10, rtol=1e-8)


def test_xsa_in_one_call_matches_the_two_steps_capture_takes():
    idx = random_tokens(2, 10)
    model = tiny_model("rbf", "rope", 2, True).double()
    perturb_registers(model)
    with torch.no_grad():
        reference, _ = model(idx)  # xsa.exclusive_attention
        with_capture, _ = model(idx, capture=[])  # rbf_attention, then xsa.exclusive
    torch.testing.assert_close(with_capture, reference, atol=1e-10, rtol=1e-8)


def test_loss_ignores_minus_100_targets():
    model = tiny_model()
    idx, targets = random_tokens(2, 8), random_tokens(2, 8, seed=5)
    masked = targets.clone()
    masked[:, :5] = -100
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, TINY.vocab_size),
                                                 targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_tied_weights_and_parameter_count():
    tied, untied = tiny_model(), tiny_model(tie_weights=False)
    assert tied.head.weight is tied.token_embedding.weight
    assert untied.num_parameters() - tied.num_parameters() == TINY.vocab_size * TINY.d_model


def test_residual_projections_start_smaller():
    torch.manual_seed(0)
    model = GPT(MODEL_PRESETS["original"])
    expected = 0.02 / math.sqrt(2 * model.config.n_layers)
    block = model.blocks[0]
    assert block.attention.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert block.mlp.down.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert block.attention.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_presets():
    for name, config in MODEL_PRESETS.items():
        config.validate()
        assert config.head_dim * config.n_heads == config.d_model, name
    original = MODEL_PRESETS["original"]
    assert (original.d_model, original.n_layers, original.n_heads, original.context) == (256, 4, 4, 256)
    assert MODEL_PRESETS["gpu10"].head_dim == 64


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"attention": "cosine"}, "attention"),
        ({"positional": "alibi"}, "positional"),
        ({"backend": "cuda"}, "backend"),
        ({"attention": "dot", "backend": "flex"}, "backend"),
        ({"n_heads": 3}, "n_heads"),
        ({"d_model": 18, "n_heads": 2, "positional": "rope"}, "positional"),
        ({"d_model": 18, "n_heads": 2, "positional": "susie"}, "positional"),
        ({"registers": -1}, "registers"),
        ({"dropout": 1.0}, "dropout"),
        ({"n_layers": 0}, "n_layers"),
        ({"scale_factor": 0.0}, "scale_factor"),
        ({"scale_factor": float("inf")}, "scale_factor"),
    ],
)
def test_bad_configs_are_refused_by_name(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        GPT(replace(TINY, **overrides))


def test_odd_head_dim_is_fine_without_rotations():
    model = GPT(replace(TINY, d_model=18, n_heads=2, positional="learned"))
    logits, _ = model(random_tokens(1, 5))
    assert logits.shape == (1, 5, TINY.vocab_size)


def test_bad_inputs_are_refused_by_name():
    model = tiny_model()
    with pytest.raises(ValueError, match="^idx:"):
        model(random_tokens(1, TINY.context + 1))
    with pytest.raises(TypeError, match="^idx:"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="^idx:"):
        model(torch.full((1, 4), TINY.vocab_size))
    with pytest.raises(ValueError, match="^targets:"):
        model(random_tokens(1, 4), random_tokens(1, 5))


@pytest.mark.parametrize("attention", ["rbf", "dot"])
def test_qk_norm_and_scale_factor_reach_the_scores(attention):
    """The captured q and k are RMS-normalised (norm sqrt(hd) at unit gain), and the weights use the
    scaled logits: rebuilding y from attention_weights only works if both settings took effect."""
    model = tiny_model(attention, "none", 0, qk_norm=True, scale_factor=0.5)
    capture: list[AttentionCapture] = []
    with torch.no_grad():
        model(random_tokens(2, 7), capture=capture)
    for layer in capture:
        expected_norm = torch.full(layer.q.shape[:-1], TINY.head_dim**0.5)
        torch.testing.assert_close(layer.q.norm(dim=-1), expected_norm, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(layer.k.norm(dim=-1), expected_norm, atol=1e-3, rtol=1e-3)
        weights = model.attention_weights(layer)
        torch.testing.assert_close(weights @ layer.v, layer.y, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# torch.compile: one graph per model, whatever the variant


def _compiles_in_one_graph(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> None:
    """fullgraph=True makes any graph break an error; the compiled model must also compute the same."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    logits, loss = compiled(idx, targets)
    expected_logits, expected_loss = model(idx, targets)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(loss, expected_loss)


@pytest.mark.parametrize("variant", list(TRAIN_VARIANTS))
def test_every_training_variant_compiles_without_graph_breaks(variant):
    settings = dict(TRAIN_VARIANTS[variant])
    if settings["attention"] == "rbf":
        settings["backend"] = "matmul"  # what "auto" resolves to on a CPU, named outright
    torch.manual_seed(0)
    model = GPT(replace(TINY, n_layers=1, **settings))
    perturb_registers(model)
    _compiles_in_one_graph(model, random_tokens(2, TINY.context), random_tokens(2, TINY.context, seed=3))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_xsa_variant_compiles_without_graph_breaks_on_auto_and_triton(backend):
    if backend == "triton" and (torch.cuda.is_available() or not _kernel_importable()):
        pytest.skip("the Triton kernel on CPU tensors runs through the interpreter only without a GPU")
    torch.manual_seed(0)
    settings = {**TRAIN_VARIANTS["rbf-susie-reg-xsa"], "backend": backend}
    model = GPT(replace(TINY, n_layers=1, context=8, **settings))
    perturb_registers(model)
    _compiles_in_one_graph(model, random_tokens(1, 8), random_tokens(1, 8, seed=3))
