"""Multilingual data: per-language tasks, language mixtures (temperature, UniMax), Aya-format
instruction data (UDHR translation, chatterbot dialogs, user files) and bad-input accounting."""

from __future__ import annotations

import collections
import gzip
import json

import numpy as np
import pytest
import seqio
import tensorflow as tf

from polyglot_jax.data import aya, instructions, mixing, quality, tasks, udhr
from polyglot_jax.data.pipeline import DatasetConfig, get_dataset, iterate_batches

tasks.register_bundled()  # this module looks bundled tasks up in seqio directly

INSTRUCTION_LENGTHS = {"inputs": 512, "targets": 512}


def _examples(name: str, lengths=INSTRUCTION_LENGTHS, split: str = "train", n: int = 100):
  ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split=split, shuffle=False, seed=0)
  return list(ds.take(n).as_numpy_iterator())


# ---------------------------------------------------------------- rates


def test_temperature_rates_follow_the_formula_and_sum_to_one():
  sizes = {"t.a": 1000, "t.b": 10, "u.a": 3000, "u.c": 1}
  langs = {"t.a": "a", "t.b": "b", "u.a": "a", "u.c": "c"}
  rates = mixing.language_rates(sizes, langs, "temperature", alpha=0.3)
  assert sum(rates.values()) == pytest.approx(1.0)
  lang = {l: sum(r for t, r in rates.items() if langs[t] == l) for l in "abc"}
  assert lang["a"] / lang["b"] == pytest.approx((4000 / 10) ** 0.3)  # p(lang) ∝ n_lang^alpha
  assert lang["b"] / lang["c"] == pytest.approx(10 ** 0.3)
  assert rates["u.a"] / rates["t.a"] == pytest.approx(3.0)  # within a language ∝ n_task
  uniform = mixing.language_rates(sizes, langs, alpha=0.0)
  assert {l: sum(r for t, r in uniform.items() if langs[t] == l) for l in "abc"} == pytest.approx(
      {l: 1 / 3 for l in "abc"})


def test_unimax_caps_epochs_and_is_uniform_otherwise():
  sizes = {"a": 10, "b": 100, "c": 10_000}
  budget, cap = 3000, 2.0
  probs = mixing.unimax_probs(sizes, budget, cap)
  assert sum(probs.values()) == pytest.approx(1.0)
  epochs = {k: probs[k] * budget / n for k, n in sizes.items()}
  assert all(e <= cap + 1e-9 for e in epochs.values())
  assert epochs["a"] == pytest.approx(cap) and epochs["b"] == pytest.approx(cap)  # capped
  assert probs["c"] == pytest.approx((budget - 20 - 200) / budget)  # gets what they cannot use
  big = {"a": 10_000, "b": 20_000, "c": 50_000}
  assert mixing.unimax_probs(big, 3000, 1.0) == pytest.approx({k: 1 / 3 for k in big})
  with pytest.raises(ValueError, match="budget"):
    mixing.language_rates({"t": 1}, {"t": "a"}, "unimax")


def test_registered_mixtures_use_the_formula():
  mix = seqio.get_mixture_or_task("udhr_lm_mix")
  assert isinstance(mix, mixing.LanguageMixture)
  total = mix.total_rate
  assert total == pytest.approx(1.0)
  by_lang: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
  for task in mix.tasks:
    by_lang[mix.languages[task.name]][0] += task.num_input_examples("train")
    by_lang[mix.languages[task.name]][1] += mix.get_rate(task)
  (n1, p1), (n2, p2) = by_lang["swh"], by_lang["cmn"]  # cmn: 7 Mandarin varieties together
  assert p2 / p1 == pytest.approx((n2 / n1) ** 0.3)
  table = mixing.rate_table("aya_instruct_mix", budget=10_000)
  lines = table.splitlines()
  assert "alpha=0.3" in lines[0] and lines[1].split() == ["language", "examples", "rate", "epochs"]
  rows = {line.split()[0]: line.split() for line in lines[2:]}
  assert float(rows["eng"][2]) > float(rows["tel"][2])
  _, examples, rate, epochs = rows["tel"]
  assert float(epochs) == pytest.approx(float(rate) * 10_000 / int(examples), abs=0.01)


