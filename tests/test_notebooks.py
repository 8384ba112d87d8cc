"""The notebooks, as a newcomer meets them.

- Every notebook runs top to bottom in a Jupyter kernel (nbclient) at small sizes
  (EFFICIENT_VIT_SMALL=1), from the notebooks/ folder as Jupyter starts it, on the shared
  CIFAR-10 copy where there is one (TFDS mock data otherwise); any cell error fails. The
  figures go to notebooks/figures/ (ignored by git), and each notebook must write its own.
- The project installs the way the notebooks' first cell does (`install_command`, with a
  local file URL instead of GitHub) into a fresh virtual environment outside the
  repository, and every import the notebooks make works there, `configs` included.
- There, from a folder outside the repository, the complexity notebook runs (its cached
  sweep ships in the package) and the attention-maps notebook runs at the size it picks on a
  CPU runtime; that run replaces its run at the tests' size in the checkout.

    uv run pytest tests/test_notebooks.py -q
"""

import ast
import glob
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
FIGURES = os.path.join(NOTEBOOK_DIR, "figures")
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "tensorflow_datasets")
# The PNGs each notebook must write (with labelled axes and titles: `save_figure` checks).
EXPECTED_FIGURES = {
    "quickstart.ipynb": ["quickstart_curves.png", "quickstart_predictions.png"],
    "attention_maps.ipynb": [f"attention_{family}.png" for family in
                             ("vit", "perceiver", "eanet", "swin", "cct", "mobilevit")],
    "complexity.ipynb": ["complexity_time_memory.png", "complexity_token_sweep.png"],
}


def _read(path):
  import nbformat

  return nbformat.read(path, as_version=4)


def _code_cells(path):
  return [cell.source for cell in _read(path).cells if cell.cell_type == "code"]


def test_every_notebook_is_listed():
  assert sorted(map(os.path.basename, NOTEBOOKS)) == sorted(EXPECTED_FIGURES)


def test_every_notebook_starts_with_the_same_install_cell():
  first = {os.path.basename(p): _code_cells(p)[0] for p in NOTEBOOKS}
  assert len(set(first.values())) == 1, "the set-up cells differ: " + ", ".join(first)
  assert "install_command(" in next(iter(first.values()))


def test_readme_has_a_colab_badge_per_notebook():
  """Badges point at the repository the first cell installs from (REPO_URL)."""
  tree = ast.parse(_code_cells(NOTEBOOKS[0])[0])
  repo_url, = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
               and getattr(node.targets[0], "id", None) == "REPO_URL"]
  repo = repo_url.removeprefix("https://github.com/")
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  for path in NOTEBOOKS:
    link = (f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/"
            f"{os.path.basename(path)}")
    assert f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]" \
           f"({link})" in readme, link


# attention_maps.ipynb runs at its larger CPU size, installed, in
# test_notebooks_run_from_the_installed_package_outside_the_repository.
IN_CHECKOUT = [path for path in NOTEBOOKS if os.path.basename(path) != "attention_maps.ipynb"]


@pytest.mark.parametrize("path", IN_CHECKOUT, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
  from nbclient import NotebookClient

  monkeypatch.setenv("EFFICIENT_VIT_SMALL", "1")
  monkeypatch.setenv("EFFICIENT_VIT_FIGURES", FIGURES)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # One CPU device, as a Colab runtime has one accelerator (the fake devices of the other
  # tests make every step several times slower; data parallelism is tested in
  # tests/test_train.py), and XLA's quicker, less optimising CPU compile: the notebooks'
  # small runs are mostly compile time.
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                     "--xla_llvm_disable_expensive_passes=true")
  if os.path.isdir(os.path.join(SHARED_DATA, "cifar10")):
    monkeypatch.setenv("TFDS_DATA_DIR", SHARED_DATA)
  else:  # Mock data: an empty data dir, so nothing is found prepared.
    monkeypatch.setenv("TFDS_DATA_DIR", os.path.join(ROOT, ".pytest_cache", "no_tfds_data"))
  start = time.time()
  notebook = _read(path)
  # Raises CellExecutionError, with the cell and its traceback, on any cell error.
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": NOTEBOOK_DIR}}).execute()
  for name in EXPECTED_FIGURES[os.path.basename(path)]:
    figure = os.path.join(FIGURES, name)
    assert os.path.exists(figure) and os.path.getmtime(figure) >= start - 1, (
        f"{os.path.basename(path)} did not write {figure}")


def _notebook_imports() -> list[str]:
  """Every import statement of every notebook's code cells, less those of the Jupyter kernel
  itself (IPython) and of Colab (google.colab), which any runtime that shows a notebook has."""
  lines = []
  for path in NOTEBOOKS:
    for source in _code_cells(path):
      for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          statement = ast.unparse(node)
          kernel_own = ("google.colab" in statement or statement.startswith(
              ("import IPython", "from IPython")))
          if not kernel_own and statement not in lines:
            lines.append(statement)
  return lines


