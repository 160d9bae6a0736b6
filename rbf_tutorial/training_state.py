"""Everything a training run carries from one step to the next, and its checkpoint.

:class:`TrainingState` holds the model, the optimiser, the learning-rate schedule, the step count,
the training time spent so far and the sums of the logging window not yet written out. It saves
itself to ``checkpoint.pt`` and comes back from it exactly: with the random-number generators, so
a resumed run draws the same dropout masks, and with the open window, so the first row after a
resume averages the same steps an unstopped run would have.

:func:`read_checkpoint` turns every way a checkpoint file can be unusable (empty, truncated by a
crash, not a checkpoint at all) into one :class:`CheckpointError` that names the file.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model import GPT
from .runs import RunError, write_atomically

__all__ = ["CheckpointError", "TrainingState", "build_optimizer", "lr_factor", "read_checkpoint"]

ADAM_BETAS = (0.9, 0.95)
# What every checkpoint written by TrainingState.save holds.
_CHECKPOINT_KEYS = frozenset(
    {"step", "model", "optimizer", "scheduler", "rng", "config", "elapsed_s", "pending_loss_sum",
     "pending_count"}
)


class CheckpointError(RunError):
    """A checkpoint file that cannot be resumed from; the message names the file and what to do."""


def lr_factor(config, step: int) -> float:
    """Multiplier of ``config.lr`` for 0-based ``step``: linear warm-up, then cosine down to min_lr."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.min_lr / config.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay only on linear layers' weight matrices (a tied head counts as embedding)."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    linear_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay_ids = linear_ids - embedding_ids
    decayed, undecayed = [], []
    for parameter in model.parameters():  # each shared parameter once
        if parameter.requires_grad:
            (decayed if id(parameter) in decay_ids else undecayed).append(parameter)
    groups = [
        {"params": decayed, "weight_decay": config.weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=ADAM_BETAS, fused=device.type == "cuda")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint in ``path``, on the CPU; CheckpointError naming the file for anything unusable."""
    path = Path(path)
    advice = (
        "it is damaged (an interrupted copy or a full disk?) or not a checkpoint of rbf-tutorial train; "
        "restore it, or start the run afresh with --overwrite instead of --resume"
    )
    if not path.is_file():
        raise CheckpointError(f"resume: no checkpoint at {path} (leave out --resume to start a new run)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, empty file, pickle garbage: all mean the same here
        raise CheckpointError(f"resume: cannot read {path} ({type(error).__name__}): {advice}") from None
    if not isinstance(checkpoint, dict) or not _CHECKPOINT_KEYS <= set(checkpoint):
        raise CheckpointError(f"resume: {path} holds no training checkpoint: {advice}")
    return checkpoint


@dataclass
class TrainingState:
    """The run so far: model and optimiser, ``step`` completed steps, and the open logging window.

    ``pending_loss`` and ``pending_grad_norm`` are sums over the ``pending_count`` steps since the
    last logged row, kept on the device so adding to them never waits for the GPU.
    """

    model: GPT
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int
    pending_loss: torch.Tensor
    pending_grad_norm: torch.Tensor
    pending_count: int = 0
    elapsed_before: float = 0.0  # training seconds of earlier invocations (before a resume)
    clock_start: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, config, device: torch.device) -> TrainingState:
        """Step 0: weights drawn from ``config.seed`` (the same in every process), a fresh optimiser."""
        torch.manual_seed(config.seed)
        model = GPT(config.model).to(device)
        optimizer = build_optimizer(model, config, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))
        zero = torch.zeros((), device=device, dtype=torch.float32)
        return cls(model, optimizer, scheduler, step=0, pending_loss=zero, pending_grad_norm=zero.clone())

    @classmethod
    def resume(cls, config, device: torch.device, checkpoint: dict[str, Any], path: Path) -> TrainingState:
        """The state a checkpoint saved, continuing on ``config``'s schedule (which may have more steps)."""
        state = cls.start(config, device)
        try:
            state.model.load_state_dict(checkpoint["model"])
            state.optimizer.load_state_dict(checkpoint["optimizer"])
            state.scheduler.load_state_dict(checkpoint["scheduler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as error:
            first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            raise CheckpointError(
                f"resume: {path} does not fit this model ({type(error).__name__}: {first_line}); "
                "resume with the run's own settings, or start afresh with --overwrite instead of --resume"
            ) from None
        state.step = int(checkpoint["step"])
        state.elapsed_before = float(checkpoint["elapsed_s"])
        state.pending_loss.fill_(float(checkpoint["pending_loss_sum"]))
        state.pending_grad_norm.fill_(float(checkpoint.get("pending_grad_norm_sum", 0.0)))
        state.pending_count = int(checkpoint["pending_count"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        if checkpoint["config"].get("steps") != config.steps:
            # Training longer (or shorter) than planned: the next step follows the new schedule.
            for group, base_lr in zip(state.optimizer.param_groups, state.scheduler.base_lrs, strict=True):
                group["lr"] = base_lr * lr_factor(config, state.step)
        return state

    def elapsed(self) -> float:
        """Training seconds so far, earlier invocations included."""
        return self.elapsed_before + time.perf_counter() - self.clock_start

    def add_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Count one finished optimiser step into the open window."""
        self.pending_loss += loss.detach().float()
        self.pending_grad_norm += grad_norm.detach().float()
        self.pending_count += 1
        self.step += 1

    def close_window(
        self, sum_over_processes: Callable[[torch.Tensor], torch.Tensor], world_size: int
    ) -> tuple[float, float]:
        """``(train loss, gradient norm)`` averaged over the window's steps (and processes), then reset.

        Reading them waits for the device. The gradient norm is this process's: after DDP's all-reduce
        the gradients, and so their norm, are the same in every process.
        """
        loss_sum = sum_over_processes(self.pending_loss.clone()).item()
        train_loss = loss_sum / world_size / self.pending_count
        grad_norm = self.pending_grad_norm.item() / self.pending_count
        self.pending_loss.zero_()
        self.pending_grad_norm.zero_()
        self.pending_count = 0
        return train_loss, grad_norm

    def save(self, path: Path, config) -> None:
        """Write the checkpoint atomically (a crash never leaves half of one)."""
        device = self.pending_loss.device
        checkpoint = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            "config": config.to_dict(),
            "elapsed_s": self.elapsed(),
            "pending_loss_sum": self.pending_loss.item(),
            "pending_count": self.pending_count,
            "pending_grad_norm_sum": self.pending_grad_norm.item(),
            "torch_version": str(torch.__version__),
        }
        write_atomically(path, lambda temporary: torch.save(checkpoint, temporary))
