"""What compression forgets, per language: Pruning Identified Exemplars (Hooker et al. 2019).

Two populations of models score the same examples: k dense and k compressed ones (several seeds,
or the dense checkpoints under int8 quantization). For every example:
  prediction of a model       argmax of its scores over the example's labels; an exact tie goes
                              to the lowest label index.
  modal prediction            the label most models of a population predict. A tie between
                              labels goes to the one with the highest mean score over the
                              population's models, then to the lowest index. With two seeds per
                              population every disagreement is such a tie, and the rule makes
                              the modal label the two-model ensemble's choice (rather than an
                              arbitrary index).
  PIE                         modal(compressed) != modal(dense).
The report gives, per language, per resource group and overall: examples, PIE share, the mean
accuracy of each population's models and the delta, and the mean negative log-likelihood of the
correct label (scores are log-likelihoods) and its delta.

For our language models an example is a rank classification (`rank_classification_examples`):
a held-out prompt of `<task>.<language>` with `num_candidates` targets, its own and distractors
(the next distinct targets of the same language, or targets of other languages), the correct
one at position i % num_candidates so that no position is favoured; each candidate scores its
mean log-likelihood per target token (so short distractors are not preferred).

The `polyglot-jax audit` command (commands/audit.py) restores the checkpoints, scores and writes
`output_dir/audit.json` and `audit.md`; `CandidateScorer` and `report` build other comparisons
(scripts/compression_repro.py scores each checkpoint once for several audits).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf

from polyglot_jax.data.pipeline import check_registered
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import checkpoints, train_state

DEFAULT_LENGTHS = {"inputs": 128, "targets": 64}
DISTRACTORS = ("same_language", "other_languages")
TIE_BREAK = ("most votes; ties: highest mean score over the population's models, then lowest "
             "label index (a model's own argmax ties: lowest index)")


def predictions(scores: np.ndarray) -> np.ndarray:
  """[models, examples, labels] scores -> [models, examples] argmax (ties: lowest label)."""
  return np.argmax(scores, axis=-1)


def modal_predictions(scores: np.ndarray) -> np.ndarray:
  """[models, examples, labels] scores -> [examples] modal label of the population (`TIE_BREAK`)."""
  labels = scores.shape[-1]
  votes = np.sum(predictions(scores)[..., None] == np.arange(labels), axis=0)  # [ex, labels]
  mean = np.mean(scores, axis=0)  # [examples, labels]
  best = votes == votes.max(axis=-1, keepdims=True)  # [examples, labels]
  return np.argmax(np.where(best, mean, -np.inf), axis=-1)


def pie(dense_scores: np.ndarray, compressed_scores: np.ndarray) -> np.ndarray:
  """[examples] bool: Pruning Identified Exemplars, modal(compressed) != modal(dense)."""
  return modal_predictions(compressed_scores) != modal_predictions(dense_scores)


def _summary(dense: np.ndarray, compressed: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Metrics over a subset of examples ([models, examples, labels] scores, [examples] labels)."""
  rows = np.arange(labels.shape[0])
  dense_accuracy = float(np.mean(predictions(dense) == labels))
  compressed_accuracy = float(np.mean(predictions(compressed) == labels))
  dense_nll = float(-np.mean(dense[:, rows, labels]))
  compressed_nll = float(-np.mean(compressed[:, rows, labels]))
  return {"examples": int(labels.shape[0]),
          "pie_share": float(np.mean(pie(dense, compressed))),
          "dense_accuracy": dense_accuracy, "compressed_accuracy": compressed_accuracy,
          "accuracy_delta": compressed_accuracy - dense_accuracy,
          "dense_nll": dense_nll, "compressed_nll": compressed_nll,
          "nll_delta": compressed_nll - dense_nll}


