"""Instruction data in the Aya Collection schema: UDHR translation prompts and chatterbot dialogs.

Every record has the Aya Collection fields (`AYA_FIELDS`): inputs, targets, dataset_name,
sub_dataset_name, task_type, template_id, language, script, split. `language` is the language of
`targets` (what the model writes): a UDHR variety code such as "swh" or "cmn_hans".

  translation_records(split)  any<->any translation of aligned UDHR text, built on the fly from
                              the bundled UDHR (no extra bundle); the held-out articles 26-30
                              appear only in "validation", as for the pretraining tasks
  dialog_records(split)       consecutive turns of the chatterbot-corpus conversations
                              (bundled/chatterbot_dialog.jsonl.gz, scripts/build_chatterbot.py)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import json
from collections.abc import Mapping

import numpy as np

from polyglot_jax.data.udhr import BUNDLE_DIR, SPLIT_ARTICLES, UdhrRecord, udhr_records

AYA_FIELDS = (
    "inputs", "targets", "dataset_name", "sub_dataset_name", "task_type", "template_id",
    "language", "script", "split",
)
DIALOG_PATH = BUNDLE_DIR / "chatterbot_dialog.jsonl.gz"
TRANSLATION_DATASET = "udhr_translation"
DIALOG_DATASET = "chatterbot_dialog"


@dataclasses.dataclass(frozen=True)
class Template:
  """A translation prompt in `prompt_language`; fills {src}, {tgt} (language names) and {text}."""

  template_id: int
  prompt_language: str
  text: str


_ENGLISH = (
    "Translate the following text from {src} to {tgt}.\n\n{text}",
    "{text}\n\nTranslate this into {tgt}.",
    "How do you say this in {tgt}?\n{text}",
    "{src}: {text}\n{tgt}:",
)
# Prompts written in the source language (translations by the polyglot_jax authors), and the names
# of the template languages in each, in the grammatical form the prompts need (German "ins
# Englische", Russian accusative "на английский").
_NATIVE = {
    "spa": ("Traduce el siguiente texto del {src} al {tgt}.\n\n{text}",
            "{text}\n\n¿Cómo se dice esto en {tgt}?"),
    "fra": ("Traduisez le texte suivant en {tgt} :\n\n{text}",
            "{text}\n\nComment dit-on cela en {tgt} ?"),
    "deu": ("Übersetze den folgenden Text ins {tgt}:\n\n{text}",
            "Übersetze ins {tgt}:\n{text}"),
    "por": ("Traduza o seguinte texto para o {tgt}:\n\n{text}",
            "{text}\n\nComo se diz isso em {tgt}?"),
    "ita": ("Traduci il seguente testo in {tgt}:\n\n{text}",
            "{text}\n\nCome si dice in {tgt}?"),
    "rus": ("Переведи следующий текст на {tgt}:\n\n{text}",
            "Переведи на {tgt}:\n{text}"),
    "cmn": ("将下面的文字翻译成{tgt}：\n\n{text}",
            "{text}\n\n用{tgt}怎么说？"),
    "jpn": ("次の文章を{tgt}に翻訳してください。\n\n{text}",
            "{text}\n\nこれを{tgt}で言うと？"),
    "ind": ("Terjemahkan teks berikut ke dalam bahasa {tgt}:\n\n{text}",
            "{text}\n\nBagaimana mengatakan ini dalam bahasa {tgt}?"),
    "swh": ("Tafsiri maandishi yafuatayo kwa {tgt}:\n\n{text}",
            "{text}\n\nHii inasemwaje kwa {tgt}?"),
}
_NAME_KEYS = ("eng", "spa", "fra", "deu", "por", "ita", "rus", "cmn", "jpn", "ind", "swh")
_NATIVE_NAMES = {
    "spa": "inglés español francés alemán portugués italiano ruso chino japonés indonesio suajili",
    "fra": "anglais espagnol français allemand portugais italien russe chinois japonais "
           "indonésien swahili",
    "deu": "Englische Spanische Französische Deutsche Portugiesische Italienische Russische "
           "Chinesische Japanische Indonesische Swahili",
    "por": "inglês espanhol francês alemão português italiano russo chinês japonês indonésio "
           "suaíli",
    "ita": "inglese spagnolo francese tedesco portoghese italiano russo cinese giapponese "
           "indonesiano swahili",
    "rus": "английский испанский французский немецкий португальский итальянский русский "
           "китайский японский индонезийский суахили",
    "cmn": "英语 西班牙语 法语 德语 葡萄牙语 意大利语 俄语 中文 日语 印度尼西亚语 斯瓦希里语",
    "jpn": "英語 スペイン語 フランス語 ドイツ語 ポルトガル語 イタリア語 ロシア語 中国語 日本語 "
           "インドネシア語 スワヒリ語",
    "ind": "Inggris Spanyol Prancis Jerman Portugis Italia Rusia Tionghoa Jepang Indonesia Swahili",
    "swh": "Kiingereza Kihispania Kifaransa Kijerumani Kireno Kiitaliano Kirusi Kichina Kijapani "
           "Kiindonesia Kiswahili",
}
LANGUAGE_NAMES: Mapping[str, Mapping[str, str]] = {
    lang: dict(zip(_NAME_KEYS, names.split(), strict=True)) for lang, names in _NATIVE_NAMES.items()
}
# The UDHR varieties written in each template language (Traditional-script Chinese has none).
NATIVE_CODES: Mapping[str, str] = {
    "eng": "eng", "spa": "spa", "fra": "fra", "deu_1996": "deu", "deu_1901": "deu",
    "por_BR": "por", "por_PT": "por", "ita": "ita", "rus": "rus", "cmn_hans": "cmn", "jpn": "jpn",
    "ind": "ind", "swh": "swh",
}
TEMPLATES: tuple[Template, ...] = tuple(
    Template(i, lang, text)
    for i, (lang, text) in enumerate(
        [("eng", t) for t in _ENGLISH] + [(l, t) for l, ts in _NATIVE.items() for t in ts]
    )
)


def _aligned_segments(source: str, target: str) -> list[tuple[str, str]]:
  """Paragraph pairs when both articles have as many paragraphs, else the whole articles.

  Paragraph pairs keep examples short enough for small feature lengths; equal counts are the only
  alignment evidence the UDHR gives, so anything else stays article-level.
  """
  src, tgt = source.split("\n"), target.split("\n")
  return list(zip(src, tgt)) if len(src) == len(tgt) else [(source, target)]


def _record(
    template: Template, source: UdhrRecord, target: UdhrRecord, src_text: str, tgt_text: str,
    split: str,
) -> dict[str, str | int]:
  """One Aya-schema translation record; language names come from the template's language."""
  if template.prompt_language == "eng":
    src_name, tgt_name = source["name"], target["name"]
  else:
    names = LANGUAGE_NAMES[template.prompt_language]
    src_name, tgt_name = names[NATIVE_CODES[source["code"]]], names[NATIVE_CODES[target["code"]]]
  return {
      "inputs": template.text.format(src=src_name, tgt=tgt_name, text=src_text),
      "targets": tgt_text,
      "dataset_name": TRANSLATION_DATASET,
      "sub_dataset_name": f"{source['code']}-{target['code']}",
      "task_type": "translation",
      "template_id": template.template_id,
      "language": target["code"],
      "script": target["script"],
      "split": split,
  }


