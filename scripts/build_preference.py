"""Build polyglot_jax/data/bundled/udhr_preference.jsonl.gz from the bundled UDHR (offline).

Usage:
  python scripts/build_preference.py [--output PATH]

Translation preference pairs over aligned UDHR articles, in the Aya-style preference schema that
`polyglot_jax.data.preference` reads: "prompt" asks to translate an article from a source
language into a target language, "chosen" is that article in the target language, "rejected" is
  related_language      the same article in the target's closest relative: among the UDHR
                        varieties of the same script and another ISO 639-3 code, the one whose
                        character-trigram profile (cosine, over the training articles only) is
                        nearest the target's, if that similarity is at least MIN_SIMILARITY
                        (below it the nearest same-script variety is no relative: Hebrew's is
                        Yiddish at 0.11, Yoruba's Ilocano at 0.18), else no such pair;
  neighbouring_article  the next article in the target language (the previous one for the last
                        article of a split), so the pair differs in content, not language.
Both pairs of an (article, target) share one prompt; a pair whose rejected text equals the
chosen one (Farsi and Dari share some articles word for word) is left out. Targets are the
languages of the bundled instruction data (the prompt-template languages and the chatterbot-
corpus languages) that the UDHR has, one variety each (TARGETS). The source of each prompt is
drawn (seeded) among the template-language varieties of another language (SOURCES), its
template among the English translation templates of `polyglot_jax.data.instructions`. Held-out articles (26-30) stay in
"validation" with everything built from them; nothing of them reaches "train" (the similarity
profiles read training articles only). The output is byte-identical across runs.
"""

from __future__ import annotations

import argparse
import collections
import math
import pathlib

import numpy as np

from polyglot_jax.data import aya
from polyglot_jax.data.instructions import TEMPLATES
from polyglot_jax.data.udhr import SPLIT_ARTICLES, UdhrRecord, load_udhr, split_of_article

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "polyglot_jax/data/bundled/udhr_preference.jsonl.gz"
MIN_SIMILARITY = 0.4
SEED = 0
SOURCES = ("eng", "spa", "fra", "deu_1996", "por_BR", "ita", "rus", "cmn_hans", "jpn", "ind",
           "swh")
TARGETS = SOURCES + ("ben", "nld", "heb", "hin", "kor", "mar", "pes_1", "swe", "tam", "tel",
                     "tha", "cmn_hant", "tur", "ukr", "urd", "yor")


def trigram_profiles(records: list[UdhrRecord]) -> dict[str, collections.Counter[str]]:
  """Character-trigram counts per variety over its training articles (lower-cased, padded)."""
  profiles: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
  for r in records:
    if split_of_article(r["article"]) == "train":
      text = f" {r['text'].lower()} "
      profiles[r["code"]].update(text[i:i + 3] for i in range(len(text) - 2))
  return profiles


def cosine(a: collections.Counter[str], b: collections.Counter[str]) -> float:
  if len(a) > len(b):
    a, b = b, a
  dot = sum(v * b[k] for k, v in a.items())
  return dot / math.sqrt(sum(v * v for v in a.values()) * sum(v * v for v in b.values()))


def related_varieties(records: list[UdhrRecord]) -> dict[str, tuple[str, float]]:
  """Target -> (closest same-script variety of another language, similarity), where one
  reaches MIN_SIMILARITY."""
  meta = {r["code"]: r for r in records}
  profiles = trigram_profiles(records)
  related = {}
  for target in TARGETS:
    candidates = [c for c in sorted(profiles) if meta[c]["script"] == meta[target]["script"]
                  and meta[c]["iso6393"] != meta[target]["iso6393"]]
    scored = [(cosine(profiles[target], profiles[c]), c) for c in candidates]
    if scored:
      similarity, code = max(scored)
      if similarity >= MIN_SIMILARITY:
        related[target] = (code, round(similarity, 4))
  return related


def neighbour(article: int, available: set[int]) -> int | None:
  """The next article of the same split the variety has, else the previous one."""
  split = SPLIT_ARTICLES[split_of_article(article)]
  for candidate in (article + 1, article - 1):
    if candidate in split and candidate in available:
      return candidate
  return None


def build() -> list[dict[str, object]]:
  """Every preference record, sorted by (split, language, article, rejection)."""
  records = list(load_udhr())
  missing = sorted(set(TARGETS) - {r["code"] for r in records})
  if missing:
    raise ValueError(f"TARGETS {missing} are not UDHR varieties of the bundle")
  text = {(r["code"], r["article"]): r for r in records}
  meta = {r["code"]: r for r in records}
  related = related_varieties(records)
  english = [t for t in TEMPLATES if t.prompt_language == "eng"]
  rng = np.random.default_rng(SEED)
  out = []
  for target in TARGETS:
    articles = sorted(a for code, a in text if code == target)
    for article in articles:
      chosen = text[(target, article)]
      sources = [s for s in SOURCES if (s, article) in text
                 and meta[s]["iso6393"] != chosen["iso6393"]]
      source = text[(sources[rng.integers(len(sources))], article)]
      template = english[rng.integers(len(english))]
      prompt = template.text.format(src=source["name"], tgt=chosen["name"], text=source["text"])
      rejected = []
      if target in related and (related[target][0], article) in text:
        rejected.append(("related_language", text[(related[target][0], article)]))
      other = neighbour(article, set(articles))
      if other is not None:
        rejected.append(("neighbouring_article", text[(target, other)]))
      for rejection, loser in rejected:
        if loser["text"] == chosen["text"]:  # e.g. Farsi and Dari share some article texts
          continue
        out.append({
            "prompt": prompt, "chosen": chosen["text"], "rejected": loser["text"],
            "language": target, "script": chosen["script"],
            "split": split_of_article(article), "article": article,
            "source_language": source["code"], "rejected_language": loser["code"],
            "rejected_article": loser["article"], "rejection": rejection,
            "template_id": template.template_id,
        })
  return sorted(out, key=lambda r: (r["split"], r["language"], r["article"], r["rejection"]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", type=pathlib.Path, default=DEFAULT_OUTPUT)
  args = parser.parse_args()
  records = build()
  aya.write_jsonl(records, args.output)
  counts = collections.Counter((r["split"], r["rejection"]) for r in records)
  print(f"wrote {len(records)} records for {len(TARGETS)} languages to {args.output} "
        f"({args.output.stat().st_size / 2**20:.2f} MiB): {dict(sorted(counts.items()))}")
  for target, (code, similarity) in sorted(related_varieties(list(load_udhr())).items()):
    print(f"  {target:>9} -> {code:<9} {similarity:.3f}")


if __name__ == "__main__":
  main()
