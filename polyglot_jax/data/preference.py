"""Preference data: Aya-style (prompt, chosen, rejected, language) records, tasks and converters.

Records hold `prompt` (a string) or `messages` (a list of {"role", "content"} turns), `chosen`
and `rejected` (strings, or message lists whose last turn is the response), and `language`;
optionally `chosen_ref_logps` / `rejected_ref_logps`, the responses' log-probabilities under a
frozen reference model (precomputed once, see `training.preference`). Messages are rendered as
their contents joined by newlines, as the bundled dialog data does, until a chat template exists.
Tasks read JSONL(.gz) or Parquet files with `aya`'s readers; bad records are dropped and counted
(`quality`), or raise in strict mode. Task features: "inputs" (the prompt), "chosen",
"rejected" and "language", tokenized with EOS; over-length examples are dropped, never cut.

The feature converters keep each pair together: row 2i of the converted stream is the chosen
response and row 2i+1 the rejected one, both after the same prompt (decoder-only: prompt +
response in one sequence, the loss on the response; encoder-decoder: the prompt in the encoder).
Rows rather than paired features in one row, because then a pair is two ordinary model rows: the
model, its loss masks and its shardings stay as they are, one forward pass scores both responses,
and an even number of rows per data shard and microbatch keeps pairs together (the batch axis is
split into contiguous blocks). With packing, pairs are packed jointly: the chosen and the
rejected row of a row pair hold the responses of the same examples, example k as segment k of
both. Task feature lengths: {"inputs", "chosen", "rejected"}.

`udhr_preference_records` reads the bundled multilingual preference set (translation prompts over
UDHR articles; `scripts/build_preference.py`, `bundled/LICENSE_udhr_preference.md`).
"""

from __future__ import annotations

import functools
import gzip
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from polyglot_jax.data import aya, quality
from polyglot_jax.data.udhr import BUNDLE_DIR, SPLIT_ARTICLES
from polyglot_jax.data.vocab import get_vocabulary

UDHR_PREFERENCE_PATH = BUNDLE_DIR / "udhr_preference.jsonl.gz"
RECORD_FIELDS = ("prompt", "messages", "chosen", "rejected", "language", "chosen_ref_logps",
                 "rejected_ref_logps")
REFERENCE_FIELDS = ("chosen_ref_logps", "rejected_ref_logps")
FEATURES = ("inputs", "chosen", "rejected")  # the tokenized task features
SIDES = ("chosen", "rejected")
REFERENCE_FEATURE = "decoder_reference_log_probs"  # the model feature (training.preference)
FORMATS = ("jsonl", "parquet")

_TOKENIZE = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)
# One chain object per strictness, shared by every preference task: `LanguageMixture` mixes tasks
# with identical preprocessors.
CHAINS = {
    strict: (_TOKENIZE, seqio.CacheDatasetPlaceholder(),
             functools.partial(quality.filter_overlength, strict=strict, source="preference data"),
             seqio.preprocessors.append_eos_after_trim)
    for strict in (False, True)
}


def render_messages(messages: Sequence[Mapping[str, Any]]) -> str | None:
  """The turns' contents joined by newlines; None when the list is not a list of turns."""
  if not isinstance(messages, (list, tuple)) or not messages:
    return None
  if not all(isinstance(m, Mapping) and isinstance(m.get("content"), str) for m in messages):
    return None
  return "\n".join(m["content"] for m in messages)


def _response(value: Any) -> Any:
  """A response string, or the last turn's content of a message list (other values unchanged)."""
  if isinstance(value, (list, tuple)) and value and isinstance(value[-1], Mapping):
    return value[-1].get("content")
  return value


