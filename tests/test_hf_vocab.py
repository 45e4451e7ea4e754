"""HF tokenizers as seqio vocabularies: ids equal `transformers.AutoTokenizer` in many scripts.

The tokenizers are trained here with `tokenizers` on UDHR text and saved by `transformers` as
the checkpoints ship them: a Cohere-style byte-level BPE (NFC, single digits, byte-level,
`CohereTokenizer`), the same tokens as a Llama 3-style folder (`TokenizersBackend`), and a
Llama 2-style SentencePiece BPE with byte fallback (`LlamaTokenizer`) trained on a few scripts
only, so that the others go through UTF-8 byte tokens. test_chat.py reuses these folders.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import seqio
import tensorflow as tf
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers

from polyglot_jax import cli
from polyglot_jax.data import aya, hf_vocab, mixing, scoring, tasks, vocab
from polyglot_jax.data.pipeline import DatasetConfig, get_dataset, iterate_batches
from polyglot_jax.data.udhr import udhr_records

# One UDHR variety per script for the parity checks (validation split: unseen by the training).
SCRIPT_CODES = {"Latn": "vie", "Cyrl": "rus", "Arab": "arb", "Deva": "hin", "Hani": "cmn_hans",
                "Ethi": "amh", "Hang": "kor", "Grek": "ell_monotonic", "Hebr": "heb",
                "Thai": "tha", "Tibt": "bod", "Geor": "kat"}
TRAIN_CODES = ("eng", "spa", "vie", "rus", "arb", "hin", "cmn_hans", "amh", "kor", "ell_monotonic")
EXTRA_TEXTS = ("Article 1948: 12,345 people — 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓ 😀", "  leading and trailing  ",
               "e\u0301 (decomposed) and é", "tabs\tand\nnewlines\n\n")
COHERE_SPECIALS = ["<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>",
                   "<EOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                   "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]

# Chat templates written like the checkpoints' own; `{% generation %}` marks what transformers'
# `return_assistant_tokens_mask` reports, an independent check of our loss weights.
COHERE_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% if system_message != false %}"
    "{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + system_message + '<|END_OF_TURN_TOKEN|>' }}"
    "{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + message['content'] | trim + "
    "'<|END_OF_TURN_TOKEN|>' }}{% elif message['role'] == 'assistant' %}"
    "{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% generation %}"
    "{{ message['content'] | trim + '<|END_OF_TURN_TOKEN|>' }}{% endgeneration %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}"
    "{% endif %}")
LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
LLAMA2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + "
    "' [/INST]' }}{% elif message['role'] == 'assistant' %}{% generation %}"
    "{{ ' ' + message['content'] + ' ' + eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}{% endfor %}")


def _training_texts() -> list[str]:
  return [r["text"] for r in udhr_records("train") if r["code"] in TRAIN_CODES]


def train_byte_level() -> Tokenizer:
  """A Cohere-style byte-level BPE (NFC, single digits, byte-level) of 1200 ids."""
  tokenizer = Tokenizer(models.BPE())
  tokenizer.normalizer = normalizers.NFC()
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)])
  tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True)
  trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=COHERE_SPECIALS + LLAMA3_SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(_training_texts(), trainer)
  return tokenizer


def train_byte_fallback() -> Tokenizer:
  """A Llama 2-style SentencePiece BPE with byte fallback, trained on Latin and Cyrillic only."""
  texts = [r["text"] for r in udhr_records("train") if r["code"] in ("eng", "spa", "rus")]
  trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>"],
                                limit_alphabet=120, show_progress=False)
  words = Tokenizer(models.BPE(unk_token="<unk>"))
  words.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
  words.train_from_iterator(texts, trainer)
  trained = json.loads(words.to_str())["model"]
  vocab_ids = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
  for token in sorted(trained["vocab"], key=trained["vocab"].get):
    vocab_ids.setdefault(token, len(vocab_ids))
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
  tokenizer = Tokenizer(models.BPE(vocab=vocab_ids, merges=merges, unk_token="<unk>",
                                   byte_fallback=True, fuse_unk=True))
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                     prepend_scheme="first", split=False)
  tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
  return tokenizer


def save_folder(tokenizer: Tokenizer, path: str, tokenizer_class: str, bos: str,
                chat_template: str, **special: str) -> str:
  """Saves `tokenizer` as transformers does (BOS added by the post-processor, as checkpoints)."""
  tokenizer = Tokenizer.from_str(tokenizer.to_str())
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
      special_tokens=[(bos, tokenizer.token_to_id(bos))])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos,
                                              chat_template=chat_template, **special)
  fast.save_pretrained(path)
  config_path = os.path.join(path, "tokenizer_config.json")
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump({**config, "tokenizer_class": tokenizer_class}, f)
  return path


def build_folders(root: str) -> dict[str, str]:
  """The three tokenizer folders: name -> path."""
  byte_level, byte_fallback = train_byte_level(), train_byte_fallback()
  return {
      "cohere": save_folder(byte_level, os.path.join(root, "cohere"), "CohereTokenizer",
                            "<BOS_TOKEN>", COHERE_TEMPLATE, eos_token="<|END_OF_TURN_TOKEN|>",
                            pad_token="<PAD>", unk_token="<UNK>"),
      "llama3": save_folder(byte_level, os.path.join(root, "llama3"), "TokenizersBackend",
                            "<|begin_of_text|>", LLAMA3_TEMPLATE, eos_token="<|eot_id|>"),
      "llama2": save_folder(byte_fallback, os.path.join(root, "llama2"), "LlamaTokenizer", "<s>",
                            LLAMA2_TEMPLATE, eos_token="</s>", unk_token="<unk>"),
  }


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
  return build_folders(str(tmp_path_factory.mktemp("tokenizers")))


def _texts() -> dict[str, list[str]]:
  """Validation paragraphs per script (unseen in training), plus awkward strings."""
  texts: dict[str, list[str]] = {}
  for record in udhr_records("validation"):
    for script, code in SCRIPT_CODES.items():
      if record["code"] == code:
        texts.setdefault(script, []).extend(record["text"].split("\n"))
  texts["misc"] = list(EXTRA_TEXTS)
  return texts


@pytest.mark.parametrize("name", ["cohere", "llama3", "llama2"])
def test_ids_equal_auto_tokenizer_in_many_scripts(folders, name):
  ours = hf_vocab.HFVocabulary(folders[name])
  theirs = transformers.AutoTokenizer.from_pretrained(folders[name])
  texts = _texts()
  assert len(texts) >= 13
  byte_tokens = 0
  for script, paragraphs in texts.items():
    for text in paragraphs:
      ids = list(ours.encode(text))
      assert ids == theirs(text, add_special_tokens=False)["input_ids"], (name, script, text)
      assert theirs(text)["input_ids"] == [ours.bos_id] + ids  # transformers adds the BOS
      if name == "llama2":
        byte_tokens += sum(3 <= i < 3 + 256 for i in ids)
      if script != "misc":
        assert ours.decode(ids) == text
  if name == "llama2":  # scripts it was not trained on go through byte fallback
    assert byte_tokens > 10_000
  special = theirs.convert_tokens_to_ids
  assert (ours.eos_id, ours.bos_id, ours.vocab_size) == (
      special(theirs.eos_token), special(theirs.bos_token), len(theirs))
  assert ours.pad_id == (special(theirs.pad_token) if theirs.pad_token else 0)
  assert ours.unk_id == (special(theirs.unk_token) if theirs.unk_token else None)
  assert ours.chat_template == theirs.chat_template


def test_tensorflow_ops_equal_python(folders):
  ours = hf_vocab.HFVocabulary(folders["cohere"])
  texts = [t for paragraphs in _texts().values() for t in paragraphs[:2]]
  ids = [list(ours.encode(t)) for t in texts]
  assert [ours.encode_tf(tf.constant(t)).numpy().tolist() for t in texts[:5]] == ids[:5]
  assert ours.encode_tf(tf.constant(texts)).to_list() == ids
  ds = tf.data.Dataset.from_tensor_slices(texts).map(ours.encode_tf, num_parallel_calls=4,
                                                      deterministic=True)
  assert [x.tolist() for x in ds.as_numpy_iterator()] == ids
  # Decoding stops at the EOS: text after it never shows.
  word = list(ours.encode(" xyz"))
  tails = [[ours.eos_id, *word], word]
  width = max(map(len, ids)) + len(word) + 1
  rows = [row + tails[i % 2] + [0] * (width - len(row) - len(tails[i % 2]))
          for i, row in enumerate(ids)]
  decoded = [t.decode() for t in ours.decode_tf(tf.constant(rows)).numpy()]
  assert decoded == [ours.decode(row) for row in rows]
  assert decoded[0] == texts[0] and decoded[1] == texts[1] + " xyz"
  assert ours.decode_tf(tf.constant(rows[0])).numpy().decode() == texts[0]


def test_special_ids_come_from_the_folder(folders, tmp_path):
  cohere = hf_vocab.HFVocabulary(folders["cohere"])
  tokenizer = cohere.tokenizer
  assert cohere.special_tokens == {"bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>",
                                   "pad_token": "<PAD>", "unk_token": "<UNK>"}
  assert (cohere.bos_id, cohere.eos_id, cohere.pad_id, cohere.unk_id) == tuple(
      tokenizer.token_to_id(t) for t in ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<PAD>", "<UNK>"))
  # Without tokenizer_config.json: the ids of config.json (the first of a list of EOS ids).
  bare = tmp_path / "bare"
  bare.mkdir()
  (bare / "tokenizer.json").write_text(tokenizer.to_str())
  (bare / "config.json").write_text(json.dumps({"eos_token_id": [9, 8], "bos_token_id": 5}))
  from_config = hf_vocab.HFVocabulary(bare)
  assert (from_config.eos_id, from_config.bos_id, from_config.pad_id) == (9, 5, 0)
  assert from_config.special_tokens["eos_token"] == tokenizer.id_to_token(9)
  assert from_config.chat_template is None
  (bare / "config.json").write_text("{}")
  with pytest.raises(ValueError, match="no EOS token"):
    hf_vocab.HFVocabulary(bare)
  (bare / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
  with pytest.raises(ValueError, match="eos_token '<nope>' is not a token of tokenizer.json"):
    hf_vocab.HFVocabulary(bare)
  (bare / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="is not a tokenizers file"):
    hf_vocab.HFVocabulary(bare)


def test_get_vocabulary_equality_and_model_checks(folders, tmp_path):
  folder = folders["cohere"]
  loaded = vocab.get_vocabulary(folder)
  assert isinstance(loaded, hf_vocab.HFVocabulary) and loaded.extra_ids == 0
  assert loaded == vocab.get_vocabulary(os.path.join(folder, "tokenizer.json"))
  assert hash(loaded) == hash(hf_vocab.HFVocabulary(folder))
  assert loaded != hf_vocab.HFVocabulary(folder, chat_template="{{ messages }}")
  assert loaded != hf_vocab.HFVocabulary(folders["llama3"])
  with pytest.raises(ValueError, match="has no T5 sentinels"):
    vocab.get_vocabulary(folder, extra_ids=100)
  # A folder with a SentencePiece model as well loads that (as today).
  both = tmp_path / "both"
  both.mkdir()
  (both / "tokenizer.json").write_text(loaded.tokenizer.to_str())
  (both / "spiece.model").write_bytes(vocab.DEFAULT_VOCAB_PATH.read_bytes())
  assert isinstance(vocab.get_vocabulary(both), seqio.SentencePieceVocabulary)
  with pytest.raises(FileNotFoundError, match="no spiece.model, tokenizer.model or tokenizer.json"):
    vocab.get_vocabulary(tmp_path)

  vocab.check_vocabulary(loaded, 1280, (loaded.eos_id, 3), loaded.bos_id)
  for args, message in [
      ((1000, (loaded.eos_id,), loaded.bos_id), "has 1200 ids but the model's vocab_size is 1000"),
      ((1280, (3,), loaded.bos_id), f"EOS id {loaded.eos_id} is not one of the model's"),
      ((1280, (loaded.eos_id,), 0), f"BOS id {loaded.bos_id} is not the model's bos_token_id 0")]:
    with pytest.raises(ValueError, match=message) as error:
      vocab.check_vocabulary(loaded, *args)
    assert len(str(error.value).splitlines()) == 1


def test_tasks_mixtures_packing_and_scoring_with_an_hf_vocabulary(folders, tmp_path):
  ours = hf_vocab.HFVocabulary(folders["llama3"])
  theirs = transformers.AutoTokenizer.from_pretrained(folders["llama3"])
  codes = ("rus", "hin", "amh")
  records = [{"inputs": f"{r['code']}:", "targets": r["text"][:80],
              "language": r["code"]} for r in udhr_records("validation") if r["code"] in codes]
  aya.write_jsonl(records, tmp_path / "pairs.jsonl")
  for code in codes:
    tasks.register_aya_task(f"hf_pairs.{code}", {"train": str(tmp_path / "pairs.jsonl")},
                            only_language=code, vocabulary=ours)
  mixing.register_language_mixture("hf_pairs_mix", {f"hf_pairs.{c}": c for c in codes},
                                   sizes={f"hf_pairs.{c}": 5 for c in codes})

  def converter(pack: bool) -> seqio.FeatureConverter:
    return seqio.PrefixLMFeatureConverter(pack=pack, bos_id=ours.bos_id)

  def expected(record: dict[str, str]) -> list[int]:  # inputs EOS targets EOS, as transformers
    encode = lambda text: theirs(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(record["inputs"]) + [ours.eos_id] + encode(record["targets"]) + [ours.eos_id]

  lengths = {"inputs": 8, "targets": 160}
  every = {tuple(expected(r)) for r in records}
  ds = get_dataset(DatasetConfig("hf_pairs_mix", lengths, "train", 2, shuffle=False), converter)
  batch = next(iterate_batches(ds))
  assert batch["decoder_segment_ids"].max() > 1
  for row in range(2):
    segments = batch["decoder_segment_ids"][row]
    for segment in range(1, segments.max() + 1):
      where = segments == segment
      targets = batch["decoder_target_tokens"][row][where]
      # Each packed segment is one record, and its decoder inputs start with the BOS.
      assert tuple(targets) in every
      assert batch["decoder_input_tokens"][row][where].tolist() == [ours.bos_id, *targets[:-1]]
  # `data score`'s batches of a task: unpacked, loss weights on the targets and their EOS.
  batches = list(scoring.scoring_batches(seqio.get_mixture_or_task("hf_pairs.rus"), "train",
                                         lengths, converter, 4))
  assert sum(int(b["decoder_loss_weights"].sum()) for b in batches) == sum(
      len(theirs(r["targets"], add_special_tokens=False)["input_ids"]) + 1
      for r in records if r["language"] == "rus")


def test_convert_from_hf_wires_up_the_tokenizer_and_refuses_one_that_does_not_fit(
    folders, tmp_path, capsys):
  tokenizer = hf_vocab.HFVocabulary(folders["cohere"])
  ids = dict(eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id, pad_token_id=0)
  for name, vocab_size in (("fits", 1280), ("too_small", 1100)):
    config = transformers.CohereConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, **ids)
    transformers.CohereForCausalLM(config).save_pretrained(tmp_path / name)
    for file in os.listdir(folders["cohere"]):
      shutil.copy(os.path.join(folders["cohere"], file), tmp_path / name)
  assert cli.main(["convert", f"--from_hf={tmp_path / 'fits'}",
                   f"--model_dir={tmp_path / 'ours'}"]) == 0, capsys.readouterr().err
  assert vocab.get_vocabulary(tmp_path / "ours") == tokenizer  # chat template included
  model_gin = (tmp_path / "ours" / "model.gin").read_text()
  assert f"eos_token_ids = ({tokenizer.eos_id},)" in model_gin
  assert f"bos_token_id = {tokenizer.bos_id}" in model_gin
  capsys.readouterr()
  assert cli.main(["convert", f"--from_hf={tmp_path / 'too_small'}",
                   f"--model_dir={tmp_path / 'refused'}"]) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and "has 1200 ids but the model's vocab_size is 1100" in err
  assert not (tmp_path / "refused").exists()  # nothing written half-way
