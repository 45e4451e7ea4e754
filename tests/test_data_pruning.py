"""Perplexity-based data pruning: ids, band selection, pruned tasks, scoring, `data score`."""

from __future__ import annotations

import json
import math
import random

import gin
import jax
import numpy as np
import pytest
import seqio
import tensorflow as tf

from polyglot_jax import cli
from polyglot_jax.data import aya, pruning, scoring, tasks
from polyglot_jax.data.pipeline import DatasetConfig, get_dataset
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.models.model import DecoderOnlyModel
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import checkpoints, train_state

tasks.register_bundled()  # this module looks bundled tasks up in seqio directly

# ppl 1..10 in language "a" (ids 1..10), 100..104 in "b" (ids 11..15), one unscored in "b".
@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


RECORDS = ([{"id": i, "language": "a", "tokens": 5, "nll": 0.0, "ppl": float(i)}
            for i in range(1, 11)]
           + [{"id": 10 + i, "language": "b", "tokens": 5, "nll": 0.0, "ppl": 99.0 + i}
              for i in range(1, 6)]
           + [{"id": 16, "language": "b", "tokens": 0, "nll": 0.0, "ppl": None}])


@pytest.mark.parametrize("band, per_language, expected", [
    # per language: "a" keeps round(0.4 * 10) = 4, "b" round(0.4 * 5) = 2
    ("bottom", True, {1, 2, 3, 4, 11, 12}),
    ("middle", True, {4, 5, 6, 7, 12, 13}),
    ("top", True, {7, 8, 9, 10, 14, 15}),
    # globally: 6 of the 15 scored, ranked 1..10, 100..104
    ("bottom", False, {1, 2, 3, 4, 5, 6}),
    ("middle", False, {5, 6, 7, 8, 9, 10}),
    ("top", False, {10, 11, 12, 13, 14, 15}),
])
def test_band_selection_known_answers(band, per_language, expected):
  assert pruning.select_ids(RECORDS, 0.4, band, per_language) == expected


def test_selection_is_a_function_of_the_scores_only():
  shuffled = random.Random(0).sample(RECORDS, len(RECORDS))
  ties = [{**r, "ppl": 1.0} if r["ppl"] is not None else r for r in RECORDS]
  for band in pruning.BANDS:
    assert pruning.select_ids(shuffled, 0.5, band) == pruning.select_ids(RECORDS, 0.5, band)
  assert pruning.select_ids(ties, 0.4, "bottom", False) == {1, 2, 3, 4, 5, 6}  # ties: by id
  assert pruning.select_ids(RECORDS, 1.0, "top") == set(range(1, 16))  # never the unscored one


def test_example_ids_depend_on_the_content_only():
  ids = pruning.column_ids({"text": ["Hello world", "b"], "language": ["eng", "eng"]})
  assert ids[0] == 8712904649537964806  # farmhash64 is stable: score files stay valid
  one = pruning.example_ids({"language": tf.constant("eng"), "text": tf.constant("b")})
  assert int(one) == ids[1]
  assert pruning.column_ids({"text": ["Hello world"], "language": ["fra"]})[0] != ids[0]


def test_missing_or_bad_score_file_and_bad_settings_are_one_line(tmp_path):
  cfg = DatasetConfig("udhr_lm.fra", {"targets": 32}, "train", 4,
                      pruning=pruning.Pruning(str(tmp_path / "none.jsonl"), 0.5))
  with pytest.raises(FileNotFoundError) as err:
    get_dataset(cfg, seqio.DecoderFeatureConverter)
  assert "\n" not in str(err.value) and "none.jsonl" in str(err.value)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": 1}\n')
  with pytest.raises(ValueError, match="bad.jsonl:1 is not a score record"):
    pruning.load_scores(bad)
  with pytest.raises(ValueError, match="keep_fraction"):
    pruning.Pruning("x", 0.0)
  with pytest.raises(ValueError, match="band"):
    pruning.Pruning("x", 0.5, band="low")


def _texts(name: str, split: str) -> list[bytes]:
  source = seqio.get_mixture_or_task(name).source
  return [x["text"] for x in source.get_dataset(split, shuffle=False).as_numpy_iterator()]