class PreferenceFileSource(aya.AyaFileSource):
  """A seqio DataSource over preference records in JSONL(.gz) or Parquet files (`aya` readers).

  Examples: {"inputs", "chosen", "rejected", "language"} strings, plus float32
  `chosen_ref_logps` / `rejected_ref_logps` when `reference_log_probs`.
  """

  def __init__(self, name: str, split_paths: Mapping[str, Sequence[str]], file_format: str,
               columns: Mapping[str, str], default_language: str | None,
               only_language: str | None, strict: bool, reference_log_probs: bool) -> None:
    super().__init__(name, split_paths, file_format, {}, default_language, only_language, strict)
    self._columns = dict(columns)  # field -> column; the parent's Parquet reader selects these
    self._reference = reference_log_probs

  def _example(self, raw: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """One clean example of a record, or None (dropped and counted, or raised when strict)."""
    name, strict, cols = self._name, self._strict, self._columns
    prompt = raw.get(cols["prompt"])
    if prompt is None and raw.get(cols["messages"]) is not None:
      prompt = render_messages(raw[cols["messages"]])
      if prompt is None:
        quality.drop("malformed", name, f"{where} (field 'messages')", strict)
        return None
    language = raw.get(cols["language"])
    example: dict[str, Any] = {}
    for field, value in (("inputs", prompt), ("chosen", _response(raw.get(cols["chosen"]))),
                         ("rejected", _response(raw.get(cols["rejected"]))),
                         ("language", self._default_language if language is None else language)):
      text = quality.clean_text(value, field, name, where, strict)
      if text is None:
        return None
      example[field] = text
    if self._only_language is not None and example["language"] != self._only_language:
      return None
    for field in REFERENCE_FIELDS if self._reference else ():
      value = raw.get(cols[field])
      if value is None:
        quality.drop("missing_field", name, f"{where} (field {field!r})", strict)
        return None
      if not isinstance(value, (int, float)) or not math.isfinite(value):
        quality.drop("malformed", name, f"{where} (field {field!r})", strict)
        return None
      example[field] = float(value)
    return example

  def examples(self, paths: Sequence[str], split: str) -> Iterator[dict[str, Any]]:
    """Clean examples of `paths` in order; bad ones are counted (or raise when strict)."""
    for path in paths:
      for where, raw in self._raw(path, split):
        if isinstance(raw, str):
          quality.drop(raw, self._name, where, self._strict)
          continue
        example = self._example(raw, where)
        if example is not None:
          yield example

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, **unused_kwargs) -> tf.data.Dataset:
    paths = self._split_paths[split]
    if shard_info:
      paths = paths[shard_info.index::shard_info.num_shards]
    if shuffle:
      paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
    signature = {f: tf.TensorSpec([], tf.string) for f in (*FEATURES, "language")}
    if self._reference:
      signature.update({f: tf.TensorSpec([], tf.float32) for f in REFERENCE_FIELDS})
    return tf.data.Dataset.from_generator(lambda: self.examples(paths, split),
                                          output_signature=signature)


