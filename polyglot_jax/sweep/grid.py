"""Sweep specs: a base `polyglot-jax train` command plus axes; the grid is their cross product.

An axis is a named list of values. Each value is a labelled bundle of gin files and bindings
that is added to the base command:
  * a binding axis, `PRUNING_RATIO=0.0,0.5,0.8`: values of one gin binding (label: the value);
  * a file axis, `routing=routing/dense.gin,routing/mov_10.gin`: one gin file per value
    (label: the file's stem; every value ends in `.gin`);
  * a bundle axis (JSON specs only): `{"d64": ["TransformerConfig.emb_dim=64", ...], ...}`,
    a label per list of bindings and/or gin files (e.g. model sizes).
A JSON spec holds what the flags hold, and is what a user checks in (gin/sweeps/*.json):
  {"gin_files": [...], "bindings": [...], "gin_search_paths": [...],
   "axes": {"size": {...}, "PRUNING_RATIO": [0.0, 0.5]}}

Runs come in `itertools.product` order (the first axis varies slowest). A run is named by its
labels, `size=d64,PRUNING_RATIO=0.5` (as Hydra names multirun folders), and trains in
SWEEP_DIR/<name>, its MODEL_DIR. Its train command is the base gin files, the axes' gin files in
axis order, the base bindings, the axes' bindings, then MODEL_DIR: later wins, so an axis
overrides the base.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import os
import re
from typing import Any, Mapping, Sequence

from polyglot_jax.commands import gin_setup

_SPEC_KEYS = ("gin_files", "bindings", "gin_search_paths", "axes")


@dataclasses.dataclass(frozen=True)
class AxisValue:
  """One value of an axis: what it adds to the base command, and its label in run names."""

  label: str
  gin_files: tuple[str, ...] = ()
  bindings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Axis:
  name: str
  values: tuple[AxisValue, ...]


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the grid: its name, its label on every axis, and its train flags."""

  name: str
  labels: Mapping[str, str]  # axis name -> label
  model_dir: str
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...]
  search_paths: tuple[str, ...] = ()

  def train_args(self) -> list[str]:
    """The flags of `polyglot-jax train` for this run, MODEL_DIR last."""
    args = [f"--gin_file={f}" for f in self.gin_files]
    if self.search_paths:
      args.append(f"--gin_search_paths={','.join(self.search_paths)}")
    return args + [f"--gin.{b}" for b in self.bindings] + [f"--gin.MODEL_DIR={self.model_dir}"]


@dataclasses.dataclass(frozen=True)
class SweepSpec:
  """A base train command (gin files, bindings, search paths) and the axes of the grid."""

  axes: tuple[Axis, ...]
  gin_files: tuple[str, ...] = ()
  bindings: tuple[str, ...] = ()
  search_paths: tuple[str, ...] = ()

  def runs(self, sweep_dir: str) -> list[Run]:
    """Every run of the grid, in `itertools.product` order of the axes."""
    runs = []
    for values in itertools.product(*(axis.values for axis in self.axes)):
      labels = {axis.name: value.label for axis, value in zip(self.axes, values)}
      name = ",".join(f"{_safe(axis)}={_safe(label)}" for axis, label in labels.items())
      runs.append(Run(
          name=name, labels=labels, model_dir=os.path.join(sweep_dir, name),
          gin_files=self.gin_files + tuple(f for v in values for f in v.gin_files),
          bindings=self.bindings + tuple(b for v in values for b in v.bindings),
          search_paths=self.search_paths))
    return runs


def _safe(text: str) -> str:
  """`text` with every character that is awkward in a path or a shell word replaced by '_'."""
  return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def split_values(text: str) -> list[str]:
  """Splits 'a,b,(1, 2),{'x': 3}' at the commas outside brackets and quotes."""
  parts, current, depth, quote = [], [], 0, None
  for char in text:
    if quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      parts.append("".join(current).strip())
      current = []
      continue
    current.append(char)
  parts.append("".join(current).strip())
  return parts


def _is_gin_file(value: Any) -> bool:
  return isinstance(value, str) and value.endswith(".gin")


