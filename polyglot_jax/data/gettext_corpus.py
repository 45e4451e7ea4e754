"""`polyglot-jax data build`: a parallel corpus from the gettext catalogs of installed packages.

PyPI `pycountry` ships the ISO code lists (country, language, currency, script, subdivision
names) translated into ~150 locales, and `Django` its user-interface strings into ~100; each
catalog is a GNU .mo file of msgid (English) -> msgstr (translation) pairs, read here by
`read_mo` (no polib needed). `build_corpus` turns every translated pair into two Aya-schema
translation instructions (English -> language and back, with `instructions.TEMPLATES`' English
prompts) and writes `<output_dir>/gettext_translation.{train,validation}.jsonl.gz`, which
`tasks.register_aya_task` reads like any user file. About 10% of the English strings, chosen by
a hash of the string, are held out: all their translations are in "validation" only.

Nothing is downloaded: the packages must be installed (`pip install 'polyglot-jax[build]'`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib
import os
import pathlib
import struct
import types
from collections.abc import Iterator, Sequence

import numpy as np

from polyglot_jax.data.aya import write_jsonl
from polyglot_jax.data.instructions import TEMPLATES

PACKAGES = {  # import name -> (PyPI name, catalog globs under the package folder)
    "pycountry": ("pycountry", ("locales/*/LC_MESSAGES/*.mo",)),
    "django": ("Django", ("conf/locale/*/LC_MESSAGES/*.mo", "contrib/*/locale/*/LC_MESSAGES/*.mo")),
}
DATASET = "gettext_translation"
VALIDATION_PERCENT = 10


def read_mo(path: str | os.PathLike[str]) -> dict[str, str]:
  """msgid -> msgstr of a GNU .mo catalog: translated singular messages, contexts stripped.

  Plural entries (msgid "one\\0many") are left out: their forms do not map one to one onto
  English. The header's charset is honoured (UTF-8 when none is given).
  """
  data = pathlib.Path(path).read_bytes()
  order = {0x950412DE: "<", 0xDE120495: ">"}.get(  # the magic, as written little/big-endian
      struct.unpack("<I", data[:4])[0] if len(data) >= 20 else None)
  if order is None:
    raise ValueError(f"{os.fspath(path)} is not a GNU .mo catalog (bad magic number)")
  count, originals, translations = struct.unpack(order + "3I", data[8:20])

  def entry(table: int, i: int) -> bytes:
    length, offset = struct.unpack_from(order + "2I", data, table + 8 * i)
    return data[offset:offset + length]

  raw = [(entry(originals, i), entry(translations, i)) for i in range(count)]
  header = dict(raw).get(b"", b"").decode("ascii", "replace")
  charset = "utf-8"
  for line in header.splitlines():
    if line.lower().startswith("content-type:") and "charset=" in line:
      charset = line.split("charset=")[1].strip() or charset
  catalog = {}
  for msgid, msgstr in raw:
    if msgid and msgstr and b"\0" not in msgid:
      catalog[msgid.split(b"\x04")[-1].decode(charset)] = msgstr.decode(charset)
  return catalog


@dataclasses.dataclass(frozen=True)
class Locale:
  """A gettext locale folder name ("pt_BR", "zh_Hans", "sr@latin") as the corpus labels it."""

  code: str  # ISO 639-3 + the locale's other parts: "por_BR", "zho_Hans", "srp_latin"
  name: str  # English name of the language: "Portuguese"
  script: str  # ISO 15924 when the locale names one ("Hans", "Latn"), else ""


def parse_locale(locale: str) -> Locale:
  """Language code, name and script of a locale, from pycountry's ISO 639-3 table."""
  import pycountry  # pylint: disable=g-import-not-at-top  (optional: the `build` extra)

  primary, _, rest = locale.replace("@", "_").partition("_")  # "sr@latin" -> "sr", "latin"
  parts = rest.split("_") if rest else []
  language = (pycountry.languages.get(alpha_2=primary) if len(primary) == 2
              else pycountry.languages.get(alpha_3=primary))
  code = "_".join([language.alpha_3 if language else primary, *parts])
  script = next((p for p in parts if len(p) == 4 and p.istitle()),
                "Latn" if "latin" in parts else "")
  return Locale(code, language.name if language else locale, script)


def _check_known(package: str) -> None:
  if package not in PACKAGES:
    raise ValueError(f"unknown gettext package {package!r}; expected some of {sorted(PACKAGES)}")


