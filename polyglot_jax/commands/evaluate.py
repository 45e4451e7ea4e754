"""`polyglot-jax eval`: a trained checkpoint's metrics on a seqio task, per language.

Restores only the parameters (no optimizer state) straight into the mesh's shardings, and
reports loss, accuracy, perplexity and the task's generation metrics, overall, per language and
per resource group (`evaluation.Evaluator`).
"""

from __future__ import annotations

import json
from typing import Any

import gin

from polyglot_jax.data.pipeline import DatasetConfig
from polyglot_jax.inference import evaluation
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import checkpoints, step as step_lib
from polyglot_jax.training.rundir import RunDir


def output_name(model: Any, dataset_cfg: DatasetConfig) -> str:
  """<task>, or <task>.<scheme> for a quantized model, so it does not overwrite the float one."""
  scheme = getattr(model, "scheme", None)  # compression.quantization.QuantizedModel
  return dataset_cfg.mixture_or_task_name + (f".{scheme}" if scheme else "")


@gin.configurable
def evaluate(*, model: Any = gin.REQUIRED, dataset_cfg: DatasetConfig = gin.REQUIRED,
             model_dir: str = gin.REQUIRED, step: int | None = None,
             mesh: MeshConfig = MeshConfig(), eval_steps: int = 1000) -> dict[str, float]:
  """Metrics of a checkpoint on the first `eval_steps` batches of a dataset (every example,
  the last batch padded), overall, per language and per resource group: the table is printed
  and written to MODEL_DIR/eval/<task>.json (<task>.<scheme>.json for a quantized model).
  Returns the overall and group metrics."""
  partitioner = Partitioner(mesh)
  params, spec = checkpoints.load_params(model, model_dir, partitioner, step)
  evaluator = evaluation.Evaluator(
      model, partitioner, spec.shardings.params, dataset_cfg,
      max_examples=eval_steps * dataset_cfg.batch_size,
      eval_step=step_lib.make_eval_step(model, spec, partitioner))
  results = evaluator.evaluate(params)
  evaluation.write_json(RunDir(model_dir).eval_json(output_name(model, dataset_cfg)), results,
                        split=dataset_cfg.split)
  print(results.table(), flush=True)
  print(json.dumps({"task": dataset_cfg.mixture_or_task_name, **results.flat()}), flush=True)
  return results.flat()