def _file_labels(paths: Sequence[str]) -> list[str]:
  """File stems ('routing/mov_10.gin' -> 'mov_10'); the path when two stems collide."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  if len(set(stems)) == len(stems):
    return stems
  return [os.path.splitext(p)[0].replace("/", "-") for p in paths]


def _literal_label(value: str) -> str:
  """The label of a binding value as written: a quoted string loses its quotes."""
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value
  return parsed if isinstance(parsed, str) else value


def make_axis(name: str, values: Sequence[Any] | Mapping[str, Sequence[str]]) -> Axis:
  """An axis from a list of binding values or gin files, or a {label: [bindings/files]} map."""
  if not name or not isinstance(name, str):
    raise ValueError(f"sweep axis name {name!r} must be a non-empty string.")
  if not values:
    raise ValueError(f"sweep axis {name!r} has no values; give it at least one.")
  if isinstance(values, Mapping):
    axis_values = []
    for label, items in values.items():
      items = [items] if isinstance(items, str) else list(items)
      if not all(isinstance(i, str) for i in items):
        raise ValueError(f"value {label!r} of sweep axis {name!r} must be a list of gin bindings "
                         "('Name.param=value') and gin files ('*.gin').")
      axis_values.append(AxisValue(str(label), tuple(i for i in items if _is_gin_file(i)),
                                   tuple(i for i in items if not _is_gin_file(i))))
  elif all(_is_gin_file(v) for v in values):
    axis_values = [AxisValue(label, gin_files=(path,))
                   for label, path in zip(_file_labels(values), values)]
  elif any(_is_gin_file(v) for v in values):
    raise ValueError(f"sweep axis {name!r} mixes gin files and binding values {list(values)}; "
                     "make one axis of gin files, or one of values for the binding "
                     f"{name!r}.")
  else:
    axis_values = []
    for value in values:
      text = value if isinstance(value, str) else repr(value)
      label = _literal_label(text) if isinstance(value, str) else text
      axis_values.append(AxisValue(label, bindings=(f"{name}={text}",)))
  safe_labels = [_safe(v.label) for v in axis_values]
  if len(set(safe_labels)) != len(safe_labels) or not all(safe_labels):
    raise ValueError(f"sweep axis {name!r} has empty or repeated labels {safe_labels}; name its "
                     "values in a JSON spec: {\"label\": [bindings], ...}.")
  return Axis(name, tuple(axis_values))


def parse_axis_flag(flag: str) -> Axis:
  """`--axis=NAME=V1,V2,...`: binding values (`PRUNING_RATIO=0.0,0.5`) or gin files."""
  name, sep, values = flag.partition("=")
  if not sep or not name.strip() or not values.strip():
    raise ValueError(f"--axis={flag!r}: write --axis=NAME=VALUE1,VALUE2 (a gin binding and its "
                     "values, or an axis name and gin files).")
  return make_axis(name.strip(), split_values(values))


def _resolve(path: str, search_paths: Sequence[str]) -> str | None:
  """`path` as given, else under gin/ or a search path (where gin would look); None if absent."""
  for folder in ("", gin_setup.GIN_DIR, *search_paths):
    candidate = os.path.join(folder, path) if folder else path
    if os.path.isfile(candidate):
      return candidate
  return None


def load_spec(path: str, search_paths: Sequence[str] = ()) -> dict[str, Any]:
  """A JSON spec file (as given, or under gin/, e.g. sweeps/tiny_scaling.json) as a dict."""
  found = _resolve(path, search_paths)
  if found is None:
    raise FileNotFoundError(f"sweep spec {path} not found (searched the working directory, "
                            f"{gin_setup.GIN_DIR} and --gin_search_paths).")
  with open(found, encoding="utf-8") as f:
    try:
      spec = json.load(f)
    except json.JSONDecodeError as exc:
      raise ValueError(f"sweep spec {found} is not valid JSON: {exc}") from exc
  unknown = set(spec) - set(_SPEC_KEYS) if isinstance(spec, dict) else {"<not an object>"}
  if unknown:
    raise ValueError(f"sweep spec {found} has unknown keys {sorted(unknown)}; use "
                     f"{', '.join(_SPEC_KEYS)}.")
  if not isinstance(spec.get("axes", {}), dict):
    raise ValueError(f"sweep spec {found}: 'axes' must map axis names to values.")
  return spec


def build_spec(spec_file: str | None = None, gin_files: Sequence[str] = (),
               bindings: Sequence[str] = (), axis_flags: Sequence[str] = (),
               search_paths: Sequence[str] = ()) -> SweepSpec:
  """The spec of a spec file (optional) extended by flags, with every gin file checked."""
  loaded = load_spec(spec_file, search_paths) if spec_file else {}
  search = tuple(loaded.get("gin_search_paths", ())) + tuple(search_paths)
  axes = [make_axis(name, values) for name, values in loaded.get("axes", {}).items()]
  axes += [parse_axis_flag(flag) for flag in axis_flags]
  if not axes:
    raise ValueError("a sweep needs at least one axis: --axis=NAME=V1,V2 or 'axes' in --spec.")
  names = [axis.name for axis in axes]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"sweep axes {repeated} are given more than once; give each axis once.")
  spec = SweepSpec(axes=tuple(axes),
                   gin_files=tuple(loaded.get("gin_files", ())) + tuple(gin_files),
                   bindings=tuple(loaded.get("bindings", ())) + tuple(bindings),
                   search_paths=search)
  files = spec.gin_files + tuple(f for a in spec.axes for v in a.values for f in v.gin_files)
  missing = [f for f in files if _resolve(f, search) is None]
  if missing:
    raise ValueError(f"gin files {missing} of the sweep not found (searched the working "
                     f"directory, {gin_setup.GIN_DIR} and --gin_search_paths).")
  for binding in spec.bindings + tuple(b for a in spec.axes for v in a.values for b in v.bindings):
    gin_setup.normalize_binding(binding)  # One-line error for a binding without '='.
  return spec
