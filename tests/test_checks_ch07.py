"""The chapter 07 checks pass the right answers and fail stubs and the usual wrong ones.
(tests/test_exercise_contract.py checks the chapter's exercise cells themselves.)
"""

from __future__ import annotations

import math

import pytest
import torch

from rbf_tutorial import data
from rbf_tutorial.checks import ch07


def stub(*args, **kwargs):
    raise NotImplementedError()


# ---------------------------------------------------------------- bits per byte


def bits_per_byte(loss_nats, n_tokens, n_bytes):
    return loss_nats * n_tokens / (n_bytes * math.log(2))


def bits_per_byte_via_log2(loss_nats, n_tokens, n_bytes):
    # log2(e) = 1 / ln 2: the same number by another road.
    return loss_nats * math.log2(math.e) * n_tokens / n_bytes


def bits_per_byte_tensor(loss_nats, n_tokens, n_bytes):
    return torch.tensor(loss_nats) * n_tokens / n_bytes / math.log(2)


def bits_per_byte_times_ln2(loss_nats, n_tokens, n_bytes):
    return loss_nats * math.log(2) * n_tokens / n_bytes


def bits_per_byte_per_token(loss_nats, n_tokens, n_bytes):
    return loss_nats / math.log(2)


def bits_per_byte_ratio_inverted(loss_nats, n_tokens, n_bytes):
    return loss_nats * n_bytes / (n_tokens * math.log(2))


def bits_per_byte_log10(loss_nats, n_tokens, n_bytes):
    return loss_nats * n_tokens / (n_bytes * math.log(10))


@pytest.mark.parametrize("correct", [bits_per_byte, bits_per_byte_via_log2, bits_per_byte_tensor])
def test_bits_per_byte_accepts_solutions(correct, capsys):
    ch07.check_bits_per_byte(correct)
    out = capsys.readouterr().out
    assert "✓" in out and "max diff" in out and "✗" not in out


@pytest.mark.parametrize(
    ("wrong", "named_mistake"),
    [
        (bits_per_byte_times_ln2, "divide by ln 2"),
        (bits_per_byte_per_token, "bits per token"),
        (bits_per_byte_ratio_inverted, "n_bytes / n_tokens"),
        (bits_per_byte_log10, "ln 10"),
        (lambda loss, tokens, nbytes: "8", "expected a number"),
    ],
)
def test_bits_per_byte_rejects_wrong_answers(wrong, named_mistake):
    with pytest.raises(AssertionError, match=named_mistake):
        ch07.check_bits_per_byte(wrong)


# ---------------------------------------------------------------- validation loss


def validation_loss(model, tokens, *, batch_size, context, max_batches):
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        windows = data.eval_windows(tokens, batch_size=batch_size, context=context, max_batches=max_batches)
        for inputs, targets in windows:
            _, loss = model(inputs, targets)
            total += loss.item() * targets.numel()
            count += targets.numel()
    model.train(was_training)
    return total / count


def validation_loss_summed_losses(model, tokens, *, batch_size, context, max_batches):
    # Another right answer: per-token losses summed in float64, returned as a 0-d tensor.
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        windows = data.eval_windows(tokens, batch_size=batch_size, context=context, max_batches=max_batches)
        for inputs, targets in windows:
            logits, _ = model(inputs)
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                            reduction="none").double())  # fmt: skip
    model.train(was_training)
    return torch.cat(losses).mean()


def validation_loss_mean_of_batches(model, tokens, *, batch_size, context, max_batches):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        windows = data.eval_windows(tokens, batch_size=batch_size, context=context, max_batches=max_batches)
        means = [model(inputs, targets)[1].item() for inputs, targets in windows]
    model.train(was_training)
    return sum(means) / len(means)


def validation_loss_dropout_on(model, tokens, *, batch_size, context, max_batches):
    total, count = 0.0, 0
    with torch.no_grad():
        windows = data.eval_windows(tokens, batch_size=batch_size, context=context, max_batches=max_batches)
        for inputs, targets in windows:
            _, loss = model(inputs, targets)
            total += loss.item() * targets.numel()
            count += targets.numel()
    return total / count


def validation_loss_left_in_eval(model, tokens, *, batch_size, context, max_batches):
    result = validation_loss(model, tokens, batch_size=batch_size, context=context, max_batches=max_batches)
    model.eval()
    return result


