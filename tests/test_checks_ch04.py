"""The chapter 04 checks pass the right answers and fail the usual wrong ones with AssertionError."""

from __future__ import annotations

import pytest
import torch

from rbf_tutorial.checks import ch04
from rbf_tutorial.reference import causal_visibility

# ---------------------------------------------------------------- exercise 1: key beats register


def assert_one_pass_line(out: str) -> None:
    """A check that passes prints exactly one line, starting with ✓."""
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("✓ "), out


def key_beats_register(q, k):
    distances = (q[..., :, None, :] - k[..., None, :, :]).norm(dim=-1)
    return distances < q.norm(dim=-1)[..., None]


def key_beats_register_expanded(q, k):
    # The same condition after expanding the square: 2 q·k > |k|².
    return 2 * q @ k.transpose(-2, -1) > k.square().sum(-1)[..., None, :]


def key_beats_register_against_key_norm(q, k):
    distances = (q[..., :, None, :] - k[..., None, :, :]).norm(dim=-1)
    return distances < k.norm(dim=-1)[..., None, :]


def key_beats_register_reversed(q, k):
    distances = (q[..., :, None, :] - k[..., None, :, :]).norm(dim=-1)
    return distances > q.norm(dim=-1)[..., None]


def key_beats_register_as_float(q, k):
    return key_beats_register(q, k).double()


def key_beats_register_dot_positive(q, k):
    # "Points the same way as the query" is not the condition: length matters too.
    return q @ k.transpose(-2, -1) > 0


@pytest.mark.parametrize("solution", [key_beats_register, key_beats_register_expanded])
def test_key_beats_register_accepts_correct(solution, capsys):
    ch04.check_key_beats_register(solution)
    assert_one_pass_line(capsys.readouterr().out)


@pytest.mark.parametrize(
    "wrong",
    [
        key_beats_register_against_key_norm,
        key_beats_register_reversed,
        key_beats_register_as_float,
        key_beats_register_dot_positive,
        lambda q, k: key_beats_register(q, k)[..., 0, :],
    ],
)
def test_key_beats_register_rejects_wrong(wrong):
    with pytest.raises(AssertionError):
        ch04.check_key_beats_register(wrong)


def test_key_beats_register_names_the_mistake():
    with pytest.raises(AssertionError, match=r"\|k\|"):
        ch04.check_key_beats_register(key_beats_register_against_key_norm)


# ---------------------------------------------------------------- exercise 2: register weight


def register_weight(q, k, scale):
    key_logits = scale * (2 * q @ k.transpose(-2, -1) - k.square().sum(-1)[..., None, :])
    return 1 / (1 + torch.exp(key_logits).sum(-1))


def register_weight_by_softmax(q, k, scale):
    # The register as an extra logit column: -scale |q|², next to -scale |q - k|².
    key_logits = -scale * (q[..., :, None, :] - k[..., None, :, :]).square().sum(-1)
    register_logit = -scale * q.square().sum(-1, keepdim=True)
    return torch.softmax(torch.cat([register_logit, key_logits], dim=-1), dim=-1)[..., 0]


def register_weight_forgets_query_norm(q, k, scale):
    key_logits = -scale * (q[..., :, None, :] - k[..., None, :, :]).square().sum(-1)
    return 1 / (1 + torch.exp(key_logits).sum(-1))


def register_weight_no_two(q, k, scale):
    key_logits = scale * (q @ k.transpose(-2, -1) - k.square().sum(-1)[..., None, :])
    return 1 / (1 + torch.exp(key_logits).sum(-1))


def register_weight_no_one(q, k, scale):
    key_logits = scale * (2 * q @ k.transpose(-2, -1) - k.square().sum(-1)[..., None, :])
    return 1 / torch.exp(key_logits).sum(-1)


def register_weight_keys_mass(q, k, scale):
    return 1 - register_weight(q, k, scale)


def register_weight_keepdim(q, k, scale):
    return register_weight(q, k, scale)[..., None]


@pytest.mark.parametrize("solution", [register_weight, register_weight_by_softmax])
def test_register_weight_accepts_correct(solution, capsys):
    ch04.check_register_weight(solution)
    assert_one_pass_line(capsys.readouterr().out)


