"""Every notebook in notebooks/ runs top to bottom on the built-in models; a failing cell fails the suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it; see conftest.one_thread_per_worker
    # run from a scratch folder so a notebook that writes files leaves the checkout clean
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()


def test_there_are_notebooks():
    assert any(p.name.startswith("01_") for p in NOTEBOOKS)
