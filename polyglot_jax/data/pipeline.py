"""The trainer's data interface: a seqio task or mixture -> deterministic host-local batches.

Every host builds the same global pipeline (same seed, same order, same packing) and keeps every
`num_shards`-th packed row, so host batch k of all hosts together is exactly global batch k,
whatever the number of hosts. This costs each host the preprocessing of the whole stream, which is
cheap for the bundled corpora; it buys resumption and re-sharding without changing the data.

`dropped_metrics()` returns the `data/dropped_*` counts of bad input examples (see `quality`) for
the trainer to log next to its own metrics.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator, Mapping

import gin
import numpy as np
import seqio
import tensorflow as tf

from polyglot_jax.data import tasks  # noqa: F401  (registers the bundled tasks and mixtures)
from polyglot_jax.data.quality import dropped_metrics  # noqa: F401  (the trainer logs these)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What to read and how; `batch_size` is the GLOBAL batch (all hosts together)."""

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str
  batch_size: int
  shuffle: bool = True
  seed: int | None = 0
  use_cached: bool = False
  pack: bool = True


def check_registered(name: str) -> None:
  """Raises a one-line ValueError naming `name`, close matches and the registered names.

  Per-language tasks (`<task>.<code>`, thousands of them) are summarised, not listed.
  """
  names = {*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()}
  if name in names:
    return
  close = difflib.get_close_matches(name, names, n=3)
  shown = sorted(n for n in names if "." not in n)
  raise ValueError(
      f"unknown seqio task or mixture {name!r}"
      + (f" (did you mean {', '.join(close)}?)" if close else "")
      + f"; registered: {', '.join(shown)}, and {len(names) - len(shown)} per-language tasks "
      "named <task>.<language code>, e.g. udhr_lm.swh"
  )


def get_dataset(
    cfg: DatasetConfig,
    feature_converter_cls: type[seqio.FeatureConverter],
    shard_id: int = 0,
    num_shards: int = 1,
    num_epochs: int | None = None,
) -> tf.data.Dataset:
  """Host-local batches of `cfg.batch_size // num_shards` rows of model features.

  Repeats forever when `num_epochs` is None. The same config and seed give the same batches in
  every process; the module docstring says how the hosts share each global batch.
  """
  check_registered(cfg.mixture_or_task_name)
  if cfg.batch_size % num_shards:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by num_shards {num_shards}")
  if not 0 <= shard_id < num_shards:
    raise ValueError(f"shard_id {shard_id} is not in [0, {num_shards})")
  if cfg.seed is None and num_shards > 1:
    raise ValueError("seed=None gives every host a different stream; set a seed for num_shards > 1")
  ds = seqio.get_dataset(
      cfg.mixture_or_task_name,
      task_feature_lengths=dict(cfg.task_feature_lengths),
      feature_converter=feature_converter_cls(pack=cfg.pack),
      dataset_split=cfg.split,
      use_cached=cfg.use_cached,
      shuffle=cfg.shuffle,
      num_epochs=num_epochs,
      seed=cfg.seed,
      verbose=False,
  )
  ds = ds.shard(num_shards, shard_id).batch(cfg.batch_size // num_shards, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def iterate_batches(ds: tf.data.Dataset, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """NumPy batches of `ds`, skipping the first `start_batch` (resume after `start_batch` steps).

  Skipping replays the deterministic pipeline, so the result equals the uninterrupted stream
  from that batch on; the replay costs time proportional to `start_batch`.
  """
  if start_batch < 0:
    raise ValueError(f"start_batch must be >= 0, got {start_batch}")
  return ds.skip(start_batch).as_numpy_iterator()
