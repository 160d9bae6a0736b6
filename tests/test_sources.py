"""Every chapter ends by naming its sources: a `## Sources and further reading` cell of cited bullets.

A tutorial that teaches people to trust measurements has to say where its ideas come from. The last
markdown cell of each chapter starts with exactly that heading and lists markdown bullets; each
bullet names a source by an arXiv id (``arXiv:2205.14135``) or an https URL.
"""

from __future__ import annotations

import re
from pathlib import Path

import jupytext
import pytest

CHAPTERS = sorted((Path(__file__).resolve().parent.parent / "chapters").glob("[0-9][0-9]*_*.py"))
HEADING = "## Sources and further reading"
CITATION = re.compile(r"arXiv:\d{4}\.\d{4,5}|https://\S+")


def last_markdown_cell(chapter: Path) -> str:
    notebook = jupytext.read(chapter, fmt="py:percent")
    markdown = [cell.source for cell in notebook.cells if cell.cell_type == "markdown"]
    assert markdown, f"{chapter.name} has no markdown cells"
    return markdown[-1]


def bullets(cell: str) -> list[str]:
    """The cell's markdown bullets, each with its continuation lines joined."""
    items: list[str] = []
    for line in cell.splitlines()[1:]:
        if line.startswith(("- ", "* ")):
            items.append(line[2:])
        elif items and line.startswith("  ") and line.strip():
            items[-1] += " " + line.strip()
    return items


def test_there_are_chapters():
    assert len(CHAPTERS) >= 8


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_the_last_markdown_cell_is_the_sources(chapter: Path):
    cell = last_markdown_cell(chapter)
    assert cell.splitlines()[0].strip() == HEADING, (
        f"{chapter.name}: the last markdown cell must start with '{HEADING}', got "
        f"{cell.splitlines()[0][:80]!r}"
    )


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_every_source_bullet_cites_an_arxiv_id_or_a_url(chapter: Path):
    cell = last_markdown_cell(chapter)
    items = bullets(cell)
    assert items, f"{chapter.name}: '{HEADING}' lists no bullets"
    uncited = [item[:80] for item in items if not CITATION.search(item)]
    assert not uncited, f"{chapter.name}: bullets without an arXiv id or https URL: {uncited}"


def test_the_check_rejects_a_cell_without_sources():
    assert not CITATION.search("A paper everyone knows, and what we took from it.")
    assert bullets(f"{HEADING}\n\n- one (arXiv:2104.09864)\n  continued\n- two https://x.org") == [
        "one (arXiv:2104.09864) continued", "two https://x.org"]