def report(dense_scores: np.ndarray, compressed_scores: np.ndarray, labels: np.ndarray,
           languages: Sequence[str], groups: Mapping[str, str] | None = None) -> dict[str, Any]:
  """PIE share and metric deltas per language, per group (`groups`: language -> group) and overall.

  Args:
    dense_scores, compressed_scores: [models, examples, labels] log-likelihood scores (the two
      populations may differ in size).
    labels: [examples] index of the correct label.
    languages: the language of each example.
    groups: e.g. {"swh": "low", "eng": "high"}; languages it does not name are "unassigned".
  """
  dense_scores, compressed_scores = np.asarray(dense_scores), np.asarray(compressed_scores)
  labels, languages = np.asarray(labels), np.asarray(languages)
  if dense_scores.shape[1:] != compressed_scores.shape[1:]:
    raise ValueError(f"dense scores {dense_scores.shape} and compressed scores "
                     f"{compressed_scores.shape} must agree on [examples, labels].")
  if labels.shape != (dense_scores.shape[1],) or languages.shape != labels.shape:
    raise ValueError(f"need one label and one language per example ({dense_scores.shape[1]}); "
                     f"got {labels.shape[0]} and {languages.shape[0]}.")

  def over(mask: np.ndarray) -> dict[str, float]:
    return _summary(dense_scores[:, mask], compressed_scores[:, mask], labels[mask])

  out: dict[str, Any] = {"tie_break": TIE_BREAK, "dense_models": dense_scores.shape[0],
                         "compressed_models": compressed_scores.shape[0],
                         "overall": over(np.ones(labels.shape, bool)),
                         "languages": {lang: over(languages == lang)
                                       for lang in sorted(set(languages.tolist()))}}
  if groups is not None:
    group_of = np.array([groups.get(lang, "unassigned") for lang in languages.tolist()])
    out["groups"] = {g: over(group_of == g) for g in sorted(set(group_of.tolist()))}
  return out


def markdown_table(audit_report: Mapping[str, Any]) -> str:
  """The report as a markdown table: groups and overall first, then each language."""
  header = ("| | examples | PIE share | dense acc | compressed acc | Δ acc | dense NLL | "
            "compressed NLL | Δ NLL |\n|---|---|---|---|---|---|---|---|---|")
  rows = [("**overall**", audit_report["overall"])]
  rows += [(f"**{g}**", m) for g, m in audit_report.get("groups", {}).items()]
  rows += list(audit_report["languages"].items())
  lines = [f"| {name} | {m['examples']} | {m['pie_share']:.3f} | {m['dense_accuracy']:.3f} | "
           f"{m['compressed_accuracy']:.3f} | {m['accuracy_delta']:+.3f} | {m['dense_nll']:.3f} | "
           f"{m['compressed_nll']:.3f} | {m['nll_delta']:+.3f} |" for name, m in rows]
  return "\n".join([header, *lines])


def _tokenized(task: str, split: str, lengths: Mapping[str, int]) -> list[dict[str, np.ndarray]]:
  """Every tokenized {inputs, targets} example of `task`'s `split`, in order."""
  check_registered(task)
  ds = seqio.get_mixture_or_task(task).get_dataset(dict(lengths), split=split, shuffle=False,
                                                   use_cached=False)
  return [{k: example[k] for k in ("inputs", "targets") if k in example}
          for example in ds.as_numpy_iterator()]


def rank_classification_examples(
    task: str, languages: Sequence[str], split: str, task_feature_lengths: Mapping[str, int],
    num_candidates: int = 4, max_examples: int | None = None,
    distractors: str = "same_language",
) -> tuple[list[dict[str, np.ndarray]], np.ndarray, list[str]]:
  """Candidate rows, labels and languages for rank classification on `<task>.<language>`.

  Per language, up to `max_examples` examples evenly spaced over the split (its order groups
  similar examples: UDHR translation lists each target paragraph once per source language).
  Distractors (`DISTRACTORS`): "same_language", the next distinct targets of the example's
  language (which target is the answer: content); "other_languages", a target of each of the
  next languages in `languages` (is the answer in the requested language). Returns (rows, labels,
  example languages): `num_candidates` consecutive rows per example (T5X's rank-classification
  layout: the example's inputs with each candidate target), the correct candidate's index per
  example, and its language. See the module docstring.
  """
  if distractors not in DISTRACTORS:
    raise ValueError(f"distractors={distractors!r}; use one of {DISTRACTORS}.")
  if distractors == "other_languages" and len(languages) < num_candidates:
    raise ValueError(f"distractors='other_languages' with num_candidates={num_candidates} needs "
                     f"at least that many languages, got {len(languages)}.")
  examples, distinct = {}, {}
  for lang in languages:
    examples[lang] = _tokenized(f"{task}.{lang}", split, task_feature_lengths)
    distinct[lang] = list({tuple(e["targets"].tolist()): e["targets"]
                           for e in examples[lang]}.values())
    needed = num_candidates if distractors == "same_language" else 1
    if len(distinct[lang]) < needed:
      raise ValueError(f"{task}.{lang} has {len(distinct[lang])} distinct targets in {split!r} "
                       f"that fit {dict(task_feature_lengths)}; rank classification with "
                       f"distractors={distractors!r} and num_candidates={num_candidates} needs "
                       f"{needed}.")
  rows, labels, example_languages = [], [], []
  for position, lang in enumerate(languages):
    chosen = examples[lang]
    if max_examples is not None and len(chosen) > max_examples:
      chosen = [chosen[i] for i in np.linspace(0, len(chosen) - 1, max_examples).astype(int)]
    index = {tuple(t.tolist()): i for i, t in enumerate(distinct[lang])}
    for i, example in enumerate(chosen):
      if distractors == "same_language":
        own = index[tuple(example["targets"].tolist())]
        pool = distinct[lang]
        others = [pool[(own + j) % len(pool)] for j in range(1, num_candidates)]
      else:
        pools = [distinct[languages[(position + j) % len(languages)]]
                 for j in range(1, num_candidates)]
        others = [pool[i % len(pool)] for pool in pools]
      label = i % num_candidates
      candidates = others[:label] + [example["targets"]] + others[label:]
      rows += [{**example, "targets": t} for t in candidates]
      labels.append(label)
      example_languages.append(lang)
  return rows, np.asarray(labels), example_languages


