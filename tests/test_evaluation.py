"""Evaluation: seqio-convention metric functions, the per-language table and resource groups,
the round-robin eval stream, infer_eval in the training loop and `evaluate` on its checkpoint."""

from __future__ import annotations

import collections
import math
import os

import numpy as np
import pytest
import seqio

from polyglot_jax.data import mixing, tasks
from polyglot_jax.data.instructions import dialog_records
from polyglot_jax.data.pipeline import DatasetConfig
from polyglot_jax.commands import evaluate, train
from polyglot_jax.inference import evaluation
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.models.model import EncoderDecoderModel
from polyglot_jax.parallel.partitioning import MeshConfig
from polyglot_jax.training.metrics import read_jsonl
from polyglot_jax.training.optimizers import AdamW

tasks.register_bundled()  # this module looks bundled tasks up in seqio directly


def test_metric_functions():
  same = ["Tous les êtres humains naissent libres.", "人人生而自由"]
  assert evaluation.chrf(same, same) == {"chrf": 100.0}
  assert evaluation.bleu(same, same) == {"bleu": pytest.approx(100.0)}
  assert 0 < evaluation.chrf(same, ["Tous les humains naissent.", "人人自由"])["chrf"] < 100
  assert evaluation.exact_match(["a", "b", "c", "d"], [" a ", "b", "x", ""]) == {
      "exact_match": 50.0}
  assert evaluation.perplexity(-4 * math.log(3.0), 4) == pytest.approx(3.0)


def _score_length(targets, scores):  # a seqio score metric: (targets, scores)
  return {"mean_score": float(np.mean(scores))}


def test_metric_fns_follow_the_tasks_or_default():
  source = seqio.FunctionDataSource(lambda split, shuffle_files, seed=None: None, splits=("x",))
  features = {k: seqio.Feature(seqio.PassThroughVocabulary(8)) for k in ("inputs", "targets")}
  custom = seqio.Task("eval_test_custom", source, output_features=features,
                      metric_fns=[evaluation.chrf, _score_length])
  assert evaluation.metric_fns([custom]) == evaluation.MetricFns(
      predict=(evaluation.chrf,), score=(_score_length,))
  assert evaluation.metric_fns([seqio.get_mixture_or_task("udhr_translation")]).predict == (
      evaluation.DEFAULT_METRIC_FNS)
  assert not evaluation.metric_fns([seqio.get_mixture_or_task("udhr_lm")]).decodes
  with pytest.raises(ValueError, match="declare different metric_fns"):
    evaluation.metric_fns([custom, seqio.get_mixture_or_task("udhr_translation")])


def test_summarize_per_language_and_groups():
  languages = ["eng", "eng", "swh", "yor"]
  targets = ["a b c", "d e", "f g", "h"]
  outputs = evaluation.Outputs(
      log_likelihoods=np.array([-3.0, -2.0, -4.0, -1.0]), num_tokens=np.array([3, 2, 2, 1.0]),
      predictions=["a b c", "d e", "x y", "h"], scores=np.zeros(4))
  fns = evaluation.MetricFns(predict=(evaluation.exact_match,))
  results = evaluation.summarize("t", languages, targets, outputs, fns, frozenset({"eng"}),
                                 "given", {"loss": 1.5})
  assert results.languages["eng"] == {"num_examples": 2.0, "perplexity": pytest.approx(math.e),
                                      "exact_match": 100.0}
  assert results.languages["swh"]["exact_match"] == 0.0
  assert results.languages["swh"]["perplexity"] == pytest.approx(math.exp(2.0))
  assert results.metrics == {"loss": 1.5, "num_examples": 4.0, "exact_match": 75.0,
                             "perplexity": pytest.approx(math.exp(10 / 8))}
  # Groups average the language rows: each language counts once.
  assert results.groups["high"]["exact_match"] == 100.0
  assert results.groups["low"] == {"perplexity": pytest.approx((math.exp(2) + math.e) / 2),
                                   "exact_match": 50.0, "num_examples": 2.0,
                                   "num_languages": 2.0}
  assert results.groups["all"]["exact_match"] == pytest.approx(200 / 3)
  assert results.flat()["low/exact_match"] == 50.0
  table = results.table().splitlines()
  assert table[2].split() == ["eng", "high", "2", "2.7183", "100.0000"]
  assert table[-1].split()[0] == "[all]"


def test_resource_split_from_training_sizes():
  counts = collections.Counter(tasks.iso639_3(r["language"]) for r in dialog_records("train"))
  median = np.median(list(counts.values()))
  high, rule = evaluation.resource_split("chatterbot_dialog")
  assert high == {lang for lang, n in counts.items() if n >= 2 * median}
  assert {"eng", "cmn"} <= high and "hin" not in high
  assert "median" in rule
  assert evaluation.resource_split("chatterbot_dialog", ["hin"])[0] == {"hin"}


def test_eval_stream_takes_every_example_once_round_robin():
  members = {"chatterbot_dialog.eng": "eng", "chatterbot_dialog.jpn": "jpn",
             "udhr_translation.swh": "swh"}
  mixing.register_language_mixture("eval_test_mix", members)
  lengths = {"inputs": 1024, "targets": 1024}  # nothing dropped as overlength
  mixed = list(evaluation.eval_dataset("eval_test_mix", "validation", lengths).as_numpy_iterator())
  assert [ex["language"].decode() for ex in mixed[:3]] == ["eng", "jpn", "swh"]
  expected = collections.Counter()
  for name in members:
    ds = seqio.get_mixture_or_task(name).get_dataset(lengths, "validation", shuffle=False)
    expected.update((ex["language"], tuple(ex["targets"])) for ex in ds.as_numpy_iterator())
  assert collections.Counter((ex["language"], tuple(ex["targets"])) for ex in mixed) == expected


def test_infer_eval_in_training_and_evaluate_on_its_checkpoint(tmp_path):
  model = EncoderDecoderModel(TransformerConfig(
      vocab_size=8192, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64, num_encoder_layers=1,
      num_decoder_layers=1))
  train_cfg = DatasetConfig("udhr_span_corruption", {"inputs": 32, "targets": 8}, "train",
                            batch_size=8, pack=True)
  dialog = DatasetConfig("chatterbot_dialog", {"inputs": 32, "targets": 8}, "validation",
                         batch_size=8, shuffle=True, seed=0, pack=False)
  model_dir = str(tmp_path)
  train.train(model=model, train_dataset_cfg=train_cfg, optimizer=AdamW(learning_rate=1e-3),
             model_dir=model_dir, total_steps=2, mesh=MeshConfig(data=2, fsdp=4),
             infer_eval_dataset_cfg=dialog, eval_period=2, eval_steps=1, checkpoint_period=2,
             log_period=1, tensorboard=False)
  directory = os.path.join(model_dir, "infer_eval", "chatterbot_dialog")
  [record] = read_jsonl(os.path.join(directory, "metrics.jsonl"))
  assert record["step"] == 2 and record["num_examples"] == 8
  for name in ("chrf", "bleu", "exact_match", "perplexity", "high/chrf", "low/chrf", "all/chrf"):
    assert name in record, name

  metrics = evaluate.evaluate(model=model, dataset_cfg=dialog, model_dir=model_dir, eval_steps=1)
  # Same parameters, same 8 examples: the same generation metrics, plus the loss metrics.
  for name, value in record.items():
    if name != "step":
      assert metrics[name] == pytest.approx(value, rel=1e-5), name
  assert metrics["perplexity"] == pytest.approx(math.exp(metrics["cross_ent_loss"]), rel=1e-5)
  assert {"loss", "accuracy"} <= set(metrics)