def _install_command(source: str) -> list[str]:
  """The first cell's `install_command(source, 'cpu')`, defined by running the cell's
  function definitions and plain constants (not its install or JAX start)."""
  tree = ast.parse(_code_cells(NOTEBOOKS[0])[0])
  keep = [node for node in tree.body
          if isinstance(node, (ast.Import, ast.FunctionDef)) or
          (isinstance(node, ast.Assign) and isinstance(node.value, (ast.Constant, ast.Dict)))]
  namespace = {}
  exec(compile(ast.Module(body=keep, type_ignores=[]), "set-up cell", "exec"), namespace)  # noqa: S102
  return namespace["install_command"](source, "cpu")


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
  """(python, env) of a fresh virtual environment outside the repository, into which the
  project was installed as the first cell installs it (plus a Jupyter kernel and nbclient,
  to run notebooks there)."""
  uv = shutil.which("uv")
  assert uv, "uv is needed to build the fresh environment (pip install uv)"
  command = _install_command(f"file://{ROOT}")
  assert command[:4] == [sys.executable, "-m", "pip", "install"], command
  requirement = command[-1]
  assert requirement == f"efficient-vit @ file://{ROOT}", requirement

  tmp_path = tmp_path_factory.mktemp("fresh")
  # Versions pinned to uv.lock, so that the install comes out of uv's cache.
  constraints = tmp_path / "constraints.txt"
  subprocess.run([uv, "export", "--frozen", "--no-hashes", "--no-emit-project",
                  "--quiet", "-o", str(constraints)], cwd=ROOT, check=True)
  venv = tmp_path / "venv"
  env = {k: v for k, v in os.environ.items()
         if k not in ("VIRTUAL_ENV", "PYTHONPATH", "UV_PROJECT_ENVIRONMENT", "XLA_FLAGS")}
  subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True,
                 cwd=tmp_path, env=env)
  python = str(venv / "bin" / "python")
  # --refresh-package: rebuild the wheel from the working tree, not a cached older build.
  subprocess.run([uv, "pip", "install", "--quiet", "--python", python, "-c", str(constraints),
                  "--refresh-package", "efficient-vit", requirement, "ipykernel", "nbclient",
                  "nbformat"], check=True, cwd=tmp_path, env=env)
  return python, env


def test_the_install_cell_gives_every_notebook_import_in_a_fresh_venv(fresh_venv, tmp_path):
  python, env = fresh_venv
  imports = _notebook_imports()
  script = "\n".join(imports + [
      "import configs, efficient_vit, os",
      "for module in (configs, efficient_vit):",
      f"  assert not os.path.abspath(module.__file__).startswith({ROOT!r}), module.__file__",
      # The notebooks import configs by name (importlib): every family's must be there.
      "from configs import cct, eanet, mobilevit, perceiver, swin, vit",
      "print('imports ok:', configs.__file__)",
  ])
  result = subprocess.run([python, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "imports ok" in result.stdout


# Runs notebooks (argv) in the current directory with the Python it runs under.
_RUN_NOTEBOOKS = """
import sys, time
import nbformat
from nbclient import NotebookClient
for name in sys.argv[1:]:
  start = time.time()
  notebook = nbformat.read(name, as_version=4)
  NotebookClient(notebook, timeout=1200, kernel_name="python3",
                 resources={"metadata": {"path": "."}}).execute()
  outputs = [o.get("text", "") for c in notebook.cells if c.cell_type == "code"
             for o in c.get("outputs", [])]
  print(f"{name}: {time.time() - start:.0f} s")
  print("".join(outputs))
"""


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "cifar10")),
                    reason="the real CIFAR-10 copy (../shared/tensorflow_datasets) is missing")
def test_notebooks_run_from_the_installed_package_outside_the_repository(fresh_venv, tmp_path):
  """The attention-maps notebook at the size it picks on a CPU runtime (not the tests'
  tiny one) and the complexity notebook, copied without anything beside them into a folder
  outside the repository, run with the installed package: its cached sweep ships in it."""
  python, env = fresh_venv
  names = ["complexity.ipynb", "attention_maps.ipynb"]
  for name in names:
    shutil.copy(os.path.join(NOTEBOOK_DIR, name), tmp_path / name)
  figures = tmp_path / "figures"
  env = dict(env, TFDS_DATA_DIR=SHARED_DATA, MPLBACKEND="Agg",
             EFFICIENT_VIT_FIGURES=str(figures), XLA_FLAGS="--xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
  env.pop("EFFICIENT_VIT_SMALL", None)
  run = subprocess.run([python, "-c", _RUN_NOTEBOOKS, *names], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=1800)
  assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
  print(run.stdout)
  assert "vit (cpu size): 100 steps" in run.stdout
  for name in names:
    for figure in EXPECTED_FIGURES[name]:
      assert (figures / figure).exists(), figure
