"""Student and instructor notebooks for every chapter, built with nbgrader.

    rbf-tutorial assignments OUT_DIR [--chapters 00,01,...]

writes

    OUT_DIR/student/NN_topic.ipynb      to hand out: solutions replaced by stubs, hidden tests removed
    OUT_DIR/instructor/NN_topic.ipynb   the chapter with its solutions, to teach from
    OUT_DIR/course/                     an nbgrader course folder (nbgrader_config.py, source/,
                                        release/, gradebook.db): collect and autograde from here

A chapter file is ``NN_topic.py``, or ``NNa_topic.py``, ``NNb_topic.py`` for a chapter taught in
parts (``03a_triton_forward.py``, ``03b_triton_backward.py``). Its id is ``NN`` or ``NNa``;
``--chapters 03`` selects every part of chapter 03, ``--chapters 03a`` one part, and ``3`` means
``03``. Each chapter file is its own nbgrader assignment named after the file
(``00_setup_and_the_bully``), holding one notebook of the same name. The gradebook is an sqlite
file inside the course folder, so nothing has to be set up beforehand and nothing outside OUT_DIR
is read or written. Runs offline.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .paths import default_chapters_dir

# Jupytext reads cell metadata from the `# %% nbgrader={...}` lines; the notebook-level metadata it
# drops (jupytext.toml keeps chapter sources free of it) is put back here, so the generated
# notebooks open with the ordinary Python kernel.
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}

# "00_setup_and_the_bully.py" (id "00") and the parts of a chapter, "03a_triton_forward.py" (id "03a").
CHAPTER_FILE_PATTERN = re.compile(r"^(\d\d[a-z]?)_\w+\.py$")
# What --chapters accepts: a number with an optional part letter, "3", "03", "03a", "3b".
CHAPTER_ID_PATTERN = re.compile(r"^(\d+)([a-z]?)$")

# Written into OUT_DIR/course so that `nbgrader collect` / `nbgrader autograde` run from that folder
# find the same gradebook generate_assignment filled (checksums and points of every graded cell).
COURSE_CONFIG = """\
# nbgrader configuration of the course folder made by `rbf-tutorial assignments`.
# Run nbgrader commands (collect, autograde, generate_feedback, formgrader) from this folder.
c = get_config()  # noqa: F821
c.CourseDirectory.root = {root!r}
c.CourseDirectory.db_url = {db_url!r}
"""


class AssignmentError(Exception):
    """A problem the user can fix (unknown chapter, unwritable folder); the message says how."""


@dataclass(frozen=True)
class Chapter:
    chapter_id: str  # "00", or "03a" for a part
    source: Path  # chapters/00_setup_and_the_bully.py

    @property
    def name(self) -> str:  # "00_setup_and_the_bully": the assignment and its notebook
        return self.source.stem


@dataclass(frozen=True)
class GeneratedAssignment:
    chapter: Chapter
    student_notebook: Path
    instructor_notebook: Path


def find_chapters(chapters_dir: Path) -> dict[str, Chapter]:
    """Every chapter file in `chapters_dir`, keyed by its id ("00", "03a"), in file order."""
    found = {}
    for path in sorted(chapters_dir.glob("*.py")):
        match = CHAPTER_FILE_PATTERN.match(path.name)
        if match:
            found[match.group(1)] = Chapter(match.group(1), path)
    return found


def select_chapters(available: dict[str, Chapter], requested: list[str] | None) -> list[Chapter]:
    """The chapters named in `requested`, or all of them.

    "3" and "03" both mean chapter 03: the file 03_topic.py, or every part of it (03a, 03b, ...).
    "03a" (or "3a") means that part alone.
    """
    if not requested:
        return list(available.values())
    selected = []
    for raw_id in requested:
        match = CHAPTER_ID_PATTERN.match(raw_id.strip().lower())
        chapter_id = f"{int(match.group(1)):02d}{match.group(2)}" if match else raw_id.strip()
        if chapter_id in available:
            matching = [available[chapter_id]]
        elif match and not match.group(2):  # a chapter number: all of its parts
            matching = [chapter for key, chapter in available.items() if key[:2] == chapter_id and key[2:]]
        else:
            matching = []
        if not matching:
            known = ", ".join(available) or "none"
            raise AssignmentError(f"--chapters: no chapter {raw_id.strip()!r} (available: {known})")
        selected.extend(chapter for chapter in matching if chapter not in selected)
    return selected


def prepare_output_dir(out_dir: Path) -> Path:
    """`out_dir`, created if needed, after checking that files can be written into it."""
    out_dir = out_dir.expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise AssignmentError(f"OUT_DIR {out_dir} exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AssignmentError(f"OUT_DIR {out_dir} cannot be created: {error.strerror}") from error
    # os.access misjudges some cases (root, network file systems); writing a file is the real test.
    probe = out_dir / ".rbf-tutorial-write-probe"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise AssignmentError(f"OUT_DIR {out_dir} is not writable: {error.strerror}") from error
    return out_dir


def chapter_to_notebook(chapter: Chapter, notebook_path: Path) -> None:
    import jupytext

    notebook = jupytext.read(chapter.source, fmt="py:percent")
    notebook.metadata["kernelspec"] = dict(KERNELSPEC)
    notebook.metadata["language_info"] = {"name": "python"}
    notebook_path.parent.mkdir(parents=True, exist_ok=True)
    jupytext.write(notebook, notebook_path, fmt="ipynb")


def write_course_config(course_dir: Path) -> str:
    db_url = f"sqlite:///{course_dir / 'gradebook.db'}"
    (course_dir / "nbgrader_config.py").write_text(
        COURSE_CONFIG.format(root=str(course_dir), db_url=db_url), encoding="utf-8"
    )
    return db_url


def run_generate_assignment(course_dir: Path, db_url: str, assignment_id: str) -> None:
    """nbgrader's generate_assignment on course/source/<assignment_id>/ into course/release/."""
    from nbgrader.converters import GenerateAssignment
    from nbgrader.converters.base import NbGraderException
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config import Config

    config = Config()
    config.CourseDirectory.root = str(course_dir)
    config.CourseDirectory.db_url = db_url
    config.CourseDirectory.assignment_id = assignment_id
    coursedir = CourseDirectory(config=config)
    converter = GenerateAssignment(coursedir=coursedir, config=config)
    converter.force = True  # re-running replaces an earlier release of the same chapter
    converter.create_assignment = True
    # nbgrader logs every step at INFO; keep its warnings and errors, which say what went wrong.
    converter.log.setLevel(logging.WARNING)
    try:
        converter.start()
    except NbGraderException as error:
        raise AssignmentError(f"nbgrader generate_assignment failed for {assignment_id}: {error}") from error


