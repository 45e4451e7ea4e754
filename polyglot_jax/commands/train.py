"""`polyglot-jax train`: resume or initialise, then the training loop with its hooks.

The gin files bind `train.*` (`setup.TrainConfig`). A rerun of the same command resumes from
MODEL_DIR's latest checkpoint (state and data position); SIGTERM/SIGINT save and stop.
"""

from __future__ import annotations

import os
from typing import Any

import gin
import jax

from polyglot_jax.data import quality
from polyglot_jax.data.pipeline import iterate_batches
from polyglot_jax.inference import evaluation
from polyglot_jax.training import checkpoints, hooks, train_state
from polyglot_jax.training.loop import Hook, TrainLoop, TrainResult
from polyglot_jax.training.metrics import MetricsWriter, Progress
from polyglot_jax.training.rundir import RunDir
from polyglot_jax.training.setup import TrainConfig, TrainSetup, peak_flops


class OperativeConfigHook(Hook):
  """Writes MODEL_DIR/config.gin, the gin bindings the run used (as T5X), after its first step."""

  every = 1

  def __init__(self, run_dir: RunDir, first_step: int):
    self.run_dir = run_dir
    self.first_step = first_step

  def after_step(self, step: int, state: Any) -> None:
    if step == self.first_step and jax.process_index() == 0:
      with open(self.run_dir.config_gin, "w", encoding="utf-8") as f:
        f.write(gin.operative_config_str())


def _initial_state(setup: TrainSetup, ckpt: checkpoints.Checkpointer
                   ) -> tuple[train_state.TrainState, int]:
  """(state, data position in batches): the latest checkpoint's, else a fresh (or
  `init_checkpoint`'s) state at batch 0."""
  config, spec = setup.config, setup.spec
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(latest, spec.abstract)
    print(f"Resumed from {ckpt.directory} at step {latest}.", flush=True)
    return state, int(data_state["batches"])
  state = train_state.initialize(config.model, spec, config.seed)
  init = config.init_checkpoint
  if init is not None:
    params = checkpoints.restore_params(
        init.path, spec.abstract.params, state.params, step=init.step,
        assignment_map=init.assignment_map, fallback_to_scratch=init.fallback_to_scratch,
        tile_axes=checkpoints.expert_axes(spec.param_axes) if init.upcycle else None)
    state = train_state.with_params(spec, state, params)
  return state, 0


def train(stop_after_step: int | None = None, **fields: Any) -> TrainResult:
  """Trains as gin's `train.*` bindings say; keyword `fields` of `TrainConfig` override them.

  `stop_after_step` ends the run early as a preemption would, after saving (tests use it to
  check exact resume).
  """
  config = TrainConfig(**fields)
  setup = TrainSetup.build(config)
  run_dir = RunDir(config.model_dir)
  ckpt = checkpoints.Checkpointer(run_dir.checkpoints, period=config.checkpoint_period,
                                  keep=config.keep_checkpoints,
                                  async_save=config.async_checkpointing)
  state, position = _initial_state(setup, ckpt)
  start = int(jax.device_get(state.step))
  end = config.total_steps if stop_after_step is None else min(config.total_steps,
                                                                stop_after_step)
  spec = setup.spec
  n_params = train_state.param_count(spec.abstract.params)
  peak, peak_source = peak_flops()
  print(f"Model: {n_params:,} parameters; mesh {dict(setup.partitioner.mesh.shape)}; "
        f"{setup.step_flops:.3e} training FLOPs/step; peak {peak:.3e} FLOP/s ({peak_source}).",
        flush=True)
  n_trainable = spec.trainable_count()
  print(f"Trainable: {n_trainable:,} parameters ({100 * n_trainable / n_params:.3f}%); optimizer "
        f"state {train_state.tree_bytes(spec.abstract.opt_state) / 2**20:.2f} MiB.", flush=True)

  os.makedirs(config.model_dir, exist_ok=True)
  primary = jax.process_index() == 0
  drops = quality.DropCounter()
  with quality.counting(drops):
    loop = TrainLoop(setup.train_step, setup.partitioner,
                     iterate_batches(setup.dataset(), start_batch=position), start, end)
    loop.add_hook(OperativeConfigHook(run_dir, start + 1))
    loop.add_hook(hooks.CheckpointHook(ckpt, start))
    metrics = loop.add_hook(hooks.MetricsHook(
        MetricsWriter(run_dir.train, config.tensorboard, primary),
        Progress(start, config.total_steps), loop.stopwatch, log_period=config.log_period,
        end=end, batch_size=config.train_dataset_cfg.batch_size,
        targets_length=setup.input_shapes["decoder_target_tokens"][1],
        step_flops=setup.step_flops, peak_flops=peak, nonfinite_policy=config.nonfinite_policy,
        extra_metrics=drops.metrics))
    if config.infer_eval_dataset_cfg:  # T5X's infer_eval: decode and score per language.
      cfg = config.infer_eval_dataset_cfg
      loop.add_hook(hooks.EvalHook(evaluation.InferEval(
          config.model, setup.partitioner, spec.shardings.params, cfg, config.model_dir,
          max_examples=config.eval_steps * cfg.batch_size, tensorboard=config.tensorboard),
          config.eval_period, end, config.total_steps))
    teacher_forced = None
    if config.eval_dataset_cfg:
      cfg = config.eval_dataset_cfg
      teacher_forced = hooks.TeacherForcedEval(
          cfg.mixture_or_task_name,
          lambda: iterate_batches(setup.dataset(cfg, num_epochs=1)), setup.eval_step,
          setup.partitioner,
          MetricsWriter(run_dir.training_eval(cfg.mixture_or_task_name), config.tensorboard,
                        primary), config.eval_steps)
      loop.add_hook(hooks.EvalHook(teacher_forced, config.eval_period, end, config.total_steps))
    state, step, interrupted = loop.run(state)
  return TrainResult(step=step, losses=metrics.losses,
                     eval_metrics=teacher_forced.last if teacher_forced else {},
                     interrupted=interrupted, state=state)
