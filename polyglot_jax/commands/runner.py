"""One way to run a gin command, for the CLI and the sweep alike: its outcome is data.

`run_gin_command(name, gin_files, bindings)` parses the gin files, calls the command and returns
an `Outcome`: status, exit code and, for a user's mistake, the one line that says what to fix.
A bug (any other exception) is not a user error: it propagates with its traceback.
With `POLYGLOT_JAX_OUTCOME=<path>` in the environment the outcome is also written there as JSON,
so a parent process (the sweep) reads it instead of parsing stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import gin

from polyglot_jax.commands import gin_setup
from polyglot_jax.training.loop import NonFiniteLossError

FINISHED, FAILED, INTERRUPTED = "finished", "failed", "interrupted"
USER_ERROR_EXIT_CODE = 2
# The exit codes of a command that saved its state on these signals (128 + signal number).
INTERRUPT_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
OUTCOME_ENV = "POLYGLOT_JAX_OUTCOME"
_USER_ERRORS = (ValueError, OSError, SyntaxError, KeyError, ImportError, NonFiniteLossError)


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How a command ended.

  Attributes:
    status: "finished", "failed" (a user error) or "interrupted" (SIGINT/SIGTERM, state saved).
    exit_code: 0, 2, 130 or 143.
    error: the one-line error of a failed command.
    stopped_by: the signal of an interrupted command.
    result: what the command returned (in-process callers).
  """

  status: str
  exit_code: int
  error: str = ""
  stopped_by: str | None = None
  result: Any = None

  def write(self, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
      json.dump({"status": self.status, "exit_code": self.exit_code, "error": self.error,
                 "stopped_by": self.stopped_by}, f)


def read_outcome(path: str) -> Outcome | None:
  """The Outcome a command wrote to `path` (see OUTCOME_ENV), or None if it wrote none."""
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return Outcome(**json.load(f))


def is_user_error(exc: BaseException) -> bool:
  """Bad input or configuration (one line to the user) rather than a bug (a traceback)."""
  return isinstance(exc, _USER_ERRORS) or gin_setup.is_missing_binding(exc)


def failure(exc: BaseException) -> Outcome:
  return Outcome(FAILED, USER_ERROR_EXIT_CODE, gin_setup.one_line_error(exc))


def run(call: Callable[[], Any]) -> Outcome:
  """Runs `call`; a user error becomes a failed Outcome, an interrupted result an interrupted
  one (set POLYGLOT_JAX_TRACEBACK=1 to let user errors raise with their traceback)."""
  try:
    result = call()
  except Exception as exc:  # pylint: disable=broad-except
    if os.environ.get("POLYGLOT_JAX_TRACEBACK") or not is_user_error(exc):
      raise
    outcome = failure(exc)
  else:
    stopped_by = getattr(result, "interrupted", None)
    outcome = (Outcome(INTERRUPTED, INTERRUPT_EXIT_CODES[stopped_by], stopped_by=stopped_by,
                       result=result) if stopped_by else Outcome(FINISHED, 0, result=result))
  if os.environ.get(OUTCOME_ENV):
    outcome.write(os.environ[OUTCOME_ENV])
  return outcome


def run_gin_command(entry: Callable[[], Any], gin_files: Sequence[str], bindings: Sequence[str],
                    search_paths: Sequence[str] = (),
                    after_parse: Callable[[], None] | None = None) -> Outcome:
  """Parses gin (fresh config), runs `entry()` and returns its Outcome (see `run`).

  `after_parse` runs between parsing and the command (multi-host checks of the parsed config).
  """
  def call() -> Any:
    gin.clear_config()
    gin_setup.parse(gin_files, bindings, search_paths)
    if after_parse is not None:
      after_parse()
    return entry()

  return run(call)
