"""Where the package finds the project's folders (the chapters) on disk."""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_chapters_dir"]


def default_chapters_dir() -> Path | None:
    """The chapters of the checkout this package is installed from, else ./chapters, else None."""
    beside_package = Path(__file__).resolve().parent.parent / "chapters"
    for candidate in (beside_package, Path.cwd() / "chapters"):
        if candidate.is_dir():
            return candidate
    return None
