"""Vocabularies: train a SentencePiece one on the bundled UDHR, or load a checkpoint's.

The trained layout is T5's (pad=0, eos=1, unk=2, no bos) so models, feature converters and
sentinel ids (`<extra_id_0>` = vocab_size - 1, counting down) behave exactly as with T5/mT5
vocabularies. `get_vocabulary` also loads any `spiece.model` and, for a folder holding a
Hugging Face `tokenizer.json` and no SentencePiece model, an `hf_vocab.HFVocabulary`.
"""

from __future__ import annotations

import collections
import io
import os
import pathlib
from collections.abc import Sequence

import numpy as np
import seqio
import sentencepiece as spm

from polyglot_jax.data.hf_vocab import TOKENIZER_FILE, HFVocabulary
from polyglot_jax.data.mixing import temperature_probs
from polyglot_jax.data.udhr import BUNDLE_DIR, udhr_records

DEFAULT_VOCAB_PATH = BUNDLE_DIR / "udhr_spm_8k.model"
DEFAULT_EXTRA_IDS = 100  # T5/mT5 sentinel count.
SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model")  # T5/mT5/umT5, Llama 2


def sample_training_lines(temperature_alpha: float, sample_chars: int, seed: int) -> list[str]:
  """Paragraphs of the UDHR train split, sampled per language with temperature weights.

  Each language gets about `sample_chars * p(lang)` characters (at least one paragraph, so
  every script is seen), drawn by cycling through its shuffled paragraphs.
  """
  paragraphs: dict[str, list[str]] = collections.defaultdict(list)
  for record in udhr_records("train"):
    paragraphs[record["code"]].extend(record["text"].split("\n"))
  probs = temperature_probs(
      {code: sum(map(len, ps)) for code, ps in paragraphs.items()}, temperature_alpha
  )
  rng = np.random.default_rng(seed)
  lines: list[str] = []
  for code in sorted(paragraphs):
    pool = [paragraphs[code][i] for i in rng.permutation(len(paragraphs[code]))]
    budget, taken, chars = sample_chars * probs[code], 0, 0
    while taken == 0 or chars < budget:
      line = pool[taken % len(pool)]
      lines.append(line)
      taken, chars = taken + 1, chars + len(line)
  return [lines[i] for i in rng.permutation(len(lines))]


def train_vocabulary(
    output_prefix: str,
    vocab_size: int = 8000,
    temperature_alpha: float = 0.3,
    sample_chars: int = 2_000_000,
    seed: int = 0,
) -> str:
  """Trains a unigram SentencePiece model on the UDHR train split; returns the .model path.

  Byte fallback keeps every script encodable (unseen characters become UTF-8 byte pieces
  instead of <unk>); temperature sampling keeps low-resource scripts in the vocabulary.
  Deterministic given the arguments: seeded sampling, one trainer thread, no input subsampling.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sample_training_lines(temperature_alpha, sample_chars, seed)),
      model_writer=model,
      model_type="unigram",
      vocab_size=vocab_size,
      character_coverage=0.9995,
      byte_fallback=True,
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      max_sentence_length=1 << 16,
      num_threads=1,
      minloglevel=2,
  )
  path = pathlib.Path(output_prefix + ".model")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(model.getvalue())
  return os.fspath(path)


def get_vocabulary(
    path: str | os.PathLike[str] | None = None, extra_ids: int | None = None
) -> seqio.Vocabulary:
  """A seqio vocabulary for `path` (default: the shipped 8k UDHR model).

  `path` is a SentencePiece .model file, or a folder (a Hugging Face checkpoint, an imported
  MODEL_DIR) holding `spiece.model` / `tokenizer.model`, else `tokenizer.json` (an
  `hf_vocab.HFVocabulary`), or a tokenizer.json itself. SentencePiece vocabularies get
  `extra_ids` T5 sentinels (default 100: with the default model, `vocab_size` is 8100 and model
  configs round to 8192); HF tokenizers have none.
  """
  path = os.fspath(DEFAULT_VOCAB_PATH if path is None else path)
  if os.path.isdir(path):
    found = [os.path.join(path, n) for n in SENTENCEPIECE_FILES + (TOKENIZER_FILE,)
             if os.path.isfile(os.path.join(path, n))]
    if not found:
      raise FileNotFoundError(f"no {', '.join(SENTENCEPIECE_FILES)} or {TOKENIZER_FILE} in "
                              f"{path!r}: point at a checkpoint folder that has its tokenizer")
    path = found[0]
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"no SentencePiece model at {path!r}: pass the path of a local .model file "
        "(e.g. mT5's spiece.model), a folder with a tokenizer, or None for the bundled UDHR "
        "vocabulary"
    )
  if os.path.basename(path) == TOKENIZER_FILE:
    if extra_ids:
      raise ValueError(f"extra_ids={extra_ids}: a Hugging Face tokenizer ({path}) has no T5 "
                       "sentinels to add; use extra_ids=0 (span corruption needs SentencePiece)")
    return HFVocabulary(path)
  return seqio.SentencePieceVocabulary(
      path, extra_ids=DEFAULT_EXTRA_IDS if extra_ids is None else extra_ids)


def check_vocabulary(vocabulary: seqio.Vocabulary, vocab_size: int,
                     eos_token_ids: Sequence[int], bos_token_id: int) -> None:
  """One-line ValueError when `vocabulary` does not fit a model (call it at run start).

  The model's embedding must have a row for every id (it may have more: checkpoints pad it),
  the EOS the data ends with must be one the model's decoding stops at, and a vocabulary with a
  BOS must match the model's first decoder input (`TransformerConfig.bos_token_id`).
  """
  if vocabulary.vocab_size > vocab_size:
    raise ValueError(
        f"the vocabulary has {vocabulary.vocab_size} ids but the model's vocab_size is "
        f"{vocab_size}: use the tokenizer that came with the checkpoint")
  if vocabulary.eos_id not in tuple(eos_token_ids):
    raise ValueError(
        f"the vocabulary's EOS id {vocabulary.eos_id} is not one of the model's eos_token_ids "
        f"{tuple(eos_token_ids)}: decoding would not stop where the data ends; set "
        "TransformerConfig.eos_token_ids or use the checkpoint's tokenizer")
  bos = vocabulary.bos_id
  if bos is not None and bos >= 0 and bos != bos_token_id:
    raise ValueError(
        f"the vocabulary's BOS id {bos} is not the model's bos_token_id {bos_token_id}: set "
        f"TransformerConfig.bos_token_id = {bos} (decoder inputs start with it)")