@functools.cache
def translation_records(
    split: str, targets_per_source: int = 2, seed: int = 0
) -> tuple[dict[str, str | int], ...]:
  """Translation instructions of one split, deterministic given the arguments.

  For every (article, source variety), `targets_per_source` target varieties of other languages
  are drawn uniformly (any<->any) with an English template; a source written in a template
  language also gets one target among the other template languages with a template in the
  source language. Articles are split into paragraph pairs where they align (see
  `_aligned_segments`). Only the split's own articles are read, so held-out text stays held out.
  """
  if split not in SPLIT_ARTICLES:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_ARTICLES)}")
  by_article: dict[int, dict[str, UdhrRecord]] = collections.defaultdict(dict)
  for r in udhr_records(split):
    by_article[r["article"]][r["code"]] = r
  english = [t for t in TEMPLATES if t.prompt_language == "eng"]
  rng = np.random.default_rng(seed)
  records = []
  for article in sorted(by_article):
    variants = by_article[article]
    codes = sorted(variants)
    native = [c for c in codes if c in NATIVE_CODES]
    for src in codes:
      iso = variants[src]["iso6393"]
      order = (codes[i] for i in rng.permutation(len(codes)))
      others = (c for c in order if variants[c]["iso6393"] != iso)
      picks = [(tgt, english) for tgt, _ in zip(others, range(targets_per_source))]
      native_targets = [c for c in native if variants[c]["iso6393"] != iso]
      if src in NATIVE_CODES and src != "eng" and native_targets:
        own = [t for t in TEMPLATES if t.prompt_language == NATIVE_CODES[src]]
        picks.append((native_targets[rng.integers(len(native_targets))], own))
      for tgt, templates in picks:
        template = templates[rng.integers(len(templates))]
        for s, t in _aligned_segments(variants[src]["text"], variants[tgt]["text"]):
          records.append(_record(template, variants[src], variants[tgt], s, t, split))
  return tuple(records)


@functools.cache
def dialog_records(split: str) -> tuple[dict[str, str | int], ...]:
  """Bundled chatterbot-corpus dialog pairs of one split ("train" or "validation")."""
  if split not in SPLIT_ARTICLES:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_ARTICLES)}")
  with gzip.open(DIALOG_PATH, "rt", encoding="utf-8") as f:
    return tuple(r for r in map(json.loads, f) if r["split"] == split)
