"""`polyglot-jax data score`: the perplexity of every raw example of a task under a checkpoint.

Writes the score file that perplexity-based data pruning reads (`data/pruning.py`,
`data/scoring.py` for what is scored and how); gin contract: gin/runs/score.gin.
"""

from __future__ import annotations

import os
from typing import Any

import gin
import numpy as np
import seqio

from polyglot_jax.data import pipeline, scoring
from polyglot_jax.data.aya import write_jsonl
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import checkpoints
from polyglot_jax.training.rundir import RunDir


@gin.configurable
def score(*, model: Any = gin.REQUIRED, dataset_cfg: pipeline.DatasetConfig = gin.REQUIRED,
          model_dir: str = gin.REQUIRED, output_path: str | None = None,
          step: int | None = None, mesh: MeshConfig = MeshConfig()) -> str:
  """Writes the score file of `dataset_cfg`'s task (every task of a mixture) and split.

  Only the name, feature lengths, split and batch size of `dataset_cfg` are used: scoring never
  shuffles or packs. Returns the path written (JSONL, gzipped if it ends in .gz); by default
  `model_dir/scores/<task>.<split>.jsonl.gz`.
  """
  name = dataset_cfg.mixture_or_task_name
  output_path = output_path or RunDir(model_dir).scores(name, dataset_cfg.split)
  pipeline.check_registered(name)
  provider = seqio.get_mixture_or_task(name)
  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  partitioner = Partitioner(mesh)
  lengths = dict(dataset_cfg.task_feature_lengths)
  params, _ = checkpoints.load_params(model, model_dir, partitioner, step)
  records = [r for task in tasks for r in scoring.score_task(
      model, params, partitioner, task, dataset_cfg.split, lengths, dataset_cfg.batch_size)]
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  write_jsonl(records, output_path)
  scored = [r["ppl"] for r in records if r["ppl"] is not None]
  print(f"Wrote perplexities of {len(scored)} of {len(records)} {name} {dataset_cfg.split} "
        f"examples to {output_path} (median {np.median(scored) if scored else float('nan'):.2f})",
        flush=True)
  return output_path
