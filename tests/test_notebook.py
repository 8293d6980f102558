"""colab/quickstart.ipynb executes end to end (at tiny size) and shows its curves and table;
its install cell installs mmtl from a git URL where there is no checkout (Colab)."""

import os
from pathlib import Path
import sys
import textwrap

from nbclient import NotebookClient
import nbformat
import pytest

from mmtl import process
from test_package import copy_sources
from test_sweep import TINY_FLAGS, tiny_runs_env  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent


def cell_tagged(nb, tag):
  (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
  return cell


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, tiny_runs_env):  # noqa: F811
  nb = nbformat.read(ROOT / "colab/quickstart.ipynb", as_version=4)
  params = cell_tagged(nb, "parameters")
  # The notebook's own parameters at tiny size: 2 steps, a 1-layer ViT, the small
  # mmtl_shapes, an ablation of one setting (tests/test_sweep.py checks tables of several
  # runs); MiniLM stays full size: it is the pretrained tower.
  params.source = "\n".join(
    [
      'REPO_URL = ""',
      'REPO_REF = ""',
      'CONFIG = "configs/quickstart.py:steps=2,train=64"',
      f"FLAGS = {[*TINY_FLAGS, '--config.model.width=16']!r}",
      f"WORKDIR = {str(tmp_path / 'work')!r}",
      'TEXT_SETTINGS = ["partial"]',
    ]
  )
  # The kernel (and the runs it starts) inherits tiny_runs_env's environment; a failing cell raises.
  NotebookClient(
    nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
  ).execute()

  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
  images = [out for out in outputs if "image/png" in out.get("data", {})]
  assert len(images) == 2  # The embedding similarity heatmap and the training curves.
  markdown = [
    out["data"]["text/markdown"] for out in outputs if "text/markdown" in out.get("data", {})
  ]
  assert len(markdown) == 2
  assert "val/accuracy" in markdown[0]  # Final metrics of the frozen-tower run.
  table = markdown[1].strip().splitlines()
  assert table[0].startswith("| text | val/accuracy |")  # Header, rule, the run, its command.
  assert table[2].split(" | ")[0] == "| partial"
  assert table[6].startswith("- text=partial: `python -m mmtl.train --config ") and len(table) == 7
  assert (tmp_path / "work/frozen_text_tower/final_metrics.json").is_file()
  assert "22.7M params" in "".join(out.get("text", "") for out in outputs)  # MiniLM was loaded.


# Runs the install cell as a script, with its `pip install` of mmtl made offline: mmtl alone
# (its dependencies are this venv's) into SITE, which the script imports from.
INSTALL_HARNESS = textwrap.dedent("""\
    import subprocess, sys
    REPO_URL, REPO_REF, SITE = sys.argv[1:]
    real_run = subprocess.run
    def run(cmd, *args, **kwargs):
      if cmd[:4] == [sys.executable, "-m", "pip", "install"]:
        cmd = [*cmd, "--no-deps", "--no-build-isolation", "--no-index", "--target", SITE]
      return real_run(cmd, *args, **kwargs)
    subprocess.run = run
    sys.path.append(SITE)
    """)


def test_install_cell_installs_mmtl_from_the_git_url_where_there_is_no_checkout(tmp_path):
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
  repo = copy_sources(tmp_path / "repo")
  process.run([*git, "init", "-q", repo], check=True, timeout=60)
  process.run([*git, "-C", repo, "add", "-A"], check=True, timeout=60)
  process.run([*git, "-C", repo, "commit", "-q", "-m", "mmtl"], check=True, timeout=60)
  commit = process.run(
    ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=60
  ).stdout.strip()
  install = cell_tagged(nbformat.read(ROOT / "colab/quickstart.ipynb", as_version=4), "install")
  script = tmp_path / "install_cell.py"
  script.write_text(INSTALL_HARNESS + install.source)
  colab, site = tmp_path / "content", tmp_path / "site"
  colab.mkdir()
  site.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JAX_PLATFORMS": "cpu"}

  def run_cell(repo_url, repo_ref=""):
    return process.run(
      [sys.executable, script, repo_url, repo_ref, site],
      capture_output=True,
      text=True,
      cwd=colab,
      env=env,
      timeout=300,
    )

  unset = run_cell("")
  assert unset.returncode == 1
  assert unset.stderr.strip().splitlines()[-1] == (
    "RuntimeError: This is not a checkout of mmtl: set REPO_URL in the parameter cell to "
    "mmtl's git URL (https://...), or open this notebook from a checkout."
  )

  url = f"file://localhost{repo}"  # With a host: pip 23.2 rejects `git+file:///` URLs.
  result = run_cell(url, "main")  # A branch: fetched into the shallow clone.
  assert result.returncode == 0, result.stdout + result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == f"pip install 'mmtl @ git+{url}@{commit}'"
  assert lines[1].startswith(f"mmtl from {site / 'mmtl'}; JAX ")  # The pip-installed package.
  clone = colab / "mmtl_repo"
  assert (clone / "configs/quickstart.py").is_file() and (clone / "launch/sweep.py").is_file()
  assert not (clone / "mmtl").exists() and (site / "mmtl/train.py").is_file()
