"""docs/results/paper_tables.md: every documented command builds and fits its data.

The page lists every table row of the DCL-CsTP and CAMContrast papers (row ids such as
`D1.7` or `C7.d2` in the first column of its markdown tables) and, in ```bash blocks, the
commands of each row after a `# <row id>` comment. For every command this test

- builds the config exactly as documented (the paper size and dataset), through the same
  absl / ml_collections flag parser the CLI uses (`--config FILE:args` + `--config.x=y`);
- builds it again at the test size (`size=tiny`, `data=phantoms`, `seg_data=phantoms`),
  with `runs/...` paths moved under a temporary folder, and checks that it is locked,
  that `methods.load_method` resolves every stage and that every stage's data resolves;
- runs the pre-flight in document order, the pipeline pre-flight for a pipeline
  (`train.pipeline.preflight`) and the stage's own `preflight` otherwise, with the
  outputs of the earlier commands planned, so a later command that reads them
  (`init_from=`, `crops_from=`, `--config.synthetic_dir=`) is checked against them.

Nothing trains. The page's row counts per table are pinned in `EXPECTED_ROWS`, so a row
cannot disappear unnoticed, and the status cells must name result files that exist.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
import shlex

import ml_collections as mlc
import pytest
from absl import flags
from ml_collections import config_flags

from medrep_jax import methods
from medrep_jax.data import registry
from medrep_jax.train import pipeline

from conftest import REPO_ROOT, shared_data_dir

DOC = REPO_ROOT / "docs" / "results" / "paper_tables.md"
# D = DCL-CsTP, C = CAMContrast; then the table (F: figure; A1, B1, ...: appendix tables),
# "." and the row ("d" marks a downstream task column).
ROW_ID = re.compile(r"(?:D|C)(?:F?\d+|A1|B[12]|C[12])\.d?\d+")
# Rows per table, in the paper's order: a deleted row fails here.
EXPECTED_ROWS = {
    # DCL-CsTP: Tables 1-4 and the figures with results
    "D1": 11, "D2": 10, "D3": 5, "D4": 6,
    "DF5": 1, "DF6": 1, "DF7": 1, "DF8": 1, "DF9": 2, "DF10": 3,
    # CAMContrast: Tables 1-13, A.1, B.1, B.2, C.1, C.2 and the figures with results
    "C1": 7, "C2": 5, "C3": 4, "C4": 7, "C5": 3, "C6": 4, "C7": 14, "C8": 5, "C9": 6,
    "C10": 3, "C11": 4, "C12": 12, "C13": 4, "CA1": 7, "CB1": 8, "CB2": 4, "CC1": 2,
    "CC2": 2, "CF5": 1, "CF6": 1, "CF7": 1, "CF8": 1,
}
STATUSES = ("run here (", "not run", "setup", "reference")
# What a row without commands of its own must say in its config cell.
NO_COMMANDS_OK = ("no config yet", "same as", "setup", "reference")
TINY = dict(size="tiny", data="phantoms")
CLI = ("python", "-m", "medrep_jax.main")
# ml_collections loads config files with the deprecated `load_module` (once per command).
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


@dataclasses.dataclass
class Row:
  id: str
  paper: str
  data: str
  config: str
  status: str


@dataclasses.dataclass
class Command:
  row: str
  text: str
  config_file: str   # e.g. "configs/finetune.py"
  arg: str           # the variant args after ':'
  overrides: list[str]
  workdir: str


def table_of(row_id: str) -> str:
  return row_id.split(".")[0]


def parse_rows(text: str) -> dict[str, Row]:
  rows: dict[str, Row] = {}
  for line in text.splitlines():
    if not line.startswith("|"):
      continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if not ROW_ID.fullmatch(cells[0]):
      continue
    assert len(cells) == 5, f"row {cells[0]}: expected 5 cells, got {len(cells)}: {line}"
    assert cells[0] not in rows, f"row id {cells[0]} appears twice"
    rows[cells[0]] = Row(*cells)
  return rows


def _split_command(row: str, text: str) -> Command:
  words = shlex.split(text)
  assert tuple(words[:3]) == CLI, f"{row}: not a medrep_jax.main command: {text}"
  spec = workdir = None
  overrides = []
  rest = iter(words[3:])
  for word in rest:
    if word in ("--config", "--workdir"):
      value = next(rest)
      word = f"{word}={value}"
    if word.startswith("--config="):
      spec = word[len("--config="):]
    elif word.startswith("--workdir="):
      workdir = word[len("--workdir="):]
    elif word.startswith("--config.") and "=" in word:
      overrides.append(word)
    else:
      raise AssertionError(f"{row}: unexpected argument {word!r} in: {text}")
  assert spec and workdir, f"{row}: a command needs --config and --workdir: {text}"
  config_file, _, arg = spec.partition(":")
  assert re.fullmatch(r"configs/\w+\.py", config_file), f"{row}: bad config path {spec}"
  return Command(row, text, config_file, arg, overrides, workdir)


def parse_commands(text: str) -> list[Command]:
  """The commands of every ```bash block, in document order, with their row ids."""
  commands = []
  for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
    row = None
    for line in block.replace("\\\n", " ").splitlines():
      line = line.strip()
      if not line:
        continue
      if line.startswith("#"):
        words = line[1:].split()
        if words and ROW_ID.fullmatch(words[0]):
          row = words[0]
        continue
      assert row is not None, f"a command before any '# <row id>' comment: {line}"
      commands.append(_split_command(row, line))
  return commands


DOC_TEXT = DOC.read_text()
ROWS = parse_rows(DOC_TEXT)
COMMANDS = parse_commands(DOC_TEXT)
ROWS_WITH_COMMANDS = list(dict.fromkeys(c.row for c in COMMANDS))  # in page order


# ------------------------------------------------------------------ building a command

def build(config_file: str, arg: str, overrides: list[str]) -> mlc.ConfigDict:
  """The locked config of `--config FILE:arg --config.x=y ...`, parsed as `main` parses it
  (ml_collections' config flag on a fresh absl FlagValues)."""
  argv = ["medrep_jax.main", f"--config={REPO_ROOT / config_file}:{arg}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  config = values["config"].value
  if not isinstance(config, mlc.ConfigDict):
    config.get("method")  # ml_collections' placeholder raises the file's load error
    raise AssertionError(f"could not load {config_file}:{arg}")
  return config


def _moved(value: str, root: pathlib.Path) -> str:
  return str(root / value) if value.startswith("runs/") else value


def tiny_args(arg: str, root: pathlib.Path) -> str:
  """The variant args at the test size: size=tiny, phantoms, `runs/` paths under root."""
  pairs = dict(p.split("=", 1) for p in arg.split(",") if p)
  pairs.update(TINY)
  if pairs.get("seg_data"):
    pairs["seg_data"] = "phantoms"
  return ",".join(f"{k}={_moved(v, root)}" for k, v in pairs.items())


def tiny_overrides(overrides: list[str], root: pathlib.Path) -> list[str]:
  out = []
  for o in overrides:
    key, _, value = o.partition("=")
    out.append(f"{key}={_moved(value, root)}")
  return out


def stages_of(config) -> list[tuple[str, mlc.ConfigDict]]:
  if pipeline.is_pipeline(config):
    return [(name, config[name]) for name in config.stages]
  return [("", config)]


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> dict[str, list[str]]:
  """Every command checked in document order; row id -> the errors of its commands."""
  root = tmp_path_factory.mktemp("paper_tables")
  planned: dict[str, int] = {}
  errors: dict[str, list[str]] = {}
  for c in COMMANDS:
    try:
      documented = build(c.config_file, c.arg, c.overrides)
      assert documented.is_locked
      config = build(c.config_file, tiny_args(c.arg, root), tiny_overrides(c.overrides, root))
      assert config.is_locked, "the config is not locked"
      for name, stage in stages_of(config):
        methods.load_method(stage)  # resolves config.method and config.stage
        if "data" in stage:
          # the 3-D configs read the volume phantoms
          assert stage.data.name in ("phantoms", "phantoms3d"), (
              f"stage {name!r} reads {stage.data.name}")
          assert len(registry.get_source(stage.data, "train")) > 0
      workdir = root / c.workdir
      if pipeline.is_pipeline(config):
        planned.update(pipeline.preflight(config, workdir))
      else:
        planned.update(methods.load_method(config, workdir=workdir).preflight(planned))
      planned.setdefault(str(workdir), 0)
    except Exception as e:  # pylint: disable=broad-except  # reported per row below
      errors.setdefault(c.row, []).append(f"{c.text}\n  -> {type(e).__name__}: {e}")
  return errors


@pytest.mark.parametrize("row", ROWS_WITH_COMMANDS)
def test_documented_commands_build_at_tiny_size_and_fit_their_data(row, checked):
  assert not checked.get(row), "\n".join(checked[row])


# ------------------------------------------------------------------ the page itself

def test_every_table_keeps_its_rows():
  counts: dict[str, int] = {}
  for row_id in ROWS:
    counts[table_of(row_id)] = counts.get(table_of(row_id), 0) + 1
  assert counts == EXPECTED_ROWS


def test_every_row_has_commands_or_says_why_not():
  with_commands = {c.row for c in COMMANDS}
  for row in ROWS.values():
    assert row.status.startswith(STATUSES), f"{row.id}: status {row.status!r}"
    for path in re.findall(r"docs/results/[\w.-]+\.md", row.status):
      assert (REPO_ROOT / path).is_file(), f"{row.id}: {path} does not exist"
    config = row.config.lower()
    if row.id in with_commands:
      assert "no config yet" not in config or "nearest" in config, (
          f"{row.id} has commands but says 'no config yet' without a 'nearest' run")
    else:
      assert config.startswith(NO_COMMANDS_OK) or "same as" in config, (
          f"{row.id} has no commands and does not say why: {row.config!r}")
    if "same as" in config:
      refs = ROW_ID.findall(row.config.split("same as", 1)[1])
      assert refs, f"{row.id}: 'same as' names no row"
      for ref in refs:
        assert ref in ROWS and ref != row.id, f"{row.id}: 'same as {ref}': no such row"


def test_every_command_belongs_to_a_row_that_names_its_config_file():
  for c in COMMANDS:
    assert c.row in ROWS, f"commands under '# {c.row}', which is not a table row"
    name = pathlib.Path(c.config_file).name
    assert name in ROWS[c.row].config, (
        f"{c.row}: the config cell {ROWS[c.row].config!r} does not name {name}")


def test_run_paths_refer_to_earlier_workdirs():
  """Every `runs/...` a command reads is the workdir (or inside the workdir) of an earlier
  command, and no two commands share a workdir."""
  seen: list[str] = []
  for c in COMMANDS:
    assert c.workdir.startswith("runs/"), f"{c.row}: workdir {c.workdir} is not under runs/"
    assert c.workdir not in seen, f"{c.row}: workdir {c.workdir} is used twice"
    values = [p.split("=", 1)[1] for p in c.arg.split(",") if "=" in p]
    values += [o.split("=", 1)[1] for o in c.overrides]
    for value in values:
      if value.startswith("runs/"):
        assert any(value == w or value.startswith(w + "/") for w in seen), (
            f"{c.row}: {value} is not written by an earlier command on the page")
    seen.append(c.workdir)


def test_shared_presets_resolve_on_the_shared_data():
  """The documented commands that read a preset of ../shared/data (no data.root of their
  own) find it: the real layout, not the phantoms."""
  if shared_data_dir() is None:
    pytest.skip("real data not found: set MEDREP_DATA_DIR or place ../shared/data beside "
                "the repo")
  done: set[str] = set()
  for c in COMMANDS:
    for name, stage in stages_of(build(c.config_file, c.arg, c.overrides)):
      if "data" not in stage:
        continue
      preset = registry.PRESETS[stage.data.name]
      key = stage.data.to_json()
      if "folder" not in preset or stage.data.root or key in done:
        continue
      done.add(key)
      source = registry.get_source(stage.data, "train")
      assert len(source) > 0, f"{c.row} {name}: {stage.data.name} has no train items"
  assert done, "no documented command reads a shared preset"