def make_source(name: str, data: Mapping[str, str | Sequence[str]],
                file_format: str | None = None, field_map: Mapping[str, str] | None = None,
                default_language: str | None = None, only_language: str | None = None,
                strict: bool = False, reference_log_probs: bool = False
                ) -> PreferenceFileSource:
  """Validates the arguments and the files' schemas (one-line errors) and builds the source.

  `data` maps split names to a path, glob or list of them; `field_map` maps the record fields
  (`RECORD_FIELDS`) to the files' own column names, e.g. {"prompt": "question"}.
  """
  field_map = dict(field_map or {})
  unknown = sorted(set(field_map) - set(RECORD_FIELDS))
  if unknown:
    raise ValueError(f"{name}: field_map keys {unknown} are not preference record fields "
                     f"{list(RECORD_FIELDS)}")
  if file_format is not None and file_format not in FORMATS:
    raise ValueError(f"{name}: file_format {file_format!r} is not supported for preference data; "
                     f"use one of {FORMATS}")
  split_paths = {split: aya.resolve_paths(spec) for split, spec in data.items()}
  formats = {file_format or aya.detect_format(p) for ps in split_paths.values() for p in ps}
  if len(formats) != 1 or not formats <= set(FORMATS):
    raise ValueError(f"{name}: preference files must all be one of {FORMATS}, got "
                     f"{sorted(formats)}")
  fmt = formats.pop()
  columns = {f: field_map.get(f, f) for f in RECORD_FIELDS}
  required = [columns[f] for f in ("chosen", "rejected")]
  required += [columns["language"]] if default_language is None else []
  required += [columns[f] for f in REFERENCE_FIELDS] if reference_log_probs else []
  for path in (p for ps in split_paths.values() for p in ps):
    present = aya.file_columns(path, fmt)
    if present is None:
      continue
    missing = [c for c in required if c not in present]
    if columns["prompt"] not in present and columns["messages"] not in present:
      missing.append(f"{columns['prompt']} or {columns['messages']}")
    if missing:
      raise ValueError(f"{name}: {path} has no column {missing} (columns: {present}); map yours "
                       "with field_map= or set default_language=")
  return PreferenceFileSource(name, split_paths, fmt, columns, default_language, only_language,
                              strict, reference_log_probs)


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """"inputs", "chosen", "rejected", each tokenized by `vocabulary` with EOS."""
  return {k: seqio.Feature(vocabulary, add_eos=True) for k in FEATURES}


def register_preference_task(
    name: str,
    data: Mapping[str, str | Sequence[str]],
    *,
    file_format: str | None = None,
    field_map: Mapping[str, str] | None = None,
    default_language: str | None = None,
    only_language: str | None = None,
    strict: bool = False,
    reference_log_probs: bool = False,
    vocabulary: seqio.Vocabulary | None = None,
) -> seqio.Task:
  """(Re-)registers a preference task over your JSONL(.gz) or Parquet files.

  `data` maps split names to a path, glob or list, e.g. {"train": "/data/prefs/*.parquet"}. One
  task per language (`only_language`) plus `mixing.register_language_mixture(..., sizes=...)`
  mixes languages with temperature or UniMax rates. With `reference_log_probs`, the records'
  `chosen_ref_logps` / `rejected_ref_logps` travel with the examples (convert with
  `reference_log_probs=True`). See `make_source` for the other arguments.
  """
  source = make_source(name, data, file_format, field_map, default_language, only_language,
                       strict, reference_log_probs)
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, source=source, preprocessors=list(CHAINS[strict]),
                                output_features=output_features(vocabulary or get_vocabulary()))


@functools.cache
def udhr_preference_records(split: str) -> tuple[dict[str, Any], ...]:
  """The bundled UDHR preference records of one split ("train" or "validation")."""
  if split not in SPLIT_ARTICLES:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_ARTICLES)}")
  with gzip.open(UDHR_PREFERENCE_PATH, "rt", encoding="utf-8") as f:
    return tuple(r for r in map(json.loads, f) if r["split"] == split)


@functools.cache
def udhr_preference_columns(split: str) -> dict[str, list[str]]:
  """The bundled records as in-memory task columns: inputs, chosen, rejected, language."""
  records = udhr_preference_records(split)
  return {"inputs": [r["prompt"] for r in records],
          **{f: [r[f] for r in records] for f in ("chosen", "rejected", "language")}}


# ---------------------------------------------------------------------------------------------
# Feature converters.


