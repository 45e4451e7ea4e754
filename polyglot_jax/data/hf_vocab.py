"""Hugging Face tokenizers (a checkpoint's `tokenizer.json`) as seqio vocabularies.

`HFVocabulary(folder)` reads the folder's `tokenizer.json` with the `tokenizers` library (BPE,
byte-level BPE, BPE with byte fallback, Unigram, WordPiece) and its special tokens: `bos_token`,
`eos_token`, `pad_token` and `unk_token` of tokenizer_config.json, else of
special_tokens_map.json, else the `*_token_id`s of config.json (the first EOS when it lists
several). Encoding never adds special tokens (seqio's contract: the feature adds EOS, the feature
converter the BOS), so ids equal `AutoTokenizer(text, add_special_tokens=False)`; a special
token written in the text (a chat template's `<|END_OF_TURN_TOKEN|>`) is one id, as in
transformers. Decoding stops at EOS and leaves special tokens out (`skip_special_tokens`). The
TensorFlow ops run the same tokenizer through `tf.numpy_function` (deterministic, for seqio
preprocessors). The chat template (chat_template.jinja, else tokenizer_config.json's
`chat_template`, as transformers loads it) is kept for `chat`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf
import tokenizers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
MODEL_CONFIG = "config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# transformers' named special tokens (its `special_tokens_map`), which chat templates can read.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
  if isinstance(value, Mapping):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _chat_template(folder: str, tokenizer_config: Mapping[str, Any]) -> str | None:
  """The folder's default chat template: chat_template.jinja first, as transformers reads it."""
  path = os.path.join(folder, CHAT_TEMPLATE_FILE)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      return f.read()
  template = tokenizer_config.get("chat_template")
  if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
    named = {t["name"]: t["template"] for t in template}
    if "default" not in named:
      raise ValueError(f"{folder}: {TOKENIZER_CONFIG} has chat templates {sorted(named)} but none "
                       "named 'default'; pass chat_template= explicitly")
    return named["default"]
  return template


