"""`polyglot-jax audit`: what compression forgets, per language (PIE; compression/audit.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gin
import numpy as np

from polyglot_jax.compression.audit import (DEFAULT_LENGTHS, CandidateScorer, candidate_features,
                                            rank_classification_examples, report, write_report)
from polyglot_jax.parallel.partitioning import MeshConfig


@gin.configurable
def audit(*, model: Any = gin.REQUIRED, dense_dirs: Sequence[str] = gin.REQUIRED,
          compressed_dirs: Sequence[str] = gin.REQUIRED, languages: Sequence[str] = gin.REQUIRED,
          output_dir: str = gin.REQUIRED, task: str = "udhr_translation",
          split: str = "validation",
          task_feature_lengths: Mapping[str, int] | None = None,
          num_candidates: int = 4, max_examples: int | None = None,
          distractors: str = "same_language",
          groups: Mapping[str, str] | None = None, compressed_model: Any = None,
          step: int | None = None, batch_size: int = 64,
          mesh: MeshConfig = MeshConfig()) -> dict[str, Any]:
  """PIE audit of checkpoints (MODEL_DIRs) on rank classification of `<task>.<language>`.

  `dense_dirs` and `compressed_dirs` are the two populations (e.g. several seeds of dense and
  of gmp_90 finetuning). `compressed_model` scores the compressed population (default `model`):
  `@quantized_model()` audits int8 with `compressed_dirs` = `dense_dirs`. Writes
  `output_dir/audit.json` (the `report`) and `output_dir/audit.md` (its table); returns the report.
  """
  if not dense_dirs or not compressed_dirs:
    raise ValueError("audit needs at least one dense and one compressed checkpoint directory.")
  task_feature_lengths = task_feature_lengths or DEFAULT_LENGTHS
  rows, labels, example_languages = rank_classification_examples(
      task, languages, split, task_feature_lengths, num_candidates, max_examples, distractors)
  features = candidate_features(rows, model.FEATURE_CONVERTER_CLS(pack=False),
                                task_feature_lengths)
  scorer = CandidateScorer(model, features, num_candidates, mesh, batch_size)
  populations = [
      np.stack([scorer.scores(scorer.restore(d, step)) for d in dense_dirs]),
      np.stack([scorer.scores(scorer.restore(d, step), compressed_model) for d in compressed_dirs]),
  ]  # [models, examples, num_candidates] each
  result = report(*populations, labels, example_languages, groups)
  print(write_report(result, output_dir), flush=True)
  return result
