"""Data layer: bundled UDHR, held-out rule, vocabulary, span corruption, tasks, trainer pipeline."""

from __future__ import annotations

import importlib
import unicodedata

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

from polyglot_jax.data import mixing, preprocessors, tasks, udhr, vocab
from polyglot_jax.data.pipeline import DatasetConfig, get_dataset, iterate_batches

tasks.register_bundled()  # this module looks bundled tasks up in seqio directly

SMALL_LENGTHS = {
    tasks.UDHR_SPAN_CORRUPTION: {"inputs": 32, "targets": 16},
    tasks.UDHR_LM: {"targets": 32},
    tasks.UDHR_PREFIX_LM: {"inputs": 16, "targets": 16},
}
CONVERTERS = {
    tasks.UDHR_SPAN_CORRUPTION: seqio.EncDecFeatureConverter,
    tasks.UDHR_LM: seqio.DecoderFeatureConverter,
    tasks.UDHR_PREFIX_LM: seqio.PrefixLMFeatureConverter,
}


@pytest.fixture(scope="module")
def spm_vocab() -> seqio.SentencePieceVocabulary:
  return vocab.get_vocabulary()


def _config(name: str = tasks.UDHR_SPAN_CORRUPTION, batch_size: int = 4, **kwargs) -> DatasetConfig:
  return DatasetConfig(name, SMALL_LENGTHS[name], "train", batch_size, **kwargs)


def _take(ds: tf.data.Dataset, n: int, start: int = 0) -> list[dict[str, np.ndarray]]:
  it = iterate_batches(ds, start)
  return [next(it) for _ in range(n)]


# ---------------------------------------------------------------- bundle and held-out rule


def test_bundle_has_many_languages_and_clean_records():
  records = udhr.load_udhr()
  codes = {r["code"] for r in records}
  assert len(codes) > 400
  assert {"eng", "cmn_hans", "tgl_tglg", "chr_cased"} <= codes
  for r in records:
    assert set(r) == {"code", "bcp47", "iso6393", "name", "script", "article", "text"}
    assert 0 <= r["article"] <= 30 and r["text"]
    assert r["text"] == unicodedata.normalize("NFC", r["text"])
    assert "  " not in r["text"] and r["text"] == r["text"].strip()
  scripts = {r["script"] for r in records}
  assert {"Latn", "Cyrl", "Arab", "Deva", "Hani", "Ethi", "Tglg", "Cher"} <= scripts


def test_held_out_articles_never_in_train():
  assert udhr.split_of_article(0) == udhr.split_of_article(25) == "train"
  assert {udhr.split_of_article(a) for a in range(26, 31)} == {"validation"}
  with pytest.raises(ValueError):
    udhr.split_of_article(31)
  train, validation = udhr.udhr_records("train"), udhr.udhr_records("validation")
  assert max(r["article"] for r in train) == 25
  assert {r["article"] for r in validation} == set(range(26, 31))
  assert len(train) + len(validation) == len(udhr.load_udhr())
  # The tasks' source reads the same rule: no validation (language, text) pair reaches "train".
  source = tasks.udhr_dataset("train").as_numpy_iterator()
  train_pairs = {(x["language"].decode(), x["text"].decode()) for x in source}
  assert train_pairs == {(r["code"], r["text"]) for r in train}
  assert not train_pairs & {(r["code"], r["text"]) for r in validation}


# ---------------------------------------------------------------- vocabulary


def test_vocabulary_id_layout(spm_vocab):
  assert spm_vocab.vocab_size == 8100  # 8000 pieces + 100 sentinels
  sp = spm_vocab.tokenizer
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert spm_vocab.eos_id == 1 and spm_vocab.unk_id == 2
  assert spm_vocab.encode("<extra_id_0>") == [8099]


@pytest.mark.parametrize("code", ["eng", "rus", "hin", "cmn_hans", "amh", "tgl_tglg", "chr_cased"])
def test_byte_fallback_round_trips_every_script(spm_vocab, code):
  text = next(r["text"] for r in udhr.load_udhr() if r["code"] == code).replace("\n", " ")
  text += " 𓀀𓀁"  # Egyptian hieroglyphs: in no declaration, so they must go through bytes
  ids = spm_vocab.encode(text)
  assert spm_vocab.unk_id not in ids
  assert spm_vocab.tokenizer.is_byte(ids[-1])
  assert spm_vocab.decode(ids) == text