def validation_loss_in_bits(model, tokens, **windows):
    return validation_loss(model, tokens, **windows) / math.log(2)


def validation_loss_every_window(model, tokens, *, batch_size, context, max_batches):
    return validation_loss(model, tokens, batch_size=batch_size, context=context, max_batches=10**6)


def validation_loss_random_windows(model, tokens, *, batch_size, context, max_batches):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = [model(*data.batch_at(tokens, step=step, batch_size=batch_size, context=context, seed=0))[1]
                  for step in range(max_batches)]  # fmt: skip
    model.train(was_training)
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize("correct", [validation_loss, validation_loss_summed_losses])
def test_validation_loss_accepts_solutions(correct, capsys):
    ch07.check_validation_loss(correct)
    out = capsys.readouterr().out
    assert "✓" in out and "✗" not in out


@pytest.mark.parametrize(
    ("wrong", "named_mistake"),
    [
        (validation_loss_mean_of_batches, "weigh each batch"),
        (validation_loss_dropout_on, "model.eval()"),
        (validation_loss_left_in_eval, "model.train\\(was_training\\)"),
        (validation_loss_in_bits, "in bits"),
        (validation_loss_every_window, "max_batches"),
        (validation_loss_random_windows, "validation_loss is wrong"),
        (lambda model, tokens, **windows: 5.5, "never called the model"),
    ],
)
def test_validation_loss_rejects_wrong_answers(wrong, named_mistake):
    with pytest.raises(AssertionError, match=named_mistake):
        ch07.check_validation_loss(wrong)


def test_validation_loss_check_leaves_the_global_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ch07.check_validation_loss(validation_loss)
    # The check's model draws dropout masks only in a wrong answer; building it uses a forked stream.
    torch.testing.assert_close(torch.rand(3), expected)


# ---------------------------------------------------------------- key norm medians


def key_norm_medians(captures):
    return torch.stack([capture.k.norm(dim=-1).flatten().median() for capture in captures])


def key_norm_medians_quantile(captures):
    return torch.tensor([torch.quantile(torch.linalg.vector_norm(c.k, dim=-1), 0.5).item() for c in captures])


def key_norm_medians_list(captures):
    return [c.k.norm(dim=-1).median().item() for c in captures]


def key_norm_medians_mean(captures):
    return torch.stack([capture.k.norm(dim=-1).mean() for capture in captures])


def key_norm_medians_squared(captures):
    return torch.stack([capture.k.square().sum(-1).median() for capture in captures])


def key_norm_medians_pooled(captures):
    pooled = torch.cat([capture.k.norm(dim=-1).flatten() for capture in captures]).median()
    return pooled.expand(len(captures))


def key_norm_medians_wrong_axis(captures):
    return torch.stack([capture.k.norm(dim=-2).median() for capture in captures])


def key_norm_medians_with_registers(captures):
    medians = []
    for capture in captures:
        registers = capture.register_k.expand(capture.k.shape[0], -1, -1, -1)
        medians.append(torch.cat([registers, capture.k], dim=2).norm(dim=-1).median())
    return torch.stack(medians)


@pytest.mark.parametrize("correct", [key_norm_medians, key_norm_medians_quantile, key_norm_medians_list])
def test_key_norm_medians_accepts_solutions(correct, capsys):
    ch07.check_key_norm_medians(correct)
    out = capsys.readouterr().out
    assert "✓" in out and "✗" not in out


@pytest.mark.parametrize(
    ("wrong", "named_mistake"),
    [
        (key_norm_medians_mean, "mean length"),
        (key_norm_medians_squared, "square root"),
        (key_norm_medians_pooled, "one median per layer"),
        (key_norm_medians_wrong_axis, "dim=-2"),
        (key_norm_medians_with_registers, "key_norm_medians is wrong"),
        (lambda captures: key_norm_medians(captures)[:1], "expected \\(3,\\)"),
    ],
)
def test_key_norm_medians_rejects_wrong_answers(wrong, named_mistake):
    with pytest.raises(AssertionError, match=named_mistake):
        ch07.check_key_norm_medians(wrong)


@pytest.mark.parametrize(
    "check", [ch07.check_bits_per_byte, ch07.check_validation_loss, ch07.check_key_norm_medians]
)
def test_checks_fail_on_the_student_stub(check):
    with pytest.raises(NotImplementedError):
        check(stub)
