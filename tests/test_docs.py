"""The commands, config keys and links that README.md and docs/*.md show are real.

The docs are read more than the code and go stale first, so this runs nothing
but checks what a reader would copy: every `python -m mmtl.X` module exists;
every trainer, evaluator, sweep and launch command's `--config PATH[:ARGS]`
loads and its `--config.KEY=VALUE` overrides apply through mmtl.config's own
parsing and type checks; every `--config.KEY` in prose names a key of
`mmtl.config.schema()`; every relative link and its #anchor resolve.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
from pathlib import Path
import re
import shlex

import ml_collections as mlc
import pytest

from mmtl import config as config_lib

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = "configs/quickstart.py"
SHELL_LANGS = ("", "bash", "sh", "shell", "console")
# Scripts whose --config and --config.* flags reach mmtl.train.
TRAINER_SCRIPTS = ("launch/sweep.py", "launch/tpu_vm.sh", "launch/gpu.sh", "launch/slurm.sbatch")
# Paths a command writes or reads elsewhere: outputs of runs, buckets, other machines.
NOT_IN_REPO = {
  "workdirs/": "a run's workdir, written by mmtl.train",
  "runs/": "a run's or sweep's workdir, written by mmtl.train or launch/sweep.py",
  "gs://": "a GCS bucket",
  "/": "a path on another machine",
}
# DIR, CONFIG.py[:ARGS], configs/ablations/NAME.py, --config.KEY=VALUE, $OUT: the reader fills in.
PLACEHOLDER = re.compile(r"\$|\[:|\.\.\.|(?<![A-Za-z])[A-Z][A-Z0-9_]*(?![a-z])")
SCRIPT = re.compile(r"launch/[\w.-]+\.(py|sh|sbatch)")
# `--config.KEY[=VALUE]` in any text; an uppercase KEY is a placeholder.
CONFIG_KEY = re.compile(r"--config\.([a-z_][\w.]*\w)(=[^\s`\"')\\]*)?")


def doc_files() -> list[Path]:
  return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def is_placeholder(text: str) -> bool:
  return bool(PLACEHOLDER.search(text))


# ---------------------------------------------------------------- extraction ---


@dataclasses.dataclass(frozen=True)
class Command:
  """One shell command: the program and its arguments, as a reader would type them."""

  where: str  # "docs/x.md:12"
  program: str  # "mmtl.train" (for `python -m`) or a repo path ("launch/sweep.py")
  args: tuple[str, ...]
  module: bool  # run as `python -m program`


def split_markdown(text: str) -> tuple[list[tuple[int, str, str]], str]:
  """(fenced code blocks as (first line, language, body), the prose with those blocks
  blanked so that line numbers still count)."""
  blocks, prose, fence, start, lang, body = [], [], None, 0, "", []
  for i, line in enumerate(text.splitlines(), 1):
    opening = re.match(r"\s*(```+|~~~+)\s*([\w+-]*)", line)
    if fence is None and opening:
      fence, start, lang, body = opening.group(1), i + 1, opening.group(2).lower(), []
      prose.append("")
    elif fence is not None and line.strip().startswith(fence):
      blocks.append((start, lang, "\n".join(body)))
      fence = None
      prose.append("")
    elif fence is not None:
      body.append(line)
      prose.append("")
    else:
      prose.append(line)
  return blocks, "\n".join(prose)


def shell_lines(block: str, first_line: int) -> list[tuple[int, str]]:
  """Logical lines of a shell block: `\\`-continued lines joined."""
  out, pending, start = [], "", first_line
  for i, line in enumerate(block.splitlines(), first_line):
    if not pending:
      start = i
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1] + " "
      continue
    out.append((start, pending + line))
    pending = ""
  if pending:
    out.append((start, pending))
  return out


def inline_code(prose: str) -> list[tuple[int, str]]:
  """`code` spans of the prose (a span may wrap lines), with their line numbers."""
  return [
    (prose.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split()))
    for m in re.finditer(r"(`+)(.+?)\1", prose, re.DOTALL)
  ]


def tokens(line: str) -> list[list[str]]:
  """The simple commands of a shell line (split at `&&`, `||`, `;`, `|`), redirections
  left out."""
  lex = shlex.shlex(line, posix=True, punctuation_chars=True)
  lex.whitespace_split = True
  lex.commenters = "#"
  commands, current, words = [], [], list(lex)
  i = 0
  while i < len(words):
    word = words[i]
    if word[0] in "<>":  # A redirection (`> f`, `2>&1`): drop it, its target and its fd.
      if current and current[-1].isdigit():
        current.pop()
      i += 2
      continue
    if set(word) <= set("();|&"):
      commands.append(current)
      current = []
    else:
      current.append(word)
    i += 1
  return [c for c in commands + [current] if c]


def parse_command(words: list[str], where: str) -> Command | None:
  """The command if it runs an mmtl module, pytest or a script of this repo, else None."""
  while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
    words = words[1:]  # VAR=value python ...
  if not words:
    return None
  if words[0] in ("sbatch", "bash", "sh"):  # sbatch [options] launch/slurm.sbatch ...
    scripts = [i for i, w in enumerate(words) if SCRIPT.fullmatch(w)]
    if not scripts:
      return None
    return Command(where, words[scripts[0]], tuple(words[scripts[0] + 1 :]), False)
  if SCRIPT.fullmatch(words[0]):
    return Command(where, words[0], tuple(words[1:]), False)
  if not re.fullmatch(r"(.*/)?python[\d.]*", words[0]):
    return None
  i = 1
  while i < len(words) and words[i].startswith("-") and words[i] not in ("-m", "-c"):
    i += 1  # Interpreter options (-u, -X ...).
  if i + 1 < len(words) and words[i] == "-m":
    module = words[i + 1]
    if module == "mmtl" or module.startswith("mmtl.") or module == "pytest":
      return Command(where, module, tuple(words[i + 2 :]), True)
    return None
  if i < len(words) and words[i] != "-c" and words[i].endswith(".py"):
    return Command(where, words[i], tuple(words[i + 1 :]), False)
  return None


def commands_in(text: str, name: str) -> list[Command]:
  blocks, prose = split_markdown(text)
  lines = [
    line for start, lang, body in blocks if lang in SHELL_LANGS for line in shell_lines(body, start)
  ]
  lines += [(n, span) for n, span in inline_code(prose) if "python" in span or "launch/" in span]
  out = []
  for n, line in lines:
    try:
      parsed = tokens(line)
    except ValueError as e:  # Unbalanced quotes: only a problem if it was a command.
      assert not re.search(r"python\S* .*-m mmtl", line), f"{name}:{n}: {e}: {line}"
      continue
    out += [c for words in parsed if (c := parse_command(words, f"{name}:{n}"))]
  return out


def doc_commands() -> list[Command]:
  return [
    c for path in doc_files() for c in commands_in(path.read_text(), str(path.relative_to(REPO)))
  ]


# ---------------------------------------------------------------- checks ---


@functools.cache
def defined_flags() -> frozenset[str]:
  """absl flag names defined anywhere in mmtl (their scripts and mmtl.config)."""
  names = set()
  for file in (REPO / "mmtl").rglob("*.py"):
    names |= set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", file.read_text()))
  return frozenset(names)


@functools.cache
def load_config(spec: str) -> mlc.ConfigDict:
  """`--config PATH[:ARGS]` as mmtl.train loads it (paths relative to the repository)."""
  path, sep, arg = spec.partition(":")
  return config_lib.load_file(str(REPO / path) + sep + arg)


@functools.cache
def quickstart_defaults() -> mlc.ConfigDict:
  return config_lib.with_defaults(load_config(QUICKSTART))


def apply(base: mlc.ConfigDict, overrides: list[tuple[str, str]], where: str) -> None:
  """The overrides on `base` through mmtl.config, then its type checks; raises ConfigError."""
  try:
    config_lib.with_defaults(config_lib.apply_overrides(base, overrides))
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"{where}: {e}") from None


def is_known_key(key: str) -> bool:
  """Whether `a.b.c` names a key of mmtl.config.schema()."""
  node = config_lib.schema()
  for part in key.split("."):
    if not isinstance(node, dict):
      return True  # Below a leaf: free-form values (a tower's config dict); apply() decides.
    if config_lib.ANY_NAME in node:
      node = node[config_lib.ANY_NAME]
    elif part in node:
      node = node[part]
    else:
      return False
  return True


def missing_path_reason(path: str) -> str | None:
  """Why a path a command names need not exist in the repository, or None if it must."""
  if is_placeholder(path):
    return "a placeholder"
  return next((why for prefix, why in NOT_IN_REPO.items() if path.startswith(prefix)), None)


@dataclasses.dataclass
class Flags:
  config: str | None = None
  overrides: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  named: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # --flag -> values
  positional: list[str] = dataclasses.field(default_factory=list)


def parse_flags(args: tuple[str, ...]) -> Flags:
  """`--config X`, `--config.K=V` / `--config.K V` (as mmtl.config.parse_flags reads them),
  other `--flag[=value]`, and positional arguments (`--` ends nothing: the flags after it
  go to the trainer, whose --config.* overrides are checked the same way)."""
  out, i = Flags(), 0
  while i < len(args):
    arg = args[i]
    value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
    if arg == "--":
      pass
    elif arg.startswith("--config."):
      key, sep, text = arg[len("--config.") :].partition("=")
      if not sep and value is not None:
        text, i = value, i + 1
      if not is_placeholder(key):
        out.overrides.append((key, text))
    elif arg == "--config" or arg.startswith("--config="):
      if arg == "--config":
        out.config, i = value, i + 1
      else:
        out.config = arg.partition("=")[2]
    elif arg.startswith("--"):
      name, sep, text = arg[2:].partition("=")
      if not sep and value is not None and not value.startswith("-"):
        text, i = value, i + 1
      out.named.setdefault(name, []).append(text)
    elif arg.startswith("-"):
      pass  # Short options of other tools (pytest -q).
    else:
      out.positional.append(arg)
    i += 1
  return out


def grid_values(spec: str) -> tuple[str, list[str]]:
  """`--grid KEY=V1,V2` or `KEY=[...]` as launch/sweep.py reads it, values as flag text."""
  key, _, values = spec.partition("=")
  if values.lstrip().startswith("["):
    return key, [v if isinstance(v, str) else repr(v) for v in ast.literal_eval(values)]
  return key, values.split(",")


PYTEST_OPTIONS_WITH_VALUES = ("-m", "-k", "-n", "-p")


def check_command(cmd: Command) -> None:
  """Raises (AssertionError, ConfigError) for the first thing of `cmd` that is not real."""
  if cmd.program == "pytest":
    args = iter(cmd.args)
    for arg in args:
      if arg in PYTEST_OPTIONS_WITH_VALUES:
        next(args, None)  # -m "not slow", -n 0: not a test path.
      elif not arg.startswith("-"):
        assert (REPO / arg.split("::")[0]).exists(), f"{cmd.where}: no test path {arg}"
    return
  flags = parse_flags(cmd.args)
  if cmd.module:
    assert importlib.util.find_spec(cmd.program) is not None, (
      f"{cmd.where}: `python -m {cmd.program}`: no module {cmd.program}"
    )
    for name in flags.named:
      known = defined_flags()
      assert name in known or (name.startswith("no") and name[2:] in known), (
        f"{cmd.where}: `python -m {cmd.program}`: --{name} is not an absl flag defined in mmtl"
      )
  else:
    assert (REPO / cmd.program).is_file(), f"{cmd.where}: {cmd.program} does not exist"
  if cmd.program not in ("mmtl.train", "mmtl.evaluate") and cmd.program not in TRAINER_SCRIPTS:
    return  # mmtl.bench and other scripts: the module or file is what is checked.

  spec = flags.config
  if cmd.program == "launch/slurm.sbatch" and flags.positional:
    spec = flags.positional[0]  # sbatch launch/slurm.sbatch CONFIG WORKDIR [FLAGS]
  if cmd.program == "mmtl.evaluate":
    assert spec is None, f"{cmd.where}: mmtl.evaluate takes its config from the workdir"
    apply(quickstart_defaults(), flags.overrides, cmd.where)  # The workdir: test_evaluate_workdir.
    return
  if spec is None:
    assert not flags.overrides, f"{cmd.where}: --config.* overrides without --config"
    return
  if is_placeholder(spec):
    base = quickstart_defaults()  # CONFIG.py[:ARGS]: the overrides still have to be keys.
  else:
    base = load_config(spec)
  apply(base, flags.overrides, cmd.where)

  if cmd.program == "launch/sweep.py":
    for sweep in flags.named.get("sweep", []):
      path, _, arg = sweep.partition(":")
      module = config_lib.load_py(REPO / path)
      assert hasattr(module, "get_sweep"), f"{cmd.where}: {path} defines no get_sweep()"
      assert module.get_sweep(arg) if arg else module.get_sweep(), f"{cmd.where}: empty sweep"
    for axis in flags.named.get("grid", []):
      key, values = grid_values(axis)
      for value in values:
        if key.startswith("arg."):
          if not is_placeholder(spec):
            load_config(spec + ("," if ":" in spec else ":") + f"{key[4:]}={value}")
        else:
          apply(base, [(key, value)], f"{cmd.where} --grid {key}={value}")


COMMANDS = doc_commands()


def test_the_docs_show_commands():
  programs = {c.program for c in COMMANDS}
  assert {"mmtl.train", "mmtl.evaluate", "mmtl.bench", "launch/sweep.py", "pytest"} <= programs


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.where} {c.program}" for c in COMMANDS])
def test_command(cmd):
  check_command(cmd)


EVALUATE = [c for c in COMMANDS if c.program == "mmtl.evaluate" and c.args]  # Not bare mentions.


@pytest.mark.parametrize("cmd", EVALUATE, ids=[c.where for c in EVALUATE])
def test_evaluate_workdir(cmd):
  """mmtl.evaluate reads its config from `--workdir`; one in the repository is checked
  with the command's overrides, one elsewhere (a run's output) is skipped, saying why."""
  workdir = (parse_flags(cmd.args).named.get("workdir") or [None])[0]
  assert workdir, f"{cmd.where}: mmtl.evaluate needs --workdir"
  config_json = REPO / workdir / config_lib.CONFIG_FILE
  if not config_json.exists():
    reason = missing_path_reason(workdir)
    assert reason, f"{cmd.where}: --workdir {workdir} is not in the repository"
    pytest.skip(f"{cmd.where}: --workdir {workdir} is {reason}, not in the repository")
  apply(config_lib.load_json(config_json), parse_flags(cmd.args).overrides, cmd.where)


def config_keys_in(text: str, name: str) -> list[tuple[str, str, str | None]]:
  """(where, key, value or None) of every `--config.KEY[=VALUE]` in `text`. Lines that
  show an error message show a bad override on purpose and are left out."""
  return [
    (f"{name}:{n}", m.group(1), m.group(2)[1:] if m.group(2) else None)
    for n, line in enumerate(text.splitlines(), 1)
    if "Error" not in line and "error:" not in line
    for m in CONFIG_KEY.finditer(line)
  ]


def check_prose_keys(found: list[tuple[str, str, str | None]]) -> None:
  for where, key, value in found:
    assert is_known_key(key), f"{where}: --config.{key} is not a key of mmtl.config.schema()"
    if value is not None and not is_placeholder(value):
      apply(load_config(QUICKSTART), [(key, value)], f"{where}: --config.{key}={value}")


def test_config_keys_in_docs_and_launch_scripts_exist():
  """Every `--config.KEY` the docs or launch/ scripts mention is a key, and with a value
  it parses as one (on the quickstart config)."""
  files = doc_files() + sorted(p for p in (REPO / "launch").iterdir() if p.is_file())
  found = [k for p in files for k in config_keys_in(p.read_text(), str(p.relative_to(REPO)))]
  assert len({key for _, key, _ in found}) >= 10, found
  check_prose_keys(found)


def test_config_files_in_prose_load():
  """`--config configs/x.py[:ARGS]` outside commands (e.g. a wrapped inline span) loads too."""
  for path in doc_files():
    text = " ".join(path.read_text().split())
    for spec in re.findall(r"--config[ =](configs/[^\s`\"')]+)", text):
      if not is_placeholder(spec):
        load_config(spec)


# ---------------------------------------------------------------- links ---


def slug(heading: str) -> str:
  """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
  return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
  _, prose = split_markdown(path.read_text())
  seen: dict[str, int] = {}
  out = set()
  for line in prose.splitlines():
    if m := re.match(r"#{1,6}\s+(.*)", line):
      base = slug(m.group(1))
      out.add(base if base not in seen else f"{base}-{seen[base]}")
      seen[base] = seen.get(base, 0) + 1
  return out


