"""Every notebook runs top to bottom at small sizes (EFFICIENT_VIT_SMALL=1).

Code cells are executed in one namespace, as a kernel would; shell (`!`) and magic (`%`)
lines are Colab set-up and are skipped.
"""

import glob
import json
import os

import matplotlib
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
  matplotlib.use("Agg")
  monkeypatch.setenv("EFFICIENT_VIT_SMALL", "1")
  monkeypatch.chdir(ROOT)
  with open(path, encoding="utf-8") as f:
    cells = json.load(f)["cells"]
  namespace = {"__name__": "__main__"}
  for i, cell in enumerate(cells):
    if cell["cell_type"] != "code":
      continue
    source = "".join(line for line in cell["source"]
                     if not line.lstrip().startswith(("!", "%")))
    exec(compile(source, f"{os.path.basename(path)}[cell {i}]", "exec"), namespace)


def test_there_is_a_notebook():
  assert NOTEBOOKS
