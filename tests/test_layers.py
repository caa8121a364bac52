"""The package's layers (docs/architecture.md): no import upwards, no import cycle.

Walks every module of medrep_jax/ with `ast` (function-level imports included), so the
structure cannot decay silently: a method importing the trainer, or the library importing
a method, fails here.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "medrep_jax"

# Low to high. A module may import its own layer and the layers below it.
LAYERS = (
    ("xla_flags", "config_lib", "errors", "quiet", "fileio"),
    ("core", "data", "diffusion", "models"),
    ("losses",),
    ("eval",),
    ("methods",),
    ("train", "inference", "export"),
    ("main", "predict", "evaluate", "radiomics"),
)
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Every medrep_jax module `path` imports (`from medrep_jax import x` -> medrep_jax.x)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("medrep_jax")}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
        node.module.startswith("medrep_jax"):
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() or \
            (PACKAGE.parent / sub.replace(".", "/")).is_dir()
        out.add(sub if is_module else node.module)
  return out


def _graph() -> dict[str, set[str]]:
  return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int | None:
  parts = module.split(".")
  return LAYER_OF.get(parts[1]) if len(parts) > 1 else None


def test_every_package_has_a_layer():
  names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
  assert names <= set(LAYER_OF), f"add {sorted(names - set(LAYER_OF))} to LAYERS"


def test_no_import_from_a_lower_layer_to_a_higher_one():
  upward = []
  for module, imported in _graph().items():
    low = _layer(module)
    for target in imported:
      high = _layer(target)
      if low is not None and high is not None and high > low:
        upward.append(f"{module} (layer {low}) imports {target} (layer {high})")
  assert not upward, "\n".join(sorted(upward))


def test_no_import_cycle():
  graph = _graph()
  graph = {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}
  # Package __init__ modules are imported by their children implicitly; ignore that edge.
  graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(m: str) -> list[str] | None:
    state[m] = 1
    stack.append(m)
    for t in sorted(graph[m]):
      if state.get(t) == 1:
        return stack[stack.index(t):] + [t]
      if t not in state and (cycle := visit(t)):
        return cycle
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state and (cycle := visit(m)):
      pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_catches_an_upward_import(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from medrep_jax.train import trainer\nfrom medrep_jax import methods\n")
  assert _imports(bad) == {"medrep_jax.train.trainer", "medrep_jax.methods"}
  assert _layer("medrep_jax.core.state") < _layer("medrep_jax.methods")
  assert _layer("medrep_jax.methods.base") < _layer("medrep_jax.train.trainer")
