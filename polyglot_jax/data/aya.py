"""Aya-format instruction files a user downloaded: JSONL(.gz), Parquet, TFRecord, TFDS data dirs.

What a user points at after downloading the Aya Dataset, the Aya Collection or xP3: records with
"inputs", "targets" and "language" (other Aya fields are allowed and ignored). Files are read in
Python, record by record, so that bad records can be counted and dropped (`quality`): a missing
field, a text that is empty or not UTF-8, a JSON line that does not parse. Problems that concern a
whole file (no such path, unknown format, required columns absent from a Parquet schema, an
unknown `field_map` key, a TFDS data dir without the split) are one-line errors when the task is
registered. A TFDS data dir is a prepared dataset's version folder (it holds dataset_info.json);
the task's split names are its TFDS split names.

Chat files (`ChatFileSource`) hold conversations: "messages", a list of {"role", "content"}
turns (a JSON string in TFRecords), or Aya "inputs"/"targets" pairs, read as one user turn and
one assistant turn. A conversation with a role outside `ROLES` or without an assistant turn is a
malformed record (dropped and counted, or an error in strict mode).

Register a task with `tasks.register_aya_task` or `tasks.register_chat_task`; this module only
reads.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from polyglot_jax.data import quality
from polyglot_jax.data.instructions import AYA_FIELDS

FORMATS = ("jsonl", "parquet", "tfrecord", "tfds")
FIELDS = ("inputs", "targets", "language")  # what the tasks keep; "language" drives mixing
CHAT_FIELDS = ("messages", "language")  # what chat tasks keep: "messages" as JSON
ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates render


def detect_format(path: str) -> str:
  """Format from the file name (or a folder's dataset_info.json: a TFDS data dir)."""
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return "tfds"
  name = os.path.basename(path).lower()
  for suffixes, fmt in (
      ((".jsonl", ".jsonl.gz", ".json", ".json.gz"), "jsonl"),
      ((".parquet",), "parquet"),
      ((".tfrecord", ".tfrecords", ".tfrecord.gz"), "tfrecord"),
  ):
    if name.endswith(suffixes):
      return fmt
  if ".tfrecord" in name:  # sharded names: train.tfrecord-00000-of-00004
    return "tfrecord"
  raise ValueError(f"cannot tell the format of {path!r}; pass file_format= one of {FORMATS}")


def resolve_paths(spec: str | Sequence[str]) -> list[str]:
  """Sorted paths matching a path, glob, or list of them; a one-line error when none exists."""
  patterns = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
  paths: list[str] = []
  for pattern in map(os.fspath, patterns):
    matches = sorted(glob.glob(pattern))
    if not matches:
      raise FileNotFoundError(f"no file or directory matches {pattern!r}")
    paths.extend(matches)
  return paths


Raw = Mapping[str, Any] | str  # a record, or the reason it is unreadable (a `quality.REASONS`)


def _jsonl(path: str) -> Iterator[tuple[str, Raw]]:
  """(location, record) per non-blank line."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line.decode("utf-8"))
      except UnicodeDecodeError:
        yield where, "invalid_utf8"
        continue
      except json.JSONDecodeError:
        record = None
      yield where, record if isinstance(record, dict) else "malformed"


def _parquet(path: str, columns: Sequence[str]) -> Iterator[tuple[str, Raw]]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (a tensorflow-datasets dep)

  row = 0
  for batch in pq.ParquetFile(path).iter_batches(columns=list(columns)):
    for record in batch.to_pylist():
      row += 1
      yield f"{path}:row {row}", record


def _tfrecord(path: str) -> Iterator[tuple[str, Raw]]:
  """tf.train.Example records; each feature's first bytes value."""
  compression = "GZIP" if path.endswith(".gz") else None
  for number, serialized in enumerate(tf.data.TFRecordDataset(path, compression), 1):
    try:
      example = tf.train.Example.FromString(serialized.numpy())
    except Exception:  # pylint: disable=broad-except  (any undecodable proto is one bad record)
      yield f"{path}:record {number}", "malformed"
      continue
    record = {k: (f.bytes_list.value[0] if f.bytes_list.value else None)
              for k, f in example.features.feature.items()}
    yield f"{path}:record {number}", record


def _tfds_builder(path: str) -> Any:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (a seqio dependency)

  return tfds.builder_from_directory(path)


def _tfds(path: str, split: str) -> Iterator[tuple[str, Raw]]:
  """(location, record) of one split of a TFDS data dir, in its stored order."""
  ds = _tfds_builder(path).as_dataset(split=split, shuffle_files=False)
  for number, record in enumerate(ds.as_numpy_iterator(), 1):
    yield f"{path}[{split}]:example {number}", record


def file_columns(path: str, fmt: str) -> list[str] | None:
  """Column names from a Parquet schema or TFDS features (None for row formats: per record)."""
  if fmt == "parquet":
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    return list(pq.read_schema(path).names)
  if fmt == "tfds":
    return list(_tfds_builder(path).info.features.keys())
  return None


class AyaFileSource(seqio.DataSource):
  """A seqio DataSource over Aya-format files: {"inputs", "targets", "language"} string examples.

  Bad records are dropped and counted (`quality.dropped_metrics`), or raise in strict mode. With
  `shuffle`, the file order is permuted (seeded); the Task's shuffle buffer mixes examples.
  """

  OUTPUT_FIELDS = FIELDS  # the examples' features
  COLUMNS = FIELDS  # the record fields read (before `field_map`)

  def __init__(
      self,
      name: str,
      split_paths: Mapping[str, Sequence[str]],
      file_format: str,
      field_map: Mapping[str, str],
      default_language: str | None,
      only_language: str | None,
      strict: bool,
  ) -> None:
    super().__init__(splits=tuple(split_paths))
    self._name = name
    self._split_paths = {k: list(v) for k, v in split_paths.items()}
    self._format = file_format
    self._columns = {f: field_map.get(f, f) for f in self.COLUMNS}
    self._default_language = default_language
    self._only_language = only_language
    self._strict = strict

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    return self._split_paths[split]

  def _raw(self, path: str, split: str) -> Iterator[tuple[str, Raw]]:
    if self._format == "jsonl":
      return _jsonl(path)
    if self._format == "parquet":
      present = set(file_columns(path, "parquet"))
      return _parquet(path, [c for c in self._columns.values() if c in present])
    if self._format == "tfds":
      return _tfds(path, split)
    return _tfrecord(path)

  def _text(self, raw: Mapping[str, Any], field: str, where: str) -> str | None:
    """The clean text of a field (None: dropped); "language" falls back to the default."""
    value = raw.get(self._columns[field])
    if value is None and field == "language":
      value = self._default_language
    return quality.clean_text(value, field, self._name, where, self._strict)

  def _example(self, raw: Mapping[str, Any], where: str) -> dict[str, str] | None:
    """The example of a record, or None when it is dropped."""
    example: dict[str, str] = {}
    for field in self.OUTPUT_FIELDS:
      text = self._text(raw, field, where)
      if text is None:
        return None
      example[field] = text
    return example

  def examples(self, paths: Sequence[str], split: str) -> Iterator[dict[str, str]]:
    """Clean examples of `paths` in order; bad ones are counted (or raise when strict)."""
    for path in paths:
      for where, raw in self._raw(path, split):
        if isinstance(raw, str):
          quality.drop(raw, self._name, where, self._strict)
          continue
        example = self._example(raw, where)
        if example is not None and (self._only_language is None
                                    or example["language"] == self._only_language):
          yield example

  def get_dataset(
      self,
      split: str = "train",
      shuffle: bool = True,
      seed: int | None = None,
      shard_info: seqio.ShardInfo | None = None,
      **unused_kwargs,
  ) -> tf.data.Dataset:
    paths = self._split_paths[split]
    if shard_info:
      paths = paths[shard_info.index::shard_info.num_shards]
    if shuffle:
      paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
    return tf.data.Dataset.from_generator(
        lambda: self.examples(paths, split),
        output_signature={f: tf.TensorSpec([], tf.string) for f in self.OUTPUT_FIELDS},
    )


def _turns(value: Any) -> list[Any] | None:
  """A "messages" value as a list: a list, JSON text of one, or TFDS's dict of sequences."""
  if isinstance(value, bytes):
    value = value.decode("utf-8")
  if isinstance(value, str):
    try:
      value = json.loads(value)
    except json.JSONDecodeError:
      return None
  if isinstance(value, Mapping) and set(value) >= {"role", "content"}:
    value = [dict(zip(value, turn)) for turn in zip(*value.values())]
  return list(value) if isinstance(value, (list, tuple, np.ndarray)) else None


class ChatFileSource(AyaFileSource):
  """A seqio DataSource over chat files: {"messages" (JSON), "language"} string examples.

  Records hold "messages" or Aya "inputs"/"targets" (one user and one assistant turn); the
  messages are validated (see the module docstring) and written back as a JSON list of
  {"role", "content"} with clean UTF-8 texts.
  """

  OUTPUT_FIELDS = CHAT_FIELDS
  COLUMNS = ("messages", "inputs", "targets", "language")

  def _messages(self, raw: Mapping[str, Any], where: str) -> list[dict[str, str]] | None:
    value = raw.get(self._columns["messages"])
    if value is None:  # an Aya pair
      pair = []
      for role, field in (("user", "inputs"), ("assistant", "targets")):
        text = self._text(raw, field, where)
        if text is None:
          return None
        pair.append({"role": role, "content": text})
      return pair
    turns = _turns(value)
    if not turns or not all(isinstance(t, Mapping) for t in turns):
      quality.drop("malformed", self._name, f"{where} (messages is not a list of turns)",
                   self._strict)
      return None
    messages = []
    for i, turn in enumerate(turns):
      role = turn.get("role")
      role = role.decode("utf-8", "replace") if isinstance(role, bytes) else role
      if role not in ROLES:
        quality.drop("malformed", self._name, f"{where} (messages[{i}] has role {role!r}, not "
                     f"one of {', '.join(ROLES)})", self._strict)
        return None
      content = quality.clean_text(turn.get("content"), f"messages[{i}].content", self._name,
                                   where, self._strict)
      if content is None:
        return None
      messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
      quality.drop("malformed", self._name, f"{where} (no assistant turn: nothing to learn)",
                   self._strict)
      return None
    return messages

  def _example(self, raw: Mapping[str, Any], where: str) -> dict[str, str] | None:
    messages = self._messages(raw, where)
    language = None if messages is None else self._text(raw, "language", where)
    if language is None:
      return None
    return {"messages": json.dumps(messages, ensure_ascii=False), "language": language}


def make_source(
    name: str,
    data: Mapping[str, str | Sequence[str]],
    file_format: str | None = None,
    field_map: Mapping[str, str] | None = None,
    default_language: str | None = None,
    only_language: str | None = None,
    strict: bool = False,
    chat: bool = False,
) -> AyaFileSource:
  """Validates the arguments and the files' schemas (one-line errors) and builds the source.

  `data` maps split names to a path, glob or list of them. `field_map` maps Aya field names (and
  "messages") to the files' own column names, e.g. {"language": "language_code"}. With `chat`,
  a `ChatFileSource`: the files need "messages" or "inputs" and "targets".
  """
  field_map = dict(field_map or {})
  known = AYA_FIELDS + (("messages",) if chat else ())
  unknown = sorted(set(field_map) - set(known))
  if unknown:
    raise ValueError(f"{name}: field_map keys {unknown} are not Aya fields {list(known)}")
  if file_format is not None and file_format not in FORMATS:
    raise ValueError(f"{name}: unknown file_format {file_format!r}; expected one of {FORMATS}")
  split_paths = {split: resolve_paths(spec) for split, spec in data.items()}
  formats = {file_format or detect_format(p) for ps in split_paths.values() for p in ps}
  if len(formats) != 1:
    raise ValueError(f"{name}: files of several formats {sorted(formats)}; register one per format")
  fmt = formats.pop()
  pair = [field_map.get("inputs", "inputs"), field_map.get("targets", "targets")]
  # Alternatives of required columns: every column of one of them must be present.
  texts = [[field_map.get("messages", "messages")], pair] if chat else [pair]
  language = [] if default_language else [field_map.get("language", "language")]
  for split, path in ((s, p) for s, ps in split_paths.items() for p in ps):
    if fmt == "tfds" and split not in _tfds_builder(path).info.splits:
      raise ValueError(f"{name}: TFDS data dir {path} has no split {split!r} (splits: "
                       f"{sorted(_tfds_builder(path).info.splits)}); name the task's splits so")
    columns = file_columns(path, fmt)
    if columns is None:
      continue
    missing = min(([c for c in option + language if c not in columns] for option in texts),
                  key=len)
    if missing:
      raise ValueError(
          f"{name}: {path} has no column {missing} (columns: {columns}); map yours with "
          "field_map= or set default_language="
      )
  source_cls = ChatFileSource if chat else AyaFileSource
  return source_cls(
      name, split_paths, fmt, field_map, default_language, only_language, strict
  )


def write_jsonl(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
  """Writes records as (gzipped if the name ends in .gz) JSON lines, e.g. to export a bundle."""
  path = pathlib.Path(path)
  payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
  path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)
