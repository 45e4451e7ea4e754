"""Language sampling for multilingual mixtures: mT5 temperature rates, UniMax, and the mixture.

Rates are decided per language, then split among that language's tasks by size:
  temperature (mT5, Xue et al. 2021):  p(lang) ∝ n_lang^alpha  (alpha=1 proportional, 0 uniform)
  unimax (Chung et al. 2023):          a budget of B examples spread uniformly over languages,
                                       smallest first, no language above `max_epochs` epochs
where n_lang counts input examples (seqio's `num_input_examples("train")`).

`LanguageMixture` is a seqio Mixture for tasks that differ only in their source (the per-language
tasks): it samples raw examples with the rates and preprocesses the mixed stream once. A plain
seqio Mixture builds one tokenise/pack pipeline per task, which for 500 languages takes minutes to
start and runs below one batch per second on two cores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

SAMPLINGS = ("temperature", "unimax")
DEFAULT_ALPHA = 0.3  # mT5


def temperature_probs(sizes: Mapping[str, int], alpha: float) -> dict[str, float]:
  """mT5 temperature sampling: p(lang) ∝ n_lang^alpha (alpha=1 proportional, 0 uniform)."""
  weights = {lang: float(n) ** alpha for lang, n in sizes.items()}
  total = sum(weights.values())
  return {lang: w / total for lang, w in weights.items()}


def unimax_probs(sizes: Mapping[str, int], budget: float, max_epochs: float) -> dict[str, float]:
  """UniMax (Chung et al. 2023, algorithm 1): uniform budget shares, capped at `max_epochs` epochs.

  Languages are visited from the smallest; each gets min(remaining budget / languages left,
  max_epochs * n_lang), so what small languages cannot use goes to the larger ones. When the
  budget exceeds max_epochs * total, the shares are renormalised and the cap cannot hold (logged).
  """
  if budget <= 0 or max_epochs <= 0:
    raise ValueError(f"UniMax needs budget > 0 and max_epochs > 0, got {budget} and {max_epochs}")
  order = sorted(sizes, key=lambda lang: (sizes[lang], lang))
  shares: dict[str, float] = {}
  remaining = float(budget)
  for i, lang in enumerate(order):
    shares[lang] = min(remaining / (len(order) - i), max_epochs * sizes[lang])
    remaining -= shares[lang]
  if remaining > 1e-6 * budget:
    logging.warning(
        "UniMax budget %s exceeds max_epochs x data (%s examples): languages will exceed %s epochs",
        budget, budget - remaining, max_epochs,
    )
  total = sum(shares.values())
  return {lang: shares[lang] / total for lang in sizes}


def language_rates(
    task_sizes: Mapping[str, int],
    task_languages: Mapping[str, str],
    sampling: str = "temperature",
    alpha: float = DEFAULT_ALPHA,
    budget: float | None = None,
    max_epochs: float = 1.0,
) -> dict[str, float]:
  """Per-task rates summing to 1: p(lang) by `sampling`, then p(task | lang) ∝ n_task."""
  if sampling not in SAMPLINGS:
    raise ValueError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")
  lang_sizes: dict[str, int] = {}
  for task, n in task_sizes.items():
    lang_sizes[task_languages[task]] = lang_sizes.get(task_languages[task], 0) + n
  if sampling == "temperature":
    probs = temperature_probs(lang_sizes, alpha)
  elif budget is None:
    raise ValueError("sampling='unimax' needs a budget: the number of examples the run will draw")
  else:
    probs = unimax_probs(lang_sizes, budget, max_epochs)
  return {
      task: probs[task_languages[task]] * n / lang_sizes[task_languages[task]]
      for task, n in task_sizes.items()
  }


Columns = Mapping[str, Sequence[str]]  # feature name -> one string per example


def shard_columns(columns: Columns, shard_info: seqio.ShardInfo | None) -> Columns:
  """Examples index, index + num_shards, ... of in-memory columns (all of them without a shard)."""
  if not shard_info:
    return columns
  return {k: v[shard_info.index::shard_info.num_shards] for k, v in columns.items()}


class MemorySource(seqio.DataSource):
  """String examples held in memory; with `shuffle`, the whole split is permuted every epoch.

  Whole-split permutation matters: bundles are sorted by language, and a Task's shuffle buffer
  only mixes neighbours. Deterministic for a given seed. Any `ShardInfo` reads only that shard's
  examples (`shard_columns`).
  """

  def __init__(self, columns_fn: Callable[[str], Columns], splits: Sequence[str]) -> None:
    super().__init__(splits, {s: len(next(iter(columns_fn(s).values()))) for s in splits})
    self.columns = columns_fn

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [split]

  def get_dataset(
      self,
      split: str = "train",
      shuffle: bool = True,
      seed: int | None = None,
      shard_info: seqio.ShardInfo | None = None,
      **unused_kwargs,
  ) -> tf.data.Dataset:
    columns = shard_columns(self.columns(split), shard_info)
    ds = tf.data.Dataset.from_tensor_slices(
        {k: tf.constant(v, tf.string, shape=[len(v)]) for k, v in columns.items()}
    )
    return ds.shuffle(max(len(ds), 1), seed=seed) if shuffle else ds


def read_shard(
    source: seqio.DataSource, split: str, shuffle: bool, seed: int | None,
    shard_info: seqio.ShardInfo | None,
) -> tf.data.Dataset:
  """Raw examples of one shard of a source, read at the source when it can split that finely.

  seqio's rule (`Task.get_dataset`): sources with arbitrary sharding, or with at least as many
  files as shards, read only their part; others are read whole and every n-th example is kept.
  """
  if (shard_info is None or source.supports_arbitrary_sharding
      or len(source.list_shards(split)) >= shard_info.num_shards):
    return source.get_dataset(split=split, shuffle=shuffle, seed=seed, shard_info=shard_info)
  ds = source.get_dataset(split=split, shuffle=shuffle, seed=seed)
  return ds.shard(shard_info.num_shards, shard_info.index)


def sampled_indices(
    sizes: Sequence[int],
    probs: Sequence[float],
    seed: int | None,
    shuffle: bool,
    num_epochs: int | None,
    chunk: int = 4096,
) -> Iterator[np.ndarray]:
  """Chunks of [chunk] int64 indices into the concatenation of the sources, sampled by `probs`.

  Each draw picks a source by `probs`, then that source's next example in its own order (a new
  permutation every epoch when `shuffle`). Ends when a source finishes `num_epochs` epochs.
  """
  rng = np.random.default_rng(seed)
  offsets = np.cumsum([0, *sizes[:-1]])
  orders = [rng.permutation(n) if shuffle else np.arange(n) for n in sizes]
  positions, epochs = [0] * len(sizes), [0] * len(sizes)
  while True:
    out = np.empty(chunk, np.int64)
    for i, source in enumerate(rng.choice(len(sizes), size=chunk, p=probs)):
      if positions[source] == sizes[source]:
        epochs[source] += 1
        if num_epochs is not None and epochs[source] >= num_epochs:
          yield out[:i]
          return
        orders[source] = rng.permutation(sizes[source]) if shuffle else orders[source]
        positions[source] = 0
      out[i] = offsets[source] + orders[source][positions[source]]
      positions[source] += 1
    yield out


class LanguageMixture(seqio.Mixture):
  """A seqio Mixture of tasks sharing preprocessors and features, sampled before preprocessing.

  Rates, `get_rate`, `tasks` and the registry behave as in `seqio.Mixture`; `languages` maps each
  task to its language (for `rate_table`). Tasks without examples in the requested split are left
  out (e.g. a language whose held-out articles were never translated). As in seqio, the stream
  ends when any task runs out (only with a finite `num_epochs`).
  """

  def __init__(
      self,
      name: str,
      tasks: Sequence[tuple[str, float]],
      default_rate: float | None = None,
      languages: Mapping[str, str] | None = None,
      description: str = "",
      **kwargs,
  ) -> None:
    super().__init__(name, tasks, default_rate, **kwargs)
    self.languages = dict(languages or {})
    self.description = description
    first = self.tasks[0]
    for task in self.tasks[1:]:
      if tuple(task.preprocessors) != tuple(first.preprocessors):
        raise ValueError(
            f"LanguageMixture {name!r}: task {task.name!r} has other preprocessors than "
            f"{first.name!r}; use seqio.Mixture for tasks that differ beyond their source"
        )

  def _raw_mixture(
      self, tasks: Sequence[seqio.Task], split: str, shuffle: bool, seed: int | None,
      num_epochs: int | None, shard_info: seqio.ShardInfo | None,
  ) -> tf.data.Dataset:
    """Raw examples of one shard of `tasks`, sampled by rate.

    In-memory sources (the bundled tasks) are concatenated into one table and indexed by
    `sampled_indices`: one small pipeline, whatever the number of languages; tasks with no
    example in the shard are left out. Other sources (streamed files) are read with `read_shard`
    and sampled with `tf.data.Dataset.sample_from_datasets`.
    """
    sample_seed = seed if seed is not None or shuffle else 42  # seqio's rule
    if not all(isinstance(t.source, MemorySource) for t in tasks):
      sources = [  # each: raw examples of one task, repeated num_epochs times
          read_shard(t.source, split, shuffle, seed, shard_info).repeat(num_epochs)
          for t in tasks
      ]
      return tf.data.Dataset.sample_from_datasets(
          sources, [self.get_rate(t) for t in tasks], seed=sample_seed,
          stop_on_empty_dataset=True,
      )
    columns = {t.name: shard_columns(t.source.columns(split), shard_info) for t in tasks}
    tasks = [t for t in tasks if len(next(iter(columns[t.name].values())))]
    if not tasks:
      raise ValueError(f"mixture {self.name!r}: shard {shard_info} of split {split!r} is empty")
    rates = np.array([self.get_rate(t) for t in tasks])
    table = {  # feature -> [total examples] strings
        k: tf.constant([v for t in tasks for v in columns[t.name][k]], tf.string)
        for k in columns[tasks[0].name]
    }
    sizes = [len(next(iter(columns[t.name].values()))) for t in tasks]
    indices = tf.data.Dataset.from_generator(
        lambda: sampled_indices(sizes, rates / rates.sum(), sample_seed, shuffle, num_epochs),
        output_signature=tf.TensorSpec([None], tf.int64),
    ).unbatch()
    return indices.map(lambda i: {k: tf.gather(v, i) for k, v in table.items()})

  def get_dataset(
      self,
      sequence_length: Mapping[str, int] | None = None,
      split: str = "train",
      use_cached: bool = False,
      shuffle: bool = True,
      seed: int | None = None,
      shard_info: seqio.ShardInfo | None = None,
      num_epochs: int | None = None,
      trim_output_features: bool = True,
      **unused_kwargs,
  ) -> tf.data.Dataset:
    """Samples the tasks' raw sources with the rates, then runs the shared preprocessors once.

    With `shard_info`, every source reads only that shard (see `_raw_mixture`).
    """
    if use_cached:
      raise ValueError(f"LanguageMixture {self.name!r} preprocesses on the fly; use_cached=False")
    tasks = [t for t in self.tasks if split in t.splits and t.num_input_examples(split) != 0]
    if not tasks:
      raise ValueError(f"no task of mixture {self.name!r} has examples in split {split!r}")
    mixed = self._raw_mixture(tasks, split, shuffle, seed, num_epochs, shard_info)

    def mixed_source(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
      del split, shuffle_files, seed  # already applied by _raw_mixture
      return mixed

    mixed_task = seqio.Task(
        self.name,
        source=seqio.FunctionDataSource(mixed_source, splits=(split,)),
        preprocessors=tasks[0].preprocessors,
        output_features=tasks[0].output_features,
        shuffle_buffer_size=tasks[0].shuffle_buffer_size,
    )
    ds = mixed_task.get_dataset(
        sequence_length, split=split, shuffle=False, seed=seed, num_epochs=1,
        trim_output_features=trim_output_features,
    )
    return ds.shuffle(mixed_task.shuffle_buffer_size, seed=seed) if shuffle else ds


def register_language_mixture(
    name: str,
    task_languages: Mapping[str, str],
    sampling: str = "temperature",
    alpha: float = DEFAULT_ALPHA,
    budget: float | None = None,
    max_epochs: float = 1.0,
    sizes: Mapping[str, int] | None = None,
) -> LanguageMixture:
  """(Re-)registers a `LanguageMixture` of `task_languages` (task name -> language) with rates.

  Sizes default to each task's `num_input_examples("train")`; pass `sizes` for tasks that do not
  know theirs (e.g. streamed user files). Tasks with no training example are left out.
  """
  if sizes is None:
    sizes = {t: seqio.get_mixture_or_task(t).num_input_examples("train") for t in task_languages}
  unknown = sorted(t for t, n in sizes.items() if n is None)
  if unknown:
    raise ValueError(f"mixture {name!r}: tasks {unknown} do not know their size; pass sizes=")
  sizes = {t: n for t, n in sizes.items() if n > 0}
  rates = language_rates(sizes, task_languages, sampling, alpha, budget, max_epochs)
  description = (
      f"temperature sampling, alpha={alpha}" if sampling == "temperature"
      else f"UniMax, budget={budget:g} examples, max_epochs={max_epochs:g}"
  )
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(
      name, sorted(rates.items()), mixture_cls=LanguageMixture,
      languages={t: task_languages[t] for t in rates}, description=description,
  )


def rate_table(name: str, budget: float | None = None) -> str:
  """The mixture's rates as text: language, examples, rate, expected epochs after `budget` draws.

  One row per language (its tasks summed), largest rate first; epochs are shown when a budget
  (the number of examples the run draws from the mixture) is given.
  """
  mixture = seqio.get_mixture_or_task(name)
  if not isinstance(mixture, seqio.Mixture):
    raise ValueError(f"{name!r} is a task, not a mixture")
  languages = getattr(mixture, "languages", {})
  total_rate = mixture.total_rate
  rows: dict[str, list[float]] = {}
  for task in mixture.tasks:
    row = rows.setdefault(languages.get(task.name, task.name), [0.0, 0.0])
    row[0] += task.num_input_examples("train") or 0
    row[1] += mixture.get_rate(task) / total_rate
  header = f"{'language':<16} {'examples':>9} {'rate':>9}" + (" epochs" if budget else "")
  lines = [f"mixture {name}: {len(rows)} languages, {getattr(mixture, 'description', '')}", header]
  for lang, (n, rate) in sorted(rows.items(), key=lambda kv: (-kv[1][1], kv[0])):
    epochs = f" {rate * budget / n:6.2f}" if budget and n else ""
    lines.append(f"{lang:<16} {int(n):>9} {rate:>9.5f}{epochs}")
  return "\n".join(lines)


def print_rate_table(name: str, budget: float | None = None) -> None:
  """Prints `rate_table(name, budget)`."""
  print(rate_table(name, budget))
