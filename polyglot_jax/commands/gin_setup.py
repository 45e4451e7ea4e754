"""Gin: search paths, binding parsing and one-line error messages for the CLI and notebooks.

Users write T5X-style flags: `--gin_file=` (repeatable), `--gin.MACRO=value`, and
`--gin_search_paths=`. Unquoted string values (`--gin.MODEL_DIR=/tmp/run`) are quoted for them.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import logging
import os
import re
from typing import Sequence

import gin
from gin import resource_reader

# The gin files ship inside the package (as T5X's configs do), so a wheel install has them too;
# the repository's top-level gin/ is a link to this folder.
GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


class _QuietSearchMisses(logging.Filter):
  """Drops gin's 'Path not found' log lines: it logs one for every search path it tries."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Path not found:")


def _system_path_file_exists(path: str) -> bool:
  """gin's package-path lookup, minus its crash on plain folders.

  gin treats 'runs/pretrain.gin' as file 'pretrain.gin' of a Python package 'runs'; a plain
  folder named like that in the working directory (e.g. our own MODEL_DIR=runs/quickstart) is
  a namespace package without an origin, and gin 0.5.0 raises TypeError instead of moving on to
  the next search path.
  """
  try:
    return resource_reader.system_path_file_exists(path)
  except TypeError:
    return False


def _guard_gin_file_readers() -> None:
  readers = gin.config._FILE_READERS  # pylint: disable=protected-access
  for i, (reader, exists) in enumerate(readers):
    if exists is resource_reader.system_path_file_exists:
      readers[i] = (reader, _system_path_file_exists)


# Every module that defines gin configurables, imported by `register_configurables` so that any
# gin file (and `gin.get_configurable`) sees all of them; a new configurable's module goes here.
GIN_MODULES = (
    "polyglot_jax.models.config", "polyglot_jax.models.model",
    "polyglot_jax.parallel.partitioning",
    "polyglot_jax.data.pipeline", "polyglot_jax.data.pruning", "polyglot_jax.data.chat",
    "polyglot_jax.data.chat_tasks",
    "polyglot_jax.training.optimizers", "polyglot_jax.training.schedules",
    "polyglot_jax.training.setup", "polyglot_jax.training.preference",
    "polyglot_jax.training.merging",
    "polyglot_jax.compression.sparsity", "polyglot_jax.compression.quantization",
    "polyglot_jax.inference.evaluation",
    "polyglot_jax.commands.evaluate", "polyglot_jax.commands.infer",
    "polyglot_jax.commands.score", "polyglot_jax.commands.prune", "polyglot_jax.commands.audit",
)


def register_configurables() -> None:
  """Imports `GIN_MODULES`: registering with gin is what importing them does."""
  for name in GIN_MODULES:
    importlib.import_module(name)


def normalize_binding(binding: str) -> str:
  """'MODEL_DIR=/tmp/x' -> 'MODEL_DIR="/tmp/x"'; literals, @refs and %macros stay as written."""
  name, sep, value = binding.partition("=")
  if not sep:
    raise ValueError(f"gin binding {binding!r} has no '='; write --gin.NAME=value.")
  value = value.strip()
  if value[:1] in ("@", "%") or value in ("None", "True", "False"):
    return f"{name.strip()} = {value}"
  try:
    ast.literal_eval(value)
  except (ValueError, SyntaxError):
    value = repr(value)
  return f"{name.strip()} = {value}"


def parse(gin_files: Sequence[str], bindings: Sequence[str],
          search_paths: Sequence[str] = ()) -> None:
  """Registers configurables, then parses files and bindings (later ones win)."""
  register_configurables()
  _guard_gin_file_readers()
  root = logging.getLogger()
  if not any(isinstance(f, _QuietSearchMisses) for f in root.filters):
    root.addFilter(_QuietSearchMisses())
  for path in [GIN_DIR, *search_paths]:
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(
      list(gin_files), [normalize_binding(b) for b in bindings], finalize_config=True)


def _registered_names() -> list[str]:
  registry = gin.config._REGISTRY  # pylint: disable=protected-access
  return sorted({selector.split(".")[-1] for selector, _ in registry.items()})


_MISSING_BINDINGS = re.compile(r"Required bindings for `(\w+)` not provided in config: (.*)")


def is_missing_binding(exc: BaseException) -> bool:
  """gin's error (a RuntimeError) for a configurable called without a gin.REQUIRED argument."""
  return bool(_MISSING_BINDINGS.match(str(exc).strip()))


def one_line_error(exc: BaseException) -> str:
  """A readable one-line description of a configuration error, with how to fix it."""
  message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
  missing_macro = re.match(r"(\w+)/macro\.value set to `%gin\.REQUIRED`", message)
  if missing_macro:
    return (f"gin macro {missing_macro.group(1)} is required but not set; pass "
            f"--gin.{missing_macro.group(1)}=... or bind it in a gin file.")
  missing_file = re.match(r"Unable to open file: (.*?)\. Searched config paths: (.*)", message)
  if missing_file:
    return (f"gin file {missing_file.group(1)} not found (searched {missing_file.group(2)}); "
            "check --gin_file and --gin_search_paths.")
  unknown = re.match(r"No configurable matching '([^']+)'", message)
  if unknown:
    close = difflib.get_close_matches(unknown.group(1).split(".")[-1], _registered_names(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown gin configurable {unknown.group(1)!r} in a binding.{hint}"
  required = _MISSING_BINDINGS.match(message)
  if required:
    return (f"{required.group(1)} needs gin bindings for {required.group(2)}; set them in a gin "
            "file or with --gin.")
  if isinstance(exc, SyntaxError):
    return f"gin value could not be parsed: {message}"
  return message
