"""Per-language regression statistics: metric deltas of models on the same examples, with paired
bootstrap confidence intervals, and the verdict of which languages regress.

Input: per-example columns of each model on the same examples in the same order (e.g.
`log_likelihood`, `num_tokens`, sentence-level `chrf`, `preference_accuracy`), each example's
language, and the high-resource languages. A `Metric` reads one column, or the ratio of two
summed columns: a language's value is Σ column / Σ denominator over its examples (the mean when
there is no denominator); token loss is Σ −log-likelihood / Σ tokens, as the evaluator's
perplexity. Groups follow the evaluator: "high" and "low" (the other languages) and "all", each
the mean of its languages' values.

The paired bootstrap (Koehn 2004) resamples each language's examples with replacement,
`num_resamples` times with a fixed seed, the same draw for every model; a group's resample is the
mean of its languages' resamples. The interval is the percentile interval of the resampled
deltas (candidate − baseline). A language regresses when its delta is worse than the threshold
(in the metric's units, direction aware: lower is better for losses, higher for chrF) and its
interval excludes 0 on the worse side.

The evaluator's per-language JSON (`evaluation.write_json`) holds aggregates only; the
per-example columns come from JSONL files of one record per example (`write_examples`,
`read_examples`), in the evaluator's example order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

GROUPS = ("high", "low", "all")


@dataclasses.dataclass(frozen=True)
class Metric:
  """How to read and aggregate one metric from per-example columns.

  Attributes:
    name: the metric's name in tables.
    higher_is_better: direction (chrF, accuracy: True; losses: False).
    column: the per-example value, or the numerator of a ratio.
    denominator: a per-example column the summed values are divided by (None: the mean).
    negate: use −column (token loss from log-likelihoods).
  """

  name: str
  higher_is_better: bool
  column: str
  denominator: str | None = None
  negate: bool = False

  def statistics(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
    """[examples, 2] (value or numerator, denominator or 1) float64."""
    for name in (self.column, self.denominator):
      if name is not None and name not in columns:
        raise ValueError(f"metric {self.name!r} needs the per-example column {name!r}; the "
                         f"examples have {sorted(columns)}")
    values = np.asarray(columns[self.column], np.float64) * (-1.0 if self.negate else 1.0)
    denominator = (np.ones_like(values) if self.denominator is None
                   else np.asarray(columns[self.denominator], np.float64))
    return np.stack([values, denominator], axis=-1)


METRICS: Mapping[str, Metric] = {
    "loss": Metric("loss", False, "log_likelihood", "num_tokens", negate=True),
    "chrf": Metric("chrf", True, "chrf"),
    "bleu": Metric("bleu", True, "bleu"),
    "exact_match": Metric("exact_match", True, "exact_match"),
    "preference_accuracy": Metric("preference_accuracy", True, "preference_accuracy"),
    "reward_margin": Metric("reward_margin", True, "reward_margin"),
    "dpo_loss": Metric("dpo_loss", False, "loss"),
}


def get_metric(name: str) -> Metric:
  if name not in METRICS:
    raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)} (or build a Metric)")
  return METRICS[name]


def _value(sums: np.ndarray) -> np.ndarray:
  """[..., 2] summed statistics -> [...] values."""
  return sums[..., 0] / np.maximum(sums[..., 1], 1e-12)


@dataclasses.dataclass(frozen=True)
class Delta:
  """One row: the candidate's value minus the baseline's, with its confidence interval."""

  model: str
  scope: str  # a language, or "[high]", "[low]", "[all]"
  baseline: float
  candidate: float
  delta: float
  low: float
  high: float
  num_examples: int


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Per-language and per-group deltas of every candidate against the baseline."""

  metric: Metric
  baseline: str
  languages: list[Delta]
  groups: list[Delta]
  confidence: float
  num_resamples: int

  def worse(self, delta: float) -> float:
    """How much worse a delta is (positive = worse), whatever the metric's direction."""
    return -delta if self.metric.higher_is_better else delta

  def regressions(self, threshold: float) -> list[Delta]:
    """Language rows worse than the baseline by more than `threshold` (metric units, >= 0) with
    an interval excluding 0 on the worse side."""
    if threshold < 0:
      raise ValueError(f"threshold={threshold} must be >= 0 (in {self.metric.name} units)")
    out = []
    for row in self.languages:
      worse_bound = -row.high if self.metric.higher_is_better else row.low
      if self.worse(row.delta) > threshold and worse_bound > 0:
        out.append(row)
    return out

  def table(self, threshold: float | None = None) -> str:
    """Rows as text; with a threshold, regressions are marked."""
    flagged = {(r.model, r.scope) for r in self.regressions(threshold)} if threshold is not None \
        else set()
    direction = "higher" if self.metric.higher_is_better else "lower"
    lines = [f"{self.metric.name} ({direction} is better): candidate - {self.baseline}, "
             f"{self.confidence:.0%} paired bootstrap CI over {self.num_resamples} resamples",
             f"{'model':<16} {'language':<12} {'n':>6} {'baseline':>10} {'candidate':>10} "
             f"{'delta':>9} {'ci_low':>9} {'ci_high':>9}"]
    for row in self.languages + self.groups:
      mark = "  REGRESSION" if (row.model, row.scope) in flagged else ""
      lines.append(f"{row.model[:16]:<16} {row.scope:<12} {row.num_examples:>6} "
                   f"{row.baseline:>10.4f} {row.candidate:>10.4f} {row.delta:>9.4f} "
                   f"{row.low:>9.4f} {row.high:>9.4f}{mark}")
    return "\n".join(lines)

  def to_json(self) -> dict[str, Any]:
    return {"metric": dataclasses.asdict(self.metric), "baseline": self.baseline,
            "confidence": self.confidence, "num_resamples": self.num_resamples,
            "languages": [dataclasses.asdict(r) for r in self.languages],
            "groups": [dataclasses.asdict(r) for r in self.groups]}