def test_relative_links_resolve():
  for path in doc_files():
    _, prose = split_markdown(path.read_text())
    prose = re.sub(r"(`+).+?\1", lambda m: "\n" * m.group(0).count("\n"), prose, flags=re.DOTALL)
    for n, target in (
      (prose.count("\n", 0, m.start()) + 1, m.group(1))
      for m in re.finditer(r"\]\(([^)\s]+)\)", prose)
    ):
      if re.match(r"[a-z]+:", target):
        continue  # https://, mailto:
      file, _, anchor = target.partition("#")
      dest = (path.parent / file).resolve() if file else path
      where = f"{path.relative_to(REPO)}:{n}"
      assert dest.exists(), f"{where}: link to {target}: {dest} does not exist"
      if anchor:
        assert anchor in anchors(dest), f"{where}: link to {target}: no heading #{anchor}"


def test_readme_links_every_docs_page():
  readme = (REPO / "README.md").read_text()
  for page in sorted((REPO / "docs").glob("*.md")):
    assert f"](docs/{page.name})" in readme, f"README.md's Documentation list lacks {page.name}"


def test_readme_layout_table_matches_the_tree():
  """Every module of the package is in README's Layout table, and every path there exists."""
  readme = (REPO / "README.md").read_text()
  table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
  rows = [line for line in table.splitlines() if line.startswith("| `")]
  named = set()
  for row in rows:
    paths = re.findall(r"`([\w./*-]+)`", row.split(" | ")[0])
    folder = paths[0] if paths[0].endswith("/") else ""
    named |= {p for p in paths}
    # Files named in the description of a folder row (e.g. `fusion.py` in `mmtl/models/`).
    named |= {folder + f for f in re.findall(r"`([\w-]+\.py)`", row) if folder}
  for path in sorted(named):
    assert list(REPO.glob(path)), f"README's Layout table names {path}, which does not exist"
  modules = [
    p.relative_to(REPO).as_posix() for p in (REPO / "mmtl").rglob("*.py") if p.name != "__init__.py"
  ]
  missing = [m for m in sorted(modules) if m not in named]
  assert not missing, f"README's Layout table does not mention {missing}"


