"""Errors a user can act on, and how the command lines show them (layer 0).

The error types here are shared by every layer. The command lines (`main`, and any other
`python -m medrep_jax.X`) catch these and the other user errors (`config_lib.ConfigError`,
`data.sources.DataError`, `OSError`) with `handled(...)` and print the message as one
paragraph with no traceback, exit code 2 (DESIGN.md, principle 6). A message says what went
wrong, names the file, key, array or shape, and says what to do. `--debug` or
`MEDREP_DEBUG=1` shows the traceback instead. Library noise (XLA's C++ alarms, orbax's
warnings) is hidden unless `--verbose` or `MEDREP_VERBOSE=1` (see `quiet.py`).

    def main(argv):
      errors.install_sigterm()
      with errors.handled(DataError):
        ...
    app.run(main, flags_parser=errors.parse_flags)
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from typing import Callable, Iterator

from medrep_jax import config_lib
from medrep_jax import quiet

EXIT_USER_ERROR = 2
EXIT_SIGTERM = 143
MISSING = "(absent)"  # the value shown for a config key one of two configs lacks


class WorkdirError(RuntimeError):
  """A workdir cannot be used as asked (held by another run, not writable, ...)."""


class WorkdirLocked(WorkdirError):
  """Another live run holds the workdir's lock file."""


class ConfigChanged(WorkdirError):
  """The config differs from the one the run in the workdir was started with.

  Attributes:
    changes: dotted key -> (old value, new value); a missing key is `MISSING`.
  """

  def __init__(self, message: str, changes: dict[str, tuple]):
    super().__init__(message)
    self.changes = changes


class CheckpointMismatch(WorkdirError):
  """A checkpoint does not fit the state the config builds (array paths or shapes)."""


class NonFiniteError(FloatingPointError):
  """A logged metric, or the state about to be saved, holds NaN or Inf."""


class Interrupted(SystemExit):
  """SIGTERM outside the train loop (start-up, compilation, final evaluation).

  A `SystemExit` with code 143 (like a plain SIGTERM), so `except Exception` does not
  swallow it and the lock is still released on the way out.
  """

  def __init__(self, message: str = "stopped by SIGTERM"):
    super().__init__(EXIT_SIGTERM)
    self.message = message

  def __str__(self) -> str:
    return self.message


# ---------------------------------------------------------------- the command lines

# Headings by class name (DataError lives in a higher layer, so names, not classes).
_TITLES = (("ConfigChanged", "the config changed"),
           ("WorkdirLocked", "the workdir is in use"),
           ("CheckpointMismatch", "the checkpoint does not fit"),
           ("WorkdirError", "workdir problem"),
           ("ConfigError", "config error"),
           ("DataError", "data error"),
           ("NonFiniteError", "NaN or Inf"),
           ("FileNotFoundError", "file not found"),
           ("OSError", "cannot read or write a file"))


def debug_requested(argv: list[str] | None = None) -> bool:
  """`MEDREP_DEBUG=1`, or `--debug` on the command line."""
  if os.environ.get("MEDREP_DEBUG", "").lower() not in ("", "0", "false", "no"):
    return True
  return any(a in ("--debug", "-debug", "--debug=true", "--debug=True", "--debug=1")
             for a in (argv if argv is not None else sys.argv))


def _title(exc: BaseException) -> str:
  names = {c.__name__ for c in type(exc).__mro__}
  return next((title for name, title in _TITLES if name in names), type(exc).__name__)


def _message(exc: BaseException) -> str:
  if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, WorkdirError):
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror}{where}. Check the path, its permissions and the free disk space."
  if isinstance(exc, KeyError) and exc.args:
    return str(exc.args[0])  # str(KeyError) is the repr of its message
  return str(exc)


def report(exc: BaseException) -> int:
  """Prints `exc` for a person (one paragraph, no traceback); returns the exit code."""
  print(f"\nmedrep_jax: {_title(exc)}: {_message(exc)}\n(Run with --debug or MEDREP_DEBUG=1 "
        f"to see the Python traceback.)", file=sys.stderr, flush=True)
  return EXIT_USER_ERROR


