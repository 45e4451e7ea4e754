"""Evaluation of a task or mixture, overall and per language: seqio metric functions, perplexity.

`Evaluator` reads one split once, as `seqio.Evaluator` does (examples cached in memory in a fixed
order), then scores any parameters on it: teacher-forced loss and accuracy (given an
`eval_step`), perplexity from `score_batch`, and the task's metric functions on `predict_batch`
decodes. Metric functions follow seqio's `metric_fns` conventions: `fn(targets, predictions)`
on postprocessed strings, `fn(targets, scores)` on summed target log-likelihoods,
`fn(targets, predictions, aux_values)`; each returns {name: value}. Tasks that declare none get
`bleu`, `chrf` and `exact_match` when they have inputs to decode from; tasks without inputs
(language modelling) get perplexity only.

Each example's language is its "language" feature mapped to ISO 639-3 (`tasks.iso639_3`), else
the mixture's language of its task, else "und". Results hold
  metrics    all examples together (corpus BLEU and chrF, token-level perplexity)
  languages  the same metrics per language
  groups     means of the language rows over "high"- and "low"-resource languages, and "all"
High-resource languages are a given list, or those with at least `HIGH_RESOURCE_RATIO` times the
median language's training examples in the evaluated task or mixture: what the model saw much of.

`InferEval` is T5X's `infer_eval` scope of the training loop: it evaluates every eval period and
writes MODEL_DIR/infer_eval/<task>/ (metrics.jsonl and TensorBoard, plus a per-language JSON).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np
import sacrebleu
import seqio
import tensorflow as tf
from jax.experimental import multihost_utils

from polyglot_jax.data import mixing
from polyglot_jax.data.pipeline import DatasetConfig, check_registered
from polyglot_jax.data.tasks import iso639_3
from polyglot_jax.models import losses
from polyglot_jax.parallel.partitioning import Partitioner
from polyglot_jax.training.metrics import MetricsWriter

UNKNOWN_LANGUAGE = "und"
HIGH_RESOURCE_RATIO = 2.0
GROUPS = ("high", "low", "all")


def bleu(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Corpus BLEU with T5's sacrebleu settings ('intl' tokenizer, exponential smoothing).

  Word-based: near 0 for scripts written without spaces; compare languages with chrF.
  """
  score = sacrebleu.corpus_bleu(list(predictions), [list(targets)], smooth_method="exp",
                                tokenize="intl")
  return {"bleu": score.score}


def chrf(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2): no tokenizer, any script."""
  return {"chrf": sacrebleu.corpus_chrf(list(predictions), [list(targets)]).score}


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions equal to their target, surrounding whitespace ignored."""
  hits = [t.strip() == p.strip() for t, p in zip(targets, predictions, strict=True)]
  return {"exact_match": 100.0 * float(np.mean(hits)) if hits else 0.0}


DEFAULT_METRIC_FNS = (bleu, chrf, exact_match)


def perplexity(log_likelihood: float, num_tokens: float) -> float:
  """exp(-log-likelihood per target token) of summed log-likelihoods and token counts."""
  return math.exp(-log_likelihood / max(num_tokens, 1.0))


@dataclasses.dataclass(frozen=True)
class MetricFns:
  """A task's seqio metric functions by the model output they read."""

  predict: tuple[Callable[..., Mapping[str, Any]], ...] = ()
  score: tuple[Callable[..., Mapping[str, Any]], ...] = ()
  predict_with_aux: tuple[Callable[..., Mapping[str, Any]], ...] = ()

  @property
  def decodes(self) -> bool:
    return bool(self.predict or self.predict_with_aux)


def _subtasks(name: str, split: str) -> list[seqio.Task]:
  """The tasks of a task or mixture that have `split`; one-line errors otherwise."""
  check_registered(name)
  tasks = [t for t in seqio.get_subtasks(seqio.get_mixture_or_task(name)) if split in t.splits]
  if not tasks:
    raise ValueError(f"no task of {name!r} has a {split!r} split; set the evaluation split.")
  return tasks


