"""The perplexity of every raw example of a task under a model (`polyglot-jax data score`).

Each raw example of the split is tagged with its `pruning.example_ids` fingerprint, run through
the task's own preprocessors (unshuffled, fixed seed: span corruption or a prefix-LM cut are
the same on every run) and the model's feature converter (unpacked), and scored with the
model's `score_batch`. An example cut into several pieces sums the pieces:
ppl = exp(sum of token NLLs / number of scored tokens). The JSONL written (see `pruning`) is what
`Pruning.scores_path` reads. Scoring runs in one process over all its devices; the command is
commands/score.py (gin contract: gin/runs/score.gin).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import seqio
import tensorflow as tf

from polyglot_jax.data.pruning import example_ids
from polyglot_jax.parallel.partitioning import Partitioner

ID = "example_id"  # the fingerprint, carried through preprocessing as a [1] int64 feature


def _with_id(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  return {**x, ID: tf.reshape(example_ids(x), [1])}


def raw_languages(task: seqio.Task, split: str) -> dict[int, str]:
  """id -> "language" feature ("" when the task has none) of every raw example, in source order."""
  ds = task.source.get_dataset(split=split, shuffle=False)
  ids = ds.map(lambda x: (example_ids(x), x.get("language", tf.constant(""))))
  return {int(i): lang.decode() for i, lang in ids.as_numpy_iterator()}


def scoring_batches(
    task: seqio.Task, split: str, task_feature_lengths: Mapping[str, int],
    converter_cls: type[seqio.FeatureConverter], batch_size: int, seed: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Unpacked model-feature batches of the whole split, each with its [batch, 1] ids.

  The last batch is padded with all-zero rows (loss weight 0, id 0) to `batch_size`.
  """
  source = seqio.FunctionDataSource(
      lambda split, shuffle_files, seed=None: task.source.get_dataset(
          split=split, shuffle=False).map(_with_id),
      splits=(split,))
  tagged = seqio.Task(task.name, source=source, preprocessors=task.preprocessors,
                      output_features=task.output_features, shuffle_buffer_size=None)
  ds = tagged.get_dataset(dict(task_feature_lengths), split=split, shuffle=False, seed=seed,
                          num_epochs=1)
  # Unpacked conversion maps example to example, so the ids zip back on (seqio's pass-through
  # features would do it in one pass, but its DecoderFeatureConverter drops them).
  features = converter_cls(pack=False)(ds, dict(task_feature_lengths))
  ds = tf.data.Dataset.zip(features, ds.map(lambda x: x[ID])).map(lambda f, i: {**f, ID: i})
  for batch in ds.batch(batch_size).as_numpy_iterator():
    missing = batch_size - len(batch[ID])
    yield {k: np.pad(v, [(0, missing)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


def score_task(
    model: Any, params: Any, partitioner: Partitioner, task: seqio.Task, split: str,
    task_feature_lengths: Mapping[str, int], batch_size: int,
) -> list[dict[str, Any]]:
  """Score records {"id", "language", "tokens", "nll", "ppl"} of every raw example of `task`.

  Examples that leave no token to score (e.g. dropped as empty or over-length) get ppl None.
  """
  languages = raw_languages(task, split)
  totals = {i: [0.0, 0] for i in languages}  # id -> [sum of token NLLs, scored tokens]
  score_fn = jax.jit(model.score_batch)  # shardings follow the (restored, sharded) params
  converter_cls = model.FEATURE_CONVERTER_CLS
  with partitioner.activate():
    for batch in scoring_batches(task, split, task_feature_lengths, converter_cls, batch_size):
      ids = batch.pop(ID)[:, 0]  # [batch]
      log_likelihood = jax.device_get(score_fn(params, partitioner.shard_batch(batch)))  # [batch]
      tokens = batch["decoder_loss_weights"].sum(axis=1)  # [batch]
      for i, ll, n in zip(ids.tolist(), log_likelihood.tolist(), tokens.tolist()):
        if n > 0:
          totals[i][0] -= ll
          totals[i][1] += int(n)
  return [{"id": i, "language": languages[i], "tokens": n, "nll": nll,
           "ppl": math.exp(nll / n) if n else None} for i, (nll, n) in totals.items()]