def user_errors(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
  """The errors `handled` turns into a message: these, ConfigError, OSError and `extra`."""
  return (config_lib.ConfigError, WorkdirError, NonFiniteError, OSError, *extra)


@contextlib.contextmanager
def handled(*extra: type[BaseException]) -> Iterator[None]:
  """Turns user errors (see `user_errors`) into a message and exit code 2, and
  `Interrupted` into a message and exit code 143; re-raises under `--debug`."""
  try:
    yield
  except Interrupted as e:
    print(f"\nmedrep_jax: {e}", file=sys.stderr, flush=True)
    if debug_requested():
      raise
    sys.exit(EXIT_SIGTERM)
  except user_errors(*extra) as e:  # pylint: disable=catching-non-exception
    if debug_requested():
      raise
    sys.exit(report(e))


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
  raise Interrupted(
      "stopped by SIGTERM outside the training steps (start-up, compilation or the final "
      "evaluation). The workdir keeps its last complete checkpoint, if any; re-run the same "
      "command to resume.")


def install_sigterm() -> None:
  """SIGTERM raises `Interrupted` (a message, exit code 143, locks released) instead of
  ending the process silently; the train loop installs its own save-and-exit handler."""
  if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
    signal.signal(signal.SIGTERM, _on_sigterm)


def _chain(exc: BaseException) -> list[BaseException]:
  out = []
  while exc is not None and exc not in out:
    out.append(exc)
    exc = exc.__cause__ or exc.__context__
  return out


def _unknown_key(exc: BaseException, argv: list[str]) -> str | None:
  """ml_collections' "Did you mean" for an unknown `--config.x` override, as one line.

  It arrives as a KeyError (or an AttributeError holding one) whose text is the key's
  repr and the hint on a second line.
  """
  inner = exc.args[0] if isinstance(exc, AttributeError) and exc.args else exc
  if not (isinstance(inner, KeyError) and inner.args):
    return None
  first, _, hint = str(inner.args[0]).partition("\n")
  key = first.strip().strip("'\"")
  flag = next((a.split("=", 1)[0] for a in argv if a.startswith(("--config.", "-config."))
               and key in a.split("=", 1)[0].split(".")), None)
  where = f" in {flag}" if flag else ""
  return f"unknown config key {key!r}{where}. {' '.join(hint.split())}".strip()


_TRACE_LAST = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit)): ", re.M)


def _without_trace(text: str) -> str:
  """`text` on one line; a traceback in it is cut down to its final message."""
  found = list(_TRACE_LAST.finditer(text))
  if "Traceback (most recent call last)" in text and found:
    kind, message = found[-1].group(1), text[found[-1].end():]
    label = "config error" if kind.endswith("ConfigError") else kind.rsplit(".", 1)[-1]
    text = f"{label}: {message}"
  return " ".join(text.split())


def flag_error_message(exc: BaseException, argv: list[str] | None = None) -> str:
  """The message behind a flag-parsing error, as one readable line.

  absl and ml_collections wrap errors raised while a flag is parsed: an unknown
  `--config.x` override is an AttributeError holding a KeyError, and an error inside a
  config file's `get_config` (e.g. a ConfigError for a bad variant arg) comes back as the
  text of its traceback. This digs out the original message.
  """
  argv = argv if argv is not None else sys.argv
  for e in _chain(exc):
    if (text := _unknown_key(e, argv)) is not None:
      return text
    if isinstance(e, config_lib.ConfigError):
      return _without_trace(f"config error: {e}")
  return _without_trace(str(exc))


def parse_flags(argv: list[str], usage: str = "") -> list[str]:
  """absl's flag parsing (`app.run(main, flags_parser=errors.parse_flags)`), with an error
  printed as one line and exit code 2."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # any flag problem is the user's
    if debug_requested(argv):
      raise
    usage = f"\n{usage}" if usage else ""
    print(f"medrep_jax: {flag_error_message(e, argv)}{usage}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def add_debug_flag(parser) -> None:
  """`--debug` for an argparse command (default on with MEDREP_DEBUG=1)."""
  parser.add_argument("--debug", action="store_true", default=debug_requested([]),
                      help="show the Python traceback of an error")


def add_verbose_flag(parser) -> None:
  """`--verbose` for an argparse command (default on with MEDREP_VERBOSE=1). The filter
  itself is installed by `command` (or `quiet.install`) before the arguments are parsed."""
  parser.add_argument("--verbose", action="store_true",
                      default=quiet.verbose_requested([]),
                      help="show the libraries' log messages (XLA, orbax, JAX), hidden by "
                           "default; also MEDREP_VERBOSE=1")


def command(main: Callable[[], int]) -> None:
  """Runs an argparse command's `main()`: library noise hidden unless `--verbose`, SIGTERM
  gives a message and exit code 143, user errors (also ValueError and KeyError) one
  paragraph and exit code 2 unless `--debug`."""
  quiet.install(quiet.verbose_requested())
  install_sigterm()
  with handled(ValueError, KeyError):
    code = main()
  sys.exit(code)
