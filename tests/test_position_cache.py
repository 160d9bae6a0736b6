"""Position tables reused across layers and steps: the same bits as computing them afresh, the
scales still train, each (length, dtype) has its own table, nothing cached belongs to autograd,
and a compiled model neither breaks its graph nor recompiles from step to step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rbf_tutorial import positional
from rbf_tutorial.model import GPT, ModelConfig
from rbf_tutorial.positional import SuSiE, apply_rope, rope, rope_tables, susie_table

TINY = ModelConfig(vocab_size=32, context=12, d_model=20, n_layers=2, n_heads=2)  # head dim 10


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_scales(module: SuSiE, seed: int) -> SuSiE:
    with torch.no_grad():
        module.scales.uniform_(0.1, 1.5, generator=generator(seed))
    return module


@pytest.fixture(autouse=True)
def fresh_caches():
    # Each test sees its own cache misses, whatever ran before it.
    positional._rope_tables.cache_clear()
    positional._susie_unit_table.cache_clear()
    yield


# ---------------------------------------------------------------- RoPE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("length", "head_dim"), [(7, 10), (13, 6), (1, 2)])
def test_rope_tables_give_ropes_bits(dtype, length, head_dim):
    x = torch.randn(2, 3, length, head_dim, generator=generator(length), dtype=torch.float64).to(dtype)
    cos, sin = rope_tables(length, head_dim, dtype=dtype, device="cpu")
    assert cos.shape == sin.shape == (length, head_dim // 2) and cos.dtype == dtype
    assert torch.equal(apply_rope(x, cos, sin), rope(x, torch.arange(length)))
    # A second call is answered from the cache, with the very same tensors.
    again = rope_tables(length, head_dim, dtype=dtype, device=torch.device("cpu"))
    assert again[0] is cos and again[1] is sin


def test_rope_tables_are_kept_per_length_dtype_and_base():
    tables = {
        (length, dtype, base): rope_tables(length, 8, base, dtype=dtype, device="cpu")
        for length in (5, 9)
        for dtype in (torch.float32, torch.float64)
        for base in (10000.0, 500.0)
    }
    assert len({id(cos) for cos, _ in tables.values()}) == len(tables)
    for (length, dtype, base), (cos, sin) in tables.items():
        assert cos.shape == (length, 4) and cos.dtype == sin.dtype == dtype
        x = torch.randn(length, 8, generator=generator(3), dtype=dtype)
        assert torch.equal(apply_rope(x, cos, sin), rope(x, torch.arange(length), base))


def test_rope_tables_never_require_grad_and_gradients_reach_x():
    x = torch.randn(1, 2, 6, 8, generator=generator(4), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        cos, sin = rope_tables(6, 8, dtype=torch.float64, device="cpu")
    assert not cos.requires_grad and not sin.requires_grad
    assert cos.grad_fn is None and sin.grad_fn is None
    assert torch.autograd.gradcheck(lambda x: apply_rope(x, cos, sin), (x,))
    # The gradient of the cached route is the gradient of rope() itself, bit for bit.
    weights = torch.randn(1, 2, 6, 8, generator=generator(5), dtype=torch.float64)
    (cached,) = torch.autograd.grad((apply_rope(x, cos, sin) * weights).sum(), x)
    (fresh,) = torch.autograd.grad((rope(x, torch.arange(6)) * weights).sum(), x)
    assert torch.equal(cached, fresh)


def test_a_table_first_made_in_inference_mode_still_trains():
    # An inference tensor cannot be saved for backward: the cache must not keep one.
    with torch.inference_mode():
        rope_tables(5, 4, dtype=torch.float32, device="cpu")
        SuSiE(1, 4)._unit_table(5)
    cos, sin = rope_tables(5, 4, dtype=torch.float32, device="cpu")
    assert not cos.is_inference() and not sin.is_inference()
    x = torch.randn(5, 4, generator=generator(6), requires_grad=True)
    apply_rope(x, cos, sin).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    module = SuSiE(1, 4)
    q = torch.randn(1, 1, 5, 4, generator=generator(7))
    new_q, new_k = module(q, q)
    (new_q * new_k).sum().backward()
    assert module.scales.grad is not None and module.scales.grad.abs().gt(0).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"length": 0}, ValueError, "length"),
        ({"length": 2.5}, TypeError, "length"),
        ({"d": 7}, ValueError, "d"),
        ({"base": -1.0}, ValueError, "base"),
        ({"dtype": torch.int64}, TypeError, "dtype"),
        ({"dtype": "float32"}, TypeError, "dtype"),
    ],
)
def test_rope_tables_name_a_bad_argument(kwargs, error, name):
    arguments = {"length": 4, "d": 8, "base": 10000.0, "dtype": torch.float32, "device": "cpu", **kwargs}
    length, d, base = arguments.pop("length"), arguments.pop("d"), arguments.pop("base")
    with pytest.raises(error, match=rf"^{name}:"):
        rope_tables(length, d, base, **arguments)


# ---------------------------------------------------------------- SuSiE


def uncached_susie(module: SuSiE, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SuSiE at positions 0 .. Nk - 1, queries end-aligned, with every table computed afresh."""
    key_len, query_len = k.shape[2], q.shape[2]
    positions = torch.arange(key_len)
    return q + module.table(positions[key_len - query_len :]), k + module.table(positions)