def generate_assignments(
    out_dir: Path, chapter_ids: list[str] | None = None, chapters_dir: Path | None = None
) -> list[GeneratedAssignment]:
    """Build the student and instructor notebooks of the chosen chapters (default: all) in `out_dir`."""
    chapters_dir = chapters_dir or default_chapters_dir()
    if chapters_dir is None or not chapters_dir.is_dir():
        raise AssignmentError("no chapters/ folder found: run from a checkout of rbf-tutorial")
    available = find_chapters(chapters_dir)
    if not available:
        raise AssignmentError(f"no chapters (NN_topic.py or NNa_topic.py) in {chapters_dir}")
    selected = select_chapters(available, chapter_ids)
    out_dir = prepare_output_dir(out_dir)

    course_dir = out_dir / "course"
    course_dir.mkdir(exist_ok=True)
    db_url = write_course_config(course_dir)
    student_dir, instructor_dir = out_dir / "student", out_dir / "instructor"
    student_dir.mkdir(exist_ok=True)
    instructor_dir.mkdir(exist_ok=True)

    generated = []
    for chapter in selected:
        source_notebook = course_dir / "source" / chapter.name / f"{chapter.name}.ipynb"
        chapter_to_notebook(chapter, source_notebook)
        run_generate_assignment(course_dir, db_url, chapter.name)
        released = course_dir / "release" / chapter.name / f"{chapter.name}.ipynb"
        if not released.is_file():
            raise AssignmentError(f"nbgrader wrote no student notebook for {chapter.name} ({released})")
        student_notebook = student_dir / released.name
        instructor_notebook = instructor_dir / source_notebook.name
        shutil.copyfile(released, student_notebook)
        shutil.copyfile(source_notebook, instructor_notebook)
        generated.append(GeneratedAssignment(chapter, student_notebook, instructor_notebook))
    return generated


def build_parser(prog: str = "rbf-tutorial assignments") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Build nbgrader assignments from the chapters: OUT_DIR/student/ (solutions replaced by "
            "stubs, hidden tests removed), OUT_DIR/instructor/ (with solutions) and OUT_DIR/course/ "
            "(the nbgrader course folder to collect and autograde from)."
        ),
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="folder to write into (created)")
    parser.add_argument(
        "--chapters",
        default=None,
        help="comma-separated chapter ids, e.g. 00,01; 03 is both parts of chapter 03, 03a one of them "
        "(default: every chapter)",
    )
    return parser


def main(argv: list[str] | None = None, prog: str = "rbf-tutorial assignments") -> int:
    args = build_parser(prog).parse_args(argv)
    chapter_ids = [part for part in args.chapters.split(",") if part.strip()] if args.chapters else None
    try:
        generated = generate_assignments(args.out_dir, chapter_ids)
    except AssignmentError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 2
    out_dir = args.out_dir.expanduser().resolve()
    for assignment in generated:
        print(
            f"{assignment.chapter.name}: {os.path.relpath(assignment.student_notebook, out_dir)}, "
            f"{os.path.relpath(assignment.instructor_notebook, out_dir)}"
        )
    print(
        f"Hand out {out_dir / 'student'}; collect and autograde from {out_dir / 'course'} "
        "(see docs/instructors.md)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
