"""`polyglot-jax eval` and `polyglot-jax infer`: a trained checkpoint over a seqio task.

Both restore only the parameters (no optimizer state) straight into the mesh's shardings.
`eval` reports loss, accuracy, perplexity and the task's generation metrics, overall and per
language (`evaluation.Evaluator`); `infer` writes greedy predictions as JSONL.
"""

from __future__ import annotations

import json
import os
from typing import Any

import gin
import jax
import seqio

from polyglot_jax.data.pipeline import DatasetConfig, get_dataset, iterate_batches
from polyglot_jax.inference import evaluation
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import checkpoints, loop, step as step_lib, train_state


def _restore(model: Any, dataset_cfg: DatasetConfig, checkpoint_dir: str, step: int | None,
             partitioner: Partitioner):
  ds = get_dataset(dataset_cfg, model.FEATURE_CONVERTER_CLS, shard_id=jax.process_index(),
                   num_shards=jax.process_count(), num_epochs=1)
  shapes, types = loop._input_shapes(ds, dataset_cfg.batch_size)  # pylint: disable=protected-access
  spec = train_state.state_spec(model, train_state.ParamsOnly(), partitioner, shapes, types)
  params = checkpoints.restore_params(os.path.join(checkpoint_dir, "checkpoints"),
                                      spec.abstract.params, step=step)
  return ds, spec, params


def _output_name(model: Any, dataset_cfg: DatasetConfig) -> str:
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
  _, spec, params = _restore(model, dataset_cfg, model_dir, step, partitioner)
  evaluator = evaluation.Evaluator(
      model, partitioner, spec.shardings.params, dataset_cfg,
      max_examples=eval_steps * dataset_cfg.batch_size,
      eval_step=step_lib.make_eval_step(model, spec, partitioner))
  results = evaluator.evaluate(params)
  evaluation.write_json(os.path.join(model_dir, "eval", f"{_output_name(model, dataset_cfg)}.json"),
                        results, split=dataset_cfg.split)
  print(results.table(), flush=True)
  print(json.dumps({"task": dataset_cfg.mixture_or_task_name, **results.flat()}), flush=True)
  return results.flat()


@gin.configurable
def infer(*, model: Any = gin.REQUIRED, dataset_cfg: DatasetConfig = gin.REQUIRED,
          model_dir: str = gin.REQUIRED, step: int | None = None,
          mesh: MeshConfig = MeshConfig(), max_batches: int = 10,
          output_path: str | None = None) -> str:
  """Greedy predictions for a dataset, written as JSONL {inputs, targets, prediction, score}."""
  partitioner = Partitioner(mesh)
  ds, spec, params = _restore(model, dataset_cfg, model_dir, step, partitioner)
  vocab = seqio.get_mixture_or_task(dataset_cfg.mixture_or_task_name).output_features[
      "targets"].vocabulary
  output_path = output_path or os.path.join(model_dir, "infer",
                                            f"{_output_name(model, dataset_cfg)}.jsonl")
  os.makedirs(os.path.dirname(output_path), exist_ok=True)
  predict = jax.jit(model.predict_batch_with_aux,
                    in_shardings=(spec.shardings.params, partitioner.batch_sharding))
  with partitioner.activate(), open(output_path, "w", encoding="utf-8") as f:
    for _, batch in zip(range(max_batches), iterate_batches(ds)):
      tokens, aux = jax.device_get(predict(params, partitioner.shard_batch(batch)))
      inputs = batch.get("encoder_input_tokens", batch["decoder_input_tokens"])
      for row in range(tokens.shape[0]):
        f.write(json.dumps({
            "inputs": vocab.decode(inputs[row].tolist()),
            "targets": vocab.decode(batch["decoder_target_tokens"][row].tolist()),
            "prediction": vocab.decode(tokens[row].tolist()),
            "score": float(aux["scores"][row]),
        }, ensure_ascii=False) + "\n")
  print(f"Wrote predictions to {output_path}", flush=True)
  return output_path
