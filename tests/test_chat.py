"""Chat format: the checkpoint's chat template, ids == transformers, loss on assistant turns only.

Tokenizer folders come from test_hf_vocab.py (trained on UDHR text, saved by transformers, each
with a chat template written like its checkpoint family's). Transformers' `apply_chat_template`
is the reference for the ids, and its `return_assistant_tokens_mask` (the templates mark the
assistant text with `{% generation %}`) for the loss weights.
"""

from __future__ import annotations

import json
import shutil

import gin
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import seqio
import transformers
from test_hf_vocab import folders  # noqa: F401  (the module-scoped tokenizer folders fixture)

from polyglot_jax.commands import gin_setup
from polyglot_jax.data import chat, hf_vocab, quality, tasks, vocab
from polyglot_jax.data.pipeline import DatasetConfig, get_dataset, iterate_batches
from polyglot_jax.data.udhr import udhr_records

TEMPLATES = ("cohere", "llama3", "llama2")


def _paragraphs(code: str) -> list[str]:
  return [p for r in udhr_records("validation") if r["code"] == code for p in r["text"].split("\n")]


def conversations() -> list[list[dict[str, str]]]:
  """Multi-turn conversations in several scripts; a system turn in every other one."""
  out = []
  for i, (user, reply) in enumerate([("eng", "rus"), ("arb", "hin"), ("cmn_hans", "amh"),
                                     ("kor", "ell_monotonic"), ("heb", "vie")]):
    asks, answers = _paragraphs(user), _paragraphs(reply)
    turns = [{"role": "user", "content": asks[0]}, {"role": "assistant", "content": answers[0]},
             {"role": "user", "content": asks[1]}, {"role": "assistant", "content": answers[1]}]
    if i % 2:
      turns.insert(0, {"role": "system", "content": "Answer in the language asked for. 42."})
    out.append(turns)
  return out


@pytest.fixture(scope="module")
def vocabularies(folders):  # noqa: F811
  return {name: hf_vocab.HFVocabulary(folders[name]) for name in TEMPLATES}


@pytest.mark.parametrize("name", TEMPLATES)
def test_ids_and_loss_weights_equal_transformers(folders, vocabularies, name):  # noqa: F811
  ours = vocabularies[name]
  theirs = transformers.AutoTokenizer.from_pretrained(folders[name])
  for messages in conversations():
    for prompt in (False, True):
      ids, weights = chat.encode_chat(ours, messages, add_generation_prompt=prompt)
      reference = theirs.apply_chat_template(
          messages, tokenize=True, add_generation_prompt=prompt, return_dict=True,
          return_assistant_tokens_mask=True)
      assert ids == reference["input_ids"]
      assert weights == reference["assistant_masks"]
      assert chat.render(ours.chat_template, messages, ours.special_tokens, prompt) == (
          theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt))
    # Only the assistant turns are weighted, all of their text.
    weighted = ours.decode([i for i, w in zip(ids, weights) if w and i != ours.eos_id])
    assert all(m["content"] in weighted for m in messages if m["role"] == "assistant")
    assert not any(m["content"] in weighted for m in messages if m["role"] != "assistant")


def _write(path, records) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
  return str(path)