def _reference_tokens(value: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
  """A float32 log-prob as `length` int32 tokens (its bit pattern, never 0) for seqio's packer,
  which packs int32 sequences and reads a sequence's length as its count of nonzero tokens."""
  value = tf.where(tf.equal(value, 0.0), tf.constant(-0.0), value)  # -0.0 has nonzero bits
  return tf.fill([length], tf.bitcast(tf.cast(value, tf.float32), tf.int32))


def _reference_values(tokens: tf.Tensor, positions: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
  """Packed bit-pattern tokens -> each sequence's float32 log-prob at its first token, 0 else."""
  first = tf.logical_and(tf.equal(positions, 0), tf.not_equal(targets, 0))
  return tf.where(first, tf.bitcast(tokens, tf.float32), 0.0)


def _pad_to(features: Mapping[str, tf.Tensor], length: int) -> dict[str, tf.Tensor]:
  """Features of static length <= `length`, zero-padded to it."""
  return {k: tf.pad(v, [[0, length - v.shape[0]]]) for k, v in features.items()}


def _interleave(rows: Sequence[Mapping[str, tf.Tensor]]) -> dict[str, tf.Tensor]:
  """Two rows (chosen, rejected) of one pair -> features with a leading [2] axis (to unbatch)."""
  return {k: tf.stack([row[k] for row in rows]) for k in rows[0]}


class _PairedConverter:
  """What both preference converters add to their seqio base: the reference feature switch."""

  def _init_reference(self, reference_log_probs: bool) -> None:
    self._reference = reference_log_probs
    if reference_log_probs:
      self.MODEL_FEATURES = {**type(self).MODEL_FEATURES,
                             REFERENCE_FEATURE: seqio.FeatureConverter.FeatureSpec(tf.float32)}

  def _check_reference(self, ds: tf.data.Dataset) -> None:
    missing = [f for f in REFERENCE_FIELDS if f not in ds.element_spec]
    if self._reference and missing:
      raise ValueError(f"reference_log_probs=True but the examples have no {missing}; register "
                       "the task with reference_log_probs=True or convert without it")


class DecoderPreferenceConverter(_PairedConverter, seqio.PrefixLMFeatureConverter):
  """Preference pairs for decoder-only models: rows 2i / 2i+1 = prompt + chosen / rejected.

  Model features are those of seqio's PrefixLM converter (loss on the response only), plus
  `decoder_reference_log_probs` with `reference_log_probs`; length inputs + max(chosen,
  rejected).
  """

  TASK_FEATURES = {f: seqio.FeatureConverter.FeatureSpec(tf.int32) for f in FEATURES}

  def __init__(self, pack: bool = True, reference_log_probs: bool = False, **kwargs) -> None:
    self._init_reference(reference_log_probs)
    super().__init__(loss_on_targets_only=True, pack=pack, **kwargs)

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
                        ) -> tf.data.Dataset:
    self._check_reference(ds)
    lengths = {side: task_feature_lengths["inputs"] + task_feature_lengths[side]
               for side in SIDES}
    row_length = max(lengths.values())

    def concat(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      out = {}
      for side in SIDES:
        # targets = prompt + response; inputs_width(_add_pos) mark the prompt (seqio PrefixLM).
        parts = self._concat_and_add_masks({"inputs": ex["inputs"], "targets": ex[side]})
        out.update({f"{side}/{k}": v for k, v in parts.items()})
        if self._reference:
          out[f"{side}/reference"] = _reference_tokens(ex[f"{side}_ref_logps"],
                                                       tf.size(parts["targets"]))
      return out

    def split(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      rows = []
      for side in SIDES:
        parts = {k: ex[f"{side}/{k}"] for k in ("targets", "inputs_width", "inputs_width_add_pos")}
        if self.pack:
          parts["targets_segment_ids"] = ex[f"{side}/targets_segment_ids"]
          parts["targets_positions"] = ex[f"{side}/targets_positions"]
        row = dict(self._convert_example(parts))
        if self._reference:
          positions = parts.get("targets_positions", tf.range(lengths[side]))
          row[REFERENCE_FEATURE] = _reference_values(ex[f"{side}/reference"], positions,
                                                     parts["targets"])
        rows.append(_pad_to(row, row_length))
      return _interleave(rows)

    ds = ds.map(concat, num_parallel_calls=tf.data.AUTOTUNE)
    # The prompt always holds EOS, so no inputs_width is 0 (seqio's PrefixLM swaps such zeros).
    packed_lengths = {f"{side}/{k}": lengths[side] for side in SIDES
                      for k in ("targets", "inputs_width", "inputs_width_add_pos")
                      + (("reference",) if self._reference else ())}
    ds = self._pack_or_pad(ds, packed_lengths)
    return ds.map(split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> dict[str, int]:
    targets = max(task_feature_lengths[side] for side in SIDES)
    lengths = dict(super().get_model_feature_lengths(
        {"inputs": task_feature_lengths["inputs"], "targets": targets}))
    if self._reference:
      lengths[REFERENCE_FEATURE] = lengths["decoder_target_tokens"]
    return lengths


class EncDecPreferenceConverter(_PairedConverter, seqio.EncDecFeatureConverter):
  """Preference pairs for encoder-decoders: rows 2i / 2i+1 = prompt -> chosen / rejected.

  Model features are those of seqio's EncDec converter, plus `decoder_reference_log_probs` with
  `reference_log_probs`; decoder length max(chosen, rejected).
  """

  TASK_FEATURES = {f: seqio.FeatureConverter.FeatureSpec(tf.int32) for f in FEATURES}

  def __init__(self, pack: bool = True, reference_log_probs: bool = False, **kwargs) -> None:
    self._init_reference(reference_log_probs)
    super().__init__(pack=pack, **kwargs)

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
                        ) -> tf.data.Dataset:
    self._check_reference(ds)
    row_length = max(task_feature_lengths[side] for side in SIDES)
    packed_lengths = dict(task_feature_lengths)

    def select(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      out = {f: ex[f] for f in FEATURES}
      for side in SIDES if self._reference else ():
        out[f"{side}/reference"] = _reference_tokens(ex[f"{side}_ref_logps"], tf.size(ex[side]))
      return out

    def split(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
      rows = []
      for side in SIDES:
        parts = {"inputs": ex["inputs"], "targets": ex[side]}
        if self.pack:
          parts.update({f"inputs_{k}": ex[f"inputs_{k}"] for k in ("segment_ids", "positions")})
          parts.update({f"targets_{k}": ex[f"{side}_{k}"] for k in ("segment_ids", "positions")})
        row = dict(self._convert_example(parts))
        if self._reference:
          positions = parts.get("targets_positions", tf.range(task_feature_lengths[side]))
          row[REFERENCE_FEATURE] = _reference_values(ex[f"{side}/reference"], positions,
                                                     parts["targets"])
        encoder = {k: v for k, v in row.items() if k.startswith("encoder_")}
        decoder = _pad_to({k: v for k, v in row.items() if not k.startswith("encoder_")},
                          row_length)
        rows.append({**encoder, **decoder})
      return _interleave(rows)

    if self._reference:
      packed_lengths.update({f"{side}/reference": task_feature_lengths[side] for side in SIDES})
    ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)
    ds = self._pack_or_pad(ds, packed_lengths)
    return ds.map(split, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> dict[str, int]:
    targets = max(task_feature_lengths[side] for side in SIDES)
    lengths = dict(super().get_model_feature_lengths(
        {"inputs": task_feature_lengths["inputs"], "targets": targets}))
    if self._reference:
      lengths[REFERENCE_FEATURE] = targets
    return lengths


def converter_cls(model_converter_cls: Callable[..., seqio.FeatureConverter],
                  reference_log_probs: bool = False) -> Any:
  """The preference converter for a model's `FEATURE_CONVERTER_CLS` (a class or a factory such
  as a partial), called like it (`converter(pack=...)`): encoder-decoder for seqio's EncDec
  converter, else decoder-only."""
  encoder_decoder = isinstance(model_converter_cls(pack=False), seqio.EncDecFeatureConverter)
  cls = EncDecPreferenceConverter if encoder_decoder else DecoderPreferenceConverter
  return functools.partial(cls, reference_log_probs=reference_log_probs)