def compare(columns: Mapping[str, Mapping[str, np.ndarray]], languages: Sequence[str],
            metric: Metric, baseline: str, high_resource: Sequence[str] | None = None,
            num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Comparison:
  """Deltas of every model of `columns` against `baseline`, per language and resource group.

  Args:
    columns: model name -> per-example columns ([examples] arrays, the same examples in the same
      order for every model).
    languages: [examples] language of each example.
    metric: what to compare (see `METRICS`).
    baseline: the reference model, a key of `columns`.
    high_resource: the "high" group's languages; None = groups "all" only.
    num_resamples, confidence, seed: the paired bootstrap's settings.
  """
  if baseline not in columns:
    raise ValueError(f"baseline {baseline!r} is not among the models {sorted(columns)}")
  if len(columns) < 2:
    raise ValueError("compare needs at least two models")
  if num_resamples < 1 or not 0 < confidence < 1:
    raise ValueError(f"num_resamples={num_resamples} must be >= 1 and confidence={confidence} "
                     "in (0, 1)")
  languages = np.asarray(languages)
  stats = {model: metric.statistics(cols) for model, cols in columns.items()}
  for model, s in stats.items():
    if len(s) != len(languages):
      raise ValueError(f"model {model!r} has {len(s)} examples, {len(languages)} languages were "
                       "given: compare models on the same examples")
  rng = np.random.default_rng(seed)
  tail = 100.0 * (1.0 - confidence) / 2.0
  candidates = [m for m in columns if m != baseline]
  per_language: dict[str, dict[str, tuple[float, float, np.ndarray]]] = {m: {} for m in candidates}
  rows = []
  counts = {}
  for lang in sorted(set(languages.tolist())):
    members = np.flatnonzero(languages == lang)
    counts[lang] = len(members)
    draws = members[rng.integers(len(members), size=(num_resamples, len(members)))]  # [R, n]
    resampled = {m: _value(s[draws].sum(axis=1)) for m, s in stats.items()}  # [R]
    point = {m: float(_value(s[members].sum(axis=0))) for m, s in stats.items()}
    for model in candidates:
      deltas = resampled[model] - resampled[baseline]  # [R]
      per_language[model][lang] = (point[baseline], point[model], deltas)
      low, high = np.percentile(deltas, [tail, 100.0 - tail])
      rows.append(Delta(model, lang, point[baseline], point[model],
                        point[model] - point[baseline], float(low), float(high), len(members)))
  members = {"all": sorted(counts)}
  if high_resource is not None:
    high = set(high_resource)
    members["high"] = [lang for lang in sorted(counts) if lang in high]
    members["low"] = [lang for lang in sorted(counts) if lang not in high]
  groups = []
  for model in candidates:
    for group in GROUPS:
      langs = members.get(group)
      if not langs:
        continue
      entries = [per_language[model][lang] for lang in langs]
      base = float(np.mean([e[0] for e in entries]))
      cand = float(np.mean([e[1] for e in entries]))
      deltas = np.mean([e[2] for e in entries], axis=0)  # [R]
      low, high = np.percentile(deltas, [tail, 100.0 - tail])
      groups.append(Delta(model, f"[{group}]", base, cand, cand - base, float(low), float(high),
                          sum(counts[lang] for lang in langs)))
  return Comparison(metric, baseline, rows, groups, confidence, num_resamples)


# --- per-example files --------------------------------------------------------------------------

def write_examples(path: str, languages: Sequence[str], columns: Mapping[str, Sequence[float]]
                   ) -> None:
  """One JSON record per example: {"language", <column>: value, ...}, in example order."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  names = list(columns)
  with open(path, "w", encoding="utf-8") as f:
    for i, lang in enumerate(languages):
      record = {"language": lang, **{n: float(columns[n][i]) for n in names}}
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_examples(path: str) -> tuple[list[str], dict[str, np.ndarray]]:
  """(languages, columns) of a `write_examples` file; one-line errors for unreadable records."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no per-example file {path}; write one with "
                            "compare.write_examples from the evaluator's outputs")
  languages, rows = [], []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        raise ValueError(f"{path}:{number} is not a JSON record") from None
      if not isinstance(record, dict) or not isinstance(record.get("language"), str):
        raise ValueError(f"{path}:{number} has no \"language\" string")
      languages.append(record.pop("language"))
      rows.append(record)
  names = sorted({k for r in rows for k in r})
  missing = [(i, n) for i, r in enumerate(rows) for n in names if n not in r][:1]
  if missing:
    raise ValueError(f"{path}: example {missing[0][0]} has no column {missing[0][1]!r}; every "
                     "example needs the same columns")
  return languages, {n: np.asarray([r[n] for r in rows], np.float64) for n in names}


def compare_files(paths: Mapping[str, str], metric: Metric, baseline: str,
                  high_resource: Sequence[str] | None = None, **bootstrap: Any) -> Comparison:
  """`compare` over per-example files (model name -> path), which must list the same languages
  in the same order."""
  read = {model: read_examples(path) for model, path in paths.items()}
  languages = read[baseline][0] if baseline in read else next(iter(read.values()))[0]
  for model, (langs, _) in read.items():
    if langs != languages:
      raise ValueError(f"{paths[model]} holds other examples than {paths[baseline]} (languages "
                       "differ in number or order); evaluate every model on the same split")
  return compare({m: cols for m, (_, cols) in read.items()}, languages, metric, baseline,
                 high_resource, **bootstrap)


def high_resource_languages(eval_json: str) -> list[str] | None:
  """The high-resource languages recorded in an evaluator JSON (`evaluation.write_json`)."""
  with open(eval_json, encoding="utf-8") as f:
    return json.load(f).get("high_resource")