def test_chat_task_packs_conversations_with_assistant_only_weights(vocabularies, tmp_path):
  tokenizer = vocabularies["cohere"]
  # Token id 0 (here <PAD>) is a token like any other: seqio's own packing would cut it off.
  zeros = [{"role": "user", "content": "Echo <PAD>"},
           {"role": "assistant", "content": "<PAD> x <PAD>"}]
  dialogs = conversations() + [zeros]
  records = [{"messages": m, "language": "mul"} for m in dialogs]
  records.append({"inputs": "Say hi.", "targets": "Hi!", "language": "eng"})  # an Aya pair
  task = tasks.register_chat_task("chat_test", {"train": _write(tmp_path / "c.jsonl", records)},
                                  tokenizer)
  assert task.output_features["targets"].add_eos is False
  dialogs.append([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}])
  expected = [chat.encode_chat(tokenizer, m) for m in dialogs]
  assert sum(ids.count(0) for ids, _ in expected) == 3
  expected = {tuple(ids[1:]): weights[1:] for ids, weights in expected}  # BOS left to the converter
  assert all(ids[0] != tokenizer.bos_id for ids in expected)
  length = max(map(len, expected)) + 10

  def converter(pack: bool) -> chat.ChatFeatureConverter:
    return chat.ChatFeatureConverter(pack=pack, bos_id=tokenizer.bos_id)

  ds = get_dataset(DatasetConfig("chat_test", {"targets": length}, "train", 2, shuffle=False,
                                 num_data_shards=1), converter, num_epochs=1)
  seen = 0
  for batch in iterate_batches(ds):
    for row in range(2):
      segments = batch["decoder_segment_ids"][row]
      for segment in range(1, segments.max() + 1):
        where = segments == segment
        targets = tuple(batch["decoder_target_tokens"][row][where])
        assert batch["decoder_loss_weights"][row][where].tolist() == expected[targets]
        inputs = batch["decoder_input_tokens"][row][where].tolist()
        assert inputs == [tokenizer.bos_id, *targets[:-1]]
        assert batch["decoder_positions"][row][where].tolist() == list(range(len(targets)))
        seen += 1
      assert not batch["decoder_loss_weights"][row][segments == 0].any()
  assert seen == len(expected) and any(batch["decoder_segment_ids"].max(axis=1) > 1)
  # Unpacked (evaluation, scoring): the same weights, each row one segment.
  plain = converter(False)(task.get_dataset({"targets": length}, "train", shuffle=False),
                           {"targets": length})
  for row in plain.as_numpy_iterator():
    real = row["decoder_segment_ids"] == 1
    assert row["decoder_loss_weights"][real].tolist() == expected[
        tuple(row["decoder_target_tokens"][real])]
  # seqio's own converter ignores the weights: loss on every token (why sft.gin binds ours).
  row = next(seqio.DecoderFeatureConverter(pack=False)(
      task.get_dataset({"targets": length}, "train", shuffle=False),
      {"targets": length}).as_numpy_iterator())
  assert row["decoder_loss_weights"].sum() == (row["decoder_target_tokens"] != 0).sum()


def test_prompt_tasks_feed_what_transformers_generates_from(  # noqa: F811
    folders, vocabularies, tmp_path):
  tokenizer = vocabularies["llama3"]
  theirs = transformers.AutoTokenizer.from_pretrained(folders["llama3"])
  dialogs = conversations()
  path = _write(tmp_path / "p.jsonl", [{"messages": m, "language": "mul"} for m in dialogs])
  task = tasks.register_chat_task("chat_prompts", {"validation": path}, tokenizer, prompts=True)
  lengths = {"inputs": 1024, "targets": 512}
  batch = next(iterate_batches(get_dataset(
      DatasetConfig("chat_prompts", lengths, "validation", len(dialogs), shuffle=False,
                    pack=False),
      lambda pack: chat.ChatFeatureConverter(pack=pack, bos_id=tokenizer.bos_id))))
  assert set(task.output_features) == {"inputs", "targets"}
  for row, messages in enumerate(dialogs):
    prompt = theirs.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                        return_dict=True)["input_ids"]
    # What `infer` decodes from (BOS, prompt: where decoder_causal_attention is 1) is exactly
    # what one gives `generate`; the target is the reply and its end of turn.
    causal = batch["decoder_causal_attention"][row] == 1
    assert batch["decoder_input_tokens"][row][causal].tolist() == prompt
    reply = batch["decoder_target_tokens"][row][batch["decoder_loss_weights"][row] == 1]
    assert tokenizer.decode(reply.tolist()) == messages[-1]["content"]
    assert reply[-1] == tokenizer.eos_id


