"""The notebooks in colabs/ run end to end in their small setting, and are saved without outputs."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
# quickstart.ipynb first: transfer.ipynb fine-tunes the student that it leaves in the shared runs directory.
NOTEBOOKS = sorted((REPO / "colabs").glob("*.ipynb"), key=lambda path: (path.name != "quickstart.ipynb", path.name))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("notebook_runs")


def kernel_env(runs_dir) -> dict:
    """The test process's environment (CPU only, 4 fake devices, and the compilation cache of the other end-to-end
    tests, which compile the same tiny networks: see conftest.py) and the notebooks' small setting."""
    return {**os.environ, "KDEP_NOTEBOOK_SMALL": "1", "KDEP_NOTEBOOK_WORKDIR": str(runs_dir)}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs_in_its_small_setting(path, runs_dir):
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute(env=kernel_env(runs_dir))  # raises CellExecutionError, with the cell and its traceback


def test_there_are_notebooks():
    assert {path.name for path in NOTEBOOKS} >= {"quickstart.ipynb", "convert_torchvision.ipynb", "transfer.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_saved_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.cells[0].cell_type == "markdown", f"{path.name} must open with its explanation and runtime note"
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name}: cell {index} was saved with outputs; clear all outputs and save before committing "
                f"(see colabs/README.md).")
