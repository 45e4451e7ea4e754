"""`polyglot-jax infer`: greedy predictions of a checkpoint over a seqio task, as JSONL."""

from __future__ import annotations

import json
import os
from typing import Any

import gin
import jax
import seqio

from polyglot_jax.commands.evaluate import output_name
from polyglot_jax.data.pipeline import DatasetConfig, get_dataset, iterate_batches
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import checkpoints
from polyglot_jax.training.rundir import RunDir


@gin.configurable
def infer(*, model: Any = gin.REQUIRED, dataset_cfg: DatasetConfig = gin.REQUIRED,
          model_dir: str = gin.REQUIRED, step: int | None = None,
          mesh: MeshConfig = MeshConfig(), max_batches: int = 10,
          output_path: str | None = None) -> str:
  """Greedy predictions for a dataset, written as JSONL {inputs, targets, prediction, score}
  to `output_path` (default MODEL_DIR/infer/<task>.jsonl); returns the path."""
  partitioner = Partitioner(mesh)
  params, spec = checkpoints.load_params(model, model_dir, partitioner, step)
  ds = get_dataset(dataset_cfg, model.FEATURE_CONVERTER_CLS, shard_id=jax.process_index(),
                   num_shards=jax.process_count(), num_epochs=1)
  vocab = seqio.get_mixture_or_task(dataset_cfg.mixture_or_task_name).output_features[
      "targets"].vocabulary
  output_path = output_path or RunDir(model_dir).infer_jsonl(output_name(model, dataset_cfg))
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
