"""Rebuild polyglot_jax/data/bundled/chatterbot_dialog.jsonl.gz from PyPI `chatterbot-corpus` (BSD).

Usage:
  python scripts/build_chatterbot.py [path/to/chatterbot_corpus-1.3.3-py2.py3-none-any.whl]
      [--output PATH]

Without a wheel it runs `pip download chatterbot-corpus==1.3.3 --no-deps` in a temporary
directory (needs PyPI). Every `chatterbot_corpus/data/<language>/<topic>.yml` conversation
[t0, t1, ..., tn] gives one dialog pair per reply: inputs = the turns before it (joined with
newlines), targets = the reply. Records follow the Aya Collection schema (see
`polyglot_jax.data.instructions.AYA_FIELDS`); `language` uses the UDHR bundle's variety codes.
Texts are NFC-normalised and whitespace-collapsed; pairs with an empty side and exact duplicates
are dropped. Every 10th conversation of a file (by position) goes to "validation", minus pairs
that also occur in "train" (the corpus repeats greetings), so validation is truly held out. The
output is byte-identical across runs (sorted records, gzip mtime 0).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import unicodedata
import zipfile

import yaml

PACKAGE = "chatterbot-corpus==1.3.3"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "polyglot_jax/data/bundled/chatterbot_dialog.jsonl.gz"
VALIDATION_EVERY = 10

# Corpus folder -> (UDHR-style language code, ISO 15924 script). "hinglish" is Hindi written in
# Latin script (code-mixed with English), hence its own code.
LANGUAGES = {
    "bengali": ("ben", "Beng"), "chinese": ("cmn_hans", "Hans"), "dutch": ("nld", "Latn"),
    "english": ("eng", "Latn"), "french": ("fra", "Latn"), "german": ("deu", "Latn"),
    "hebrew": ("heb", "Hebr"), "hindi": ("hin", "Deva"), "hinglish": ("hin_latn", "Latn"),
    "indonesian": ("ind", "Latn"), "italian": ("ita", "Latn"), "japanese": ("jpn", "Jpan"),
    "korean": ("kor", "Kore"), "marathi": ("mar", "Deva"), "oriya": ("ory", "Orya"),
    "persian": ("pes", "Arab"), "portuguese": ("por", "Latn"), "russian": ("rus", "Cyrl"),
    "spanish": ("spa", "Latn"), "swedish": ("swe", "Latn"), "tamil": ("tam", "Taml"),
    "telugu": ("tel", "Telu"), "thai": ("tha", "Thai"), "traditionalchinese": ("cmn_hant", "Hant"),
    "turkish": ("tur", "Latn"), "ukrainian": ("ukr", "Cyrl"), "urdu": ("urd", "Arab"),
    "yoruba": ("yor", "Latn"),
}


def _normalise(value: object) -> str:
  """NFC, single spaces, stripped; YAML scalars that are not strings (numbers) become text."""
  return re.sub(r"\s+", " ", unicodedata.normalize("NFC", str(value))).strip()


def dialog_pairs(folder: str, topic: str, document: dict) -> list[dict[str, object]]:
  """Aya-schema records of one corpus file."""
  code, script = LANGUAGES[folder]
  records = []
  for index, conversation in enumerate(document.get("conversations") or []):
    turns = [_normalise(t) for t in conversation if t is not None]
    split = "validation" if index % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
    for k in range(1, len(turns)):
      inputs = "\n".join(t for t in turns[:k] if t)
      if inputs and turns[k]:
        records.append({
            "inputs": inputs, "targets": turns[k], "dataset_name": "chatterbot_dialog",
            "sub_dataset_name": topic, "task_type": "dialog", "template_id": 0,
            "language": code, "script": script, "split": split,
        })
  return records


def build(wheel: pathlib.Path, output: pathlib.Path) -> tuple[int, int]:
  """Write the bundle; returns (number of languages, number of records)."""
  records: list[dict[str, object]] = []
  with zipfile.ZipFile(wheel) as zf:
    for name in sorted(zf.namelist()):
      match = re.fullmatch(r"chatterbot_corpus/data/([^/]+)/([^/]+)\.yml", name)
      if match:
        if match[1] not in LANGUAGES:
          raise ValueError(f"no language code for corpus folder {match[1]!r}; extend LANGUAGES")
        document = yaml.safe_load(zf.read(name).decode("utf-8"))
        records.extend(dialog_pairs(match[1], match[2], document))
  seen_in_train = {
      (r["language"], r["inputs"], r["targets"]) for r in records if r["split"] == "train"
  }
  records = [
      r for r in records
      if r["split"] == "train" or (r["language"], r["inputs"], r["targets"]) not in seen_in_train
  ]
  lines = sorted({json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records})
  buffer = io.BytesIO()
  with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
    gz.write("".join(line + "\n" for line in lines).encode("utf-8"))
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_bytes(buffer.getvalue())
  return len({r["language"] for r in records}), len(lines)


def _pip_download(directory: pathlib.Path) -> pathlib.Path:
  """Download the pinned wheel with pip (the only step that needs the network)."""
  subprocess.run(
      [sys.executable, "-m", "pip", "download", PACKAGE, "--no-deps", "-d", str(directory)],
      check=True, capture_output=True,
  )
  return next(directory.glob("chatterbot_corpus-*.whl"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "wheel", nargs="?", type=pathlib.Path, help=f"`pip download {PACKAGE}` output"
  )
  parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    wheel = args.wheel or _pip_download(pathlib.Path(tmp))
    languages, records = build(wheel, args.output)
  size_kib = args.output.stat().st_size / 1024
  print(f"wrote {args.output}: {languages} languages, {records} records, {size_kib:.0f} KiB")


if __name__ == "__main__":
  main()