def metric_fns(tasks: Sequence[seqio.Task]) -> MetricFns:
  """The metric functions the tasks declare (they must agree), or the defaults."""
  declared = {(tuple(t.predict_metric_fns), tuple(t.score_metric_fns),
               tuple(t.predict_with_aux_metric_fns)) for t in tasks}
  if len(declared) > 1:
    raise ValueError(f"the tasks {[t.name for t in tasks][:5]}... declare different metric_fns; "
                     "evaluate them one task at a time.")
  fns = MetricFns(*declared.pop())
  if fns.predict or fns.score or fns.predict_with_aux:
    return fns
  return MetricFns(predict=DEFAULT_METRIC_FNS if "inputs" in tasks[0].output_features else ())


def _round_robin(datasets: Sequence[tf.data.Dataset]) -> tf.data.Dataset:
  """One example of each dataset in turn, skipping exhausted ones, until all are exhausted."""
  if len(datasets) == 1:
    return datasets[0]
  order = tf.data.Dataset.range(len(datasets)).repeat()
  return tf.data.Dataset.choose_from_datasets(datasets, order, stop_on_empty_dataset=False)


def _with_language(ds: tf.data.Dataset, language: str) -> tf.data.Dataset:
  if "language" in ds.element_spec:
    return ds
  return ds.map(lambda ex: {**ex, "language": tf.constant(language)})


def eval_dataset(name: str, split: str, feature_lengths: Mapping[str, int],
                 shuffle: bool = False, seed: int | None = None) -> tf.data.Dataset:
  """Every example of every task of `name` once, preprocessed, with a "language" string.

  Tasks take turns (round robin), so the first N examples span the tasks: a capped evaluation
  of a per-language mixture still sees many languages. `seed` also seeds random preprocessors
  (span corruption), as in `pipeline.get_dataset`. Tasks sharing their preprocessors (all
  of a `LanguageMixture`) are preprocessed as one stream, as `LanguageMixture` does when
  training: one pipeline, not one per language.
  """
  languages = getattr(seqio.get_mixture_or_task(name), "languages", {})
  chains: dict[tuple[Any, ...], list[seqio.Task]] = collections.defaultdict(list)
  for task in _subtasks(name, split):
    chains[tuple(task.preprocessors)].append(task)
  streams = []
  for tasks in chains.values():
    raw = _round_robin([
        _with_language(t.source.get_dataset(split=split, shuffle=shuffle, seed=seed),
                       languages.get(t.name, UNKNOWN_LANGUAGE)) for t in tasks])
    stream = seqio.Task(
        tasks[0].name,
        source=seqio.FunctionDataSource(lambda split, shuffle_files, seed=None, raw=raw: raw,
                                        splits=(split,)),
        preprocessors=tasks[0].preprocessors, output_features=tasks[0].output_features)
    streams.append(stream.get_dataset(dict(feature_lengths), split=split, shuffle=False,
                                      seed=seed, num_epochs=1))
  return _round_robin(streams)


def training_sizes(name: str) -> dict[str, int] | None:
  """Training examples per language of a task or mixture; None where that is not known cheaply
  (tasks streaming files without a mixture language)."""
  languages = getattr(seqio.get_mixture_or_task(name), "languages", {})
  sizes: collections.Counter[str] = collections.Counter()
  for task in seqio.get_subtasks(seqio.get_mixture_or_task(name)):
    if "train" not in task.splits:
      continue
    columns = task.source.columns("train") if isinstance(task.source, mixing.MemorySource) else {}
    if "language" in columns:
      sizes.update(iso639_3(code) for code in columns["language"])
    elif task.name in languages and task.num_input_examples("train") is not None:
      sizes[languages[task.name]] += task.num_input_examples("train")
    else:
      return None
  return dict(sizes)


