"""One module per method; `load_method(config)` finds it by `config.method`."""
from __future__ import annotations

import difflib
import importlib
import pkgutil

METHODS_PACKAGE = __name__


def available() -> list[str]:
  import medrep_jax.methods as pkg
  return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                if not (m.ispkg or m.name.startswith("_") or m.name == "base"
                        or m.name.endswith("_base")))


def load_method(config):
  """Imports `medrep_jax.methods.<config.method>` and builds its Method."""
  name = config.method
  names = available()
  if name not in names:
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown method {name!r}.{hint} Available: {', '.join(names)}")
  module = importlib.import_module(f"{METHODS_PACKAGE}.{name}")
  return module.build(config)
