"""Train the byte-level GPT of :mod:`rbf_tutorial.model` and record what a comparison of variants needs.

    rbf-tutorial train --preset smoke                           a CPU run of under a minute
    rbf-tutorial train --preset gpu10 --variant rbf-susie-reg   about a minute on one H100
    torchrun --nproc_per_node 4 -m rbf_tutorial.train --preset gpu10 --variant dot-rope
    rbf-tutorial train --out runs/gpu10-dot-rope --resume       continue a stopped run exactly

A run folder holds ``config.json``, ``metrics.jsonl`` (one row per logged step), ``loss.png``,
``checkpoint.pt`` (the latest, written atomically) and ``summary.json``. Ctrl-C saves a checkpoint
before the run stops; ``--resume`` then continues with the very losses an unstopped run would
have seen: batches are a pure function of (seed, step) (:func:`rbf_tutorial.data.batch_at`), and
the checkpoint holds the model, the optimiser, the schedule and the random-number generators.

The recipe, kept plain on purpose: AdamW with betas (0.9, 0.95); weight decay on the matrices of
linear layers only (embeddings, norms, biases, registers and positional scales are not decayed);
linear warm-up then cosine decay to ``min_lr``; gradient-norm clipping; bfloat16 autocast on CUDA
(float32 on the CPU); optional ``torch.compile``. Under ``torchrun`` every process takes its
contiguous share of the same global batch, so N processes follow one process's losses.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data, runs
from .arguments import boolean, non_negative_int, number, positive_float, positive_int
from .model import GPT, MODEL_PRESETS, ModelConfig
from .runs import RunError
from .training_state import CheckpointError, TrainingState, lr_factor, read_checkpoint

__all__ = [
    "TRAIN_PRESETS",
    "VARIANTS",
    "RunError",
    "RunResult",
    "TrainConfig",
    "lr_factor",
    "main",
    "make_config",
    "run_label",
    "train",
]

# Data sources load_corpus knows by name; anything else is a path to a text file.
NAMED_DATA = ("stdlib", "tinystories")


@dataclass
class TrainConfig:
    """Everything that decides a run's numbers. Build one with :func:`make_config`."""

    preset: str
    model: ModelConfig
    steps: int = 200
    batch_size: int = 16  # the global batch, in sequences; split across processes under torchrun
    lr: float = 1e-3
    min_lr: float = 1e-4  # where the cosine ends
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0
    data: str | None = None  # None or "stdlib": the standard library's sources; else see load_corpus
    compile: bool = False
    checkpoint_every: int = 100
    log_every: int = 10
    # Threads for a CPU run (None: torch's default). A tiny model's matmuls are too small to split:
    # on a 2-core machine the smoke preset ran at 25k tokens/s on one thread, 4-8k on two.
    cpu_threads: int | None = None
    variant: str | None = None  # the VARIANTS entry the model settings came from, if any

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.model.context

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        model_values = values.pop("model", None)
        if not isinstance(model_values, dict):
            raise ValueError("config: expected the model's settings under 'model'")
        _reject_unknown("config", values, _train_fields())
        _reject_unknown("config.model", model_values, _model_fields())
        return cls(model=ModelConfig(**model_values), **values)


# Model settings of the attention variants the comparison trains. Each sets every field that
# tells variants apart, so applying one never inherits a register count or XSA from the preset.
_PLAIN = {"registers": 0, "xsa": False, "qk_norm": False, "scale_factor": 1.0}
_DOT = {**_PLAIN, "attention": "dot", "backend": "sdpa"}
_RBF = {**_PLAIN, "attention": "rbf", "backend": "auto"}
VARIANTS: dict[str, dict[str, Any]] = {
    "dot-rope": {**_DOT, "positional": "rope"},
    "dot-learned": {**_DOT, "positional": "learned"},
    # Queries and keys RMS-normalised per head: dot product without magnitude bullying.
    "dot-qknorm-rope": {**_DOT, "positional": "rope", "qk_norm": True},
    "rbf-rope": {**_RBF, "positional": "rope"},
    "rbf-susie": {**_RBF, "positional": "susie"},
    "rbf-susie-reg": {**_RBF, "positional": "susie", "registers": 1},
    "rbf-susie-reg-xsa": {**_RBF, "positional": "susie", "registers": 1, "xsa": True},
    # Half the logit scale: RBF's 2 q.k term then weighs exactly what dot product's q.k does.
    "rbf-susie-reg-halfscale": {**_RBF, "positional": "susie", "registers": 1, "scale_factor": 0.5},
}

