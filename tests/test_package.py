"""mmtl as a package: pyproject.toml's wheel holds mmtl (and only mmtl), declares the
dependencies of requirements*.txt, and works installed, away from the checkout."""

import email.parser
import os
from pathlib import Path
import shutil
import sys
import zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import pytest

from mmtl import process

ROOT = Path(__file__).resolve().parent.parent
# A build's inputs; the wheel leaves out tests/, configs/ and launch/ (they stay in the checkout).
SOURCES = [
  "pyproject.toml",
  "README.md",
  "requirements.txt",
  "requirements-test.txt",
  "mmtl",
  "tests",
  "configs",
  "launch",
]
DIST_INFO = "mmtl-0.1.0.dist-info"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]


def copy_sources(dest: Path) -> Path:
  """The checkout's build inputs without caches, in `dest`: a build writes build/ and
  *.egg-info next to pyproject.toml, which should not happen in the checkout."""
  for name in SOURCES:
    if (ROOT / name).is_dir():
      shutil.copytree(
        ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
      )
    else:
      dest.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, dest / name)
  return dest


def requirements(path: Path) -> set[tuple]:
  """A requirements file's requirements (not `-r` includes), comparable with wheel metadata."""
  lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
  return {key(Requirement(line)) for line in lines if line and not line.startswith("-")}


def key(req: Requirement) -> tuple:
  return canonicalize_name(req.name), tuple(sorted(req.extras)), str(req.specifier)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """(the sources it was built from, the wheel): built with `pip wheel`, offline, with the venv's
  setuptools (requirements-test.txt), as a `pip install .` or `pip install git+URL` builds it."""
  src = copy_sources(tmp_path_factory.mktemp("src"))
  out = tmp_path_factory.mktemp("wheel")
  result = process.run(
    [*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", out, src],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert sorted(p.name for p in out.iterdir()) == ["mmtl-0.1.0-py3-none-any.whl"]
  return src, out / "mmtl-0.1.0-py3-none-any.whl"


def test_wheel_holds_every_module_of_mmtl_and_nothing_else(built):
  src, wheel = built
  names = set(zipfile.ZipFile(wheel).namelist())
  modules = {p.relative_to(src).as_posix() for p in (src / "mmtl").rglob("*.py")}
  packages = {"mmtl/__init__.py", "mmtl/data/__init__.py", "mmtl/models/__init__.py"}
  assert packages <= modules and "mmtl/train.py" in modules
  assert {n for n in names if not n.startswith(f"{DIST_INFO}/")} == modules
  assert {n.split("/")[0] for n in names} == {"mmtl", DIST_INFO}  # No tests/, configs/, launch/.
  # The wheel ships .py files only: a data file added under mmtl/ needs
  # [tool.setuptools.package-data] in pyproject.toml (and this test updated).
  assert [p for p in (src / "mmtl").rglob("*") if p.is_file() and p.suffix != ".py"] == []


def test_wheel_metadata_has_the_requirements_files_dependencies_and_extras(built):
  _, wheel = built
  with zipfile.ZipFile(wheel) as z:
    metadata = email.parser.Parser().parsestr(z.read(f"{DIST_INFO}/METADATA").decode())
  assert (metadata["Name"], metadata["Version"]) == ("mmtl", "0.1.0")
  assert metadata["Requires-Python"] == ">=3.10"
  extras = metadata.get_all("Provides-Extra")
  assert sorted(extras) == ["cuda12", "gcs", "test", "tpu", "tracking"]
  declared = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
  assert {key(r) for r in declared if r.marker is None} == requirements(ROOT / "requirements.txt")
  by_extra = {
    e: {key(r) for r in declared if r.marker and r.marker.evaluate({"extra": e})} for e in extras
  }
  runtime = requirements(ROOT / "requirements.txt")
  assert by_extra == {
    "test": requirements(ROOT / "requirements-test.txt") - runtime,  # Its test-only list.
    "cuda12": {("jax", ("cuda12",), "")},
    "tpu": {("jax", ("tpu",), "")},
    "gcs": {("gcsfs", (), "")},
    "tracking": {("wandb", (), ">=0.31"), ("mlflow", (), ">=3.0")},
  }
  assert {("ruff", (), "==0.17.6"), ("torch", (), "==2.13.0")} <= by_extra["test"]


@pytest.mark.slow
def test_installed_wheel_imports_and_runs_the_trainer_from_any_directory(built, tmp_path):
  _, wheel = built
  site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
  elsewhere.mkdir()
  result = process.run(
    [*PIP, "install", "-q", "--no-deps", "--no-index", "--target", site, wheel],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}

  def python(*args):
    return process.run(
      [sys.executable, *args], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300
    )

  imported = python("-c", "import mmtl, mmtl.config, mmtl.rules; print(mmtl.__file__)")
  assert imported.returncode == 0, imported.stderr
  assert imported.stdout.strip() == str(site / "mmtl/__init__.py")
  # The trainer runs as `python -m mmtl.train` with the config given by path: it loads the
  # checkout's config file (which imports the installed mmtl) and checks the overrides.
  trainer = python(
    "-m",
    "mmtl.train",
    "--config",
    ROOT / "configs/quickstart.py",
    "--workdir",
    "w",
    "--config.total_steps=abc",
  )
  assert trainer.returncode == 1
  last_line = trainer.stderr.strip().splitlines()[-1]
  assert last_line.startswith("ConfigError: --config.total_steps=abc:"), trainer.stderr
  assert list(elsewhere.iterdir()) == []
