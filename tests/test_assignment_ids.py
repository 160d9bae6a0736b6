"""`rbf-tutorial assignments --chapters` names chapters by id: "03" is every part of chapter 03.

Chapter files are `NN_topic.py`, or `NNa_topic.py`, `NNb_topic.py` for a chapter in parts. These
tests run on a folder of empty chapter files, so they need neither nbgrader nor the real chapters.
"""

from __future__ import annotations

import pytest

from rbf_tutorial import assignments

FILES = ["00_setup.py", "02_algebra.py", "03a_forward.py", "03b_backward.py", "10_later.py",
         "helpers.py", "3_too_short.py", "04x.py"]


@pytest.fixture
def available(tmp_path):
    for name in FILES:
        (tmp_path / name).write_text("")
    return assignments.find_chapters(tmp_path)


def ids(chapters):
    return [chapter.chapter_id for chapter in chapters]


def test_chapter_files_and_parts_are_found_by_id(available):
    assert list(available) == ["00", "02", "03a", "03b", "10"]
    assert available["03a"].name == "03a_forward"


@pytest.mark.parametrize(("requested", "expected"), [
    (["03"], ["03a", "03b"]),
    (["3"], ["03a", "03b"]),
    (["03a"], ["03a"]),
    (["3b"], ["03b"]),
    (["03B "], ["03b"]),
    (["2", "03b", "03"], ["02", "03b", "03a"]),
    (["0", "00"], ["00"]),
    (["10"], ["10"]),
])
def test_ids_select_chapters_and_parts(available, requested, expected):
    assert ids(assignments.select_chapters(available, requested)) == expected


def test_no_request_selects_every_chapter_in_file_order(available):
    assert ids(assignments.select_chapters(available, None)) == ["00", "02", "03a", "03b", "10"]


@pytest.mark.parametrize("requested", ["03c", "3c", "1", "04", "x"])
def test_unknown_ids_are_refused_with_what_exists(available, requested):
    refusal = rf"no chapter '{requested}' \(available: 00, 02, 03a, 03b, 10\)"
    with pytest.raises(assignments.AssignmentError, match=refusal):
        assignments.select_chapters(available, [requested])
