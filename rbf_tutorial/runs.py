"""Run folders: what a training run writes, and reading it back.

A run folder, written by :mod:`rbf_tutorial.train` and read by :mod:`rbf_tutorial.compare` and
:mod:`rbf_tutorial.results`, holds

    config.json      the TrainConfig, as a dict                      (:data:`CONFIG`)
    metrics.jsonl    one JSON object per logged step                 (:data:`METRICS`)
    summary.json     final numbers, device, versions; written at the end or on Ctrl-C (:data:`SUMMARY`)
    checkpoint.pt    the latest checkpoint (torch.save)              (:data:`CHECKPOINT`)
    loss.png         training and validation loss                    (:data:`LOSS_PLOT`)

Every file is replaced atomically (:func:`write_atomically`): written under a temporary name, then
renamed, so a crash or Ctrl-C never leaves half a file for the next reader. Nothing here imports
torch, so reading runs back is quick.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "LOSS_PLOT",
    "METRICS",
    "RUN_FILES",
    "SUMMARY",
    "Run",
    "RunError",
    "append_jsonl",
    "holds_run",
    "load_run",
    "read_json",
    "read_jsonl",
    "run_label",
    "write_atomically",
    "write_json",
    "write_jsonl",
]

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
LOSS_PLOT = "loss.png"
RUN_FILES = (CONFIG, METRICS, SUMMARY, CHECKPOINT, LOSS_PLOT)


class RunError(ValueError):
    """A run that cannot go ahead as asked (its folder, checkpoint or data); the message says what to do."""


# ---------------------------------------------------------------------------------------------------
# writing


def write_atomically(path: str | os.PathLike, content: bytes | str | Callable[[Path], None]) -> None:
    """Put ``content`` at ``path`` all at once: bytes, text (UTF-8), or ``write(temporary_path)``.

    The content goes to a temporary file in the same folder, is flushed to disk, and is then renamed
    over ``path`` (a rename is atomic), so readers see the old file or the new one, never a part.
    The temporary name is unique, so several processes may write the same path at once; the last
    rename wins. Nothing is left behind when writing fails.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if callable(content):
            content(temporary)
        else:
            temporary.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, value: Any, *, indent: int = 2) -> None:
    """``value`` as indented JSON, written atomically."""
    write_atomically(path, json.dumps(value, indent=indent) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line, written atomically (replacing the file)."""
    write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


def append_jsonl(path: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Add one line to a JSON-lines file. One short write: a reader sees the line whole or not at all."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------------
# reading


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; ValueError naming the file when it is missing or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def read_jsonl(path: str | os.PathLike, *, missing_ok: bool = False) -> list[Any]:
    """Every JSON value of a JSON-lines file, blank lines skipped; ``[]`` for a missing file if
    ``missing_ok``. ValueError naming the file and line for anything that is not JSON."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not JSON lines ({error})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from None
    return rows


def holds_run(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds any file of a run (so starting a new run there would replace it)."""
    folder = Path(folder)
    return any((folder / name).exists() for name in RUN_FILES)


# ---------------------------------------------------------------------------------------------------
# naming and loading runs


def run_label(config: Mapping[str, Any] | Any) -> str:
    """The run's variant name, else attention-positional with the extras: ``"rbf-susie-reg2-xsa"``.

    ``config`` is a :class:`rbf_tutorial.train.TrainConfig` or the dict ``config.json`` holds.
    """
    if not isinstance(config, Mapping):
        config = config.to_dict()
    if config.get("variant"):
        return config["variant"]
    model = config.get("model", {})
    label = f"{model.get('attention', '?')}-{model.get('positional', '?')}"
    registers = model.get("registers", 0)
    if registers:
        label += "-reg" if registers == 1 else f"-reg{registers}"
    return label + ("-xsa" if model.get("xsa") else "")


@dataclass
class Run:
    """One run read back: its folder, name, config, metrics rows and summary (empty while unfinished)."""

    path: Path
    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        """The metrics rows that carry a validation loss."""
        return [row for row in self.metrics if row.get("val_loss") is not None]

    @property
    def attention(self) -> str:
        return self.config.get("model", {}).get("attention", "?")

    @property
    def complete(self) -> bool:
        return bool(self.summary.get("complete", False))


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read a run folder; ValueError naming the folder (or the file) when it is not one."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"run_dir: {path} is not a folder")
    missing = [name for name in (CONFIG, METRICS) if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"run_dir: {path} has no {' or '.join(missing)}; is it a folder written by rbf-tutorial train?"
        )
    try:
        config = read_json(path / CONFIG)
        metrics = read_jsonl(path / METRICS)
        summary = read_json(path / SUMMARY) if (path / SUMMARY).is_file() else {}
    except ValueError as error:
        raise ValueError(f"run_dir: {error}") from None
    return Run(path=path, name=summary.get("label") or run_label(config), config=config, metrics=metrics,
               summary=summary)
