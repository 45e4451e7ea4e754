"""Aya-format instruction files a user downloaded: JSONL(.gz), Parquet, TFRecord, TFDS data dirs.

What a user points at after downloading the Aya Dataset, the Aya Collection or xP3: records with
"inputs", "targets" and "language" (other Aya fields are allowed and ignored). Files are read in
Python, record by record, so that bad records can be counted and dropped (`quality`): a missing
field, a text that is empty or not UTF-8, a JSON line that does not parse. Problems that concern a
whole file (no such path, unknown format, required columns absent from a Parquet schema, an
unknown `field_map` key, a TFDS data dir without the split) are one-line errors when the task is
registered. A TFDS data dir is a prepared dataset's version folder (it holds dataset_info.json);
the task's split names are its TFDS split names.

Register a task with `tasks.register_aya_task`; this module only reads.
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
    self._columns = {f: field_map.get(f, f) for f in FIELDS}
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

  def examples(self, paths: Sequence[str], split: str) -> Iterator[dict[str, str]]:
    """Clean examples of `paths` in order; bad ones are counted (or raise when strict)."""
    for path in paths:
      for where, raw in self._raw(path, split):
        if isinstance(raw, str):
          quality.drop(raw, self._name, where, self._strict)
          continue
        example: dict[str, str] = {}
        for field, column in self._columns.items():
          value = raw.get(column)
          if value is None and field == "language":
            value = self._default_language
          text = quality.clean_text(value, field, self._name, where, self._strict)
          if text is None:
            break
          example[field] = text
        else:
          if self._only_language is None or example["language"] == self._only_language:
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
        output_signature={f: tf.TensorSpec([], tf.string) for f in FIELDS},
    )


def make_source(
    name: str,
    data: Mapping[str, str | Sequence[str]],
    file_format: str | None = None,
    field_map: Mapping[str, str] | None = None,
    default_language: str | None = None,
    only_language: str | None = None,
    strict: bool = False,
) -> AyaFileSource:
  """Validates the arguments and the files' schemas (one-line errors) and builds the source.

  `data` maps split names to a path, glob or list of them. `field_map` maps Aya field names to
  the files' own column names, e.g. {"language": "language_code"}.
  """
  field_map = dict(field_map or {})
  unknown = sorted(set(field_map) - set(AYA_FIELDS))
  if unknown:
    raise ValueError(f"{name}: field_map keys {unknown} are not Aya fields {list(AYA_FIELDS)}")
  if file_format is not None and file_format not in FORMATS:
    raise ValueError(f"{name}: unknown file_format {file_format!r}; expected one of {FORMATS}")
  split_paths = {split: resolve_paths(spec) for split, spec in data.items()}
  formats = {file_format or detect_format(p) for ps in split_paths.values() for p in ps}
  if len(formats) != 1:
    raise ValueError(f"{name}: files of several formats {sorted(formats)}; register one per format")
  fmt = formats.pop()
  required = [field_map.get(f, f) for f in FIELDS if not (f == "language" and default_language)]
  for split, path in ((s, p) for s, ps in split_paths.items() for p in ps):
    if fmt == "tfds" and split not in _tfds_builder(path).info.splits:
      raise ValueError(f"{name}: TFDS data dir {path} has no split {split!r} (splits: "
                       f"{sorted(_tfds_builder(path).info.splits)}); name the task's splits so")
    columns = file_columns(path, fmt)
    missing = [c for c in required if columns is not None and c not in columns]
    if missing:
      raise ValueError(
          f"{name}: {path} has no column {missing} (columns: {columns}); map yours with "
          "field_map= or set default_language="
      )
  return AyaFileSource(
      name, split_paths, fmt, field_map, default_language, only_language, strict
  )


def write_jsonl(records: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
  """Writes records as (gzipped if the name ends in .gz) JSON lines, e.g. to export a bundle."""
  path = pathlib.Path(path)
  payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
  path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)
