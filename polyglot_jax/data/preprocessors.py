"""Token preprocessors for self-supervised objectives: T5 span corruption, causal LM, prefix LM.

T5's span corruption lives in `t5.data`, which we do not depend on; this module implements the
same algorithm (Raffel et al. 2020, `t5.data.preprocessors.span_corruption`): noise spans chosen
by `random_spans_noise_mask`, each replaced in "inputs" by a unique sentinel counting down from
`vocab_size - 1`, and "targets" = the dropped spans, each preceded by its sentinel.

Unlike T5 we never concatenate different documents before splitting (each example keeps its
"language"), and long sequences are split into consecutive pieces instead of sampling one random
chunk, so no text is dropped. Every random choice uses stateless ops seeded by seqio, so a dataset
built with a seed is reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


@seqio.map_over_dataset
def text_to_targets(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Renames "text" to "targets", keeping every other feature ("language", a scoring id)."""
  return {**{k: v for k, v in x.items() if k != "text"}, "targets": x["text"]}


def _max_tokens(sequence_length: Mapping[str, int] | None, *keys: str) -> int:
  """Token budget per piece: the smallest of the features' lengths, minus one for EOS."""
  if not sequence_length or any(sequence_length.get(k) is None for k in keys):
    raise ValueError(f"this preprocessor needs lengths for {list(keys)}, got {sequence_length}")
  return min(sequence_length[k] for k in keys) - 1


def split_tokens(
    dataset: tf.data.Dataset, max_tokens: int, feature_key: str = "targets"
) -> tf.data.Dataset:
  """Cuts each `feature_key` sequence into consecutive pieces of at most `max_tokens`.

  Other features (e.g. "language") are copied to every piece; empty sequences are dropped.
  """

  def _split(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor | tf.RaggedTensor]:
    tokens = x[feature_key]
    starts = tf.range(0, tf.size(tokens), max_tokens)
    pieces = {k: tf.repeat(v[tf.newaxis], tf.size(starts), axis=0) for k, v in x.items()}
    pieces[feature_key] = tf.RaggedTensor.from_row_starts(tokens, starts)
    return pieces

  dataset = dataset.filter(lambda x: tf.size(x[feature_key]) > 0)
  return dataset.map(_split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def _random_segmentation(
    num_items: tf.Tensor, num_segments: tf.Tensor, seed: tf.Tensor
) -> tf.Tensor:
  """Lengths of a uniformly random split of `num_items` into `num_segments` non-empty parts."""
  is_boundary = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
  first_in_segment = tf.pad(seqio.stateless_shuffle(is_boundary, seed), [[1, 0]])
  segment_id = tf.cumsum(first_in_segment)
  return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)


def random_spans_noise_mask(
    length: tf.Tensor,
    seeds: tf.Tensor,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tf.Tensor:
  """Boolean [length] mask of random noise spans (T5's algorithm).

  round(length * noise_density) noise tokens in round(noise / mean_noise_span_length) spans
  (at least one of each), alternating non-noise/noise and starting with non-noise; all such
  masks are equally likely. `seeds` is an int32 [2, 2] tensor.
  """
  original_length = length
  length = tf.maximum(length, 2)  # one noise and one non-noise token at least
  num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
  num_spans = tf.maximum(num_spans, 1)
  noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])  # [num_spans]
  kept_lengths = _random_segmentation(length - num_noise, num_spans, seeds[1])  # [num_spans]
  span_lengths = tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1), [-1])  # [2*spans]
  span_starts = tf.cumsum(span_lengths)[:-1]  # [2*spans - 1]
  is_span_start = tf.scatter_nd(span_starts[:, tf.newaxis], tf.ones_like(span_starts), [length])
  is_noise = tf.equal(tf.cumsum(is_span_start) % 2, 1)  # [length]
  return is_noise[:original_length]


def noise_span_to_unique_sentinel(
    tokens: tf.Tensor, noise_mask: tf.Tensor, vocab_size: int
) -> tf.Tensor:
  """Replaces each run of noise tokens by one sentinel: vocab_size-1, vocab_size-2, ... in order."""
  previous_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
  first_noise = tf.logical_and(noise_mask, tf.logical_not(previous_is_noise))
  later_noise = tf.logical_and(noise_mask, previous_is_noise)
  sentinels = vocab_size - tf.cumsum(tf.cast(first_noise, tokens.dtype))
  return tf.boolean_mask(tf.where(first_noise, sentinels, tokens), tf.logical_not(later_noise))


def span_corruption_lengths(
    inputs_length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
  """(raw tokens per example, targets length) so that corrupted inputs just fit `inputs_length`.

  Same arithmetic as T5's `random_spans_helper` with one sentinel per span and EOS on both sides.
  """

  def corrupted_lengths(tokens_length: int) -> tuple[int, int]:
    num_noise = int(round(tokens_length * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

  tokens_length = inputs_length - 1
  while corrupted_lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  return tokens_length, corrupted_lengths(tokens_length)[1]


def span_corruption(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tf.data.Dataset:
  """T5 span corruption of tokenized "targets" into {"inputs", "targets"} (EOS added later)."""
  _max_tokens(sequence_length, "inputs", "targets")  # validates the lengths are given
  tokens_length, targets_length = span_corruption_lengths(
      sequence_length["inputs"], noise_density, mean_noise_span_length
  )
  if sequence_length["targets"] < targets_length:
    raise ValueError(
        f"span corruption with inputs length {sequence_length['inputs']} needs targets length "
        f">= {targets_length}, got {sequence_length['targets']}"
    )
  vocab_size = output_features["targets"].vocabulary.vocab_size

  @seqio.map_over_dataset(num_seeds=2)
  def corrupt(x: Mapping[str, tf.Tensor], seeds: tf.Tensor) -> dict[str, tf.Tensor]:
    tokens = x["targets"]
    noise = random_spans_noise_mask(
        tf.size(tokens), tf.stack(seeds), noise_density, mean_noise_span_length
    )
    return {
        **x,
        "inputs": noise_span_to_unique_sentinel(tokens, noise, vocab_size),
        "targets": noise_span_to_unique_sentinel(tokens, tf.logical_not(noise), vocab_size),
    }

  return corrupt(split_tokens(dataset, tokens_length))


def causal_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int]) -> tf.data.Dataset:
  """Decoder-only LM: "targets" split into pieces that fit the targets length with EOS."""
  return split_tokens(dataset, _max_tokens(sequence_length, "targets"))


def prefix_lm(dataset: tf.data.Dataset, sequence_length: Mapping[str, int]) -> tf.data.Dataset:
  """Prefix LM: each piece of "targets" is cut at a uniformly random point into inputs/targets.

  Pieces are at most min(inputs, targets) - 1 tokens, so either side fits with its EOS and no
  token is trimmed. The cut leaves both sides non-empty unless the piece is one token long.
  """

  @seqio.map_over_dataset(num_seeds=1)
  def cut(x: Mapping[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
    tokens = x["targets"]
    n = tf.size(tokens)
    point = tf.random.stateless_uniform(
        [], seed=seed, minval=tf.minimum(1, n - 1), maxval=n, dtype=tf.int32
    )
    return {**x, "inputs": tokens[:point], "targets": tokens[point:]}

  return cut(split_tokens(dataset, _max_tokens(sequence_length, "inputs", "targets")))