def test_sampled_indices_follow_rates_and_stop_after_epochs():
  sizes, probs = [5, 50, 500], np.array([0.2, 0.3, 0.5])
  chunks = mixing.sampled_indices(sizes, probs, seed=0, shuffle=True, num_epochs=None)
  draws = np.concatenate([next(chunks) for _ in range(5)])  # 20480 draws
  freq = np.bincount(np.searchsorted([5, 55], draws, side="right"), minlength=3) / len(draws)
  assert np.abs(freq - probs).max() < 0.02
  one_epoch = np.concatenate(list(mixing.sampled_indices(sizes, probs, 0, False, num_epochs=1)))
  assert len(set(one_epoch.tolist())) == len(one_epoch)  # no repeats within an epoch
  assert set(range(5)) <= set(one_epoch.tolist())  # stopped when source 0 ran out


def test_mixture_samples_languages_in_proportion():
  task_languages = {f"chatterbot_dialog.{c}": c for c in ("eng", "pes", "tel", "yor")}
  mix = mixing.register_language_mixture("test_dialog_mix", task_languages, alpha=0.3)
  n = 1500
  counts = collections.Counter(x["language"].decode() for x in mix.get_dataset(
      INSTRUCTION_LENGTHS, "train", shuffle=True, seed=1).take(n).as_numpy_iterator())
  for task in mix.tasks:
    p = mix.get_rate(task)
    observed = counts[mix.languages[task.name]] / n
    assert abs(observed - p) < 4 * np.sqrt(p * (1 - p) / n) + 0.01, (task.name, observed, p)
  seqio.MixtureRegistry.remove("test_dialog_mix")


def test_mixture_pipeline_is_deterministic_and_packed():
  cfg = DatasetConfig("udhr_span_corruption_mix", {"inputs": 64, "targets": 16}, "train", 4)
  first = next(iterate_batches(get_dataset(cfg, seqio.EncDecFeatureConverter)))
  again = next(iterate_batches(get_dataset(cfg, seqio.EncDecFeatureConverter)))
  assert first["encoder_input_tokens"].shape == (4, 64)
  assert all(np.array_equal(first[k], again[k]) for k in first)


# ---------------------------------------------------------------- per-language tasks


def test_per_language_tasks_are_registered_and_hold_one_language():
  names = set(seqio.TaskRegistry.names())
  codes = {r["code"] for r in udhr.load_udhr()}
  for base in (tasks.UDHR_LM, tasks.UDHR_SPAN_CORRUPTION, tasks.UDHR_PREFIX_LM):
    assert {f"{base}.{c}" for c in codes} <= names
  assert {"udhr_translation.swh", "chatterbot_dialog.jpn", "chatterbot_dialog.hin_latn"} <= names
  per_language = sum(seqio.get_mixture_or_task(f"udhr_lm.{c}").num_input_examples("train")
                     for c in codes)
  assert per_language == seqio.get_mixture_or_task("udhr_lm").num_input_examples("train")
  examples = _examples("udhr_lm.swh", {"targets": 64}, n=20)
  assert examples and {x["language"] for x in examples} == {b"swh"}


# ---------------------------------------------------------------- instruction data


def test_translation_records_are_any_to_any_with_native_prompts_and_held_out():
  train = instructions.translation_records("train")
  assert all(tuple(r) == instructions.AYA_FIELDS for r in train[:100])
  pairs = [r["sub_dataset_name"].split("-") for r in train]
  assert len({s for s, _ in pairs}) > 400 and len({t for _, t in pairs}) > 400
  assert sum("eng" in p for p in pairs) / len(pairs) < 0.05  # not English-centric
  templates = {t.template_id: t for t in instructions.TEMPLATES}
  native = [r for r in train if templates[r["template_id"]].prompt_language != "eng"]
  assert {templates[r["template_id"]].prompt_language for r in native} == set(instructions._NATIVE)
  for r in native:
    src, tgt = r["sub_dataset_name"].split("-")
    prompt_language = templates[r["template_id"]].prompt_language
    assert instructions.NATIVE_CODES[src] == prompt_language
    names = instructions.LANGUAGE_NAMES[prompt_language]
    assert names[instructions.NATIVE_CODES[tgt]] in r["inputs"]
  # Held out: every train target is (a paragraph of) a train article of its language.
  def texts(split):
    records = udhr.udhr_records(split)
    return {(r["code"], t) for r in records for t in [r["text"], *r["text"].split("\n")]}
  train_texts = texts("train")
  assert all((r["language"], r["targets"]) in train_texts for r in train)
  validation, validation_texts = instructions.translation_records("validation"), texts("validation")
  assert all((r["language"], r["targets"]) in validation_texts for r in validation)
  assert instructions.translation_records("train", seed=1) != train