@pytest.mark.parametrize(
    "wrong",
    [
        register_weight_forgets_query_norm,
        register_weight_no_two,
        register_weight_no_one,
        register_weight_keys_mass,
        register_weight_keepdim,
        lambda q, k, scale: register_weight(q, k, 1.0),  # ignores the scale
    ],
)
def test_register_weight_rejects_wrong(wrong):
    with pytest.raises(AssertionError):
        ch04.check_register_weight(wrong)


def test_register_weight_names_the_mistake():
    with pytest.raises(AssertionError, match=r"exp\(-scale \|q\|²\)"):
        ch04.check_register_weight(register_weight_forgets_query_norm)


# ---------------------------------------------------------------- exercise 3: attention with a register


def _extend(q, k, v, register_key, register_value, *, at_end=False):
    batch, heads = q.shape[:2]
    key_row = register_key.expand(batch, heads, 1, -1)
    value_row = register_value.expand(batch, heads, 1, -1)
    if at_end:
        return torch.cat([k, key_row], dim=2), torch.cat([v, value_row], dim=2)
    return torch.cat([key_row, k], dim=2), torch.cat([value_row, v], dim=2)


def _attend(q, k, v, scale, visible):
    logits = -scale * (q[..., :, None, :] - k[..., None, :, :]).square().sum(-1)
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def attention_with_register(q, k, v, register_key, register_value, *, scale, causal):
    k, v = _extend(q, k, v, register_key, register_value)
    visible = causal_visibility(q.shape[2], k.shape[2]) if causal else None
    return _attend(q, k, v, scale, visible)


def attention_with_register_top_left(q, k, v, register_key, register_value, *, scale, causal):
    k, v = _extend(q, k, v, register_key, register_value)
    visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril() if causal else None
    return _attend(q, k, v, scale, visible)


def attention_with_register_at_end(q, k, v, register_key, register_value, *, scale, causal):
    k, v = _extend(q, k, v, register_key, register_value, at_end=True)
    visible = causal_visibility(q.shape[2], k.shape[2]) if causal else None
    return _attend(q, k, v, scale, visible)


def attention_without_register(q, k, v, register_key, register_value, *, scale, causal):
    visible = causal_visibility(q.shape[2], k.shape[2]) if causal else None
    return _attend(q, k, v, scale, visible)


def attention_with_register_hidden(q, k, v, register_key, register_value, *, scale, causal):
    # The causal mask of the real keys, with the register column masked too when causal.
    extended_k, extended_v = _extend(q, k, v, register_key, register_value)
    visible = None
    if causal:
        real = causal_visibility(q.shape[2], k.shape[2])
        visible = torch.cat([torch.zeros(q.shape[2], 1, dtype=torch.bool), real], dim=1)
    return _attend(q, extended_k, extended_v, scale, visible)


def attention_with_register_zero_value(q, k, v, register_key, register_value, *, scale, causal):
    return attention_with_register(q, k, v, register_key, torch.zeros_like(register_value),
                                   scale=scale, causal=causal)


def attention_with_register_ignores_causal(q, k, v, register_key, register_value, *, scale, causal):
    return attention_with_register(q, k, v, register_key, register_value, scale=scale, causal=False)


def test_attention_with_register_accepts_correct(capsys):
    ch04.check_attention_with_register(attention_with_register)
    assert_one_pass_line(capsys.readouterr().out)


@pytest.mark.parametrize(
    "wrong",
    [
        attention_with_register_top_left,
        attention_with_register_at_end,
        attention_without_register,
        attention_with_register_hidden,
        attention_with_register_zero_value,
        attention_with_register_ignores_causal,
    ],
)
def test_attention_with_register_rejects_wrong(wrong):
    with pytest.raises(AssertionError):
        ch04.check_attention_with_register(wrong)


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        (attention_with_register_top_left, "top-left"),
        (attention_with_register_at_end, "at the end"),
        (attention_without_register, "without the register"),
    ],
)
def test_attention_with_register_names_the_mistake(wrong, message):
    with pytest.raises(AssertionError, match=message):
        ch04.check_attention_with_register(wrong)


def test_stubs_fail_with_not_implemented():
    # What a learner's untouched exercise does: the check lets the stub's own error through.
    def stub(*args, **kwargs):
        raise NotImplementedError()

    checks = (ch04.check_key_beats_register, ch04.check_register_weight, ch04.check_attention_with_register)
    for check in checks:
        with pytest.raises(NotImplementedError):
            check(stub)