TRAIN_PRESETS: dict[str, TrainConfig] = {
    # Under a minute on a laptop CPU, start-up included: for CI and a first look.
    "smoke": TrainConfig(
        preset="smoke",
        model=MODEL_PRESETS["smoke"],
        steps=200,
        batch_size=16,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=20,
        eval_every=50,
        eval_batches=4,
        checkpoint_every=100,
        log_every=10,
        cpu_threads=1,
    ),
    # One variant in about a minute on an H100 (46-71 s measured, kernel autotuning included), so the
    # four-variant comparison of chapter 07 and docs/results/training-gpu10-h100.md takes about five.
    "gpu10": TrainConfig(
        preset="gpu10",
        model=MODEL_PRESETS["gpu10"],
        steps=2000,
        batch_size=32,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=100,
        eval_every=200,
        eval_batches=20,
        checkpoint_every=500,
        log_every=20,
    ),
    # The sizes of the original RBF-attention experiment (d_model 256, 4 layers, 4 heads, context 256).
    "original": TrainConfig(
        preset="original",
        model=MODEL_PRESETS["original"],
        steps=5000,
        batch_size=32,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=200,
        eval_every=250,
        eval_batches=20,
        checkpoint_every=500,
        log_every=25,
    ),
}


def _train_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig))


def _model_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ModelConfig))


def _reject_unknown(where: str, values: dict[str, Any], known: Sequence[str]) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")


