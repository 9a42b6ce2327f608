"""The student edition (`make student`): the lessons and the assignments without their answers, in out/student/.

    notebooks/   every lesson with all outputs cleared (an executed cell shows its result; students run them),
                 each exercise's solution cell replaced by an empty one to write in, and the collapsed
                 "Answer" blocks of the Markdown removed; course.py, the syllabus (README.md), the glossary and the
                 lesson map beside them
    assignments/ the stubs, the grader and its README; not solutions/ nor wrong/

The committed notebooks stay the instructor's edition. The folder is written only if it is new, empty or an
earlier student edition (its marker file); nothing else is removed.

    python assignments/student_edition.py [--out out/student]
"""

import argparse
import re
import shutil
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
MARKER = ".student-edition"
DETAILS = re.compile(r"<details>\s*<summary>(?P<summary>.*?)</summary>.*?</details>", re.S)
BLANK = "# Your answer here: write it, then check it with course.check as the exercise says.\n"


def without_answers(markdown: str) -> str:
    """Each collapsed <details> block removed; a question's summary kept as a line to think about."""

    def keep_question(m):
        summary = m["summary"].strip()
        return (
            "" if summary.lower().startswith("answer") else f"*{summary}* (think it over before reading on)"
        )

    return DETAILS.sub(keep_question, markdown)


def student_notebook(nb):
    """A lesson without its answers: outputs cleared, solution cells emptied, collapsed answers removed."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            if "solution" in cell.metadata.get("tags", []):
                cell.source = BLANK
                cell.metadata = {"tags": ["answer"]}  # shown, not collapsed
        elif cell.cell_type == "markdown":
            cell.source = without_answers(cell.source)
    return nb


def write(out: Path) -> list[Path]:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise SystemExit(
            f"error: --out {out} exists and is not an earlier student edition: choose a new folder"
        )
    if out.exists():
        shutil.rmtree(out)
    (out / "notebooks").mkdir(parents=True)
    (out / MARKER).write_text("written by assignments/student_edition.py (make student)\n")
    written = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = student_notebook(nbformat.read(path, as_version=4))
        nbformat.write(nb, out / "notebooks" / path.name)
        written.append(out / "notebooks" / path.name)
    for name in ("course.py", "README.md", "GLOSSARY.md", "lesson_map.png"):
        shutil.copy(ROOT / "notebooks" / name, out / "notebooks" / name)
    keep = ("solutions", "wrong", "student_edition.py", "__pycache__")
    shutil.copytree(
        ROOT / "assignments", out / "assignments", ignore=lambda d, names: [n for n in names if n in keep]
    )
    return written


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "out" / "student")
    a = p.parse_args()
    notebooks = write(a.out)
    print(f"{len(notebooks)} lessons and the assignments without answers -> {a.out}")