def resource_split(name: str, high_resource_languages: Collection[str] | None = None
                   ) -> tuple[frozenset[str] | None, str]:
  """(high-resource languages or None, the rule that chose them) for the task or mixture `name`.

  A given list wins; otherwise a language is high-resource when it has at least
  HIGH_RESOURCE_RATIO times the median language's training examples.
  """
  if high_resource_languages is not None:
    return frozenset(high_resource_languages), "the given high_resource_languages"
  sizes = training_sizes(name)
  if not sizes:
    return None, (f"unknown: {name!r} has no per-language training sizes; pass "
                  "Evaluator.high_resource_languages")
  median = float(np.median(list(sizes.values())))
  high = frozenset(lang for lang, n in sizes.items() if n >= HIGH_RESOURCE_RATIO * median)
  return high, (f"at least {HIGH_RESOURCE_RATIO:g}x the median language's {median:g} training "
                f"examples of {name}")


@dataclasses.dataclass(frozen=True)
class Outputs:
  """What the model produced for each cached example (None: the evaluator does not decode)."""

  log_likelihoods: np.ndarray  # [examples]
  num_tokens: np.ndarray  # [examples]
  predictions: list[str] | None
  scores: np.ndarray | None  # [examples] decoding scores (aux_values["scores"])


def _compute(fns: MetricFns, targets: Sequence[Any], outputs: Outputs,
             rows: Sequence[int]) -> dict[str, float]:
  """The metrics of the examples `rows`."""
  rows = np.asarray(rows, np.int64)
  picked = [targets[i] for i in rows]
  out = {"num_examples": float(len(rows)),
         "perplexity": perplexity(float(np.sum(outputs.log_likelihoods[rows])),
                                  float(np.sum(outputs.num_tokens[rows])))}
  for fn in fns.score:
    out.update(fn(picked, list(outputs.log_likelihoods[rows])))
  if outputs.predictions is not None:
    predictions = [outputs.predictions[i] for i in rows]
    for fn in fns.predict:
      out.update(fn(picked, predictions))
    for fn in fns.predict_with_aux:
      out.update(fn(picked, predictions, {"scores": list(outputs.scores[rows])}))
  return {k: float(v) for k, v in out.items()}


@dataclasses.dataclass
class EvalResults:
  """Metrics of one evaluation: overall, per language, per resource group."""

  task: str
  metrics: dict[str, float]
  languages: dict[str, dict[str, float]]
  groups: dict[str, dict[str, float]]
  high_resource: list[str] | None
  resource_rule: str

  def flat(self) -> dict[str, float]:
    """Overall metrics plus `<group>/<metric>` for the resource groups (for metric writers)."""
    out = dict(self.metrics)
    for group, values in self.groups.items():
      out.update({f"{group}/{k}": v for k, v in values.items()})
    return out

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def table(self) -> str:
    """The per-language table as text: one row per language, then the group rows."""
    names = [k for k in next(iter(self.languages.values())) if k != "num_examples"]
    header = f"{'language':<12} {'group':<5} {'examples':>8} " + " ".join(
        f"{n[:12]:>12}" for n in names)
    lines = [f"{self.task}: {len(self.languages)} languages; high-resource = {self.resource_rule}",
             header]
    high = set(self.high_resource or ())
    group_of = (lambda lang: "high" if lang in high else "low") if self.high_resource is not None \
        else (lambda lang: "")
    for lang, row in sorted(self.languages.items()):
      lines.append(f"{lang:<12} {group_of(lang):<5} {int(row['num_examples']):>8} " + " ".join(
          f"{row[n]:>12.4f}" for n in names))
    for group, row in self.groups.items():
      lines.append(f"{'[' + group + ']':<12} {'':<5} {int(row['num_examples']):>8} " + " ".join(
          f"{row.get(n, float('nan')):>12.4f}" for n in names))
    return "\n".join(lines)