def candidate_features(rows: Sequence[Mapping[str, np.ndarray]],
                       converter: seqio.FeatureConverter,
                       task_feature_lengths: Mapping[str, int]) -> dict[str, np.ndarray]:
  """Model features of the candidate rows, one row each (the model's seqio feature converter)."""
  spec = {k: tf.TensorSpec([None], tf.int32) for k in rows[0]}
  ds = tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=spec)
  features = converter(ds, dict(task_feature_lengths))
  return next(features.batch(len(rows)).as_numpy_iterator())


class CandidateScorer:
  """Scores rank-classification rows (`candidate_features`) with checkpoints of one model.

  One state spec and one jitted scorer per model (the float model, a `QuantizedModel` of it),
  so every checkpoint after the first costs a restore and the forward passes only.
  """

  def __init__(self, model: Any, features: Mapping[str, np.ndarray], num_candidates: int,
               mesh: MeshConfig = MeshConfig(), batch_size: int = 64) -> None:
    self.model = model
    self.num_candidates = num_candidates
    self.partitioner = Partitioner(mesh)
    self.spec = train_state.params_spec(model, self.partitioner)
    total = next(iter(features.values())).shape[0]
    padded = -(-total // batch_size) * batch_size  # empty rows fill the last batch
    self._total = total
    self._batches = [{k: np.pad(v, [(0, padded - total)] + [(0, 0)] * (v.ndim - 1))[
        start:start + batch_size] for k, v in features.items()}
                     for start in range(0, padded, batch_size)]
    self._jitted: dict[int, Any] = {}

  def restore(self, model_dir: str, step: int | None = None) -> Any:
    """The parameters of MODEL_DIR's checkpoint (latest unless `step`), in the mesh's shardings."""
    return checkpoints.load_params(self.model, model_dir, self.partitioner, step)[0]

  def _scorer(self, model: Any) -> Any:
    """jit of (params, batch) -> [batch] mean target-token log-likelihood under `model`."""
    if id(model) not in self._jitted:
      def mean_scores(params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
        tokens = jnp.sum(batch["decoder_loss_weights"], axis=-1)  # [batch]
        return model.score_batch(params, batch) / jnp.maximum(tokens, 1.0)  # [batch]

      self._jitted[id(model)] = jax.jit(mean_scores, in_shardings=(
          self.spec.shardings.params, self.partitioner.batch_sharding))
    return self._jitted[id(model)]

  def scores(self, params: Any, model: Any = None) -> np.ndarray:
    """[examples, num_candidates] mean log-likelihood per target token of every candidate,
    under `model` (default: the scorer's; e.g. a `QuantizedModel` of it) with `params`."""
    score = self._scorer(model or self.model)
    with self.partitioner.activate():
      out = [np.asarray(jax.device_get(score(params, self.partitioner.shard_batch(batch))))
             for batch in self._batches]
    return np.concatenate(out)[:self._total].reshape(-1, self.num_candidates)


def write_report(audit_report: Mapping[str, Any], output_dir: str) -> str:
  """Writes `output_dir/audit.json` and `audit.md`; returns the markdown table."""
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "audit.json"), "w", encoding="utf-8") as f:
    json.dump(audit_report, f, indent=1)
  table = markdown_table(audit_report)
  with open(os.path.join(output_dir, "audit.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  return table