def make_config(preset: str, variant: str | None = None, **overrides: Any) -> TrainConfig:
    """The named preset, with a variant's model settings, then ``overrides`` applied, validated.

    An override names a :class:`TrainConfig` field (``steps=50``) or a :class:`ModelConfig`
    field (``attention="dot"``, ``registers=2``); anything else is a ValueError naming it.
    """
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r}; choose from {', '.join(TRAIN_PRESETS)}")
    config = copy.deepcopy(TRAIN_PRESETS[preset])
    if variant is not None:
        if variant not in VARIANTS:
            raise ValueError(f"variant: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        config.model = dataclasses.replace(config.model, **VARIANTS[variant])
        config.variant = variant
    train_changes, model_changes = {}, {}
    for name, value in overrides.items():
        if name == "preset":
            raise ValueError("preset: pass the preset as make_config's first argument, not as an override")
        if name in _train_fields():
            train_changes[name] = value
        elif name in _model_fields():
            model_changes[name] = value
        else:
            raise ValueError(
                f"{name}: unknown option; training options are {', '.join(_train_fields()[2:])}, "
                f"model options are {', '.join(_model_fields())}"
            )
    config = dataclasses.replace(config, **train_changes)
    config.model = dataclasses.replace(config.model, **model_changes)
    if variant is not None and any(config.model.__dict__[k] != v for k, v in VARIANTS[variant].items()):
        # An explicit --attention/--positional/... changed the variant: the name no longer describes it.
        config.variant = None
    validate_config(config)
    return config


def validate_config(config: TrainConfig) -> None:
    """Raise TypeError/ValueError naming the first bad field (model fields via ModelConfig.validate)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig (see make_config), got {type(config).__name__}")
    if not isinstance(config.model, ModelConfig):
        raise TypeError(f"model: expected a ModelConfig, got {type(config.model).__name__}")
    config.model.validate()
    for name in ("steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every", "log_every"):
        positive_int(name, getattr(config, name))
    non_negative_int("warmup_steps", config.warmup_steps)
    non_negative_int("seed", config.seed)
    positive_float("lr", config.lr)
    number("min_lr", config.min_lr, low=0.0, high=config.lr)
    number("weight_decay", config.weight_decay, low=0.0)
    number("grad_clip", config.grad_clip, low=0.0)
    if config.cpu_threads is not None:
        positive_int("cpu_threads", config.cpu_threads)
    boolean("compile", config.compile)
    if config.variant is not None and config.variant not in VARIANTS:
        raise ValueError(f"variant: unknown variant {config.variant!r}; choose from {', '.join(VARIANTS)}")
    if config.data is not None:
        if not isinstance(config.data, str):
            raise TypeError(f"data: expected a path or one of {NAMED_DATA}, got {type(config.data).__name__}")
        if config.data not in NAMED_DATA and not Path(config.data).is_file():
            raise ValueError(f"data: no such file {config.data!r} (or name one of {', '.join(NAMED_DATA)})")


def run_label(config: TrainConfig) -> str:
    """The variant's name, else attention-positional with the extras: "rbf-susie-reg2-xsa"."""
    return runs.run_label(config)


def default_out_dir(config: TrainConfig) -> Path:
    return Path("runs") / f"{config.preset}-{run_label(config)}"


# ---------------------------------------------------------------------------------------------------
# processes, devices, evaluation


@dataclass(frozen=True)
class Processes:
    """This process's place among the torchrun workers (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> Processes:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes, in place (itself when running alone)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor


def _device(processes: Processes) -> torch.device:
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for the few float32 matmuls left under autocast
        return torch.device("cuda", processes.local_rank)
    return torch.device("cpu")


def _device_description(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"CPU ({platform.machine()}, {threads} thread{'' if threads == 1 else 's'})"
    return name if world_size == 1 else f"{world_size} x {name}"


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: GPT,
    corpus: data.ByteCorpus,
    config: TrainConfig,
    device: torch.device,
    processes: Processes = Processes(),
) -> float:
    """Mean validation loss (nats per byte) over the fixed windows; processes split the batches."""
    autocast = _autocast(device)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss summed over tokens, token count
    windows = data.eval_windows(
        corpus.val,
        batch_size=config.batch_size,
        context=config.model.context,
        max_batches=config.eval_batches,
        device=device,
    )
    for index, (inputs, targets) in enumerate(windows):
        if index % processes.world_size != processes.rank:
            continue
        with autocast:
            _, loss = model(inputs, targets)
        counted = (targets != -100).sum()
        totals[0] += loss.double() * counted
        totals[1] += counted
    processes.sum(totals)
    model.train(was_training)
    if totals[1] == 0:
        raise ValueError("data: the validation split is too short for one window of the model's context")
    return (totals[0] / totals[1]).item()


def plot_losses(metrics: Sequence[dict[str, Any]], title: str):
    """Training and validation loss against step, as a matplotlib Figure (not tied to pyplot)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.0), layout="constrained")
    axes = figure.subplots()
    steps = [row["step"] for row in metrics]
    axes.plot(steps, [row["train_loss"] for row in metrics], color="#8c8c8c", label="train")
    evaluated = [row for row in metrics if row.get("val_loss") is not None]
    axes.plot(
        [row["step"] for row in evaluated],
        [row["val_loss"] for row in evaluated],
        "o-",
        color="#2a7f9e",
        label="validation",
    )
    axes.set(xlabel="step", ylabel="loss (nats per byte)", title=title)
    axes.grid(alpha=0.3)
    axes.legend(frameon=False)
    return figure


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C while the optimiser updates the weights, so a checkpoint never holds half a step.

    Only the main thread can handle signals; elsewhere (or with no Python handler) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):
        yield
        return
    arrived: list[tuple[int, Any]] = []
    signal.signal(signal.SIGINT, lambda signum, frame: arrived.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if arrived:
            previous(*arrived[0])


def training_step(
    state: TrainingState, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
    autocast: contextlib.AbstractContextManager, max_norm: float, multithreaded_backward: bool,
) -> float:
    """One optimiser step of :func:`train` on one batch; returns the learning rate it used.

    ``model`` is ``state.model`` or its compiled (or DDP) wrapper. Forward under ``autocast``,
    backward (on autograd's worker thread only if ``multithreaded_backward``), the gradient norm
    clipped to ``max_norm``, then AdamW and the schedule, with Ctrl-C held back while the weights
    change. docs/results/training_step_profile.py times this same step.
    """
    with autocast:
        _, loss = model(inputs, targets)
    with torch.autograd.set_multithreading_enabled(multithreaded_backward):
        loss.backward()
    # The global gradient norm before clipping, averaged over the logging window.
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), max_norm)
    used_lr = state.optimizer.param_groups[0]["lr"]
    with _interrupts_deferred():
        state.optimizer.step()
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.add_step(loss, grad_norm)
    return used_lr