@pytest.mark.parametrize(("query_len", "key_len"), [(7, 7), (3, 8), (1, 5)])
def test_susie_reused_table_gives_the_same_bits_and_gradients(query_len, key_len):
    module = random_scales(SuSiE(3, 10), seed=8)
    q = torch.randn(2, 3, query_len, 10, generator=generator(9), requires_grad=True)
    k = torch.randn(2, 3, key_len, 10, generator=generator(10), requires_grad=True)
    weights_q = torch.randn(2, 3, query_len, 10, generator=generator(11))
    weights_k = torch.randn(2, 3, key_len, 10, generator=generator(12))
    results = []
    for add_positions in (module, lambda q, k: uncached_susie(module, q, k)):
        new_q, new_k = add_positions(q, k)
        loss = (new_q * weights_q).sum() + (new_k * weights_k).sum()
        grads = torch.autograd.grad(loss, (module.scales, q, k))
        results.append((new_q, new_k, *grads))
    for cached, fresh in zip(*results, strict=True):
        assert torch.equal(cached, fresh)
    assert results[0][2].abs().gt(0).all(), "some (head, frequency) scale got no gradient"


def test_susie_scales_keep_training_through_the_cache():
    # The cache holds the unit table only: after an update the next call sees the new scales.
    module = random_scales(SuSiE(2, 6), seed=13)
    q = torch.randn(1, 2, 5, 6, generator=generator(14))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(3):
        new_q, new_k = module(q, q)
        expected_q, _ = uncached_susie(module, q, q)
        assert torch.equal(new_q, expected_q)
        optimizer.zero_grad()
        (new_q[..., :, None, :] - new_k[..., None, :, :]).square().sum().backward()
        assert module.scales.grad.abs().gt(0).all()
        optimizer.step()
    unit = module._unit_table(5)
    assert unit is module._unit_table(5)  # one cached table, reused
    assert not unit.requires_grad and unit.grad_fn is None
    assert torch.equal(unit, susie_table(5, 6))


def test_susie_default_positions_pass_gradcheck():
    module = random_scales(SuSiE(2, 4).double(), seed=15)
    q = torch.randn(1, 2, 3, 4, generator=generator(16), dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, generator=generator(17), dtype=torch.float64, requires_grad=True)

    def add_positions(scales, q, k):
        return torch.func.functional_call(module, {"scales": scales}, (q, k))

    scales = module.scales.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(add_positions, (scales, q, k))


def test_susie_unit_tables_are_kept_per_length_and_dtype():
    single, double = SuSiE(1, 8), SuSiE(1, 8).double()
    tables = [single._unit_table(4), single._unit_table(6), double._unit_table(4), double._unit_table(6)]
    assert len({id(table) for table in tables}) == 4
    assert [tuple(t.shape) for t in tables] == [(4, 8), (6, 8), (4, 8), (6, 8)]
    assert [t.dtype for t in tables] == [torch.float32] * 2 + [torch.float64] * 2
    assert torch.equal(tables[3], susie_table(6, 8, dtype=torch.float64))
    # A different base is a different table, even at the same length.
    assert not torch.equal(SuSiE(1, 8, base=100.0)._unit_table(4), tables[0])


# ---------------------------------------------------------------- in the model


@pytest.mark.parametrize("positional_encoding", ["rope", "susie"])
def test_model_positions_match_fresh_tables(positional_encoding):
    torch.manual_seed(0)
    attention = GPT(replace(TINY, positional=positional_encoding)).blocks[0].attention
    if attention.susie is not None:
        random_scales(attention.susie, seed=18)
    q = torch.randn(2, 2, 9, 10, generator=generator(19))
    k = torch.randn(2, 2, 9, 10, generator=generator(20))
    new_q, new_k = attention._position(q, k)
    if positional_encoding == "rope":
        expected = rope(q, torch.arange(9)), rope(k, torch.arange(9))
    else:
        expected = uncached_susie(attention.susie, q, k)
    assert torch.equal(new_q, expected[0]) and torch.equal(new_k, expected[1])


@pytest.mark.parametrize("positional_encoding", ["rope", "susie"])
def test_compiled_model_neither_breaks_nor_recompiles_across_steps(positional_encoding):
    torch.manual_seed(0)
    model = GPT(replace(TINY, n_layers=1, backend="matmul", positional=positional_encoding))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.context), generator=generator(21))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            _, loss = compiled(idx, idx)
            loss.backward()
    _, expected = model(idx, idx)
    torch.testing.assert_close(loss, expected)