# ---------------------------------------------------------------- the checks themselves ---

# One mistake each, as a docs page would show it: a shell block (`\` continues a line).
BAD_COMMANDS = {
  "a made-up module": "python -m mmtl.trian --config configs/quickstart.py --workdir w",
  "a made-up key": (
    ".venv/bin/python -m mmtl.train --config configs/quickstart.py \\\n"
    "  --workdir workdirs/q --config.optim.lrr=0.1"
  ),
  "a wrongly typed value": (
    "python3 -m mmtl.train --config configs/quickstart.py --config.total_steps=abc"
  ),
  "a made-up config argument": "python -m mmtl.train --config configs/quickstart.py:colour=red",
  "a missing config file": "python -m mmtl.train --config configs/nope.py --workdir runs/x",
  "a made-up evaluate override": (
    "python -m mmtl.evaluate --workdir DIR --config.evals.val.inputt.split=test"
  ),
  "a made-up flag": "python -m mmtl.train --config configs/quickstart.py --work_dir runs/x",
  "a made-up grid key": (
    "python launch/sweep.py --config configs/quickstart.py --sweep_dir r \\\n  --grid optim.lrr=1,2"
  ),
  "a made-up trainer flag after --": (
    "launch/gpu.sh --config configs/quickstart.py --workdir r -- --config.optim.lrr=1"
  ),
  "a missing script": "python launch/sweeps.py --config configs/quickstart.py",
  "a missing test file": ".venv/bin/python -m pytest -q tests/test_nope.py",
}


