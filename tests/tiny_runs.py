"""Finished training runs in seconds, for tests of what reads run folders (compare, results)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from rbf_tutorial.train import make_config, train


def train_tiny_runs(folder: Path, variants: Sequence[str]) -> list[Path]:
    """One 4-step ``smoke`` run per variant on a small text file (a stdlib module), in that order."""
    corpus = folder / "corpus.txt"
    corpus.write_text(Path(argparse.__file__).read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only wait on each other
    try:
        return [
            train(
                make_config("smoke", variant, data=str(corpus), steps=4, batch_size=4, context=32,
                            eval_every=2, eval_batches=1, log_every=1),
                folder / variant,
                progress=False,
            ).out_dir
            for variant in variants
        ]
    finally:
        torch.set_num_threads(threads)
