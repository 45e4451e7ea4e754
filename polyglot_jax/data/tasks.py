"""seqio Tasks over the bundled UDHR; importing this module registers them.

Every task reads the same text (splits from `udhr.SPLIT_ARTICLES`) and keeps the language code
as a "language" string feature next to the tokens, for per-language evaluation; feature
converters drop it when packing.

  udhr_span_corruption  encoder-decoder pretraining (T5 span corruption): inputs, targets
  udhr_lm               decoder-only causal LM: targets
  udhr_prefix_lm        decoder-only prefix LM (random cut point): inputs, targets
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import seqio
import tensorflow as tf

from polyglot_jax.data import preprocessors
from polyglot_jax.data.udhr import SPLIT_ARTICLES, udhr_records
from polyglot_jax.data.vocab import get_vocabulary

UDHR_SPAN_CORRUPTION = "udhr_span_corruption"
UDHR_LM = "udhr_lm"
UDHR_PREFIX_LM = "udhr_prefix_lm"


def udhr_dataset(
    split: str, shuffle_files: bool = False, seed: int | None = None
) -> tf.data.Dataset:
  """{"text", "language"} examples of one split, in bundle order unless `shuffle_files`.

  The bundle is sorted by language, and a Task's shuffle buffer only mixes neighbours, so when
  shuffling we permute the whole split first (seeded, a new permutation every epoch).
  """
  records = udhr_records(split)
  ds = tf.data.Dataset.from_tensor_slices(
      {"text": [r["text"] for r in records], "language": [r["code"] for r in records]}
  )
  return ds.shuffle(len(records), seed=seed) if shuffle_files else ds


def _register(
    name: str,
    objective: Callable[..., tf.data.Dataset],
    feature_names: tuple[str, ...],
    vocabulary: seqio.Vocabulary,
) -> None:
  """(Re-)registers one task: tokenize "text" as "targets", apply `objective`, append EOS."""
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(
          udhr_dataset,
          splits=tuple(SPLIT_ARTICLES),
          num_input_examples={s: len(udhr_records(s)) for s in SPLIT_ARTICLES},
      ),
      preprocessors=[
          functools.partial(
              seqio.preprocessors.rekey, key_map={"targets": "text", "language": "language"}
          ),
          functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
          seqio.CacheDatasetPlaceholder(),
          objective,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features={
          k: seqio.Feature(vocabulary, add_eos=True) for k in feature_names
      },
  )


def register_udhr_tasks(vocabulary: seqio.Vocabulary | None = None) -> None:
  """Registers the three UDHR tasks (idempotent; replaces earlier registrations).

  Pass a vocabulary to train with your own SentencePiece model; default: the bundled 8k one.
  """
  vocabulary = vocabulary or get_vocabulary()
  _register(UDHR_SPAN_CORRUPTION, preprocessors.span_corruption, ("inputs", "targets"), vocabulary)
  _register(UDHR_LM, preprocessors.causal_lm, ("targets",), vocabulary)
  _register(UDHR_PREFIX_LM, preprocessors.prefix_lm, ("inputs", "targets"), vocabulary)


register_udhr_tasks()
