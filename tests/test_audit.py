"""PIE audit: modal predictions and ties on a constructed case, rank-classification data, end to end."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polyglot_jax.commands import audit as audit_command
from polyglot_jax.compression import audit
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.models.model import EncoderDecoderModel
from polyglot_jax.parallel.partitioning import Partitioner
from polyglot_jax.training import checkpoints, train_state

# [models, examples, labels]: 2 dense and 2 compressed models, 5 examples, 3 labels.
DENSE = np.array([
    [[3, 1, 0], [0, 4, 1], [0, 0, 5], [1, 1, 0], [1, 0, 0]],  # predicts 0 1 2 0 0 (ex3: tie -> 0)
    [[2, 0, 1], [1, 3, 0], [3, 0, 1], [0, 2, 0], [0, 1, 0]],  # predicts 0 1 0 1 1
], np.float64)
COMPRESSED = np.array([
    [[5, 0, 0], [0, 1, 3], [4, 0, 1], [2, 2, 2], [3, 0, 0]],  # predicts 0 2 0 0 0
    [[1, 0, 0], [0, 0, 1], [0, 0, 2], [2, 2, 2], [2, 0, 0]],  # predicts 0 2 2 0 0
], np.float64)
LABELS = np.array([0, 1, 2, 0, 1])
LANGUAGES = ["swh", "swh", "eng", "eng", "eng"]


def test_modal_prediction_breaks_ties_by_mean_score_then_lowest_label():
  # ex2: dense votes 2 vs 0, mean scores 3.0 vs 1.5 -> 2; compressed votes 0 vs 2, means 2 vs 1.5
  # -> 0. ex3: dense votes 0 vs 1 (model 1's own [1, 1, 0] tie went to 0), means 0.5 vs 1.5 -> 1.
  # ex4: dense votes 0 vs 1 with equal means 0.5 -> the lowest label, 0.
  np.testing.assert_array_equal(audit.modal_predictions(DENSE), [0, 1, 2, 1, 0])
  np.testing.assert_array_equal(audit.modal_predictions(COMPRESSED), [0, 2, 0, 0, 0])
  np.testing.assert_array_equal(audit.pie(DENSE, COMPRESSED), [False, True, True, True, False])
  # Lowest-label tie-breaking would call ex2 and ex3 stable: the rule changes the answer.
  three = np.array([[[1, 0, 0]], [[0, 2, 0]], [[0, 0, 1.5]]])  # a three-way vote tie
  np.testing.assert_array_equal(audit.modal_predictions(three), [1])


def test_report_per_language_and_group():
  result = audit.report(DENSE, COMPRESSED, LABELS, LANGUAGES, {"swh": "low", "eng": "high"})
  overall, swh, eng = result["overall"], result["languages"]["swh"], result["languages"]["eng"]
  assert (overall["examples"], swh["examples"], eng["examples"]) == (5, 2, 3)
  assert overall["pie_share"] == pytest.approx(3 / 5)
  assert swh["pie_share"] == pytest.approx(1 / 2) and eng["pie_share"] == pytest.approx(2 / 3)
  assert result["groups"]["low"] == swh and result["groups"]["high"] == eng
  # Correct predictions: dense 4 + 3 of 10, compressed 2 + 3; swh: dense 4/4, compressed 2/4.
  assert overall["dense_accuracy"] == pytest.approx(0.7)
  assert overall["compressed_accuracy"] == pytest.approx(0.5)
  assert overall["accuracy_delta"] == pytest.approx(-0.2)
  assert (swh["dense_accuracy"], swh["compressed_accuracy"]) == (1.0, 0.5)
  rows = np.arange(5)
  assert overall["dense_nll"] == pytest.approx(-DENSE[:, rows, LABELS].mean())
  assert overall["nll_delta"] == pytest.approx(
      DENSE[:, rows, LABELS].mean() - COMPRESSED[:, rows, LABELS].mean())
  table = audit.markdown_table(result).splitlines()
  assert len(table) == 2 + 1 + 2 + 2  # header, overall, 2 groups, 2 languages
  assert table[2].startswith("| **overall** | 5 | 0.600 |")
  with pytest.raises(ValueError, match="one label and one language per example"):
    audit.report(DENSE, COMPRESSED, LABELS[:4], LANGUAGES)
  with pytest.raises(ValueError, match="must agree"):
    audit.report(DENSE, COMPRESSED[:, :4], LABELS, LANGUAGES)


LENGTHS = {"inputs": 128, "targets": 64}


def test_rank_classification_rows_rotate_the_correct_target():
  rows, labels, languages = audit.rank_classification_examples(
      "udhr_translation", ["rus"], "validation", LENGTHS, num_candidates=3, max_examples=6)
  examples = audit._tokenized("udhr_translation.rus", "validation", LENGTHS)  # pylint: disable=protected-access
  examples = [examples[i] for i in np.linspace(0, len(examples) - 1, 6).astype(int)]  # spread
  assert len(rows) == 18 and languages == ["rus"] * 6
  np.testing.assert_array_equal(labels, [0, 1, 2, 0, 1, 2])
  for i, example in enumerate(examples):
    choices = [tuple(r["targets"]) for r in rows[3 * i:3 * i + 3]]
    assert choices[labels[i]] == tuple(example["targets"])
    assert len(set(choices)) == 3  # distinct distractors
    assert all(np.array_equal(r["inputs"], example["inputs"]) for r in rows[3 * i:3 * i + 3])
  # Other languages: example i of a language gets target i of the next languages, cyclically.
  languages = ["rus", "eng", "ita"]
  rows, labels, _ = audit.rank_classification_examples(
      "udhr_translation", languages, "validation", LENGTHS, num_candidates=3, max_examples=2,
      distractors="other_languages")
  targets = {lang: [tuple(e["targets"]) for e in audit._tokenized(  # pylint: disable=protected-access
      f"udhr_translation.{lang}", "validation", LENGTHS)] for lang in languages}
  for example in range(6):
    lang, i = languages[example // 2], example % 2
    choices = [tuple(r["targets"]) for r in rows[3 * example:3 * example + 3]]
    assert labels[example] == i % 3 and choices[labels[example]] in targets[lang]
    others = [c for j, c in enumerate(choices) if j != labels[example]]
    nexts = [languages[(languages.index(lang) + j) % 3] for j in (1, 2)]
    assert all(c in targets[other] for c, other in zip(others, nexts))
  with pytest.raises(ValueError, match="needs at least that many languages"):
    audit.rank_classification_examples("udhr_translation", ["rus"], "validation", LENGTHS, 3,
                                       distractors="other_languages")


def _save(directory: str, params) -> None:
  writer = checkpoints.Checkpointer(os.path.join(directory, "checkpoints"), period=1, keep=None,
                                    async_save=False)
  writer.save(1, train_state.TrainState(step=jnp.asarray(1, jnp.int32), params=params,
                                        opt_state={}), {"batches": 1}, force=True)
  writer.close()


def test_audit_end_to_end_on_saved_checkpoints(tmp_path):
  """Two random 'dense' seeds and their 90%-magnitude-pruned copies (numpy: nothing to compile
  but the scorer): the audit restores and scores every checkpoint, writes a consistent report."""
  config = TransformerConfig(vocab_size=8192, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                             num_encoder_layers=1, num_decoder_layers=1,
                             relative_attention_num_buckets=8, relative_attention_max_distance=16)
  model = EncoderDecoderModel(config)
  spec = train_state.state_spec(model, train_state.ParamsOnly(), Partitioner())
  dense, pruned = [], []
  for seed in range(2):
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(np.float32),
                          spec.abstract.params)
    dense.append(str(tmp_path / f"dense_{seed}"))
    pruned.append(str(tmp_path / f"pruned_{seed}"))
    _save(dense[-1], params)
    _save(pruned[-1], jax.tree.map(lambda w: w * (np.abs(w) >= np.quantile(np.abs(w), 0.9)),
                                   params))
  result = audit_command.audit(model=model, dense_dirs=dense, compressed_dirs=pruned,
                       languages=["rus", "eng"], output_dir=str(tmp_path / "audit"),
                       task_feature_lengths=LENGTHS, num_candidates=3, max_examples=4,
                       groups={"rus": "low", "eng": "high"}, batch_size=8)
  with open(tmp_path / "audit" / "audit.json", encoding="utf-8") as f:
    assert json.load(f) == json.loads(json.dumps(result))
  assert (tmp_path / "audit" / "audit.md").read_text().count("\n") == 2 + 1 + 2 + 2
  assert result["overall"]["examples"] == 8 and result["dense_models"] == 2
  for metrics in result["languages"].values():
    assert 0.0 <= metrics["pie_share"] <= 1.0
    assert np.isfinite(metrics["dense_nll"]) and metrics["dense_nll"] > 0