def test_missing_vocabulary_is_a_one_line_error(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    vocab.get_vocabulary(tmp_path / "spiece.model")
  assert "\n" not in str(err.value) and "spiece.model" in str(err.value)


def test_temperature_probs():
  sizes = {"big": 1000, "small": 10}
  assert vocab.temperature_probs(sizes, 1.0)["small"] == pytest.approx(10 / 1010)
  assert vocab.temperature_probs(sizes, 0.0)["small"] == pytest.approx(0.5)
  assert 10 / 1010 < vocab.temperature_probs(sizes, 0.3)["small"] < 0.5


def test_train_vocabulary_is_deterministic(tmp_path):
  kwargs = dict(vocab_size=4000, sample_chars=100_000, seed=3)
  first = vocab.train_vocabulary(str(tmp_path / "a"), **kwargs)
  second = vocab.train_vocabulary(str(tmp_path / "b"), **kwargs)
  assert open(first, "rb").read() == open(second, "rb").read()
  trained = vocab.get_vocabulary(first)
  assert trained.vocab_size == 4100 and trained.tokenizer.pad_id() == 0


# ---------------------------------------------------------------- preprocessors


def test_split_tokens_keeps_every_token_and_the_language():
  ds = tf.data.Dataset.from_tensor_slices(
      {"targets": tf.ragged.constant([list(range(3, 13)), [], [7]]), "language": ["a", "b", "c"]}
  )
  ds = ds.map(lambda x: {**x, "targets": x["targets"]})  # ragged rows -> dense 1-D tensors
  pieces = list(preprocessors.split_tokens(ds, 4).as_numpy_iterator())
  assert [p["targets"].tolist() for p in pieces] == [[3, 4, 5, 6], [7, 8, 9, 10], [11, 12], [7]]
  assert [p["language"] for p in pieces] == [b"a", b"a", b"a", b"c"]


def test_span_corruption_lengths_match_t5():
  assert preprocessors.span_corruption_lengths(512) == (568, 114)  # T5's published numbers


def _reconstruct(inputs: list[int], targets: list[int], first_sentinel: int) -> list[int]:
  """Puts each target span back where its sentinel sits in the inputs."""
  spans: dict[int, list[int]] = {}
  for token in targets:
    if token >= first_sentinel:
      current = spans.setdefault(token, [])
    else:
      current.append(token)
  return [t for token in inputs for t in spans.get(token, [token])]


def test_span_corruption_matches_t5_format(spm_vocab):
  lengths = {"inputs": 64, "targets": 32}
  tokens_length, targets_length = preprocessors.span_corruption_lengths(64)
  original = np.random.default_rng(0).integers(3, 8000, size=3 * tokens_length + 7).astype(np.int32)
  ds = tf.data.Dataset.from_tensors({"targets": original, "language": "xx"})
  features = {"targets": seqio.Feature(spm_vocab)}
  with seqio.map_seed_manager(7):
    out = list(preprocessors.span_corruption(ds, lengths, features).as_numpy_iterator())
  with seqio.map_seed_manager(7):
    again = list(preprocessors.span_corruption(ds, lengths, features).as_numpy_iterator())
  assert len(out) == 4
  assert all(a["inputs"].tolist() == b["inputs"].tolist() for a, b in zip(out, again))

  first_sentinel = spm_vocab.vocab_size - 100
  rebuilt = []
  for ex in out:
    inputs, targets = ex["inputs"].tolist(), ex["targets"].tolist()
    assert ex["language"] == b"xx"
    sentinels = [t for t in inputs if t >= first_sentinel]
    assert sentinels == list(range(8099, 8099 - len(sentinels), -1))  # <extra_id_0>, 1, ...
    assert [t for t in targets if t >= first_sentinel] == sentinels
    assert targets[0] == 8099
    assert len(inputs) < lengths["inputs"] and len(targets) < targets_length  # room for EOS
    piece = _reconstruct(inputs, targets, first_sentinel)
    noise = len(targets) - len(sentinels)
    assert noise == round(len(piece) * 0.15)
    assert len(sentinels) == max(1, round(noise / 3))
    rebuilt += piece
  assert rebuilt == original.tolist()


@pytest.mark.parametrize("name", sorted(SMALL_LENGTHS))
@pytest.mark.parametrize("split", ["train", "validation"])
def test_each_task_yields_examples_with_language(name, split):
  task = seqio.get_mixture_or_task(name)
  lengths = SMALL_LENGTHS[name]
  codes = {r["code"].encode() for r in udhr.load_udhr()}
  ds = task.get_dataset(lengths, split=split, shuffle=False, seed=0)
  for ex in ds.take(5).as_numpy_iterator():
    assert ex["language"] in codes
    for feature, length in lengths.items():
      assert 1 <= len(ex[feature]) <= length and ex[feature][-1] == 1  # EOS


def test_task_registration_is_idempotent():
  importlib.reload(tasks)
  tasks.register_udhr_tasks()
  assert set(SMALL_LENGTHS) <= set(seqio.TaskRegistry.names())


# ---------------------------------------------------------------- trainer pipeline


@pytest.mark.parametrize("name", sorted(SMALL_LENGTHS))
def test_get_dataset_packed_shapes(name):
  batch = _take(get_dataset(_config(name), CONVERTERS[name]), 1)[0]
  converter = CONVERTERS[name](pack=True)
  expected = converter.get_model_feature_lengths(SMALL_LENGTHS[name])
  assert {k: v.shape for k, v in batch.items()} == {k: (4, n) for k, n in expected.items()}
  segments, positions = batch["decoder_segment_ids"], batch["decoder_positions"]
  assert segments.min() == 0 and segments.max() >= 1 and positions.max() > 0
  # Positions restart at 0 at the start of every packed segment.
  starts = np.diff(segments, axis=1, prepend=0) != 0
  assert np.all(positions[starts] == 0)


def test_get_dataset_is_deterministic_and_resumable():
  cfg = _config()
  first = _take(get_dataset(cfg, seqio.EncDecFeatureConverter), 5)
  second = _take(get_dataset(cfg, seqio.EncDecFeatureConverter), 5)
  resumed = _take(get_dataset(cfg, seqio.EncDecFeatureConverter), 3, start=2)
  for a, b in zip(first, second):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  for a, b in zip(first[2:], resumed):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  other_seed = _take(get_dataset(_config(seed=1), seqio.EncDecFeatureConverter), 1)[0]
  assert not np.array_equal(first[0]["encoder_input_tokens"], other_seed["encoder_input_tokens"])


@pytest.mark.parametrize("name", [tasks.CHATTERBOT_DIALOG, "test_dialog_mix"])
def test_two_hosts_read_their_shards_and_together_give_the_one_host_batches(name):
  mixing.register_language_mixture(
      "test_dialog_mix", {f"chatterbot_dialog.{c}": c for c in ("eng", "yor", "tel", "jpn")})
  cfg = DatasetConfig(name, {"inputs": 32, "targets": 32}, "train", batch_size=4,
                      num_data_shards=2)
  one = _take(get_dataset(cfg, seqio.EncDecFeatureConverter), 3)
  hosts = [_take(get_dataset(cfg, seqio.EncDecFeatureConverter, i, 2), 3) for i in range(2)]
  assert max(b["decoder_segment_ids"].max() for b in one) > 1  # packed: rows of several dialogs
  for k in range(3):  # host 0's rows, then host 1's, are the one-host batch
    for feature, rows in one[k].items():
      assert hosts[0][k][feature].shape == (2, 32)
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][k][feature], hosts[1][k][feature]]), rows)


