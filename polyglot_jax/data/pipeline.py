"""The trainer's data interface: a seqio task or mixture -> deterministic host-local batches.

The data is split into `num_data_shards` shards (default: one per host). Shard k reads only its
own part of every source (seqio's `ShardInfo(k, num_data_shards)`: a slice of in-memory data, a
subset of the files), shuffles, preprocesses and packs it with seed `seed + k`, and fills rows
[k * b, (k + 1) * b) of every global batch, b = batch_size // num_data_shards. Host h reads the
consecutive shards h * s ... (h + 1) * s - 1, s = num_data_shards // num_hosts, so its batch is
one contiguous block of the global batch (what `jax.make_array_from_process_local_data` in
`Partitioner.shard_batch` expects). With a fixed `num_data_shards` the global batches do not
depend on the number of hosts, which may be any divisor of it: a run can resume on another
host count and see the same data.

A finite pass (`num_epochs`, evaluation) reads every shard on every host and keeps the host's
rows, so that all hosts see the same number of batches (it ends when the first shard runs out).

`DatasetConfig.pruning` trains on a perplexity-pruned version of the task (`pruning`).
Bad input examples are dropped and counted by `quality` (the trainer logs `data/dropped_*`).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator, Mapping

import gin
import numpy as np
import seqio
import tensorflow as tf

from polyglot_jax.data import tasks
from polyglot_jax.data.pruning import Pruning, register_pruned


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """What to read and how; `batch_size` is the GLOBAL batch (all hosts together).

  `num_data_shards` (None: the number of hosts) must divide `batch_size` and be a multiple of
  the number of hosts; `pruning` keeps a perplexity band of the split (`pruning.Pruning`).
  """

  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str
  batch_size: int
  shuffle: bool = True
  seed: int | None = 0
  use_cached: bool = False
  pack: bool = True
  num_data_shards: int | None = None
  pruning: Pruning | None = None


def check_registered(name: str) -> None:
  """Raises a one-line ValueError naming `name`, close matches and the registered names.

  Per-language tasks (`<task>.<code>`, thousands of them) and pruned ones (`<name>#ppl_...`)
  are summarised, not listed.
  """
  tasks.register_bundled()
  names = {*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()}
  if name in names:
    return
  close = difflib.get_close_matches(name, names, n=3)
  shown = sorted(n for n in names if "." not in n and "#" not in n)
  raise ValueError(
      f"unknown seqio task or mixture {name!r}"
      + (f" (did you mean {', '.join(close)}?)" if close else "")
      + f"; registered: {', '.join(shown)}, and {len(names) - len(shown)} per-language or pruned "
      "tasks named <task>.<language code> (e.g. udhr_lm.swh) or <name>#ppl_<band>_<percent>"
  )


def _shard_batches(cfg: DatasetConfig, name: str, converter: seqio.FeatureConverter,
                   shard: seqio.ShardInfo, num_epochs: int | None) -> tf.data.Dataset:
  """Batches of `batch_size // num_shards` rows of one data shard (see the module docstring)."""
  ds = seqio.get_dataset(
      name,
      task_feature_lengths=dict(cfg.task_feature_lengths),
      feature_converter=converter,
      dataset_split=cfg.split,
      use_cached=cfg.use_cached,
      shuffle=cfg.shuffle,
      num_epochs=num_epochs,
      shard_info=shard if shard.num_shards > 1 else None,
      seed=None if cfg.seed is None else cfg.seed + shard.index,
      verbose=False,
  )
  return ds.batch(cfg.batch_size // shard.num_shards, drop_remainder=True)


def _concat_rows(parts: list[tf.data.Dataset]) -> tf.data.Dataset:
  """Batch k of every part, concatenated along the rows, in the order of `parts`."""
  if len(parts) == 1:
    return parts[0]
  return tf.data.Dataset.zip(tuple(parts)).map(
      lambda *batches: {k: tf.concat([b[k] for b in batches], 0) for k in batches[0]})


def get_dataset(
    cfg: DatasetConfig,
    feature_converter_cls: type[seqio.FeatureConverter],
    shard_id: int = 0,
    num_shards: int = 1,
    num_epochs: int | None = None,
) -> tf.data.Dataset:
  """Host `shard_id`'s batches of `cfg.batch_size // num_shards` rows of model features.

  `num_shards` is the number of hosts. Repeats forever when `num_epochs` is None. The same
  config gives the same batches in every process; the module docstring says which host reads
  which data.
  """
  check_registered(cfg.mixture_or_task_name)
  data_shards = cfg.num_data_shards or num_shards
  if not 0 <= shard_id < num_shards:
    raise ValueError(f"shard_id {shard_id} is not in [0, {num_shards})")
  if data_shards % num_shards:
    raise ValueError(f"num_data_shards {data_shards} is not a multiple of the {num_shards} hosts; "
                     "set DatasetConfig.num_data_shards to one")
  if cfg.batch_size % data_shards:
    raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {data_shards} data "
                     "shards (DatasetConfig.num_data_shards, default: the number of hosts)")
  if cfg.seed is None and data_shards > 1:
    raise ValueError("seed=None gives every data shard a different stream on every run; set a "
                     "seed for num_data_shards > 1")
  name = cfg.mixture_or_task_name
  if cfg.pruning is not None:
    name = register_pruned(name, cfg.pruning)
  per_host = data_shards // num_shards
  read = (range(data_shards) if num_epochs is not None
          else range(shard_id * per_host, (shard_id + 1) * per_host))
  converter = feature_converter_cls(pack=cfg.pack)
  ds = _concat_rows([_shard_batches(cfg, name, converter, seqio.ShardInfo(k, data_shards),
                                    num_epochs) for k in read])
  if len(read) > per_host:  # a finite pass read every shard: keep this host's rows
    rows = cfg.batch_size // num_shards
    ds = ds.map(lambda b: {k: v[shard_id * rows:(shard_id + 1) * rows] for k, v in b.items()})
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def batch_shapes(cfg: DatasetConfig, converter_cls: type[seqio.FeatureConverter],
                 pack: bool | None = None) -> dict[str, tuple[int, int]]:
  """Each model feature's global [batch, length] from the feature converter; reads no data.

  `pack` overrides `cfg.pack` (scoring never packs).
  """
  converter = converter_cls(pack=cfg.pack if pack is None else pack)
  lengths = converter.get_model_feature_lengths(cfg.task_feature_lengths)
  return {name: (cfg.batch_size, length) for name, length in lengths.items()}


def iterate_batches(ds: tf.data.Dataset, start_batch: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """NumPy batches of `ds`, skipping the first `start_batch` (resume after `start_batch` steps).

  Skipping replays the deterministic pipeline, so the result equals the uninterrupted stream
  from that batch on; the replay costs time proportional to `start_batch`.
  """
  if start_batch < 0:
    raise ValueError(f"start_batch must be >= 0, got {start_batch}")
  return ds.skip(start_batch).as_numpy_iterator()