def test_dialog_bundle_has_28_languages_and_a_clean_split():
  train = instructions.dialog_records("train")
  validation = instructions.dialog_records("validation")
  assert len({r["language"] for r in train}) == 28
  assert all(set(r) == set(instructions.AYA_FIELDS) and r["inputs"].strip() and r["targets"].strip()
             for r in train + validation)
  key = lambda r: (r["language"], r["inputs"], r["targets"])  # noqa: E731
  assert not {key(r) for r in train} & {key(r) for r in validation}


def test_instruction_tasks_tokenize_and_drop_overlength():
  quality.reset_dropped()
  examples = _examples(tasks.UDHR_TRANSLATION, {"inputs": 64, "targets": 64}, n=30)
  assert examples and all(len(x["inputs"]) <= 64 and x["targets"][-1] == 1 for x in examples)
  assert quality.dropped_metrics()["data/dropped_overlength"] > 0  # UDHR articles are long
  dialog = _examples("chatterbot_dialog.eng", n=5)
  assert {x["language"] for x in dialog} == {b"eng"}


# ---------------------------------------------------------------- user files and bad input

GOOD = [{"inputs": f"question {i}", "targets": f"answer {i}", "language": "swh", "template_id": i}
        for i in range(3)]


def _write_tfrecord(records, path):
  with tf.io.TFRecordWriter(str(path)) as writer:
    for r in records:
      feature = {k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[str(v).encode()]))
                 for k, v in r.items()}
      example = tf.train.Example(features=tf.train.Features(feature=feature))
      writer.write(example.SerializeToString())


def _write_parquet(records, path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.Table.from_pylist(records), path)


def _write_tfds(records, data_dir, splits=("train",)) -> str:
  """A prepared TFDS dataset of `records` in `splits`; returns its data dir (version folder)."""
  import tensorflow_datasets as tfds

  columns = {k: [str(r[k]) for r in records] for k in ("inputs", "targets", "language")}
  builder = tfds.dataset_builders.store_as_tfds_dataset(
      name="aya_test", version="1.0.0", data_dir=str(data_dir), config=None,
      features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in columns}),
      split_datasets={s: tf.data.Dataset.from_tensor_slices(columns) for s in splits})
  return builder.data_dir


def test_tfds_data_dirs_load_with_bad_records_counted(tmp_path):
  quality.reset_dropped()
  path = _write_tfds(GOOD + [{"inputs": "q", "targets": " ", "language": "swh"}], tmp_path)
  tasks.register_aya_task("test_aya_tfds", {"train": path})
  got = _examples("test_aya_tfds", {"inputs": 16, "targets": 16})
  vocabulary = seqio.get_mixture_or_task("test_aya_tfds").output_features["inputs"].vocabulary
  assert [vocabulary.decode(x["inputs"].tolist()) for x in got] == [r["inputs"] for r in GOOD]
  assert quality.dropped_metrics()["data/dropped_empty"] == 1
  with pytest.raises(ValueError) as err:
    tasks.register_aya_task("test_aya_tfds", {"validation": path})
  assert "\n" not in str(err.value) and "no split 'validation'" in str(err.value)


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "parquet", "tfrecord"])
def test_aya_files_load_in_every_format(tmp_path, suffix):
  path = tmp_path / f"train.{suffix}"
  {"parquet": _write_parquet, "tfrecord": _write_tfrecord}.get(suffix, aya.write_jsonl)(GOOD, path)
  tasks.register_aya_task("test_aya_files", {"train": str(tmp_path / "train.*")})
  got = _examples("test_aya_files", {"inputs": 16, "targets": 16})
  vocabulary = seqio.get_mixture_or_task("test_aya_files").output_features["inputs"].vocabulary
  assert [vocabulary.decode(x["inputs"].tolist()) for x in got] == [r["inputs"] for r in GOOD]
  assert {x["language"] for x in got} == {b"swh"}


