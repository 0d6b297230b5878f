"""Executes colab/quickstart.ipynb top to bottom, as a user running every cell would."""

import json
import pathlib

import matplotlib
import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "colab" / "quickstart.ipynb"


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch, capsys):
  matplotlib.use("Agg")
  notebook = json.loads(NOTEBOOK.read_text())
  assert notebook["nbformat"] == 4
  cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
  assert len(cells) >= 6
  monkeypatch.setenv("QUICKSTART_WORKDIR", str(tmp_path))
  monkeypatch.chdir(NOTEBOOK.parent.parent)
  namespace = {"__name__": "__main__"}
  for index, cell in enumerate(cells):
    source = "".join(cell["source"])
    assert not cell.get("outputs"), "commit the notebook without outputs"
    try:
      exec(compile(source, f"{NOTEBOOK.name} code cell {index}", "exec"), namespace)
    except Exception as error:  # Name the cell, then let pytest show the traceback.
      pytest.fail(f"Code cell {index} failed: {error!r}\n{source}")
  printed = capsys.readouterr().out
  assert "Targets with loss:" in printed
  assert (tmp_path / "report" / "report.md").exists()
  assert namespace["answer"].ndim == 1
