"""SentencePiece vocabularies: train one on the bundled UDHR, or load any `spiece.model`.

The layout is T5's (pad=0, eos=1, unk=2, no bos) so models, feature converters and sentinel ids
(`<extra_id_0>` = vocab_size - 1, counting down) behave exactly as with T5/mT5 vocabularies.
"""

from __future__ import annotations

import collections
import io
import os
import pathlib

import numpy as np
import seqio
import sentencepiece as spm

from polyglot_jax.data.mixing import temperature_probs
from polyglot_jax.data.udhr import BUNDLE_DIR, udhr_records

DEFAULT_VOCAB_PATH = BUNDLE_DIR / "udhr_spm_8k.model"
DEFAULT_EXTRA_IDS = 100  # T5/mT5 sentinel count.


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
    path: str | os.PathLike[str] | None = None, extra_ids: int = DEFAULT_EXTRA_IDS
) -> seqio.SentencePieceVocabulary:
  """A seqio vocabulary for `path` (default: the shipped 8k UDHR model) with T5 sentinels.

  With the default model and 100 extra ids, `vocab_size` is 8100 (model configs round to 8192).
  """
  path = os.fspath(DEFAULT_VOCAB_PATH if path is None else path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"no SentencePiece model at {path!r}: pass the path of a local .model file "
        "(e.g. mT5's spiece.model) or None for the bundled UDHR vocabulary"
    )
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
