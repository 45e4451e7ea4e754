"""What a training run is (`TrainConfig`, gin name `train`) and what it builds (`TrainSetup`).

`TrainConfig` holds every `train.*` binding of the gin files (runs/pretrain.gin,
runs/finetune.gin, ...). `TrainSetup.build` turns it into the objects a run needs: the mesh, the
abstract state with its shardings, the jitted train and eval steps, the global batch shapes and
the step's FLOPs. It reads no data and allocates no state, so `precompile`, the benchmarks and
the sweep build exactly what `train` runs without running it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import gin
import jax
import numpy as np
import tensorflow as tf

from polyglot_jax.data.pipeline import DatasetConfig, batch_shapes, get_dataset
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import flops, step as step_lib, train_state
from polyglot_jax.training.train_state import StateSpec, WeightMasks

NONFINITE_POLICIES = ("stop", "skip")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class InitCheckpoint:
  """Where a fresh run loads its initial parameters from (finetuning, PEFT, upcycling).

  Attributes:
    path: a checkpoint directory written by `polyglot-jax train`.
    step: which step; None = the latest.
    assignment_map: (regex, replacement-or-None) rules, see checkpoints.source_path.
    fallback_to_scratch: keep fresh values for parameters the checkpoint lacks.
    upcycle: sparse upcycling: a checkpoint tensor that lacks the target's "expert" axis (a
      dense FFN kernel for an MoE layer) is copied into every expert.
  """

  path: str
  step: int | None = None
  assignment_map: tuple[tuple[str, str | None], ...] = ()
  fallback_to_scratch: bool = False
  upcycle: bool = False


@gin.configurable("train")
@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Every knob of a training run: the `train.*` gin bindings.

  Attributes:
    model: the model (models/model.py API), usually `%MODEL`.
    train_dataset_cfg: the training data.
    optimizer: `Adafactor` or `AdamW` (training/optimizers.py).
    model_dir: MODEL_DIR: checkpoints, metrics, config.gin (training/rundir.py).
    total_steps: optimizer steps of the whole run.
    eval_dataset_cfg: teacher-forced evaluation every `eval_period` (training_eval/).
    infer_eval_dataset_cfg: decoded evaluation every `eval_period`, per language (infer_eval/).
    mesh: the device mesh and its logical-axis rules.
    seed: parameter initialisation and dropout seed.
    num_microbatches: gradient accumulation steps per batch.
    checkpoint_period, keep_checkpoints, async_checkpointing: orbax saving.
    eval_period: steps between evaluations; eval_steps: batches per evaluation.
    log_period: steps between metric lines.
    nonfinite_policy: "stop" (raise) or "skip" (drop the update and go on) on NaN/Inf.
    init_checkpoint: initial parameters of a fresh run (`InitCheckpoint`).
    sparsity: gradual magnitude pruning (gin/sparsity/*.gin), or None.
    trainable_params: regex of the parameters that train; the rest are frozen (no optimizer
      state), e.g. gin/routing/*.gin's adapters.
    tensorboard: also write TensorBoard events.
  """

  model: Any = gin.REQUIRED
  train_dataset_cfg: DatasetConfig = gin.REQUIRED
  optimizer: Any = gin.REQUIRED
  model_dir: str = gin.REQUIRED
  total_steps: int = gin.REQUIRED
  eval_dataset_cfg: DatasetConfig | None = None
  infer_eval_dataset_cfg: DatasetConfig | None = None
  mesh: MeshConfig = MeshConfig()
  seed: int = 0
  num_microbatches: int = 1
  checkpoint_period: int = 1000
  keep_checkpoints: int | None = 3
  async_checkpointing: bool = True
  eval_period: int = 1000
  eval_steps: int = 20
  log_period: int = 100
  nonfinite_policy: str = "stop"
  init_checkpoint: InitCheckpoint | None = None
  sparsity: WeightMasks | None = None
  trainable_params: str | None = None
  tensorboard: bool = True

  def __post_init__(self) -> None:
    if self.nonfinite_policy not in NONFINITE_POLICIES:
      raise ValueError(f"train.nonfinite_policy={self.nonfinite_policy!r}; use one of "
                       f"{NONFINITE_POLICIES}.")


@functools.cache
def peak_flops() -> tuple[float, str]:
  """(peak FLOP/s, its source): the datasheet on accelerators; on CPU a large f32 matmul,
  measured once per process (1-2 s that every in-process run would pay otherwise)."""
  device = jax.devices()[0]
  peak = flops.datasheet_peak_flops(device)
  if peak:
    return peak, f"{device.device_kind} datasheet"
  return flops.measure_peak_flops(), "measured f32 matmul"


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The objects a run of `config` needs; built without data or device memory.

  Attributes:
    config: what was asked for.
    partitioner: the mesh and its rules.
    input_shapes: global [batch, length] of every model feature (the feature converter's).
    spec: abstract train state, shardings and optimizer.
    train_step: jitted (state, batch) -> (state, metrics).
    eval_step: jitted (params, batch) -> metric sums.
    step_flops: analytic training FLOPs of one global batch (`flops.batch_training_flops`).
  """

  config: TrainConfig
  partitioner: Partitioner
  input_shapes: dict[str, tuple[int, int]]
  spec: StateSpec
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  step_flops: float

  @classmethod
  def build(cls, config: TrainConfig, devices: Any = None) -> TrainSetup:
    """`devices` (default: all of this process's view) make the mesh, e.g. a TPU topology's."""
    model = config.model
    partitioner = Partitioner(config.mesh, devices=devices)
    shapes = batch_shapes(config.train_dataset_cfg, model.FEATURE_CONVERTER_CLS)
    spec = train_state.state_spec(model, config.optimizer, partitioner,
                                  sparsity=config.sparsity,
                                  trainable_params=config.trainable_params)
    train_step = step_lib.make_train_step(
        model, spec, partitioner, learning_rate_fn=config.optimizer.learning_rate_fn,
        num_microbatches=config.num_microbatches, dropout_seed=config.seed)
    return cls(config=config, partitioner=partitioner, input_shapes=shapes, spec=spec,
               train_step=train_step,
               eval_step=step_lib.make_eval_step(model, spec, partitioner),
               step_flops=flops.batch_training_flops(model.config, shapes))

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as ShapeDtypeStructs with the batch sharding (what the step compiles for)."""
    return {name: jax.ShapeDtypeStruct(shape, np.int32, sharding=self.partitioner.batch_sharding)
            for name, shape in self.input_shapes.items()}

  def dataset(self, cfg: DatasetConfig | None = None, num_epochs: int | None = None
              ) -> tf.data.Dataset:
    """This host's batches of `cfg` (default: the training data) for the run's model."""
    return get_dataset(cfg or self.config.train_dataset_cfg, self.config.model.FEATURE_CONVERTER_CLS,
                       shard_id=jax.process_index(), num_shards=jax.process_count(),
                       num_epochs=num_epochs)