def test_field_map_default_language_and_user_mixture(tmp_path):
  renamed = [{"prompt": r["inputs"], "completion": r["targets"]} for r in GOOD]
  _write_parquet(renamed, tmp_path / "swh.parquet")
  aya.write_jsonl([{**r, "language": "yor"} for r in GOOD], tmp_path / "yor.jsonl")
  tasks.register_aya_task("test_aya.swh", {"train": str(tmp_path / "swh.parquet")},
                          field_map={"inputs": "prompt", "targets": "completion"},
                          default_language="swh")
  tasks.register_aya_task("test_aya.yor", {"train": str(tmp_path / "yor.jsonl")},
                          only_language="yor")
  mix = mixing.register_language_mixture(
      "test_aya_mix", {"test_aya.swh": "swh", "test_aya.yor": "yor"}, sizes={"test_aya.swh": 3,
                                                                            "test_aya.yor": 3})
  languages = {x["language"] for x in mix.get_dataset(
      {"inputs": 16, "targets": 16}, "train", seed=0).take(40).as_numpy_iterator()}
  assert languages == {b"swh", b"yor"}
  seqio.MixtureRegistry.remove("test_aya_mix")


BAD_LINES = {
    "empty": b'{"inputs": "", "targets": "x", "language": "swh"}',
    "empty_whitespace": b'{"inputs": "q", "targets": " \\n\\t ", "language": "swh"}',
    "invalid_utf8": b'{"inputs": "caf\xe9", "targets": "x", "language": "swh"}',
    "invalid_utf8_surrogate": b'{"inputs": "\\udc80", "targets": "x", "language": "swh"}',
    "missing_field": b'{"inputs": "q", "language": "swh"}',
    "malformed": b'{"inputs": "q", "targ',
    "overlength": json.dumps({"inputs": "word " * 200, "targets": "x", "language": "swh"}).encode(),
}


def _bad_file(tmp_path, lines) -> str:
  path = tmp_path / "bad.jsonl.gz"
  good = [json.dumps(r).encode() for r in GOOD]
  path.write_bytes(gzip.compress(b"\n".join(good[:1] + lines + good[1:]) + b"\n"))
  return str(path)


def test_bad_input_is_counted_and_dropped(tmp_path):
  quality.reset_dropped()
  tasks.register_aya_task("test_aya_bad", {"train": _bad_file(tmp_path, list(BAD_LINES.values()))})
  got = _examples("test_aya_bad", {"inputs": 32, "targets": 32})
  assert len(got) == len(GOOD)
  reasons = collections.Counter(k.split("_")[0] if k.startswith("empty") else k.replace(
      "_surrogate", "") for k in BAD_LINES)
  assert quality.dropped_metrics() == {f"data/dropped_{r}": reasons[r] for r in quality.REASONS}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_strict_mode_stops_on_bad_input(tmp_path, case):
  tasks.register_aya_task("test_aya_strict", {"train": _bad_file(tmp_path, [BAD_LINES[case]])},
                          strict=True)
  reason = "empty" if case.startswith("empty") else case.replace("_surrogate", "")
  with pytest.raises(Exception, match=f"{reason} example"):
    _examples("test_aya_strict", {"inputs": 32, "targets": 32})


def test_user_file_errors_are_one_line(tmp_path):
  _write_parquet([{"inputs": "q", "targets": "a"}], tmp_path / "x.parquet")
  cases = [
      (FileNotFoundError, {"train": str(tmp_path / "nope*.jsonl")}, {}, "nope"),
      (ValueError, {"train": str(tmp_path / "x.parquet")}, {}, "language"),  # missing column
      (ValueError, {"train": str(tmp_path / "x.parquet")}, {"field_map": {"query": "q"}}, "query"),
      (ValueError, {"train": str(tmp_path / "x.parquet")}, {"file_format": "csv"}, "csv"),
  ]
  (tmp_path / "data.csv").write_text("a,b\n")
  cases.append((ValueError, {"train": str(tmp_path / "data.csv")}, {}, "data.csv"))
  for error, data, kwargs, needle in cases:
    with pytest.raises(error) as err:
      tasks.register_aya_task("test_aya_err", data, **kwargs)
    assert "\n" not in str(err.value) and needle in str(err.value)


def test_unknown_name_error_suggests_and_stays_short():
  with pytest.raises(ValueError) as err:
    cfg = DatasetConfig("udhr_lm_mx", {"targets": 8}, "train", 4)
    get_dataset(cfg, seqio.DecoderFeatureConverter)
  message = str(err.value)
  assert "\n" not in message and "udhr_lm_mix" in message and len(message) < 2000
