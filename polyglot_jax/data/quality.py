"""Bad input: drop and count it (the `data/dropped_*` metrics), or stop on it in strict mode.

A user's instruction files may hold empty or whitespace-only texts, bytes that are not UTF-8,
records without a required field, lines that are not JSON, or examples longer than the feature
lengths. By default each such example is dropped, counted per reason, and the first one of each
(source, reason) is logged with its location; `strict=True` raises `BadInputError` instead.

Counts belong to a `DropCounter`: a run makes its own and reads its data inside
`counting(counter)`, so an in-process sweep or notebook never reports an earlier run's drops as
its own; drops outside any run go to a process-wide counter. The pipeline counts an example every
time it reads it (once per epoch, and again when a resume replays the stream). The trainer adds
the counter's `metrics()` to its logged metrics.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Iterator, Mapping

import seqio
import tensorflow as tf

REASONS = ("empty", "invalid_utf8", "missing_field", "malformed", "overlength")


class BadInputError(ValueError):
  """An input example that strict mode refuses (one line: source, reason, location)."""


class DropCounter:
  """Dropped examples by reason; the first of each (source, reason) is logged with its location."""

  def __init__(self):
    self._lock = threading.Lock()
    self._counts: collections.Counter[str] = collections.Counter()
    self._logged: set[tuple[str, str]] = set()

  def count(self, reason: str, source: str, message: str) -> None:
    with self._lock:
      self._counts[reason] += 1
      first = (source, reason) not in self._logged
      self._logged.add((source, reason))
    if first:
      logging.warning("%s; dropped (further ones are counted in data/dropped_%s)", message, reason)

  def metrics(self) -> dict[str, int]:
    """{"data/dropped_<reason>": count} for every reason, zeros included, for the metrics log."""
    with self._lock:
      return {f"data/dropped_{reason}": self._counts[reason] for reason in REASONS}

  def reset(self) -> None:
    """Zeroes the counts and forgets which drops were logged."""
    with self._lock:
      self._counts.clear()
      self._logged.clear()


_active = DropCounter()  # where drops go now: a run's counter inside `counting`, else this one


@contextlib.contextmanager
def counting(counter: DropCounter) -> Iterator[DropCounter]:
  """Counts the drops of the data read inside the block (by any thread) into `counter`."""
  global _active
  previous, _active = _active, counter
  try:
    yield counter
  finally:
    _active = previous


def drop(reason: str, source: str, where: str, strict: bool) -> None:
  """Counts one dropped example (and logs the first per source and reason), or raises if strict."""
  if reason not in REASONS:
    raise ValueError(f"unknown drop reason {reason!r}; expected one of {REASONS}")
  message = f"{source}: {reason} example at {where}"
  if strict:
    raise BadInputError(f"{message} (strict mode; strict=False drops and counts such examples)")
  _active.count(reason, source, message)


def dropped_metrics() -> dict[str, int]:
  """The current counter's `metrics()` (a run's inside `counting`, else the process's)."""
  return _active.metrics()


def reset_dropped() -> None:
  """Resets the current counter (tests)."""
  _active.reset()


def clean_text(value: object, field: str, source: str, where: str, strict: bool) -> str | None:
  """`value` as a str, or None (dropped and counted) when missing, not UTF-8 or blank."""
  if value is None:
    drop("missing_field", source, f"{where} (field {field!r})", strict)
    return None
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError:
      drop("invalid_utf8", source, f"{where} (field {field!r})", strict)
      return None
  text = str(value)
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\udc80" escape
    drop("invalid_utf8", source, f"{where} (field {field!r})", strict)
    return None
  if not text.strip():
    drop("empty", source, f"{where} (field {field!r})", strict)
    return None
  return text


def filter_overlength(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None,
    output_features: Mapping[str, seqio.Feature],
    source: str = "instruction data",
    strict: bool = False,
) -> tf.data.Dataset:
  """Drops (and counts) tokenized examples that would not fit their feature length with EOS.

  Instruction examples are never truncated: a cut-off target teaches the model to stop mid-answer.
  Without sequence lengths (e.g. while caching) nothing is filtered.
  """
  if not sequence_length:
    return dataset
  limits = {
      k: sequence_length[k] - int(f.add_eos)
      for k, f in output_features.items()
      if sequence_length.get(k) is not None
  }

  def count(language: bytes) -> bool:
    drop("overlength", source, f"language {language.decode()!r} (limits {limits})", strict)
    return False

  def keep(x: Mapping[str, tf.Tensor]) -> tf.Tensor:
    too_long = tf.reduce_any([tf.size(x[k]) > n for k, n in limits.items()])  # []
    return tf.cond(
        too_long,
        lambda: tf.reshape(tf.numpy_function(count, [x["language"]], tf.bool, stateful=True), []),
        lambda: tf.constant(True),
    )

  return dataset.filter(keep)
