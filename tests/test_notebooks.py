"""Every notebook runs top to bottom on CPU, and is committed with its outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells and all(c.execution_count for c in code_cells), \
        f"{path.name} must be committed executed (make notebooks)"
    assert not any(o.get("output_type") == "error" for c in code_cells for o in c.outputs), \
        f"{path.name} was committed with an error in its outputs"
    # Execute a fresh copy (the committed file is left alone), from the notebooks folder.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