# ---------------------------------------------------------------------------------------------------
# before the run: every check, nothing written


# Fields that may change between a run and its resumption: they do not change what is computed.
# `steps` may grow to train longer; the cosine schedule is then stretched from the resumed step on.
RESUMABLE_CHANGES = ("steps", "compile", "eval_every", "checkpoint_every", "log_every", "cpu_threads")


def _config_differences(saved: TrainConfig, given: TrainConfig) -> list[str]:
    differences = []
    for name in _train_fields():
        if name in ("model", *RESUMABLE_CHANGES):
            continue
        if getattr(saved, name) != getattr(given, name):
            differences.append(f"{name} {getattr(saved, name)!r} -> {getattr(given, name)!r}")
    for name in _model_fields():
        if getattr(saved.model, name) != getattr(given.model, name):
            before, after = getattr(saved.model, name), getattr(given.model, name)
            differences.append(f"model.{name} {before!r} -> {after!r}")
    return differences


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run folder's metrics.jsonl ([] when there is none yet)."""
    return runs.read_jsonl(Path(out_dir) / runs.METRICS, missing_ok=True)


def _saved_config(checkpoint: dict[str, Any], path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(checkpoint["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"resume: {path} holds settings this version cannot read ({error})") from None


def _describe_existing_run(out_dir: Path) -> str:
    try:
        summary = runs.read_json(out_dir / runs.SUMMARY)
        return f" ({'finished' if summary.get('complete') else 'stopped'} after {summary.get('steps')} steps)"
    except (ValueError, AttributeError):
        return ""


def _load_corpus(config: TrainConfig) -> data.ByteCorpus:
    try:
        corpus = data.load_corpus(config.data)
    except (RuntimeError, ValueError) as error:
        raise RunError(str(error)) from None
    needed = config.model.context + 1
    for split in ("train", "val"):
        if getattr(corpus, split).numel() < needed:
            raise RunError(
                f"data (--data): the {split} split of {config.data or 'stdlib'} holds "
                f"{getattr(corpus, split).numel()} bytes, fewer than one window of the model's context "
                f"({needed}); use a longer text"
            )
    return corpus


def _make_writable(out_dir: Path, rank: int) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-probe-{rank}-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise RunError(f"out: cannot write to {out_dir} ({error.strerror or error})") from None


@dataclass
class _Run:
    """A run that passed every check: its state, data and rows so far. Nothing has been written yet."""

    config: TrainConfig
    out_dir: Path
    processes: Processes
    device: torch.device
    corpus: data.ByteCorpus
    state: TrainingState
    metrics: list[dict[str, Any]]
    resumed: bool

    @property
    def label(self) -> str:
        return f"{self.config.preset} {run_label(self.config)}"


def _prepare(
    config: TrainConfig, out_dir: Path, processes: Processes, *, resume: bool, overwrite: bool
) -> _Run:
    """Check the folder, the checkpoint and the data, and build the state; RunError says what is wrong."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"out: {out_dir} is a file, not a run folder")
    checkpoint = None
    if resume:
        path = out_dir / runs.CHECKPOINT
        checkpoint = read_checkpoint(path)
        differences = _config_differences(_saved_config(checkpoint, path), config)
        if differences:
            raise RunError(
                f"resume: {out_dir} was trained with other settings ({'; '.join(differences)}); "
                "pass the same options, or a new --out to start a new run"
            )
    elif runs.holds_run(out_dir) and not overwrite:
        raise RunError(
            f"out: {out_dir} already holds a run{_describe_existing_run(out_dir)}; continue it with "
            "--resume, replace it with --overwrite, or choose another --out"
        )
    corpus = _load_corpus(config)
    device = _device(processes)
    if checkpoint is None:
        state = TrainingState.start(config, device)
        metrics = []
    else:
        state = TrainingState.resume(config, device, checkpoint, out_dir / runs.CHECKPOINT)
        metrics = [row for row in read_metrics(out_dir) if row["step"] <= state.step]
    _make_writable(out_dir, processes.rank)
    return _Run(config, out_dir, processes, device, corpus, state, metrics, resumed=checkpoint is not None)


# ---------------------------------------------------------------------------------------------------
# the run


@dataclass
class RunResult:
    """What :func:`train` hands back: the trained model (on its device), the logged rows, the folder."""

    model: GPT
    metrics: list[dict[str, Any]]
    out_dir: Path
    config: TrainConfig
    summary: dict[str, Any] = field(default_factory=dict)


class _Progress:
    """The progress bar of the main process, and the lines it prints between updates."""

    def __init__(self, run: _Run, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.is_main = run.processes.is_main
        self.shown = enabled and self.is_main
        self.bar = tqdm(total=run.config.steps, initial=run.state.step, desc=run.label, unit="step",
                        disable=not self.shown, dynamic_ncols=True)  # fmt: skip

    def say(self, message: str) -> None:
        if self.is_main:
            (self.bar.write if self.shown else print)(message)


def _metrics_row(run: _Run, used_lr: float, window: tuple[float, int], evaluate_now: bool) -> dict[str, Any]:
    """The logged row after the current step; ``window`` is (when it opened, the step count then)."""
    config, state = run.config, run.state
    steps_in_window = state.step - window[1]
    train_loss, grad_norm = state.close_window(run.processes.sum, run.processes.world_size)
    seconds = time.perf_counter() - window[0]  # close_window waited for the device
    row: dict[str, Any] = {
        "step": state.step,
        "train_loss": train_loss,
        "val_loss": None,
        "val_bpb": None,
        "lr": used_lr,
        "tokens": state.step * config.tokens_per_step,
        "elapsed_s": None,
        "tokens_per_s": steps_in_window * config.tokens_per_step / seconds,
        "grad_norm": grad_norm,
    }
    if evaluate_now:
        row["val_loss"] = evaluate(state.model, run.corpus, config, run.device, run.processes)
        row["val_bpb"] = row["val_loss"] / math.log(2)  # one token is one byte
    row["elapsed_s"] = state.elapsed()
    return row


def _summary(run: _Run, *, complete: bool, wall_time_s: float) -> dict[str, Any]:
    config, metrics = run.config, run.metrics
    speeds = [row["tokens_per_s"] for row in metrics if row.get("tokens_per_s")]
    # The first window pays for compilation and warm-up; leave it out when there are others.
    speeds = speeds[1:] if len(speeds) > 2 else speeds
    evaluated = [row for row in metrics if row.get("val_loss") is not None]
    last = evaluated[-1] if evaluated else {}
    return {
        "label": run_label(config),
        "preset": config.preset,
        "variant": config.variant,
        "complete": complete,
        "steps": run.state.step,
        "tokens": run.state.step * config.tokens_per_step,
        "parameters": run.state.model.num_parameters(),
        "final_train_loss": metrics[-1]["train_loss"] if metrics else None,
        "final_val_loss": last.get("val_loss"),
        "final_val_bpb": last.get("val_bpb"),
        "final_val_step": last.get("step"),
        "tokens_per_s_median": statistics.median(speeds) if speeds else None,
        "elapsed_s": round(run.state.elapsed(), 2),
        "wall_time_s": round(wall_time_s, 2),
        "device": _device_description(run.device, run.processes.world_size),
        "world_size": run.processes.world_size,
        "compile": config.compile,
        "data": run.corpus.source,
        "torch": str(torch.__version__),
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_summary(run: _Run, summary: dict[str, Any]) -> None:
    if run.processes.is_main:
        runs.write_json(run.out_dir / runs.SUMMARY, summary)
        if run.metrics:
            figure = plot_losses(run.metrics, f"{run.label}: loss")
            runs.write_atomically(run.out_dir / runs.LOSS_PLOT, lambda path: figure.savefig(path, dpi=120,
                                                                                           format="png"))


def _finished_result(run: _Run) -> RunResult | None:
    """A resumed run with nothing left to do, as it stands (nothing rewritten); None otherwise."""
    summary_path = run.out_dir / runs.SUMMARY
    if not run.resumed or run.state.step < run.config.steps or not summary_path.is_file():
        return None
    summary = runs.read_json(summary_path)
    if run.processes.is_main:
        print(f"{run.label}: {run.out_dir} already finished ({run.state.step} steps); nothing changed "
              f"(a larger --steps trains on, --overwrite starts again)")  # fmt: skip
    return RunResult(run.state.model, run.metrics, run.out_dir, run.config, summary)


@contextlib.contextmanager
def _process_group(processes: Processes, config: TrainConfig) -> Iterator[None]:
    """Join torchrun's process group (unless the caller did) and set CPU threads, for the run's length."""
    joined_here = processes.world_size > 1 and not torch.distributed.is_initialized()
    if joined_here:
        if torch.cuda.is_available():
            torch.cuda.set_device(processes.local_rank)
        torch.distributed.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    threads = torch.get_num_threads()
    if config.cpu_threads is not None and not torch.cuda.is_available():
        torch.set_num_threads(config.cpu_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if joined_here:
            torch.distributed.destroy_process_group()


def train(
    config: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    after_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Train ``config`` into ``out_dir`` (default ``runs/<preset>-<label>``); see the module docstring.

    ``resume=True`` continues from ``out_dir/checkpoint.pt``; a run that already finished is returned
    as it is, nothing rewritten. A folder that holds a run is refused unless ``resume`` or
    ``overwrite`` says what to do with it. ``after_step(step)`` is called after every completed step
    (``step`` counts from 1); raising KeyboardInterrupt there behaves like Ctrl-C: a checkpoint is
    saved and the KeyboardInterrupt goes on to the caller. Under torchrun (WORLD_SIZE > 1 in the
    environment) it joins the process group itself.

    Raises :class:`rbf_tutorial.runs.RunError` (a ValueError) before anything is written when the
    folder, the checkpoint or the data cannot be used; the message says what to do.
    """
    validate_config(config)
    boolean("resume", resume)
    boolean("overwrite", overwrite)
    if resume and overwrite:
        raise ValueError("overwrite: resume=True continues the run in out_dir; overwrite=True replaces it")
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(config)
    processes = Processes.from_environment()
    if config.batch_size % processes.world_size:
        raise ValueError(
            f"batch_size: {config.batch_size} sequences do not split evenly over "
            f"{processes.world_size} processes"
        )
    with _process_group(processes, config):
        invocation_start = time.perf_counter()
        run = _prepare(config, out_dir, processes, resume=resume, overwrite=overwrite)
        if processes.world_size > 1:
            torch.distributed.barrier()  # every process passed its checks before any file changes
        finished = _finished_result(run)
        if finished is not None:
            return finished
        return _train(run, invocation_start, progress=progress, after_step=after_step)


def _train(
    run: _Run, invocation_start: float, *, progress: bool, after_step: Callable[[int], None] | None
) -> RunResult:
    config, state, processes, out_dir = run.config, run.state, run.processes, run.out_dir
    if processes.is_main:
        if not run.resumed:
            for stale in runs.RUN_FILES:
                (out_dir / stale).unlink(missing_ok=True)
        runs.write_json(out_dir / runs.CONFIG, config.to_dict())
        runs.write_jsonl(out_dir / runs.METRICS, run.metrics)
    model: nn.Module = state.model
    if processes.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [run.device.index] if run.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    if config.compile:
        # Wrapped first, compiled second: the compiler then splits graphs at DDP's gradient buckets,
        # so communication still overlaps the backward pass.
        model = torch.compile(model)
    shown = _Progress(run, progress)
    shown.say(
        f"{run.label}: {state.model.num_parameters() / 1e6:.2f} M parameters, {run.corpus.source}, "
        f"{_device_description(run.device, processes.world_size)}"
        + (f"; resuming after step {state.step}" if run.resumed else "")
    )
    autocast = _autocast(run.device)
    # Autograd runs CUDA backward nodes on a worker thread. The Triton kernel's backward is Python
    # (its launches), and handing it the interpreter there cost 0.26 ms per attention call on an
    # H100 (host time per forward + backward at N = 1024: 0.61 ms, against 0.35 ms on the calling
    # thread). One process runs backward on its own thread; DDP keeps autograd's default threading,
    # around which its gradient hooks were built.
    multithreaded_backward = processes.world_size > 1
    max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
    window = (time.perf_counter(), state.step)  # when the logging window opened, and at which step
    model.train()
    try:
        for step in range(state.step, config.steps):
            inputs, targets = data.batch_at(
                run.corpus.train, step=step, batch_size=config.batch_size, context=config.model.context,
                seed=config.seed, rank=processes.rank, world_size=processes.world_size, device=run.device,
            )  # fmt: skip
            used_lr = training_step(state, model, inputs, targets, autocast=autocast, max_norm=max_norm,
                                    multithreaded_backward=multithreaded_backward)
            last = state.step == config.steps
            evaluate_now = state.step % config.eval_every == 0 or last
            if state.step % config.log_every == 0 or evaluate_now:
                row = _metrics_row(run, used_lr, window, evaluate_now)
                run.metrics.append(row)
                if processes.is_main:
                    runs.append_jsonl(out_dir / runs.METRICS, row)
                shown.bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}",
                                      refresh=False)  # fmt: skip
                if evaluate_now:
                    shown.say(
                        f"step {state.step}/{config.steps}: train {row['train_loss']:.4f}, val "
                        f"{row['val_loss']:.4f} nats ({row['val_bpb']:.4f} bits per byte), "
                        f"{row['tokens_per_s']:,.0f} tokens/s"
                    )
                window = (time.perf_counter(), state.step)
            if processes.is_main and (state.step % config.checkpoint_every == 0 or last):
                state.save(out_dir / runs.CHECKPOINT, config)
            shown.bar.update(1)
            if after_step is not None:
                after_step(state.step)
    except KeyboardInterrupt:
        if processes.is_main:
            state.save(out_dir / runs.CHECKPOINT, config)
        _write_summary(run, _summary(run, complete=False, wall_time_s=time.perf_counter() - invocation_start))
        shown.bar.close()
        shown.say(f"interrupted after step {state.step}; checkpoint saved in {out_dir}; --resume continues")
        raise
    shown.bar.close()
    summary = _summary(run, complete=True, wall_time_s=time.perf_counter() - invocation_start)
    _write_summary(run, summary)
    if summary["final_val_loss"] is not None:
        shown.say(
            f"{run.label}: final val loss {summary['final_val_loss']:.4f} nats "
            f"({summary['final_val_bpb']:.4f} bits per byte), median "
            f"{summary['tokens_per_s_median'] or 0:,.0f} tokens/s, {summary['elapsed_s']:.1f} s; "
            f"wrote {out_dir}"
        )
    return RunResult(model=state.model, metrics=run.metrics, out_dir=out_dir, config=config, summary=summary)


# ---------------------------------------------------------------------------------------------------
# command line


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m rbf_tutorial.train",
        allow_abbrev=False,
        description=(
            "Train a byte-level GPT with dot-product or RBF attention. Writes config.json, metrics.jsonl, "
            "loss.png, checkpoint.pt and summary.json to --out. Ctrl-C saves a checkpoint; --resume "
            "continues from it. Under `torchrun --nproc_per_node N -m rbf_tutorial.train ...` the "
            "global batch is split over N processes."
        ),
    )
    parser.add_argument(
        "--preset",
        choices=tuple(TRAIN_PRESETS),
        default=None,
        help="sizes and schedule (required, except with --resume, which reads the run's own)",
    )
    parser.add_argument(
        "--variant",
        choices=tuple(VARIANTS),
        default=None,
        help="named attention variant; the options below override its settings",
    )
    parser.add_argument(
        "--attention", choices=("dot", "rbf"), default=None, help="score keys by q.k or by -|q-k|^2"
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="attention backend (rbf: any rbf_attention backend; dot: sdpa, matmul, auto)",
    )
    parser.add_argument(
        "--positional",
        choices=("rope", "susie", "learned", "none"),
        default=None,
        help="how position enters the model",
    )
    parser.add_argument("--registers", type=int, default=None, help="register tokens per head and layer")
    parser.add_argument(
        "--xsa",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="exclusive self attention on every attention output",
    )
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch, in sequences")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--eval-every", type=int, default=None, help="validate every N steps")
    parser.add_argument("--log-every", type=int, default=None, help="log a metrics row every N steps")
    parser.add_argument(
        "--data",
        default=None,
        help="text file to train on, or 'stdlib' (default: this Python's standard library)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for weights and batches")
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/<preset>-<variant>)")
    parser.add_argument("--resume", action="store_true", help="continue from --out's checkpoint.pt")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the run already in --out (default: refuse)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar; a line per evaluation")
    return parser


