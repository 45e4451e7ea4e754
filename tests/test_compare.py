"""Per-language regression statistics: paired bootstrap deltas and the regression verdict."""

import numpy as np
import pytest

from polyglot_jax.inference import compare
from polyglot_jax.inference.compare import METRICS

LANGS = ("eng", "swh", "yor")
N = 300


def _languages():
  return [lang for lang in LANGS for _ in range(N)]


def _chrf(seed: int = 0):
  """Sentence chrF of a baseline and of a candidate that is 6 points worse on Yoruba only."""
  rng = np.random.default_rng(seed)
  base = rng.normal(50.0, 8.0, len(LANGS) * N)
  shift = np.where(np.asarray(_languages()) == "yor", -6.0, 0.0)
  candidate = base + shift + rng.normal(0.0, 2.0, base.shape)  # paired noise
  return {"base": {"chrf": base}, "candidate": {"chrf": candidate}}


def test_a_known_regression_is_flagged_and_only_it():
  result = compare.compare(_chrf(), _languages(), METRICS["chrf"], "base", high_resource=["eng"],
                           num_resamples=500)
  rows = {r.scope: r for r in result.languages}
  assert rows["yor"].delta < -5 and rows["yor"].high < 0
  assert [r.scope for r in result.regressions(threshold=2.0)] == ["yor"]
  assert result.regressions(threshold=8.0) == []  # beyond the regression's size
  for lang in ("eng", "swh"):
    assert rows[lang].low < 0 < rows[lang].high  # noise only: the interval holds 0
  groups = {r.scope: r for r in result.groups}
  np.testing.assert_allclose(groups["[all]"].delta, np.mean([rows[l].delta for l in LANGS]))
  np.testing.assert_allclose(groups["[low]"].delta, np.mean([rows[l].delta for l in
                                                             ("swh", "yor")]))
  assert groups["[high]"].num_examples == N and groups["[all]"].num_examples == 3 * N
  flagged = [line for line in result.table(threshold=2.0).splitlines() if "REGRESSION" in line]
  assert len(flagged) == 1 and " yor " in flagged[0]


def test_identical_models_give_zero_deltas_and_no_regression():
  chrf = _chrf()["base"]
  result = compare.compare({"a": chrf, "b": dict(chrf)}, _languages(), METRICS["chrf"], "a",
                           num_resamples=200)
  for row in result.languages + result.groups:
    assert (row.delta, row.low, row.high) == (0.0, 0.0, 0.0)
  assert result.regressions(threshold=0.0) == []


def test_the_interval_matches_the_normal_approximation():
  """For a mean, the paired bootstrap interval is close to delta ± 1.96 sd / sqrt(n)."""
  columns = _chrf(seed=4)
  result = compare.compare(columns, _languages(), METRICS["chrf"], "base", num_resamples=2000)
  differences = columns["candidate"]["chrf"] - columns["base"]["chrf"]
  for row in result.languages:
    d = differences[np.asarray(_languages()) == row.scope]
    half = 1.96 * d.std() / np.sqrt(len(d))
    np.testing.assert_allclose(row.delta, d.mean(), atol=1e-12)
    np.testing.assert_allclose([row.low, row.high], [d.mean() - half, d.mean() + half],
                               atol=0.15 * half)
  again = compare.compare(columns, _languages(), METRICS["chrf"], "base", num_resamples=2000)
  assert again.languages == result.languages  # fixed seed: reproducible


def test_token_loss_is_lower_is_better_and_ratio_of_sums():
  rng = np.random.default_rng(2)
  tokens = rng.integers(1, 20, len(LANGS) * N).astype(float)
  base_ll = -2.0 * tokens + rng.normal(0, 1.0, tokens.shape)
  worse_swh = np.where(np.asarray(_languages()) == "swh", -0.5 * tokens, 0.0)  # +0.5 nats/token
  columns = {"base": {"log_likelihood": base_ll, "num_tokens": tokens},
             "pruned": {"log_likelihood": base_ll + worse_swh + 0.01 * tokens,  # better elsewhere
                        "num_tokens": tokens}}
  result = compare.compare(columns, _languages(), METRICS["loss"], "base", num_resamples=300)
  rows = {r.scope: r for r in result.languages}
  swh = np.asarray(_languages()) == "swh"
  np.testing.assert_allclose(rows["swh"].baseline, -base_ll[swh].sum() / tokens[swh].sum())
  np.testing.assert_allclose(rows["swh"].delta, 0.49, rtol=1e-9)
  assert [r.scope for r in result.regressions(threshold=0.1)] == ["swh"]
  assert rows["eng"].delta < 0  # an improvement is never a regression


def test_per_example_files_round_trip_and_must_hold_the_same_examples(tmp_path):
  columns = _chrf()
  paths = {}
  for model, cols in columns.items():
    paths[model] = str(tmp_path / f"{model}.jsonl")
    compare.write_examples(paths[model], _languages(), cols)
  from_files = compare.compare_files(paths, METRICS["chrf"], "base", num_resamples=100)
  in_memory = compare.compare(columns, _languages(), METRICS["chrf"], "base", num_resamples=100)
  assert from_files.languages == in_memory.languages
  compare.write_examples(paths["candidate"], _languages()[::-1], columns["candidate"])
  with pytest.raises(ValueError, match="holds other examples than"):
    compare.compare_files(paths, METRICS["chrf"], "base")
  with pytest.raises(ValueError, match="needs the per-example column 'log_likelihood'"):
    compare.compare(columns, _languages(), METRICS["loss"], "base")
  with pytest.raises(ValueError, match="baseline 'nope'"):
    compare.compare(columns, _languages(), METRICS["chrf"], "nope")
  with pytest.raises(ValueError, match="threshold=-1"):
    compare.compare(columns, _languages(), METRICS["chrf"], "base",
                    num_resamples=10).regressions(-1)
