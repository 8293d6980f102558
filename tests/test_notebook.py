"""colab/quickstart.ipynb executes end to end (at tiny size) and shows its curves and table."""
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from test_sweep import TINY_FLAGS, tiny_runs_env  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_notebook_executes(tmp_path, tiny_runs_env):  # noqa: F811
  nb = nbformat.read(ROOT / "colab/quickstart.ipynb", as_version=4)
  (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  # The notebook's own parameters at tiny size: 2 steps, a 1-layer ViT, the small
  # mmtl_shapes, a 2-run ablation (MiniLM stays full size: it is the pretrained tower).
  params.source = "\n".join([
      'REPO_URL = ""',
      'CONFIG = "configs/quickstart.py:steps=2,train=64"',
      f"FLAGS = {[*TINY_FLAGS, '--config.model.width=16']!r}",
      f"WORKDIR = {str(tmp_path / 'work')!r}",
      'TEXT_SETTINGS = ["frozen", "partial"]',
  ])
  # The kernel (and the runs it starts) inherits tiny_runs_env's environment; a failing cell raises.
  NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

  outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
  images = [out for out in outputs if "image/png" in out.get("data", {})]
  assert len(images) == 2  # The embedding similarity heatmap and the training curves.
  markdown = [out["data"]["text/markdown"] for out in outputs if "text/markdown" in out.get("data", {})]
  assert len(markdown) == 2
  assert "val/accuracy" in markdown[0]  # Final metrics of the frozen-tower run.
  table = markdown[1].strip().splitlines()
  assert table[0].startswith("| text | val/accuracy |") and len(table) == 4  # Header, rule, 2 runs.
  assert [row.split(" | ")[0] for row in table[2:]] == ["| frozen", "| partial"]
  assert (tmp_path / "work/frozen_text_tower/final_metrics.json").is_file()
  assert "22.7M params" in "".join(out.get("text", "") for out in outputs)  # MiniLM was loaded.
