"""Checks for chapter 07: scoring a language model (validation loss on fixed windows, bits per
byte) and reading a trained model's keys (median key norm per layer)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .. import data
from ..model import GPT, AttentionCapture, ModelConfig
from .tally import Tally

__all__ = ["check_bits_per_byte", "check_key_norm_medians", "check_validation_loss"]


def _as_float_tensor(value: object, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            shape = tuple(value.shape)
            raise AssertionError(f"{name} returned a tensor of shape {shape}; expected one number.")
        return value.detach().double().reshape(())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise AssertionError(f"{name} returned {type(value).__name__}; expected a number (float).")


def _first_match(
    actual: torch.Tensor, expected: torch.Tensor, near_misses: dict[str, torch.Tensor], *, rtol: float = 1e-6
) -> str:
    """The first mistake whose result ``actual`` equals, skipping those that happen to equal the answer."""
    for mistake, value in near_misses.items():
        value = value.double()
        if value.shape != actual.shape or torch.allclose(value, expected.double(), atol=0, rtol=rtol):
            continue
        if torch.allclose(actual.double(), value, atol=0, rtol=rtol):
            return f"Your result equals {mistake}."
    return ""


# ------------------------------------------------------------------------------------------------
# Exercise 1: bits per byte from a loss in nats per token


def check_bits_per_byte(bits_per_byte: Callable[[float, int, int], float]) -> None:
    """``bits_per_byte(loss_nats, n_tokens, n_bytes)``: a mean loss of ``loss_nats`` nats per token
    over ``n_tokens`` tokens that spell ``n_bytes`` bytes of text is ``loss_nats * n_tokens / (n_bytes
    * ln 2)`` bits per byte. Checked on random losses and token/byte counts, byte-level (one token per
    byte) and tokenised (several bytes per token)."""
    generator = torch.Generator().manual_seed(7)
    tally = Tally()
    cases = [(math.log(256), 1000, 1000)]  # a uniform guess over bytes: exactly 8 bits per byte
    for tokenised in (False, False, True, True, True, True):
        loss = 0.2 + 5 * torch.rand((), generator=generator, dtype=torch.float64).item()
        n_tokens = int(torch.randint(10, 100_000, (), generator=generator))
        bytes_per_token = 1 + 4 * torch.rand((), generator=generator).item() if tokenised else 1.0
        cases.append((loss, n_tokens, round(n_tokens * bytes_per_token)))
    for loss, n_tokens, n_bytes in cases:
        actual = _as_float_tensor(bits_per_byte(loss, n_tokens, n_bytes), "bits_per_byte")
        expected = torch.tensor(loss * n_tokens / (n_bytes * math.log(2)), dtype=torch.float64)
        # rtol 1e-6: a float32 answer is a right answer.
        if not tally.close(actual, expected, atol=1e-9, rtol=1e-6):
            ratio = n_tokens / n_bytes
            near_misses = {
                "loss * ln 2: to turn nats into bits divide by ln 2 (one bit is ln 2 nats)": (
                    loss * ratio * math.log(2)
                ),
                "the loss in bits per token: multiply by n_tokens / n_bytes to count per byte": (
                    loss / math.log(2)
                ),
                "the loss times n_bytes / n_tokens: a byte carries less loss than a token, "
                "so multiply by n_tokens / n_bytes": loss / ratio / math.log(2),
                "a conversion by ln 10 (or log10): bits are base 2": loss * ratio / math.log(10),
            }
            hint = _first_match(actual, expected, {k: torch.tensor(v) for k, v in near_misses.items()})
            raise AssertionError(
                f"bits_per_byte({loss}, {n_tokens}, {n_bytes}) is wrong. "
                + (hint or "Expected loss_nats * n_tokens / (n_bytes * math.log(2)).")
            )
    tally.passed("bits_per_byte is right; ln 256 nats per byte is 8 bits per byte, a uniform guess")


# ------------------------------------------------------------------------------------------------
# Exercise 2: median key norm per layer


def _random_captures(generator: torch.Generator, n_layers: int, shape: tuple[int, int, int, int]):
    """Captures whose keys have heavy-tailed lengths (a mean sits far from the median) and a
    different typical length per layer (so pooling the layers is caught)."""
    captures = []
    for layer in range(n_layers):
        directions = torch.randn(shape, generator=generator)
        lengths = torch.exp(1.5 * torch.randn(*shape[:-1], 1, generator=generator)) * (layer + 1) ** 2
        k = directions * lengths
        other = torch.randn(shape, generator=generator)
        captures.append(
            AttentionCapture(
                q=other, k=k, v=other, y=other, z=other,
                # Registers sit beside the keys, with lengths of their own: they are not keys of tokens.
                register_k=100 * torch.randn(shape[1], 1, shape[3], generator=generator),
                register_v=torch.randn(shape[1], 1, shape[3], generator=generator),
            )
        )  # fmt: skip
    return captures


def check_key_norm_medians(key_norm_medians: Callable[[Sequence[AttentionCapture]], torch.Tensor]) -> None:
    """``key_norm_medians(captures)`` returns a ``(n_layers,)`` tensor: for each layer's capture, the
    median over batch, heads and positions of the key lengths ``|k|`` (``capture.k`` is ``(B, H, T,
    head_dim)``; registers are not keys of tokens and stay out). Counts are odd here, so the median
    is one of the lengths whichever definition you use."""
    generator = torch.Generator().manual_seed(7)
    tally = Tally()
    for n_layers, shape in [(1, (1, 1, 5, 4)), (3, (3, 1, 7, 8)), (4, (1, 3, 33, 16))]:
        captures = _random_captures(generator, n_layers, shape)
        result = key_norm_medians(captures)
        name = f"{n_layers} layers, k {shape}"
        actual = torch.as_tensor(result).double() if not isinstance(result, torch.Tensor) else result.double()
        if actual.shape != (n_layers,):
            raise AssertionError(
                f"key_norm_medians for {name} returned shape {tuple(actual.shape)}; expected ({n_layers},): "
                "one median per layer, over batch, heads and positions together."
            )
        norms = [c.k.double().norm(dim=-1).flatten() for c in captures]
        expected = torch.stack([n.median() for n in norms])
        if not tally.close(actual, expected, atol=1e-5, rtol=1e-5):
            pooled = torch.cat(norms).median()
            hint = _first_match(
                actual,
                expected,
                {
                    "the mean length: long keys pull a mean up; use the median": torch.stack(
                        [n.mean() for n in norms]
                    ),
                    "the median of |k|²: take the square root (torch.linalg.vector_norm)": torch.stack(
                        [n.square().median() for n in norms]
                    ),
                    "the median of all layers' norms together: one median per layer": pooled.expand(n_layers),
                    "norms over positions (dim=-2): a key's length is over its head dim (dim=-1)": (
                        torch.stack([c.k.double().norm(dim=-2).flatten().median() for c in captures])
                    ),
                },
                rtol=1e-5,
            )
            raise AssertionError(
                f"key_norm_medians is wrong for {name}. "
                + (hint or "Expected torch.stack([c.k.norm(dim=-1).flatten().median() for c in captures]).")
            )
    tally.passed("key_norm_medians gives one median key length per layer")


# ------------------------------------------------------------------------------------------------
# Exercise 3: validation loss on fixed windows


def _loss_model(seed: int) -> GPT:
    """A tiny GPT with dropout on, and embeddings scaled up so windows differ clearly in loss
    (an untrained model at the usual scale predicts a near-uniform byte everywhere)."""
    config = ModelConfig(context=16, d_model=32, n_layers=1, n_heads=2, dropout=0.3, attention="dot",
                         backend="matmul", positional="rope")  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # leave the learner's random stream where it was
        torch.manual_seed(seed)
        model = GPT(config)
    with torch.no_grad():
        model.token_embedding.weight.mul_(60.0)
    return model


def _reference_validation_loss(model: GPT, tokens: torch.Tensor, **windows) -> float:
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for inputs, targets in data.eval_windows(tokens, **windows):
            logits, _ = model(inputs)
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), targets.flatten(),
                                                       reduction="none")  # fmt: skip
            total += losses.sum().item()
            count += losses.numel()
    return total / count


def _batch_means(model: GPT, tokens: torch.Tensor, **windows) -> float:
    model.eval()
    with torch.no_grad():
        means = [model(inputs, targets)[1].item() for inputs, targets in data.eval_windows(tokens, **windows)]
    return sum(means) / len(means)


def check_validation_loss(validation_loss: Callable[..., float]) -> None:
    """``validation_loss(model, tokens, *, batch_size, context, max_batches)``: the mean loss in nats
    per token over :func:`rbf_tutorial.data.eval_windows` of ``tokens``, every token counted once (a
    smaller last batch weighs less), with dropout off (``model.eval()``), and the model handed back
    in the mode it came in. Checked on a tiny model with dropout and random bytes."""
    generator = torch.Generator().manual_seed(7)
    tally = Tally()
    cases = [
        # 10 possible windows, batches of 4: 4 + 4 + 2, so a plain mean of batch means is off.
        dict(length=16 + 1 + 9, batch_size=4, context=16, max_batches=5),
        # Many more windows than 3 batches of 5: only the first max_batches batches count.
        dict(length=2000, batch_size=5, context=16, max_batches=3),
        # A context shorter than the model's.
        dict(length=300, batch_size=3, context=9, max_batches=4),
    ]
    for index, case in enumerate(cases):
        model = _loss_model(seed=index)
        tokens = torch.randint(0, 256, (case.pop("length"),), generator=generator, dtype=torch.uint8)
        seen_training: list[bool] = []
        hook = model.register_forward_pre_hook(
            lambda module, args, seen=seen_training: seen.append(module.training)
        )
        model.train()
        try:
            result = validation_loss(model, tokens, **case)
        finally:
            hook.remove()
        name = f"{tokens.numel()} tokens, " + ", ".join(f"{k}={v}" for k, v in case.items())
        actual = _as_float_tensor(result, "validation_loss")
        if any(seen_training):
            raise AssertionError(
                f"validation_loss ({name}) ran the model in training mode, with dropout on: call "
                "model.eval() first (and model.train(was_training) at the end)."
            )
        if not seen_training:
            raise AssertionError(f"validation_loss ({name}) never called the model.")
        if not model.training:
            raise AssertionError(
                f"validation_loss ({name}) left a model that came in training mode in eval mode: remember "
                "was_training = model.training, and call model.train(was_training) before returning."
            )
        expected = torch.tensor(_reference_validation_loss(model, tokens, **case), dtype=torch.float64)
        if not tally.close(actual, expected, atol=1e-5, rtol=1e-5):
            hint = _first_match(
                actual,
                expected,
                {
                    "the plain mean of the batch losses: weigh each batch by its number of tokens": (
                        torch.tensor(_batch_means(model, tokens, **case))
                    ),
                    "the loss in bits: the table reports nats here; keep the loss as the model returns it": (
                        expected / math.log(2)
                    ),
                    "the loss over every window: stop after max_batches batches": torch.tensor(
                        _reference_validation_loss(model, tokens, **{**case, "max_batches": 10**6})
                    ),
                },
                rtol=1e-5,
            )
            raise AssertionError(
                f"validation_loss is wrong for {name}. "
                + (hint or "Expected the token-weighted mean of the loss over data.eval_windows(...).")
            )
    tally.passed("validation_loss weighs every token once, with dropout off, and leaves the model as it came")
