"""The MODEL_DIR layout: one place that names every file a run writes and its readers read.

    MODEL_DIR/
      config.gin                    the operative gin config of the run (`train` writes it)
      model.gin                     the architecture, for imported checkpoints (`convert`)
      hf_config.json                an imported checkpoint's Hugging Face config.json
      checkpoints/<step>/           orbax checkpoints: state (params, optimizer state, step), data
      train/                        metrics.jsonl + TensorBoard events of training
      training_eval/<task>/         teacher-forced eval metrics during training
      infer_eval/<task>/            decoded eval metrics during training (+ step_<N>.json tables)
      eval/<name>.json              `polyglot-jax eval` results (<task> or <task>.<scheme>)
      infer/<name>.jsonl            `polyglot-jax infer` predictions
      scores/<task>.<split>.jsonl.gz  `polyglot-jax data score` perplexities
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class RunDir:
  """Paths inside one MODEL_DIR (local or gs://); creates nothing."""

  path: str

  def _join(self, *parts: str) -> str:
    return os.path.join(self.path, *parts)

  @property
  def config_gin(self) -> str:
    return self._join("config.gin")

  @property
  def model_gin(self) -> str:
    return self._join("model.gin")

  @property
  def hf_config(self) -> str:
    return self._join("hf_config.json")

  @property
  def checkpoints(self) -> str:
    return self._join("checkpoints")

  @property
  def train(self) -> str:
    return self._join("train")

  def training_eval(self, task: str) -> str:
    return self._join("training_eval", task)

  def infer_eval(self, task: str) -> str:
    return self._join("infer_eval", task)

  def eval_json(self, name: str) -> str:
    return self._join("eval", f"{name}.json")

  def infer_jsonl(self, name: str) -> str:
    return self._join("infer", f"{name}.jsonl")

  def scores(self, task: str, split: str) -> str:
    return self._join("scores", f"{task}.{split}.jsonl.gz")


METRICS_FILE = "metrics.jsonl"  # in train/, training_eval/<task>/ and infer_eval/<task>/
