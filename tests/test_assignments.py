"""The course's graders (assignments/grader) grade: every test fails on the stubs (each pointing to its lesson),
all pass with the reference solutions, and each typical wrong solution in assignments/wrong fails with the
message written for it."""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRADER = ROOT / "assignments" / "grader"
LESSONS = sorted({p.name[5:7] for p in GRADER.glob("test_*.py")})  # "02", "05", ...
# Each typical wrong solution: assignments/wrong/<name>/ holds the graded module(s) with the mistake, and
# mistake.txt says which lesson grades it ("lesson: 02") and what the grader must tell the student ("says: ...").
WRONG = {
    p.parent.name: dict(line.split(": ", 1) for line in p.read_text().splitlines() if ": " in line)
    for p in sorted((ROOT / "assignments" / "wrong").glob("*/mistake.txt"))
}


def pytest_summary(out: str) -> tuple[int, int]:
    """(passed, failed + errors) from pytest's last line."""
    last = out.strip().splitlines()[-1] if out.strip() else ""
    count = lambda word: sum(int(n) for n in re.findall(rf"(\d+) {word}", last))
    return count("passed"), count("failed") + count("error")


def grade(folder: Path) -> tuple[int, int, str]:
    """Run the whole grader on the modules in `folder` -> (passed, failed, its output)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(GRADER)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "ASSIGNMENTS": str(folder), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    return (*pytest_summary(done.stdout), done.stdout)


def graders_of(folder: Path, lesson: str) -> list[str]:
    """The lesson's grader files that load a module the folder holds (test_02_rope.py for wrong/rope_halves)."""
    modules = {p.stem for p in folder.glob("*.py")}
    return [
        str(p)
        for p in sorted(GRADER.glob(f"test_{lesson}_*.py"))
        if any(f'load("{m}")' in p.read_text() for m in modules)
    ]


def grade_each(folders: dict) -> dict:
    """{name: [grader files]} graded in one process (pytest and diffusers are imported once, not per mistake:
    ~5 s each) -> {name: that run's output}. Each run re-imports the grader's modules under its ASSIGNMENTS."""
    script = (
        "import contextlib, io, json, os, sys, pytest\n"
        "out = {}\n"
        "for name, (folder, files) in json.loads(sys.argv[1]).items():\n"
        "    os.environ['ASSIGNMENTS'] = folder\n"
        "    for module in [m for m in sys.modules if m == 'conftest' or m.startswith(('test_', 'graded_', 'assignments'))]:\n"
        "        del sys.modules[module]\n"
        "    buffer = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buffer):\n"
        "        pytest.main(['-q', '-p', 'no:cacheprovider', *files])\n"
        "    out[name] = buffer.getvalue()\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(folders)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@functools.cache
def graded_tests() -> int:
    """How many tests the grader holds (pytest --collect-only): every one must fail on the stubs and pass on the
    solutions, so that a grader file that collects nothing, or a lost parametrisation, is noticed."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", str(GRADER)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "ASSIGNMENTS": str(ROOT / "assignments" / "solutions"), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    return sum("::" in line for line in done.stdout.splitlines())


def test_every_test_fails_on_the_stubs_and_says_which_lesson():
    passed, failed, out = grade(ROOT / "assignments")
    assert passed == 0 and failed == graded_tests() >= 129, out[-2000:]
    for lesson in LESSONS:
        assert f"see lesson {lesson}" in out, out[-2000:]


def test_the_reference_solutions_pass_every_test():
    passed, failed, out = grade(ROOT / "assignments" / "solutions")
    assert failed == 0 and passed == graded_tests() >= 129, out[-2000:]


def test_each_typical_mistake_fails_with_its_own_message():
    assert len(WRONG) >= 6 and all({"lesson", "says"} <= set(m) for m in WRONG.values()), WRONG
    folders = {}
    for name, mistake in WRONG.items():
        folder = ROOT / "assignments" / "wrong" / name
        files = graders_of(folder, mistake["lesson"])
        assert files, f"wrong/{name}: no grader of lesson {mistake['lesson']} loads its modules"
        folders[name] = (str(folder), files)
    outputs = grade_each(folders)
    for name, mistake in WRONG.items():
        passed, failed = pytest_summary(outputs[name])
        # Only the failures' own lines ("E   ..."): the traceback also prints the test's source, which holds every
        # hint as a literal, so a search of the whole output would find the hint whichever mistake was made.
        said = "\n".join(line for line in outputs[name].splitlines() if line.startswith("E "))
        assert failed >= 1 and mistake["says"] in said, (name, said[-3000:] or outputs[name][-3000:])


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
    assert set(written) == {p.name for p in lessons}
    for name in ("course.py", "README.md", "GLOSSARY.md", "lesson_map.png"):  # the syllabus comes along
        assert (out / "notebooks" / name).is_file(), name
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
