"""Every notebook runs top to bottom on CPU, and is committed with its outputs."""

import re
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells and all(c.execution_count for c in code_cells), (
        f"{path.name} must be committed executed (make notebooks)"
    )
    assert not any(o.get("output_type") == "error" for c in code_cells for o in c.outputs), (
        f"{path.name} was committed with an error in its outputs"
    )
    # Execute a fresh copy (the committed file is left alone), from the notebooks folder.
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")


def markdown_of(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_a_lesson(path):
    """A lesson: it names a kernel, ends with exercises whose solutions are collapsed and checked, and cites
    its sources (issue 15's shape for every notebook)."""
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: no python3 kernelspec"
    text = markdown_of(nb)
    assert re.search(r"^#+ .*What you will learn", text, re.M | re.I), (
        f"{path.name}: no 'What you will learn'"
    )
    references = re.split(r"^#+ .*References\s*$", text, flags=re.M)
    assert len(references) == 2, f"{path.name}: needs one References section"
    assert len(re.findall(r"^\s*\d+\.\s", references[1], re.M)) >= 3, f"{path.name}: fewer than 3 references"
    exercises = re.findall(r"^### Exercise \d+", text, re.M)
    assert len(exercises) >= 2, f"{path.name}: fewer than 2 exercises"
    solutions = [c for c in nb.cells if c.cell_type == "code" and "solution" in c.metadata.get("tags", [])]
    assert solutions, f"{path.name}: no solution cell"
    for cell in solutions:
        assert cell.metadata.get("jupyter", {}).get("source_hidden"), (
            f"{path.name}: a solution cell is not collapsed"
        )
        assert "course.check(" in cell.source, f"{path.name}: a solution cell checks nothing"


def test_course_check_fails_on_a_wrong_answer():
    """The exercises' checks can fail: a wrong answer raises, saying by how much; parity asserts its tolerance."""
    sys.path.insert(0, str(NOTEBOOKS[0].parent))
    import course

    course.check("right", torch.tensor([1.0, 2.0]), [1.0, 2.0])
    with pytest.raises(AssertionError, match="off by up to 0.5"):
        course.check("wrong", torch.tensor([1.0, 2.5]), [1.0, 2.0])
    with pytest.raises(TypeError, match="answer must be a number"):
        course.check("not attempted", None, [1.0, 2.0])
    with pytest.raises(AssertionError, match="shape"):
        course.check("shape", torch.zeros(3), torch.zeros(2))
    assert course.parity("close", torch.tensor([1.0, 2.0 + 1e-7]), torch.tensor([1.0, 2.0])) < 1e-6
    with pytest.raises(AssertionError, match="above"):
        course.parity("far", torch.tensor([1.0, 2.1]), torch.tensor([1.0, 2.0]))