_OPTION_FIELDS = {
    "attention": "attention",
    "backend": "backend",
    "positional": "positional",
    "registers": "registers",
    "xsa": "xsa",
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "eval_every": "eval_every",
    "log_every": "log_every",
    "data": "data",
    "seed": "seed",
    "compile": "compile",
}


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """The run's config and folder from parsed options; with --resume and no --preset, the saved config."""
    overrides = {
        field_name: getattr(args, option)
        for option, field_name in _OPTION_FIELDS.items()
        if getattr(args, option) is not None
    }
    if args.preset is not None:
        config = make_config(args.preset, args.variant, **overrides)
        return config, args.out if args.out is not None else default_out_dir(config)
    if not args.resume:
        raise ValueError(f"--preset: choose one of {', '.join(TRAIN_PRESETS)} (or --resume with --out)")
    if args.out is None:
        raise ValueError("--out: --resume without --preset needs the run folder")
    path = args.out / runs.CHECKPOINT
    saved = _saved_config(read_checkpoint(path), path)
    if args.variant is not None:
        saved.model = dataclasses.replace(saved.model, **VARIANTS[args.variant])
        saved.variant = args.variant
    model_changes = {k: v for k, v in overrides.items() if k in _model_fields()}
    train_changes = {k: v for k, v in overrides.items() if k not in model_changes}
    model = dataclasses.replace(saved.model, **model_changes)
    config = dataclasses.replace(saved, model=model, **train_changes)
    validate_config(config)
    return config, args.out


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Train from the command line; returns the exit status (130 after Ctrl-C, checkpoint saved).

    Options that cannot work, and folders, checkpoints or data that cannot be used, end it with one
    line saying what to do and exit status 2, before anything is written.
    """
    parser = build_parser(prog)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.resume and args.overwrite:
        parser.error("--overwrite: --resume continues the run in --out, --overwrite replaces it; pick one")
    try:
        config, out_dir = config_from_args(args)
    except RunError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    try:
        train(config, out_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    except RunError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