def summarize(task: str, languages: Sequence[str], targets: Sequence[Any], outputs: Outputs,
              fns: MetricFns, high_resource: frozenset[str] | None, resource_rule: str,
              extra_metrics: Mapping[str, float] | None = None) -> EvalResults:
  """Metrics over all examples, per language, and the resource groups' means of language rows.

  A group row averages each metric over the group's languages (each language counts once) and
  reports its `num_examples` and `num_languages`; languages outside `high_resource` are "low".
  """
  by_language: dict[str, list[int]] = collections.defaultdict(list)
  for i, lang in enumerate(languages):
    by_language[lang].append(i)
  rows = {lang: _compute(fns, targets, outputs, idx) for lang, idx in sorted(by_language.items())}
  members = {"all": list(rows)}
  if high_resource is not None:
    members["high"] = [lang for lang in rows if lang in high_resource]
    members["low"] = [lang for lang in rows if lang not in high_resource]
  groups = {}
  for group in GROUPS:
    langs = members.get(group)
    if not langs:
      continue
    names = [k for k in rows[langs[0]] if k != "num_examples"]
    groups[group] = {k: float(np.mean([rows[lang][k] for lang in langs])) for k in names}
    groups[group]["num_examples"] = float(sum(rows[lang]["num_examples"] for lang in langs))
    groups[group]["num_languages"] = float(len(langs))
  metrics = {**(extra_metrics or {}), **_compute(fns, targets, outputs, range(len(languages)))}
  return EvalResults(task, metrics, rows, groups,
                     sorted(high_resource) if high_resource is not None else None, resource_rule)


