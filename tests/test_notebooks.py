"""The notebooks run top to bottom on CPU with tiny settings (IVA_NOTEBOOK_TINY=1, executed by nbclient
from the repo root), are stored without outputs, match their source (notebooks/build_notebooks.py),
and state their GPU assumptions in the first cell."""

import importlib.util
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need nbformat + nbclient (the test extra)")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need nbformat + nbclient (the test extra)")
pytest.importorskip("ipykernel", reason="nbclient needs a python3 Jupyter kernel (ipykernel)")
pytest.importorskip("matplotlib", reason="the notebooks plot with matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"
NAMES = ["kernels", "hrm", "rl", "quickstart"]


def _load(name):
    return nbformat.read(NB / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_stored_clean_and_states_gpu_assumptions(name):
    nb = _load(name)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "GPU assumptions" in first.source, first.source[:200]
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{name}: outputs not stripped"
            assert "def " not in c.source.replace("def __", ""), f"{name}: library logic belongs in iva_jax"
    nbformat.validate(nb)


def test_notebooks_match_their_source():
    spec = importlib.util.spec_from_file_location("build_notebooks", NB / "build_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert set(mod.NOTEBOOKS) == set(NAMES)
    assert mod.main(["--check"]) == 0


@pytest.mark.parametrize("name", NAMES)
def test_runs_top_to_bottom_on_cpu(name, monkeypatch):
    monkeypatch.setenv("IVA_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # one CPU device (not the suite's 8 fake ones), XLA's fast-compile settings: these runs are about behaviour
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = _load(name)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any failure
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert "Traceback" not in text
    images = [o for c in code for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert images, f"{name}: no plot displayed"