def test_bad_records_are_dropped_and_counted_or_refused(vocabularies, tmp_path):
  tokenizer = vocabularies["cohere"]
  good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
          "language": "eng"}
  records = [
      good,
      {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}],
       "language": "eng"},  # unknown role
      {"messages": [{"role": "user", "content": "Hi"}], "language": "eng"},  # no assistant turn
      {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}],
       "language": "eng"},  # empty reply
      {"messages": "not a list", "language": "eng"},
      {"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "B"},
                    {"role": "assistant", "content": "C"}], "language": "eng"},  # template refuses
  ]
  path = _write(tmp_path / "bad.jsonl", records)
  quality.reset_dropped()
  task = tasks.register_chat_task("chat_bad", {"train": path}, tokenizer)
  examples = list(task.get_dataset({"targets": 64}, "train", shuffle=False).as_numpy_iterator())
  assert len(examples) == 1
  dropped = quality.dropped_metrics()
  assert (dropped["data/dropped_malformed"], dropped["data/dropped_empty"]) == (4, 1)
  for bad, message in [(records[1], r"messages\[1\] has role 'bot', not one of system, user"),
                       (records[2], "no assistant turn"),
                       (records[4], "messages is not a list of turns")]:
    one = _write(tmp_path / "s.jsonl", [bad])
    strict = tasks.register_chat_task("chat_strict", {"train": one}, tokenizer, strict=True)
    with pytest.raises(quality.BadInputError, match=message) as error:
      list(strict.source.examples([one], "train"))
    assert len(str(error.value).splitlines()) == 1


def test_templates_that_cannot_serve_are_one_line_errors(folders, tmp_path):  # noqa: F811
  path = _write(tmp_path / "c.jsonl", [{"messages": list(chat.PROBE), "language": "eng"}])
  for template, message in [
      ("{% for m in messages %}{{ m['content'] }", "does not compile"),
      ("{{ raise_exception('no chat here') }}", "fails to render: no chat here"),
      ("{{ messages[-1]['content'] }}", "does not render conversations turn by turn")]:
    tokenizer = hf_vocab.HFVocabulary(folders["cohere"], chat_template=template)
    with pytest.raises(ValueError, match=message) as error:
      tasks.register_chat_task("chat_broken", {"train": path}, tokenizer)
    assert len(str(error.value).splitlines()) == 1
  bare = tmp_path / "no_template"
  bare.mkdir()
  shutil.copy(f"{folders['cohere']}/tokenizer.json", bare)
  (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|END_OF_TURN_TOKEN|>"}))
  for vocabulary, message in [(hf_vocab.HFVocabulary(bare), "has no chat template"),
                              (vocab.get_vocabulary(), "not a SentencePieceVocabulary")]:
    with pytest.raises(ValueError, match=message) as error:
      tasks.register_chat_task("chat_broken", {"train": path}, vocabulary)
    assert len(str(error.value).splitlines()) == 1
  pq.write_table(pa.table({"text": ["a"]}), tmp_path / "x.parquet")
  with pytest.raises(ValueError, match=r"x.parquet has no column \['messages', 'language'\]"):
    tasks.register_chat_task("chat_broken", {"train": str(tmp_path / "x.parquet")},
                             hf_vocab.HFVocabulary(folders["cohere"]))


def test_sft_gin_registers_the_chat_task_and_the_converter(folders, tmp_path):  # noqa: F811
  path = _write(tmp_path / "c.jsonl", [{"messages": m, "language": "mul"} for m in conversations()])
  gin.clear_config()
  try:
    gin_setup.parse(["models/llama/tiny.gin", "runs/sft.gin"], [
        "TRAIN_STEPS=1", "MODEL_DIR='/tmp/unused'", "INITIAL_CHECKPOINT_PATH='/tmp/unused'",
        f"CHAT_DATA={{'train': '{path}', 'validation': '{path}'}}",
        f"VOCABULARY='{folders['cohere']}'", "TransformerConfig.bos_token_id=5",
        "TransformerConfig.eos_token_ids=(8,)", "TransformerConfig.vocab_size=1280"])
    cfg = gin.query_parameter("train.train_dataset_cfg").scoped_configurable_fn()
    model = gin.query_parameter("train.model").scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert cfg.mixture_or_task_name == "chat_sft" and cfg.task_feature_lengths == {"targets": 2048}
  converter = model.FEATURE_CONVERTER_CLS(pack=True)
  assert isinstance(converter, chat.ChatFeatureConverter) and converter.bos_id == 5
  task = seqio.get_mixture_or_task("chat_sft")
  assert task.output_features["targets"].vocabulary == hf_vocab.HFVocabulary(folders["cohere"])