def _import(package: str) -> types.ModuleType:
  """The installed module of a known package (`PACKAGES`), or a one-line install hint."""
  _check_known(package)
  try:
    return importlib.import_module(package)
  except ImportError:
    raise ValueError(
        f"`data build` reads the catalogs of the Python package {PACKAGES[package][0]!r}, which "
        "is not installed; pip install 'polyglot-jax[build]' (pins in pyproject.toml)") from None


def catalogs(package: str, domains: Sequence[str] = ()
             ) -> Iterator[tuple[str, str, dict[str, str]]]:
  """(locale, domain, catalog) of the .mo files of an installed package, in path order.

  Domains are named like "pycountry/iso3166-1" or "django/djangojs"; `domains` keeps those
  whose name or file stem is listed (all when empty).
  """
  root = os.path.dirname(_import(package).__file__)
  paths = sorted(p for g in PACKAGES[package][1] for p in glob.glob(os.path.join(root, g)))
  for path in paths:
    locale, stem = pathlib.Path(path).parts[-3], pathlib.Path(path).stem
    domain = f"{package}/{stem}"
    if not domains or domain in domains or stem in domains:
      yield locale, domain, read_mo(path)


def split_of(msgid: str) -> str:
  """The split of an English string: "validation" for ~VALIDATION_PERCENT% (by hash)."""
  bucket = int.from_bytes(hashlib.sha256(msgid.encode()).digest()[:4], "little") % 100
  return "validation" if bucket < VALIDATION_PERCENT else "train"


def pair_records(
    pairs: Sequence[tuple[str, str, str, str]], seed: int = 0
) -> list[dict[str, str | int]]:
  """Aya-schema records of (locale, domain, msgid, msgstr) pairs, both directions each.

  Pairs whose translation equals the English (untranslated names) teach nothing and are left
  out, as are English locales. Templates are drawn with a seeded generator: deterministic.
  """
  english = [t for t in TEMPLATES if t.prompt_language == "eng"]
  rng = np.random.default_rng(seed)
  eng = Locale("eng", "English", "Latn")
  locales: dict[str, Locale] = {}
  records = []
  for locale, domain, msgid, msgstr in pairs:
    if msgid.strip() == msgstr.strip() or locale.split("_")[0] == "en":
      continue
    target = locales.setdefault(locale, parse_locale(locale))
    for src, tgt, src_text, tgt_text in ((eng, target, msgid, msgstr),
                                         (target, eng, msgstr, msgid)):
      template = english[rng.integers(len(english))]
      records.append({
          "inputs": template.text.format(src=src.name, tgt=tgt.name, text=src_text),
          "targets": tgt_text,
          "dataset_name": DATASET,
          "sub_dataset_name": f"{domain}:{src.code}-{tgt.code}",
          "task_type": "translation",
          "template_id": template.template_id,
          "language": tgt.code,
          "script": tgt.script,
          "split": split_of(msgid),
      })
  return records


def build_corpus(output_dir: str, packages: Sequence[str] = tuple(PACKAGES),
                 domains: Sequence[str] = (), seed: int = 0) -> dict[str, str]:
  """Writes the train and validation JSONL files; returns split -> path.

  `domains` restricts the catalogs (see `catalogs`), e.g. ["iso3166-1"] for country names.
  """
  for package in packages:  # A typo is reported whatever else is installed.
    _check_known(package)
  for package in packages:
    _import(package)  # all missing packages fail before any work
  pairs = [(locale, domain, msgid, msgstr)
           for package in packages for locale, domain, catalog in catalogs(package, domains)
           for msgid, msgstr in catalog.items()]
  records = pair_records(pairs, seed)
  if not records:
    raise ValueError(f"no translated message in the catalogs of {list(packages)} matching "
                     f"domains {list(domains)}; check --domains (e.g. iso3166-1, django)")
  os.makedirs(output_dir, exist_ok=True)
  paths = {}
  for split in ("train", "validation"):
    paths[split] = os.path.join(output_dir, f"{DATASET}.{split}.jsonl.gz")
    write_jsonl([r for r in records if r["split"] == split], paths[split])
  languages = len({r["language"] for r in records})
  print(f"{len(records)} records in {languages} languages from {', '.join(packages)}: "
        + ", ".join(f"{s} {p}" for s, p in paths.items()), flush=True)
  return paths