def _pad_rows(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Zero rows appended up to `size` (zero loss weights: they count nowhere)."""
  return {k: np.pad(v, [(0, size - len(v))] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}


def _target_text(example: Mapping[str, Any], vocabulary: seqio.Vocabulary) -> str:
  """seqio's reference: `targets_pretokenized` when kept, else the decoded target tokens."""
  text = example.get("targets_pretokenized")
  if text is None:
    return vocabulary.decode(example["targets"].tolist())
  return text.decode("utf-8") if isinstance(text, bytes) else str(text)


@gin.configurable
class Evaluator:
  """One split of a task or mixture, read and cached once; `evaluate(params)` scores it.

  Attributes set from gin (`Evaluator.<name>`), for `polyglot-jax eval` and `infer_eval` alike:
    decoder_params: `predict_batch` settings (see `decoding.DecoderParams`); default greedy.
    high_resource_languages: ISO 639-3 codes of the high-resource group; default from the
      training sizes (see `resource_split`).
  """

  def __init__(self, model: Any, partitioner: Partitioner, params_shardings: Any,
               dataset_cfg: DatasetConfig, *, max_examples: int | None = None,
               eval_step: Callable[[Any, Any], Any] | None = None,
               decoder_params: Mapping[str, Any] | None = None,
               high_resource_languages: Sequence[str] | None = None, seed: int = 0) -> None:
    self.name = dataset_cfg.mixture_or_task_name
    tasks = _subtasks(self.name, dataset_cfg.split)
    self._fns = metric_fns(tasks)
    self._postprocess = tasks[0].postprocess_fn
    self._vocabulary = tasks[0].output_features["targets"].vocabulary
    self._partitioner = partitioner
    self._eval_step = eval_step
    self._seed = seed
    self._batch_size = dataset_cfg.batch_size
    ds = eval_dataset(self.name, dataset_cfg.split, dataset_cfg.task_feature_lengths,
                      dataset_cfg.shuffle, dataset_cfg.seed)
    ds = ds.take(-1 if max_examples is None else max_examples).cache()
    examples = list(ds.as_numpy_iterator())
    if not examples:
      raise ValueError(f"{self.name!r} has no {dataset_cfg.split!r} example at feature lengths "
                       f"{dict(dataset_cfg.task_feature_lengths)}.")
    self.languages = [iso639_3(ex["language"].decode("utf-8")) for ex in examples]
    self.targets = [self._postprocess(_target_text(ex, self._vocabulary), example=ex,
                                      is_target=True) for ex in examples]
    self._examples = examples
    converter = model.FEATURE_CONVERTER_CLS(pack=False)
    model_ds = converter(ds, dict(dataset_cfg.task_feature_lengths)).batch(self._batch_size)
    self._batches = [(_pad_rows(b, self._batch_size), len(b["decoder_target_tokens"]))
                     for b in model_ds.as_numpy_iterator()]
    self.high_resource, self.resource_rule = resource_split(self.name, high_resource_languages)
    decodes = self._fns.decodes

    def run(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[Any, ...]:
      log_likelihoods = model.score_batch(params, batch)  # [batch]
      if not decodes:
        return (log_likelihoods,)
      tokens, aux = model.predict_batch_with_aux(params, batch, rng, decoder_params)
      return log_likelihoods, tokens, aux["scores"]  # [batch], [batch, length], [batch]

    self._run = jax.jit(run, in_shardings=(params_shardings, partitioner.batch_sharding,
                                               partitioner.replicated))

  @property
  def num_examples(self) -> int:
    return len(self._examples)

  def _device_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """The global batch (the same on every host) placed in the batch sharding."""
    sharding = self._partitioner.batch_sharding
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
            for k, v in batch.items()}

  def outputs(self, params: Any) -> tuple[Outputs, dict[str, float]]:
    """Model outputs for every cached example, and the loss metrics when there is an eval_step."""
    columns: list[list[np.ndarray]] = []
    sums = None
    num_tokens = []
    with self._partitioner.activate():
      for i, (batch, real) in enumerate(self._batches):
        device_batch = self._device_batch(batch)
        if self._eval_step is not None:
          step_sums = self._eval_step(params, device_batch)
          sums = step_sums if sums is None else jax.tree.map(np.add, sums, step_sums)
        rng = jax.random.fold_in(jax.random.key(self._seed), i)
        out = multihost_utils.process_allgather(self._run(params, device_batch, rng), tiled=True)
        columns.append([np.asarray(x)[:real] for x in out])
        num_tokens.append(batch["decoder_loss_weights"][:real].sum(axis=1))
    merged = [np.concatenate(parts) for parts in zip(*columns)]
    predictions = None
    if len(merged) > 1:
      predictions = [self._postprocess(self._vocabulary.decode(tokens.tolist()), example=ex,
                                       is_target=False)
                     for tokens, ex in zip(merged[1], self._examples)]
    outputs = Outputs(merged[0], np.concatenate(num_tokens), predictions,
                      merged[2] if len(merged) > 1 else None)
    loss_metrics = ({k: float(v) for k, v in losses.summarize(jax.device_get(sums)).items()}
                    if sums is not None else {})
    return outputs, loss_metrics

  def evaluate(self, params: Any) -> EvalResults:
    """Scores (and decodes) every cached example with `params`; see the module docstring."""
    outputs, loss_metrics = self.outputs(params)
    return summarize(self.name, self.languages, self.targets, outputs, self._fns,
                     self.high_resource, self.resource_rule, loss_metrics)


def write_json(path: str, results: EvalResults, **fields: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({**fields, **results.to_json()}, f, indent=1, ensure_ascii=False)


def summary_line(results: EvalResults) -> str:
  """Overall and group metrics in one line."""
  shown = {k: v for k, v in results.flat().items() if not k.endswith(("num_examples",
                                                                      "num_languages"))}
  return "  ".join(f"{k} {v:.4f}" for k, v in shown.items())


class InferEval:
  """The training loop's `infer_eval` scope: decode the eval data every eval period.

  Writes MODEL_DIR/infer_eval/<task>/metrics.jsonl and TensorBoard events (overall metrics and
  `high/`, `low/`, `all/` group means) and the full table as step_<step>.json beside them.
  """

  def __init__(self, model: Any, partitioner: Partitioner, params_shardings: Any,
               dataset_cfg: DatasetConfig, model_dir: str, max_examples: int | None,
               tensorboard: bool = True) -> None:
    self.evaluator = Evaluator(model, partitioner, params_shardings, dataset_cfg,
                               max_examples=max_examples)
    self.directory = os.path.join(model_dir, "infer_eval", dataset_cfg.mixture_or_task_name)
    self.writer = MetricsWriter(self.directory, tensorboard, jax.process_index() == 0)

  def __call__(self, params: Any, step: int) -> dict[str, float]:
    results = self.evaluator.evaluate(params)
    self.writer.write(step, results.flat())
    write_json(os.path.join(self.directory, f"step_{step}.json"), results, step=step)
    print(f"infer_eval {results.task} @ step {step}: {summary_line(results)}", flush=True)
    return results.flat()

  def close(self) -> None:
    self.writer.close()
