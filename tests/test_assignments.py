"""The course's graders (assignments/grader) grade: every test fails on the stubs (each pointing to its lesson),
all pass with the reference solutions, and each typical wrong solution in assignments/wrong fails with the
message written for it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRADER = ROOT / "assignments" / "grader"
LESSONS = {"02": "rope", "05": "guidance", "07": "lora_linear"}


def grade(folder: Path, lesson: str | None = None) -> tuple[int, int, str]:
    """Run the grader on the modules in `folder` -> (passed, failed, its output)."""
    files = [str(next(GRADER.glob(f"test_{lesson}_*.py")))] if lesson else [str(GRADER)]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "ASSIGNMENTS": str(folder), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    count = lambda word: sum(int(n) for n in re.findall(rf"(\d+) {word}", done.stdout.splitlines()[-1]))
    return count("passed"), count("failed") + count("error"), done.stdout


def test_every_test_fails_on_the_stubs_and_says_which_lesson():
    passed, failed, out = grade(ROOT / "assignments")
    assert passed == 0 and failed >= 20, out[-2000:]
    for lesson in LESSONS:
        assert f"see lesson {lesson}" in out, out[-2000:]


def test_the_reference_solutions_pass_every_test():
    passed, failed, out = grade(ROOT / "assignments" / "solutions")
    assert failed == 0 and passed >= 20, out[-2000:]


WRONG = {
    "rope_halves": ("02", "the 'halves' layout of"),
    "rope_one_axis": ("02", "one frequency ladder over the whole head"),
    "cfg_no_rescale": ("05", "is not rescaled"),
    "euler_sign": ("05", "the step has the wrong sign"),
    "lora_r_over_alpha": ("07", "scaled by r / alpha"),
    "fuse_in_bf16": ("07", "computed in the weight's dtype"),
}


@pytest.mark.parametrize("mistake", sorted(WRONG))
def test_each_typical_mistake_fails_with_its_own_message(mistake):
    lesson, message = WRONG[mistake]
    passed, failed, out = grade(ROOT / "assignments" / "wrong" / mistake, lesson)
    assert failed >= 1 and message in out, out[-3000:]


def test_the_student_edition_holds_no_answer(tmp_path):
    """`make student`: every lesson, with no solution's printed answer, no solution source, no collapsed answer;
    the assignments' stubs and grader without the solutions."""
    import nbformat

    out = tmp_path / "student"
    subprocess.run(
        [sys.executable, ROOT / "assignments" / "student_edition.py", "--out", out], check=True, cwd=ROOT
    )
    lessons = sorted((ROOT / "notebooks").glob("*.ipynb"))
    written = {p.name: p.read_text() for p in (out / "notebooks").glob("*.ipynb")}
    assert set(written) == {p.name for p in lessons} and (out / "notebooks" / "course.py").is_file()
    answers, lesson_text = [], ""  # the solutions' lines and printed results; everything else the lessons say
    for path in lessons:
        for cell in nbformat.read(path, as_version=4).cells:
            if "solution" in cell.metadata.get("tags", []):
                answers += [line.strip() for line in cell.source.splitlines() if len(line.strip()) > 20]
                for output in cell.outputs:
                    text = output.get("text", "") or output.get("data", {}).get("text/plain", "")
                    answers += [line.strip() for line in text.splitlines() if len(line.strip()) > 8]
            else:
                lesson_text += cell.source + "\n"
    answers = [a for a in answers if a not in lesson_text]  # only what the solutions alone reveal
    assert len(answers) > 50
    leaked = [a for a in answers if any(a in text for text in written.values())]
    assert not leaked, leaked[:5]
    assert not any("<summary>Answer" in text for text in written.values())
    assert (out / "assignments" / "rope.py").is_file() and (out / "assignments" / "grader").is_dir()
    assert not (out / "assignments" / "solutions").exists() and not (out / "assignments" / "wrong").exists()
    with pytest.raises(subprocess.CalledProcessError):  # a folder it did not write is left alone
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("mine")
        subprocess.run(
            [sys.executable, ROOT / "assignments" / "student_edition.py", "--out", tmp_path / "mine"],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