def _length_scores(path, names: list[str]) -> dict[bytes, int]:
  """A score file whose "perplexity" is the text length; returns text -> id."""
  records, ids = [], {}
  for name in names:
    columns = seqio.get_mixture_or_task(name).source.columns("train")
    for i, text, language in zip(pruning.column_ids(columns), columns["text"],
                                 columns["language"]):
      records.append({"id": int(i), "language": language, "tokens": 1, "nll": 0.0,
                      "ppl": float(len(text))})
      ids[text.encode()] = int(i)
  aya.write_jsonl(records, path)
  return ids


def test_pruned_task_and_mixture_read_exactly_the_kept_examples(tmp_path):
  path = tmp_path / "scores.jsonl.gz"
  _length_scores(path, ["udhr_lm.fra", "udhr_lm.deu_1996"])
  prune = pruning.Pruning(str(path), 0.5, "bottom")
  name = pruning.register_pruned("udhr_lm.fra", prune)
  assert name == "udhr_lm.fra#ppl_bottom_50"
  full = _texts("udhr_lm.fra", "train")
  assert sorted(_texts(name, "train")) == sorted(sorted(full, key=len)[:13])  # 26 articles
  assert _texts(name, "validation") == _texts("udhr_lm.fra", "validation")  # not pruned
  # The ids are those of the raw text: the same scores prune every objective built on it.
  other = pruning.register_pruned("udhr_span_corruption.fra", prune)
  assert sorted(_texts(other, "train")) == sorted(_texts(name, "train"))
  # A mixture: each task pruned, same rates; languages without scores keep nothing.
  seqio.MixtureRegistry.remove("test_two_mix")
  seqio.MixtureRegistry.add("test_two_mix", [("udhr_lm.fra", 1.0), ("udhr_lm.deu_1996", 3.0)])
  mixture = seqio.get_mixture_or_task(pruning.register_pruned("test_two_mix", prune))
  assert [t.name for t in mixture.tasks] == ["udhr_lm.deu_1996#ppl_bottom_50", name]
  assert mixture.get_rate(mixture.tasks[0]) == 3.0
  assert {t.num_input_examples("train") for t in mixture.tasks} == {13}
  # Keeping everything reads the unpruned stream, batch for batch.
  cfg = DatasetConfig("udhr_lm.fra", {"targets": 32}, "train", 4)
  everything = DatasetConfig("udhr_lm.fra", {"targets": 32}, "train", 4,
                             pruning=pruning.Pruning(str(path), 1.0))
  for a, b in zip(get_dataset(cfg, seqio.DecoderFeatureConverter).take(3),
                  get_dataset(everything, seqio.DecoderFeatureConverter).take(3)):
    np.testing.assert_array_equal(a["decoder_target_tokens"], b["decoder_target_tokens"])


def test_pruning_a_file_source_filters_in_the_graph(tmp_path):
  data = tmp_path / "aya.jsonl"
  rows = [{"inputs": f"q{i}", "targets": "x" * (i + 1), "language": "eng"} for i in range(6)]
  aya.write_jsonl(rows, data)
  from polyglot_jax.data import tasks  # pylint: disable=import-outside-toplevel
  task = tasks.register_aya_task("test_prune_aya", {"train": str(data)})
  ids = pruning.column_ids({k: [r[k] for r in rows] for k in aya.FIELDS})
  aya.write_jsonl([{"id": int(i), "language": "eng", "tokens": 1, "nll": 0.0,
                    "ppl": float(len(r["targets"]))} for i, r in zip(ids, rows)],
                  tmp_path / "s.jsonl")
  pruned = pruning.register_pruned(task.name, pruning.Pruning(str(tmp_path / "s.jsonl"), 0.5,
                                                              "top"))
  source = seqio.get_mixture_or_task(pruned).source
  assert isinstance(source, pruning.KeptSource)
  kept = [x["targets"] for x in source.get_dataset("train", shuffle=False).as_numpy_iterator()]
  assert kept == [b"xxxx", b"xxxxx", b"xxxxxx"]


# Dimensions set by flags over gin/models/llama/tiny.gin; LLAMA: what its family file sets.
TINY_LM = dict(vocab_size=8192, emb_dim=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
               num_decoder_layers=1)
