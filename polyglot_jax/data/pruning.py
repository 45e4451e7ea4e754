"""Perplexity-based data pruning (Marion et al. 2023, "When Less is More"): keep a band of the data.

`polyglot-jax data score` (`scoring.score`) writes one JSON line per raw example of a task:
{"id", "language", "tokens", "nll", "ppl"}, where `id` is `example_ids` of the example (a
fingerprint of its text, so a score file stays valid however the data is ordered, and covers
every task built on the same raw examples: `udhr_lm` scores also prune `udhr_span_corruption`
and the per-language mixtures) and ppl = exp(nll / tokens) under a reference checkpoint.

`Pruning` (gin) selects which examples a training run keeps: within each language by default
(perplexities are not comparable across languages and scripts) or over all examples, the
`keep_fraction` of them with the lowest ("bottom"), middle or highest ("top") perplexity. Ties
are broken by id, so the selection is a pure function of the score file. `register_pruned`
registers the pruned task or mixture as `<name>#ppl_<band>_<percent>` (plus `_global`): the
same tasks, preprocessors and mixing rates, reading only the kept examples of one split.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import numpy as np
import seqio
import tensorflow as tf

from polyglot_jax.data.mixing import Columns, LanguageMixture, MemorySource

BANDS = ("bottom", "middle", "top")
SCORE_FIELDS = ("id", "language", "tokens", "nll", "ppl")


def example_ids(example: Mapping[str, tf.Tensor]) -> tf.Tensor:
  """int64 fingerprints of raw examples: [] for one example, [n] for columns of n examples.

  Hashes every string feature with its name (farmhash64, stable across platforms and TF
  versions), so the id depends on the content only, never on the position in the data.
  """
  parts: list[Any] = []
  for name in sorted(k for k, v in example.items() if v.dtype == tf.string):
    parts += [f"{name}=", example[name], "\x1f"]
  joined = tf.strings.join(parts)  # [] or [n]
  ids = tf.bitcast(tf.fingerprint(tf.reshape(joined, [-1])), tf.int64)  # [n]
  return tf.reshape(ids, tf.shape(joined))


def column_ids(columns: Columns) -> np.ndarray:
  """[n] int64 `example_ids` of in-memory columns (feature -> n strings)."""
  return example_ids({k: tf.constant(v, tf.string, shape=[len(v)]) for k, v in columns.items()}
                     ).numpy()


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Pruning:
  """Which examples of a split to keep, by reference-model perplexity.

  Set as `train/DatasetConfig.pruning = @Pruning()` (gin/experiments/prune_udhr_lm.gin).

  Attributes:
    scores_path: the JSONL(.gz) written by `polyglot-jax data score`.
    keep_fraction: in (0, 1]; in each group, round(keep_fraction * n) examples are kept.
    band: "bottom" (lowest perplexity), "middle" or "top" (highest).
    per_language: rank within each "language" (default) or over all examples at once.
    split: the split pruned; other splits are read whole (evaluation stays comparable).
  """

  scores_path: str
  keep_fraction: float
  band: str = "middle"
  per_language: bool = True
  split: str = "train"

  def __post_init__(self) -> None:
    if not 0.0 < self.keep_fraction <= 1.0:
      raise ValueError(f"Pruning.keep_fraction={self.keep_fraction}; use a fraction in (0, 1]")
    if self.band not in BANDS:
      raise ValueError(f"Pruning.band={self.band!r}; use one of {BANDS}")

  @property
  def suffix(self) -> str:
    """Name suffix of the pruned tasks, e.g. "ppl_middle_50" or "ppl_top_30_global"."""
    scope = "" if self.per_language else "_global"
    return f"ppl_{self.band}_{100 * self.keep_fraction:g}{scope}"


def load_scores(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of a score file; a one-line error when it is missing or not a score file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"no perplexity score file at {path!r}; write one with `polyglot-jax data score` "
        "(gin/runs/score.gin) or fix Pruning.scores_path")
  opener = gzip.open if path.endswith(".gz") else open
  records = []
  with opener(path, "rt", encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      try:
        record = json.loads(line)
        missing = [k for k in SCORE_FIELDS if k not in record]
      except (json.JSONDecodeError, TypeError):
        missing = list(SCORE_FIELDS)
      if missing:
        raise ValueError(f"{path}:{number} is not a score record (missing {missing}); "
                         "rewrite the file with `polyglot-jax data score`")
      records.append(record)
  return records


def _band(n: int, keep_fraction: float, band: str) -> slice:
  """Positions kept among n examples sorted by perplexity."""
  k = math.floor(keep_fraction * n + 0.5)
  start = {"bottom": 0, "middle": (n - k) // 2, "top": n - k}[band]
  return slice(start, start + k)


def select_ids(records: Sequence[Mapping[str, Any]], keep_fraction: float, band: str,
               per_language: bool = True) -> frozenset[int]:
  """Ids of the kept examples: a perplexity band of each language (or of all examples).

  Records without a perplexity (no token was scored, e.g. an empty text) are never kept.
  """
  groups: dict[str, list[tuple[float, int]]] = {}
  for r in records:
    if r["ppl"] is not None:
      groups.setdefault(r["language"] if per_language else "", []).append((r["ppl"], r["id"]))
  kept: set[int] = set()
  for ranked in groups.values():
    ranked.sort()
    kept.update(i for _, i in ranked[_band(len(ranked), keep_fraction, band)])
  return frozenset(kept)


class _KeptColumns:
  """Columns of one split restricted to the kept ids (other splits unchanged); cached."""

  def __init__(self, columns_fn: Callable[[str], Columns], split: str, keep: np.ndarray):
    self._columns_fn, self._split, self._keep = columns_fn, split, keep
    self._cache: dict[str, Columns] = {}

  def __call__(self, split: str) -> Columns:
    if split != self._split:
      return self._columns_fn(split)
    if split not in self._cache:
      columns = self._columns_fn(split)
      rows = np.flatnonzero(np.isin(column_ids(columns), self._keep))
      self._cache[split] = {k: [v[i] for i in rows] for k, v in columns.items()}
    return self._cache[split]


class KeptSource(seqio.DataSource):
  """Any seqio DataSource, filtered to the kept ids in one split (in the tf.data graph)."""

  def __init__(self, source: seqio.DataSource, split: str, keep: np.ndarray) -> None:
    super().__init__(splits=source.splits)
    self._source, self._split, self._keep = source, split, keep

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return self._source.supports_arbitrary_sharding

  def list_shards(self, split: str) -> Sequence[str]:
    return self._source.list_shards(split)

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, **unused_kwargs) -> tf.data.Dataset:
    ds = self._source.get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info)
    if split != self._split:
      return ds
    table = tf.lookup.StaticHashTable(  # id -> 1 for the kept ones, else 0
        tf.lookup.KeyValueTensorInitializer(self._keep, np.ones_like(self._keep)), default_value=0)
    return ds.filter(lambda x: table.lookup(example_ids(x)) > 0)


def _pruned_source(source: seqio.DataSource, split: str, keep: np.ndarray) -> seqio.DataSource:
  """In-memory sources stay in memory (the fast `LanguageMixture` path); others filter."""
  if isinstance(source, MemorySource):
    return MemorySource(_KeptColumns(source.columns, split, keep), source.splits)
  return KeptSource(source, split, keep)


def _register_pruned_task(task: seqio.Task, pruning: Pruning, keep: np.ndarray) -> seqio.Task:
  name = f"{task.name}#{pruning.suffix}"
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name, source=_pruned_source(task.source, pruning.split, keep),
      preprocessors=task.preprocessors, output_features=task.output_features,
      shuffle_buffer_size=task.shuffle_buffer_size)


def register_pruned(name: str, pruning: Pruning) -> str:
  """Registers the pruned version of task or mixture `name` and returns its name.

  A mixture's tasks are pruned one by one and mixed at the full mixture's rates (a language
  keeps its share of the steps, now spread over fewer examples). Deterministic: the same score
  file and settings register the same examples.
  """
  kept = select_ids(load_scores(pruning.scores_path), pruning.keep_fraction, pruning.band,
                    pruning.per_language)
  keep = np.array(sorted(kept), np.int64)  # [kept]
  provider = seqio.get_mixture_or_task(name)
  pruned = f"{name}#{pruning.suffix}"
  if isinstance(provider, seqio.Task):
    task = _register_pruned_task(provider, pruning, keep)
    logging.info("%s: %s of %s %s examples kept", pruned, task.num_input_examples(pruning.split),
                 provider.num_input_examples(pruning.split), pruning.split)
    return pruned
  tasks = {t.name: _register_pruned_task(t, pruning, keep).name for t in provider.tasks}
  extra: dict[str, Any] = {}
  if isinstance(provider, LanguageMixture):
    extra = {"languages": {tasks[t]: lang for t, lang in provider.languages.items()},
             "description": f"{provider.description}; pruned {pruning.suffix}"}
  seqio.MixtureRegistry.remove(pruned)
  seqio.MixtureRegistry.add(pruned, [(tasks[t.name], provider.get_rate(t)) for t in provider.tasks],
                            mixture_cls=type(provider), **extra)
  return pruned
