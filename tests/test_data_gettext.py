"""`polyglot-jax data build`: .mo catalogs, the translation records, the corpus files."""

from __future__ import annotations

import gettext
import gzip
import json
import struct

import pytest
import seqio

from polyglot_jax import cli
from polyglot_jax.data import gettext_corpus, tasks

HEADER = "Content-Type: text/plain; charset={charset}\nLanguage: de\n"
ENTRIES = {  # msgid -> msgstr as stored in the catalog
    "Germany": "Deutschland",
    "menu\x04Open": "Öffnen",  # a message with context "menu"
    "one file\0%d files": "eine Datei\0%d Dateien",  # a plural entry
    "Untranslated": "",
    "Stra\u00dfe": "Straße",
}


def _write_mo(path, entries: dict[str, str], charset: str = "utf-8", byteorder: str = "<") -> None:
  """A GNU .mo file (the layout msgfmt writes), sorted by msgid, in either byte order."""
  items = sorted({"": HEADER.format(charset=charset), **entries}.items())
  ids = [k.encode(charset) for k, _ in items]
  strs = [v.encode(charset) for _, v in items]
  start = 7 * 4 + 16 * len(items)  # header + both tables
  blob, offsets = b"", []
  for data in ids + strs:
    offsets.append((len(data), start + len(blob)))
    blob += data + b"\0"
  header = struct.pack(byteorder + "7I", 0x950412DE, 0, len(items), 28, 28 + 8 * len(items), 0, 0)
  tables = b"".join(struct.pack(byteorder + "2I", *o) for o in offsets)
  path.write_bytes(header + tables + blob)


@pytest.mark.parametrize("charset, byteorder", [("utf-8", "<"), ("utf-8", ">"), ("latin-1", "<")])
def test_read_mo_matches_pythons_gettext(tmp_path, charset, byteorder):
  path = tmp_path / "de.mo"
  _write_mo(path, ENTRIES, charset, byteorder)
  catalog = gettext_corpus.read_mo(path)
  assert catalog == {"Germany": "Deutschland", "Open": "Öffnen", "Straße": "Straße"}
  with open(path, "rb") as f:
    reference = gettext.GNUTranslations(f)
  for msgid, msgstr in catalog.items():
    assert msgstr == (reference.pgettext("menu", msgid) if msgid == "Open"
                      else reference.gettext(msgid))


def test_not_a_catalog_is_one_line(tmp_path):
  path = tmp_path / "x.mo"
  path.write_bytes(b"not a catalog at all, no")
  with pytest.raises(ValueError, match="x.mo is not a GNU .mo catalog"):
    gettext_corpus.read_mo(path)


def test_pair_records_both_directions_and_a_shared_held_out_split():
  pairs = [("de", "pycountry/iso3166-1", "Germany", "Deutschland"),
           ("pt_BR", "pycountry/iso3166-1", "Germany", "Alemanha"),
           ("de", "pycountry/iso3166-1", "Peru", "Peru"),  # untranslated: left out
           ("en_GB", "django/django", "color", "colour")]  # English locale: left out
  records = gettext_corpus.pair_records(pairs)
  assert [(r["language"], r["targets"]) for r in records] == [
      ("deu", "Deutschland"), ("eng", "Germany"), ("por_BR", "Alemanha"), ("eng", "Germany")]
  assert records[0]["inputs"].count("Germany") == 1 and "German" in records[0]["inputs"]
  assert {r["split"] for r in records} == {gettext_corpus.split_of("Germany")}
  assert records[0]["sub_dataset_name"] == "pycountry/iso3166-1:eng-deu"
  assert records == gettext_corpus.pair_records(pairs)  # deterministic
  splits = [gettext_corpus.split_of(f"message {i}") for i in range(2000)]
  assert 0.07 < splits.count("validation") / len(splits) < 0.13


def test_pycountry_catalogs_build_a_readable_task(tmp_path):
  paths = gettext_corpus.build_corpus(str(tmp_path), ["pycountry"], ["iso3166-1"])
  records = []
  for split, path in paths.items():
    with gzip.open(path, "rt", encoding="utf-8") as f:
      records += [json.loads(line) for line in f]
    assert {r["split"] for r in records[-100:]} == {split}
  assert len({r["language"] for r in records}) > 100  # ~150 locales translate country names
  assert any(r["language"] == "deu" and r["targets"] == "Deutschland" for r in records)
  task = tasks.register_aya_task("test_gettext", paths)
  example = next(task.get_dataset({"inputs": 64, "targets": 64}, "validation",
                                  shuffle=False).as_numpy_iterator())
  assert example["inputs"].size and example["targets"].size
  seqio.TaskRegistry.remove("test_gettext")


def test_build_errors_are_one_line(tmp_path, capsys):
  code = cli.main(["data", "build", f"--output_dir={tmp_path}", "--packages=pycountry,babel"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and "\n" not in err and "'babel'" in err