LLAMA = dict(num_encoder_layers=0, mlp_activations=("silu", "linear"), logits_via_embedding=False,
             position_embedding="rope", rope_theta=500000.0, rope_interleaved=False,
             scale_attention=True, norm_type="rms", norm_epsilon=1e-5, dtype="float32")
LENGTH = 32


@pytest.fixture(scope="module")
def tiny_lm():
  model = DecoderOnlyModel(TransformerConfig(**TINY_LM, **LLAMA))
  partitioner = Partitioner(MeshConfig(data=8))
  spec = train_state.state_spec(model, train_state.ParamsOnly(), partitioner)
  return model, partitioner, train_state.initialize(model, spec, seed=0)


def _manual_nll(score_fn, params, vocab, text: str) -> tuple[float, int]:
  """Sum of token NLLs of `text` cut into LENGTH - 1 token pieces + EOS, without seqio."""
  ids = vocab.encode(text)
  pieces = [ids[i:i + LENGTH - 1] + [1] for i in range(0, len(ids), LENGTH - 1)]
  targets = np.zeros((-(-len(pieces) // 8) * 8, LENGTH), np.int32)  # rows: a multiple of 8
  for row, piece in enumerate(pieces):
    targets[row, :len(piece)] = piece
  inputs = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
  batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
           "decoder_loss_weights": (targets > 0).astype(np.float32)}
  return -float(np.sum(score_fn(params, batch))), int((targets > 0).sum())


def test_scores_are_perplexities_of_the_tasks_pieces(tiny_lm):
  model, partitioner, state = tiny_lm
  task = seqio.get_mixture_or_task("udhr_lm.fra")
  records = scoring.score_task(model, state.params, partitioner, task, "validation",
                               {"targets": LENGTH}, 8)
  texts = _texts("udhr_lm.fra", "validation")
  assert len(records) == len(texts) == 5
  vocab = task.output_features["targets"].vocabulary
  score_fn = jax.jit(model.score_batch)
  for record, text in zip(records, texts):
    nll, tokens = _manual_nll(score_fn, state.params, vocab, text.decode())
    assert record["tokens"] == tokens and tokens > LENGTH  # several pieces each
    assert record["nll"] == pytest.approx(nll, rel=1e-5)
    assert record["ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_data_score_command_writes_the_score_file(tiny_lm, tmp_path, capsys):
  model, partitioner, state = tiny_lm
  ckpt = checkpoints.Checkpointer(str(tmp_path / "ref" / "checkpoints"), period=1,
                                  async_save=False)
  ckpt.save(1, state, {"batches": 0}, force=True)
  ckpt.close()
  scores = tmp_path / "scores.jsonl"
  dims = [f"--gin.TransformerConfig.{k}={v}" for k, v in TINY_LM.items()]
  args = ["data", "score", "--gin_file=models/llama/tiny.gin", "--gin_file=runs/score.gin",
          *dims, "--gin.MIXTURE_OR_TASK_NAME=udhr_lm.fra", "--gin.EVAL_SPLIT=validation",
          "--gin.TASK_FEATURE_LENGTHS={'targets': 32}", "--gin.BATCH_SIZE=8",
          "--gin.ACTIVATION_DTYPE='float32'", f"--gin.MODEL_DIR={tmp_path / 'ref'}"]
  assert cli.main(args + [f"--gin.SCORES_PATH={scores}"]) == 0, capsys.readouterr().err
  written = [json.loads(line) for line in scores.read_text().splitlines()]
  expected = scoring.score_task(model, state.params, partitioner,  # a second run: deterministic
                                seqio.get_mixture_or_task("udhr_lm.fra"), "validation",
                                {"targets": LENGTH}, 8)
  assert [r["id"] for r in written] == [r["id"] for r in expected]
  np.testing.assert_allclose([r["ppl"] for r in written], [r["ppl"] for r in expected],
                             rtol=1e-5)
  gin.clear_config()
  assert cli.main(["data", "score", "--gin_file=models/llama/tiny.gin",
                   "--gin_file=runs/score.gin", *args[4:-1],
                   f"--gin.MODEL_DIR={tmp_path / 'nothing'}",
                   f"--gin.SCORES_PATH={scores}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "no checkpoint found" in err
