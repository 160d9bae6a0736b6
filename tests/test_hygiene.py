"""Chapter sources stay clean, reviewable text, and the code stays lint-free.

Chapters are jupytext percent-format .py files: notebooks are built from them, never committed, so
outputs, execution counts and editor state cannot sneak into a diff.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest
from jupytext.formats import guess_format

REPO_ROOT = Path(__file__).resolve().parent.parent
CHAPTERS_DIR = REPO_ROOT / "chapters"
CHAPTERS = sorted(CHAPTERS_DIR.glob("*.py"))
LINTED_FOLDERS = ["rbf_tutorial", "kernels", "tests", "chapters"]

# What a chapter cell may carry: tags (raises-exception, skip-execution, ...), nbgrader's exercise
# metadata and `jupyter` (source_hidden folds a solution), as jupytext.toml's cell_metadata_filter
# keeps them; a percent cell's title; and the layout hints jupytext itself derives while reading.
ALLOWED_CELL_METADATA = {"tags", "nbgrader", "jupyter", "title", "cell_marker", "lines_to_next_cell"}

chapter_params = pytest.mark.parametrize("chapter", CHAPTERS, ids=[chapter.stem for chapter in CHAPTERS])


@chapter_params
def test_chapter_is_percent_format(chapter: Path) -> None:
    format_name, _ = guess_format(chapter.read_text(encoding="utf-8"), ".py")
    assert format_name == "percent", (
        f"{chapter.name} reads as jupytext '{format_name}' format; chapters are percent format: "
        "start every cell with a `# %%` line (`# %% [markdown]` for prose)"
    )


@chapter_params
def test_chapter_carries_no_notebook_state(chapter: Path) -> None:
    text = chapter.read_text(encoding="utf-8")
    notebook = jupytext.reads(text, fmt="py:percent")
    # The YAML header holds the kernelspec (so JupyterLab starts Python 3 without asking) and nothing
    # else: no jupytext versions, widget state or language_info that would churn in every diff.
    # (jupytext itself adds a "jupytext" entry describing the format while reading.)
    stored = set(notebook.metadata) - {"jupytext"}
    assert stored == {"kernelspec"}, (
        f"{chapter.name}: notebook metadata {sorted(stored)}; a chapter's YAML header holds "
        "the kernelspec only (jupytext.toml's notebook_metadata_filter)"
    )
    assert notebook.metadata["kernelspec"].get("name") == "python3", notebook.metadata["kernelspec"]
    for index, cell in enumerate(notebook.cells):
        unexpected = set(cell.metadata) - ALLOWED_CELL_METADATA
        assert not unexpected, (
            f"{chapter.name}, cell {index}: metadata {sorted(unexpected)} does not belong in a chapter "
            f"source (allowed: {sorted(ALLOWED_CELL_METADATA)})"
        )


def _git_ls_files(*options: str) -> list[str] | None:
    """`git ls-files OPTIONS` in the repository, or None outside a git checkout."""
    if shutil.which("git") is None:
        return None
    listing = subprocess.run(["git", "ls-files", *options], cwd=REPO_ROOT, capture_output=True, text=True)
    return listing.stdout.splitlines() if listing.returncode == 0 else None


def test_no_notebooks_are_committed() -> None:
    tracked = _git_ls_files("--cached")
    # Untracked too, but only in chapters/: a virtual environment inside the checkout may hold notebooks.
    untracked_chapters = _git_ls_files("--others", "--exclude-standard", "--", "chapters")
    if tracked is None or untracked_chapters is None:
        candidates = [str(path.relative_to(REPO_ROOT)) for path in CHAPTERS_DIR.glob("*.ipynb")]
    else:
        candidates = tracked + untracked_chapters
    notebooks = sorted(path for path in candidates if path.endswith(".ipynb"))
    assert not notebooks, (
        f"notebooks are build output, not sources: {notebooks}. Edit the chapter's .py instead "
        "(JupyterLab opens it as a notebook) and remove the .ipynb from git"
    )


def test_ruff_is_clean() -> None:
    folders = [folder for folder in LINTED_FOLDERS if (REPO_ROOT / folder).is_dir()]
    lint = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", *folders],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    if lint.returncode != 0:
        report = f"ruff check {' '.join(folders)} found problems:\n{lint.stdout}{lint.stderr}"
        pytest.fail(report, pytrace=False)
