"""Every notebook under notebooks/ runs top to bottom, as a user would run it in Colab.

Each notebook executes in a fresh kernel of this interpreter (a kernelspec written for
`sys.executable`, so the kernel is this venv's Python whatever kernelspecs the machine has), with
an empty temporary folder as its working directory and a deadline for the whole notebook. A
failing cell fails the test with that cell's source and traceback (nbclient's CellExecutionError).
"""

from __future__ import annotations

import os
import pathlib
import time

import nbformat
import pytest
from ipykernel import kernelspec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
DEADLINE_S = 600  # Per notebook; each is meant to take about 2 minutes on a 2-core CPU.
KERNEL_NAME = "polyglot-jax-tests"
# The kernel runs with XLA's default flags, as in Colab: conftest's XLA_FLAGS (faster compiles for
# the unit tests' many tiny programs) make these longer runs slower overall.
KERNEL_ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory: pytest.TempPathFactory) -> KernelSpecManager:
  """A kernelspec whose argv starts with this interpreter, in a folder only this test reads."""
  kernels = tmp_path_factory.mktemp("kernels")
  kernelspec.write_kernel_spec(kernels / KERNEL_NAME)
  return KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)


def test_notebooks_are_committed_without_outputs():
  """Outputs are for readers' own runs: the repository keeps clean nbformat-4 notebooks."""
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4, path.name
    assert nb.metadata.kernelspec.name == "python3", path.name
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, (path.name, cell.source[:60])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path: pathlib.Path, tmp_path: pathlib.Path,
                                     kernel_specs: KernelSpecManager):
  nb = nbformat.read(path, as_version=4)
  deadline = time.monotonic() + DEADLINE_S
  client = NotebookClient(
      nb,
      km=AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_specs),
      # Each cell may use what is left of the notebook's deadline (nbclient times cells).
      timeout_func=lambda cell: max(1, int(deadline - time.monotonic())),
      timeout=DEADLINE_S,
      resources={"metadata": {"path": str(tmp_path)}},
  )
  # Raises CellExecutionError (the cell's source and traceback) on the first error; the kernel
  # is shut down either way (nbclient keeps kernels of a manager it was given unless told).
  client.execute(cleanup_kc=True, env=KERNEL_ENV)