@pytest.mark.parametrize("what", sorted(BAD_COMMANDS))
@pytest.mark.parametrize("inline", [False, True], ids=["block", "inline"])
def test_the_command_check_catches(what, inline):
  command = BAD_COMMANDS[what]
  if inline:  # A span on one line, without the continuation.
    text = "Run `" + " ".join(command.replace("\\", " ").split()) + "`."
  else:
    text = f"```bash\n{command}\n```\n"
  cmds = commands_in(text, "scratch.md")
  assert cmds, what
  with pytest.raises((AssertionError, config_lib.ConfigError)):
    for cmd in cmds:
      check_command(cmd)


@pytest.mark.parametrize(
  "text",
  [
    "Set `--config.optim.lrr=0.1` to ...",
    "see --config.model.fusio for ...",
    "`--config.model.num_classes=2.5`",
  ],
)
def test_the_prose_check_catches(text):
  found = config_keys_in(text, "scratch.md")
  assert found
  with pytest.raises((AssertionError, config_lib.ConfigError)):
    check_prose_keys(found)


def test_continuations_comments_and_chains_are_split():
  text = (
    "```bash\n# comment\nA=1 python3 -m venv .venv && .venv/bin/python -m mmtl.bench \\\n"
    "  --tiny --out /tmp/b 2>&1 | tee log.txt   # trailing\n```\n"
  )
  cmds = commands_in(text, "x.md")
  assert [(c.where, c.program, c.args) for c in cmds] == [
    ("x.md:3", "mmtl.bench", ("--tiny", "--out", "/tmp/b"))
  ]
