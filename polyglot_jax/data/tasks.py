"""seqio Tasks and Mixtures over the bundled data, registered by `register_bundled()`.

Pretraining on the UDHR (text -> "targets", then an objective; splits from `udhr.SPLIT_ARTICLES`):
  udhr_span_corruption  encoder-decoder pretraining (T5 span corruption): inputs, targets
  udhr_lm               decoder-only causal LM: targets
  udhr_prefix_lm        decoder-only prefix LM (random cut point): inputs, targets
Instruction tuning (Aya-schema records, `instructions`): inputs, targets
  udhr_translation      any<->any UDHR translation prompts (language = the target's)
  chatterbot_dialog     chatterbot-corpus dialog pairs
Preference pairs (`preference`): inputs, chosen, rejected
  udhr_preference       UDHR translation prompts; rejected = related language or next article
Each of these also exists per language as `<task>.<code>` (e.g. `udhr_lm.swh`, 532 UDHR varieties;
`chatterbot_dialog.jpn`), and the per-language tasks form `LanguageMixture`s with mT5 temperature
rates (alpha 0.3, by ISO 639-3 language): `udhr_span_corruption_mix`, `udhr_lm_mix`,
`udhr_prefix_lm_mix`, `aya_instruct_mix` (translation and dialog together) and
`udhr_preference_mix`.

Every example keeps its language code as a "language" string feature next to the tokens, for
per-language evaluation; feature converters drop it when packing. `register_aya_task` registers a
user's own Aya-format files the same way, and `register_chat_task` (gin: `chat.chat_task`) a
user's chat files (conversations rendered with a checkpoint's chat template, see `chat`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

from polyglot_jax.data import aya, chat, mixing, preference, preprocessors, quality
from polyglot_jax.data.instructions import dialog_records, translation_records
from polyglot_jax.data.mixing import Columns, MemorySource
from polyglot_jax.data.udhr import SPLIT_ARTICLES, load_udhr, udhr_records
from polyglot_jax.data.vocab import get_vocabulary

UDHR_SPAN_CORRUPTION = "udhr_span_corruption"
UDHR_LM = "udhr_lm"
UDHR_PREFIX_LM = "udhr_prefix_lm"
UDHR_TRANSLATION = "udhr_translation"
CHATTERBOT_DIALOG = "chatterbot_dialog"
AYA_INSTRUCT_MIX = "aya_instruct_mix"
UDHR_PREFERENCE = "udhr_preference"
MIX_SUFFIX = "_mix"

_TOKENIZE = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)
# One chain object per objective, shared by all its tasks: `LanguageMixture` requires identical
# preprocessors, and it is also what makes the per-language tasks the same task on other data.
_PRETRAINING = {
    name: ((preprocessors.text_to_targets, _TOKENIZE, seqio.CacheDatasetPlaceholder(), objective,
            seqio.preprocessors.append_eos_after_trim), features)
    for name, objective, features in (
        (UDHR_SPAN_CORRUPTION, preprocessors.span_corruption, ("inputs", "targets")),
        (UDHR_LM, preprocessors.causal_lm, ("targets",)),
        (UDHR_PREFIX_LM, preprocessors.prefix_lm, ("inputs", "targets")),
    )
}
_INSTRUCTION_CHAINS = {
    strict: (_TOKENIZE, seqio.CacheDatasetPlaceholder(),
             functools.partial(quality.filter_overlength, strict=strict),
             seqio.preprocessors.append_eos_after_trim)
    for strict in (False, True)
}
_INSTRUCTION_FEATURES = ("inputs", "targets")
# Chat: the template writes every special token (no EOS added); over-long conversations dropped.
_CHAT_CHAINS = {
    strict: (functools.partial(chat.tokenize_chat, strict=strict), seqio.CacheDatasetPlaceholder(),
             functools.partial(quality.filter_overlength, source="chat data", strict=strict))
    for strict in (False, True)
}


@functools.cache
def _udhr_columns(split: str) -> Columns:
  records = udhr_records(split)
  return {"text": [r["text"] for r in records], "language": [r["code"] for r in records]}


@functools.cache
def _instruction_columns(
    records_fn: Callable[[str], Sequence[Mapping[str, str | int]]], split: str
) -> Columns:
  return {f: [str(r[f]) for r in records_fn(split)] for f in aya.FIELDS}


@functools.cache
def _columns_by_language(columns_fn: Callable[[str], Columns], split: str) -> dict[str, Columns]:
  """One pass over a split, grouped by the "language" column (cached: 500+ tasks read it)."""
  columns = columns_fn(split)
  groups: dict[str, dict[str, list[str]]] = {}
  for i, code in enumerate(columns["language"]):
    group = groups.setdefault(code, {k: [] for k in columns})
    for k, values in columns.items():
      group[k].append(values[i])
  return groups


def _language_columns(columns_fn: Callable[[str], Columns], language: str, split: str) -> Columns:
  """The examples of one language (none if the split has no such language)."""
  empty = {k: [] for k in columns_fn(split)}
  return _columns_by_language(columns_fn, split).get(language, empty)


def udhr_dataset(
    split: str, shuffle_files: bool = False, seed: int | None = None
) -> tf.data.Dataset:
  """{"text", "language"} examples of one UDHR split, in bundle order unless `shuffle_files`."""
  return MemorySource(_udhr_columns, (split,)).get_dataset(split, shuffle_files, seed)


@functools.cache
def _udhr_iso639_3() -> dict[str, str]:
  return {r["code"]: r["iso6393"] for r in load_udhr()}


def iso639_3(code: str) -> str:
  """The ISO 639-3 language of a variety code ("cmn_hans" -> "cmn"): the unit of mixing rates.

  UDHR varieties without a code of their own ("und") stay separate languages.
  """
  iso = _udhr_iso639_3().get(code, code.split("_")[0])
  return code if iso == "und" else iso


def _register(
    name: str,
    source: seqio.DataSource,
    chain: Sequence[Callable[..., tf.data.Dataset]],
    feature_names: Sequence[str],
    vocabulary: seqio.Vocabulary,
    add_eos: bool = True,
) -> seqio.Task:
  """(Re-)registers one task; every task of this package goes through here."""
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=list(chain),
      output_features={k: seqio.Feature(vocabulary, add_eos=add_eos) for k in feature_names},
  )


def _register_with_languages(
    name: str,
    columns_fn: Callable[[str], Columns],
    chain: Sequence[Callable[..., tf.data.Dataset]],
    feature_names: Sequence[str],
    vocabulary: seqio.Vocabulary,
) -> dict[str, str]:
  """Registers `name` (all languages) and `name.<code>` per language; returns task -> language."""
  splits = tuple(SPLIT_ARTICLES)
  _register(name, MemorySource(columns_fn, splits), chain, feature_names, vocabulary)
  codes = sorted({c for s in splits for c in _columns_by_language(columns_fn, s)})
  task_languages = {}
  for code in codes:
    source = MemorySource(functools.partial(_language_columns, columns_fn, code), splits)
    _register(f"{name}.{code}", source, chain, feature_names, vocabulary)
    task_languages[f"{name}.{code}"] = iso639_3(code)
  return task_languages


def register_udhr_tasks(vocabulary: seqio.Vocabulary | None = None) -> None:
  """Registers the UDHR pretraining tasks, their per-language tasks and mixtures (idempotent).

  Pass a vocabulary to train with your own SentencePiece model; default: the bundled 8k one.
  """
  vocabulary = vocabulary or get_vocabulary()
  for name, (chain, features) in _PRETRAINING.items():
    languages = _register_with_languages(name, _udhr_columns, chain, features, vocabulary)
    mixing.register_language_mixture(name + MIX_SUFFIX, languages)


def register_instruction_tasks(vocabulary: seqio.Vocabulary | None = None) -> None:
  """Registers the bundled instruction tasks, per language, and `aya_instruct_mix` (idempotent)."""
  vocabulary = vocabulary or get_vocabulary()
  languages: dict[str, str] = {}
  for name, records_fn in ((UDHR_TRANSLATION, translation_records),
                           (CHATTERBOT_DIALOG, dialog_records)):
    columns_fn = functools.partial(_instruction_columns, records_fn)
    languages |= _register_with_languages(
        name, columns_fn, _INSTRUCTION_CHAINS[False], _INSTRUCTION_FEATURES, vocabulary)
  mixing.register_language_mixture(AYA_INSTRUCT_MIX, languages)


def register_preference_tasks(vocabulary: seqio.Vocabulary | None = None) -> None:
  """Registers `udhr_preference`, its per-language tasks and `udhr_preference_mix` (idempotent).

  Convert them with `preference.converter_cls` (pairs stay together); feature lengths
  {"inputs", "chosen", "rejected"}.
  """
  languages = _register_with_languages(
      UDHR_PREFERENCE, preference.udhr_preference_columns, preference.CHAINS[False],
      preference.FEATURES, vocabulary or get_vocabulary())
  mixing.register_language_mixture(UDHR_PREFERENCE + MIX_SUFFIX, languages)


def register_aya_task(
    name: str,
    data: Mapping[str, str | Sequence[str]],
    *,
    file_format: str | None = None,
    field_map: Mapping[str, str] | None = None,
    default_language: str | None = None,
    only_language: str | None = None,
    strict: bool = False,
    vocabulary: seqio.Vocabulary | None = None,
) -> seqio.Task:
  """Registers an instruction task over your Aya-format files: JSONL(.gz), Parquet or TFRecord.

  `data` maps split names to a path, glob or list, e.g. {"train": "/data/aya/*.parquet"}.
  Bad records are dropped and counted (`quality.dropped_metrics()`), over-length examples too;
  `strict=True` raises on the first one instead. See `aya.make_source` for the other arguments.
  """
  source = aya.make_source(
      name, data, file_format, field_map, default_language, only_language, strict
  )
  return _register(name, source, _INSTRUCTION_CHAINS[strict], _INSTRUCTION_FEATURES,
                   vocabulary or get_vocabulary())


def register_chat_task(
    name: str,
    data: Mapping[str, str | Sequence[str]],
    vocabulary: seqio.Vocabulary,
    *,
    file_format: str | None = None,
    field_map: Mapping[str, str] | None = None,
    default_language: str | None = None,
    only_language: str | None = None,
    strict: bool = False,
    prompts: bool = False,
) -> seqio.Task:
  """Registers a chat task over your files: "messages" conversations (or Aya inputs/targets).

  `vocabulary` is the checkpoint's Hugging Face tokenizer with its chat template
  (`vocab.get_vocabulary(folder)`). Examples are "targets" (the rendered conversation's ids,
  without the leading BOS) and `chat.LOSS_WEIGHTS` (1 on the assistant turns): train them with
  `chat.ChatFeatureConverter` (runs/sft.gin). With `prompts`, for decoding (`infer`, generation
  metrics), they are "inputs" (every turn before the last, with the generation prompt) and
  "targets" (the last, assistant turn). Bad records and conversations longer than the feature
  lengths are dropped and counted (`strict=True` raises); a template that cannot render a
  conversation turn by turn is a one-line ValueError here. Other arguments: `aya.make_source`.
  """
  source = aya.make_source(
      name, data, file_format, field_map, default_language, only_language, strict, chat=True
  )
  chat.check_chat_template(vocabulary)
  features = ("inputs", "targets") if prompts else ("targets",)
  return _register(name, source, _CHAT_CHAINS[strict], features, vocabulary, add_eos=False)


@functools.cache
def register_bundled() -> None:
  """Registers the bundled tasks and mixtures, once per process.

  Every lookup of a task by name (`pipeline.check_registered`) calls it first, so commands that
  read no data never pay for it (thousands of per-language tasks and the vocabulary).
  """
  register_udhr_tasks()
  register_instruction_tasks()
  register_preference_tasks()