class HFVocabulary(seqio.Vocabulary):
  """A seqio vocabulary over a Hugging Face `tokenizer.json` (see the module docstring).

  `vocab_size` counts the tokenizer's ids, added tokens included (a model's embedding may have
  more rows: `vocab.check_vocabulary`). There are no extra ids: T5 sentinels are not part of
  HF tokenizers.
  """

  def __init__(self, path: str | os.PathLike[str], chat_template: str | None = None) -> None:
    """`path`: a folder holding tokenizer.json, or the file itself; `chat_template` replaces the
    folder's own template."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    tokenizer_file = os.path.join(folder, TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_file):
      raise FileNotFoundError(f"no {TOKENIZER_FILE} in {folder!r}: point at a Hugging Face "
                              "tokenizer folder (tokenizer.json, tokenizer_config.json)")
    with open(tokenizer_file, "rb") as f:
      raw = f.read()
    try:
      self._tokenizer = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as error:  # pylint: disable=broad-except  (the library raises plain Exception)
      raise ValueError(f"{tokenizer_file} is not a tokenizers file: {error}") from None
    self._folder = folder
    self._fingerprint = hashlib.sha256(raw).hexdigest()
    tokenizer_config = _read_json(os.path.join(folder, TOKENIZER_CONFIG))
    special_map = _read_json(os.path.join(folder, SPECIAL_TOKENS_MAP))
    model_config = _read_json(os.path.join(folder, MODEL_CONFIG))
    self._tokens: dict[str, str] = {}
    self._ids: dict[str, int | None] = {}
    for name in NAMED_TOKENS:
      text = _token_text(tokenizer_config.get(name)) or _token_text(special_map.get(name))
      token_id = None
      if text is not None:
        token_id = self._tokenizer.token_to_id(text)
        if token_id is None:
          raise ValueError(f"{folder}: {name} {text!r} is not a token of {TOKENIZER_FILE}; fix "
                           f"{TOKENIZER_CONFIG} or use the tokenizer that came with it")
      else:
        configured = model_config.get(f"{name}_id")
        token_id = configured[0] if isinstance(configured, list) and configured else configured
        if isinstance(token_id, int):
          text = self._tokenizer.id_to_token(token_id)
      if text is not None and token_id is not None:
        self._tokens[name], self._ids[name] = text, token_id
    if "eos_token" not in self._ids:
      raise ValueError(f"{folder}: no EOS token (no eos_token in {TOKENIZER_CONFIG} or "
                       f"{SPECIAL_TOKENS_MAP}, no eos_token_id in {MODEL_CONFIG}); add one")
    self._chat_template = chat_template or _chat_template(folder, tokenizer_config)
    super().__init__(extra_ids=0)

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    """The `tokenizers.Tokenizer` of tokenizer.json."""
    return self._tokenizer

  @property
  def folder(self) -> str:
    return self._folder

  @property
  def chat_template(self) -> str | None:
    """The Jinja chat template (see `chat`), or None when the folder has none."""
    return self._chat_template

  @property
  def special_tokens(self) -> dict[str, str]:
    """{"bos_token": "<s>", "eos_token": ...}: the named special tokens a chat template reads."""
    return dict(self._tokens)

  @property
  def bos_id(self) -> int | None:
    return self._ids.get("bos_token")

  @property
  def eos_id(self) -> int:
    return self._ids["eos_token"]

  @property
  def pad_id(self) -> int:
    """The tokenizer's pad id; seqio's 0 when it has none (seqio pads batches with 0 anyway)."""
    pad = self._ids.get("pad_token")
    return seqio.vocabularies.PAD_ID if pad is None else pad

  @property
  def unk_id(self) -> int | None:
    return self._ids.get("unk_token")

  @property
  def _base_vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def _encode(self, s: str) -> Sequence[int]:
    return self._tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids: Iterable[int]) -> str:
    """Text of the ids before the first EOS, special tokens left out."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self._tokenizer.decode(ids, skip_special_tokens=True)

  def _encode_numpy(self, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n] UTF-8 strings -> (concatenated int32 ids, [n] int64 lengths)."""
    encodings = self._tokenizer.encode_batch([t.decode("utf-8") for t in texts],
                                             add_special_tokens=False)
    ids = [e.ids for e in encodings]
    values = np.fromiter((i for row in ids for i in row), np.int32, sum(map(len, ids)))
    return values, np.array([len(row) for row in ids], np.int64)

  def _decode_numpy(self, ids: np.ndarray) -> np.ndarray:
    """[n, length] ids -> [n] UTF-8 strings."""
    return np.array([self._decode(row).encode("utf-8") for row in ids], dtype=object)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
    """A string scalar -> [ids] int32; a [n] string vector -> a [n, None] ragged tensor."""
    s = tf.convert_to_tensor(s, tf.string)
    if s.shape.rank not in (0, 1):
      raise ValueError(f"HFVocabulary.encode_tf takes a string scalar or vector, got {s.shape}")
    values, lengths = tf.numpy_function(self._encode_numpy, [tf.reshape(s, [-1])],
                                        (tf.int32, tf.int64), stateful=False)
    values.set_shape([None])
    lengths.set_shape([None])
    if s.shape.rank == 0:
      return values  # [ids]
    return tf.RaggedTensor.from_row_lengths(values, lengths)  # [n, None]

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """[..., length] ids -> [...] strings (each row up to its first EOS)."""
    ids = tf.convert_to_tensor(ids)
    shape = tf.shape(ids)
    rows = tf.reshape(ids, [-1, shape[-1]])  # [n, length]
    texts = tf.numpy_function(self._decode_numpy, [rows], tf.string, stateful=False)  # [n]
    return tf.reshape(texts, shape[:-1])

  def _key(self) -> tuple[Any, ...]:
    return (self._fingerprint, tuple(sorted(self._ids.items())),
            tuple(sorted(self._tokens.items())), self._chat_template)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, HFVocabulary) and self._key() == other._key()

  def __hash__(self) -> int:
    return hash(self._key())

  def __repr__(self) -> str:
    return f"HFVocabulary({self._folder!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"