def test_each_data_shard_reads_only_its_examples():
  source = seqio.get_mixture_or_task("udhr_lm.fra").source
  texts = [x["text"] for x in source.get_dataset("train", shuffle=False).as_numpy_iterator()]
  shards = [[x["text"] for x in source.get_dataset(
      "train", shuffle=True, seed=0, shard_info=seqio.ShardInfo(i, 2)).as_numpy_iterator()]
            for i in range(2)]
  assert sorted(shards[0]) == sorted(texts[0::2]) and sorted(shards[1]) == sorted(texts[1::2])


def test_finite_passes_give_every_host_the_same_number_of_batches():
  cfg = DatasetConfig("udhr_lm.eng", {"targets": 32}, "validation", batch_size=8, shuffle=False,
                      pack=False, num_data_shards=4)
  one = list(iterate_batches(get_dataset(cfg, seqio.DecoderFeatureConverter, num_epochs=1)))
  hosts = [list(iterate_batches(get_dataset(cfg, seqio.DecoderFeatureConverter, i, 2,
                                            num_epochs=1))) for i in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == len(one) > 0
  for k in (0, len(one) - 1):
    np.testing.assert_array_equal(np.concatenate([hosts[0][k]["decoder_target_tokens"],
                                                  hosts[1][k]["decoder_target_tokens"]]),
                                  one[k]["decoder_target_tokens"])


def test_pipeline_errors_are_one_line():
  with pytest.raises(ValueError) as err:
    cfg = DatasetConfig("udhr_nope", {"targets": 8}, "train", 4)
    get_dataset(cfg, seqio.DecoderFeatureConverter)
  message = str(err.value)
  assert "\n" not in message and "udhr_nope" in message and tasks.UDHR_LM in message
  with pytest.raises(ValueError, match="not divisible"):
    get_dataset(_config(batch_size=3), seqio.EncDecFeatureConverter, 0, 2)
  with pytest.raises(ValueError, match="not a multiple of the 2 hosts"):
    get_dataset(_config(num_data_shards=3), seqio.EncDecFeatureConverter, 0, 2)


def test_dataset_config_is_gin_configurable():
  with gin.unlock_config():
    gin.bind_parameter("DatasetConfig.batch_size", 16)
  try:
    cfg = DatasetConfig(tasks.UDHR_LM, {"targets": 8}, "train")
  finally:
    gin.clear_config()
  assert cfg.batch_size == 16 and cfg.seed == 0
