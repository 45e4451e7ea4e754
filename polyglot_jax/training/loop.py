"""The training loop: resume or initialise, step, log, evaluate, checkpoint, stop cleanly.

Read top to bottom, `train` is the whole run. Metrics of step t are fetched after step t+1 is
dispatched, so the host never stalls the device, yet every step's loss is checked and logged.
SIGTERM/SIGINT (preemption, Ctrl-C) finish the current step, save a checkpoint and return.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Iterator, Mapping

import gin
import jax
from jax.experimental import multihost_utils
import numpy as np

from polyglot_jax.compression.sparsity import Sparsity
from polyglot_jax.data.pipeline import DatasetConfig, dropped_metrics, get_dataset, iterate_batches
from polyglot_jax.inference import evaluation
from polyglot_jax.models import losses
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import checkpoints, flops, step as step_lib, train_state
from polyglot_jax.training.metrics import MetricsWriter, Progress

NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
  """Raised when a step's loss or gradients are NaN/Inf under nonfinite_policy='stop'."""


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


@dataclasses.dataclass
class TrainResult:
  """What a run did: its final step, the loss of every step it ran, the last eval metrics."""

  step: int
  losses: list[float]
  eval_metrics: dict[str, float]
  interrupted: str | None = None  # Name of the signal that stopped it, if any.
  state: train_state.TrainState | None = None


class _StopSignals:
  """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint first.

  With several processes, every one must stop after the same step or the others hang in the
  next collective, yet a signal reaches one host at a time. There JAX's preemption service
  (installed by `jax.distributed.initialize`) catches SIGTERM, tells every process, and agrees
  on the step to stop after; SIGINT is forwarded to it as a SIGTERM.
  """

  def __init__(self):
    self.received: str | None = None
    self._coordinated = jax.process_count() > 1
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> "_StopSignals":
    signals = (signal.SIGINT,) if self._coordinated else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. a notebook worker): nothing to install.
        pass
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    self.received = signal.Signals(signum).name
    if self._coordinated:
      os.kill(os.getpid(), signal.SIGTERM)

  def stop_after(self, step: int) -> bool:
    """Whether to stop after `step`; call it once per step, with increasing steps."""
    if self._coordinated and multihost_utils.reached_preemption_sync_point(step):
      self.received = self.received or "SIGTERM"
      return True
    return not self._coordinated and self.received is not None

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _input_shapes(ds: Any, global_batch: int) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
  shapes, types = {}, {}
  for name, spec in ds.element_spec.items():
    shapes[name] = (global_batch,) + tuple(spec.shape[1:])
    types[name] = spec.dtype.as_numpy_dtype
  return shapes, types


@functools.cache
def _peak_flops() -> tuple[float, str]:
  """Datasheet peak on accelerators; on CPU a large f32 matmul measured once in this process
  (1-2 s of every in-process run otherwise: sweeps, notebooks, tests)."""
  device = jax.devices()[0]
  peak = flops.datasheet_peak_flops(device)
  if peak:
    return peak, f"{device.device_kind} datasheet"
  return flops.measure_peak_flops(), "measured f32 matmul"


def evaluate(model: Any, params: Any, eval_step: Any, partitioner: Partitioner,
             batches: Iterator[Mapping[str, np.ndarray]], max_batches: int) -> dict[str, float]:
  """Sums eval metric sums over up to `max_batches` batches and returns T5X-named metrics."""
  total: dict[str, Any] | None = None
  for _, batch in zip(range(max_batches), batches):
    sums = eval_step(params, partitioner.shard_batch(batch))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  if total is None:
    raise ValueError("the evaluation dataset produced no batch; check its split and batch size.")
  total = jax.device_get(total)
  return {k: float(v) for k, v in losses.summarize(total).items()}


@gin.configurable(denylist=["stop_after_step"])
def train(
    *,
    model: Any = gin.REQUIRED,
    train_dataset_cfg: DatasetConfig = gin.REQUIRED,
    optimizer: Any = gin.REQUIRED,
    model_dir: str = gin.REQUIRED,
    total_steps: int = gin.REQUIRED,
    eval_dataset_cfg: DatasetConfig | None = None,
    infer_eval_dataset_cfg: DatasetConfig | None = None,
    mesh: MeshConfig = MeshConfig(),
    seed: int = 0,
    num_microbatches: int = 1,
    checkpoint_period: int = 1000,
    keep_checkpoints: int | None = 3,
    async_checkpointing: bool = True,
    eval_period: int = 1000,
    eval_steps: int = 20,
    log_period: int = 100,
    nonfinite_policy: str = "stop",
    init_checkpoint: InitCheckpoint | None = None,
    sparsity: Sparsity | None = None,
    trainable_params: str | None = None,
    tensorboard: bool = True,
    stop_after_step: int | None = None,
) -> TrainResult:
  """Trains `model` on `train_dataset_cfg` for `total_steps` optimizer steps.

  Resumes from the latest checkpoint in `model_dir` when there is one (state and data position),
  otherwise initialises (optionally from `init_checkpoint`). `stop_after_step` ends the run early
  as a preemption would, after saving (tests use it to check exact resume). `sparsity` prunes
  weights gradually during training (gin/sparsity/*.gin) and logs `sparsity/*` metrics.
  `trainable_params` (a regex over parameter paths, e.g. gin/routing/mov_10.gin's adapters)
  freezes every other parameter: it gets no updates and no optimizer state.
  Every `eval_period` steps, `eval_dataset_cfg` gives teacher-forced metrics (training_eval/)
  and `infer_eval_dataset_cfg` decodes and scores per language (infer_eval/, `evaluation`).
  """
  if nonfinite_policy not in NONFINITE_POLICIES:
    raise ValueError(f"train.nonfinite_policy={nonfinite_policy!r}; use one of {NONFINITE_POLICIES}.")
  partitioner = Partitioner(mesh)
  converter = model.FEATURE_CONVERTER_CLS
  ds = get_dataset(train_dataset_cfg, converter, shard_id=jax.process_index(),
                   num_shards=jax.process_count())
  input_shapes, input_types = _input_shapes(ds, train_dataset_cfg.batch_size)
  spec = train_state.state_spec(model, optimizer, partitioner, input_shapes, input_types,
                                sparsity=sparsity, trainable_params=trainable_params)
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), period=checkpoint_period,
                                  keep=keep_checkpoints, async_save=async_checkpointing)

  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(latest, spec.abstract)
    print(f"Resumed from {ckpt.directory} at step {latest}.", flush=True)
  else:
    state = train_state.initialize(model, spec, input_shapes, seed, input_types)
    data_state = {"batches": 0}
    if init_checkpoint is not None:
      params = checkpoints.restore_params(
          init_checkpoint.path, spec.abstract.params, state.params, step=init_checkpoint.step,
          assignment_map=init_checkpoint.assignment_map,
          fallback_to_scratch=init_checkpoint.fallback_to_scratch,
          tile_axes=checkpoints.expert_axes(spec.param_axes) if init_checkpoint.upcycle else None)
      state = train_state.with_params(spec, state, params)
  start = int(jax.device_get(state.step))
  n_params = train_state.param_count(spec.abstract.params)

  lr_fn = optimizer.learning_rate_fn
  train_step = step_lib.make_train_step(model, spec, partitioner, learning_rate_fn=lr_fn,
                                        num_microbatches=num_microbatches, dropout_seed=seed)
  eval_step = step_lib.make_eval_step(model, spec, partitioner)
  batches = iterate_batches(ds, start_batch=int(data_state["batches"]))
  targets_len = input_shapes["decoder_target_tokens"][1]
  step_flops = flops.batch_training_flops(model.config, input_shapes)
  peak, peak_source = _peak_flops()
  print(f"Model: {n_params:,} parameters; mesh {dict(partitioner.mesh.shape)}; "
        f"{step_flops:.3e} training FLOPs/step; peak {peak:.3e} FLOP/s ({peak_source}).",
        flush=True)
  n_trainable = spec.trainable_count()
  print(f"Trainable: {n_trainable:,} parameters ({100 * n_trainable / n_params:.3f}%); optimizer "
        f"state {train_state.tree_bytes(spec.abstract.opt_state) / 2**20:.2f} MiB.", flush=True)

  os.makedirs(model_dir, exist_ok=True)
  primary = jax.process_index() == 0
  writer = MetricsWriter(os.path.join(model_dir, "train"), tensorboard, primary)
  eval_writer = MetricsWriter(os.path.join(model_dir, "training_eval",
                                           eval_dataset_cfg.mixture_or_task_name),
                              tensorboard, primary) if eval_dataset_cfg else None
  # T5X's infer_eval: decode up to eval_steps batches and score them per language.
  infer_eval = evaluation.InferEval(
      model, partitioner, spec.shardings.params, infer_eval_dataset_cfg, model_dir,
      max_examples=eval_steps * infer_eval_dataset_cfg.batch_size,
      tensorboard=tensorboard) if infer_eval_dataset_cfg else None
  progress = Progress(start, total_steps)
  result = TrainResult(step=start, losses=[], eval_metrics={})
  nonfinite_total = 0
  window: list[dict[str, float]] = []
  window_start = time.time()
  end = total_steps if stop_after_step is None else min(total_steps, stop_after_step)

  def run_eval(at_step: int) -> None:
    nonlocal window_start
    began = time.time()
    if infer_eval:
      infer_eval(state.params, at_step)
    if eval_dataset_cfg:
      eval_ds = get_dataset(eval_dataset_cfg, converter, shard_id=jax.process_index(),
                            num_shards=jax.process_count(), num_epochs=1)
      metrics = evaluate(model, state.params, eval_step, partitioner, iterate_batches(eval_ds),
                         eval_steps)
      eval_writer.write(at_step, metrics)
      result.eval_metrics = metrics
      shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
      print(f"eval {eval_dataset_cfg.mixture_or_task_name} @ step {at_step}: {shown}", flush=True)
    window_start += time.time() - began  # Throughput counts training time only.

  def finish_step(at_step: int, device_metrics: Any) -> None:
    """Host side of a finished step: check, accumulate, log."""
    nonlocal nonfinite_total, window, window_start
    metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if metrics["nonfinite"]:
      nonfinite_total += 1
      if nonfinite_policy == "stop":
        raise NonFiniteLossError(
            f"loss or gradients are not finite at step {at_step} (loss={metrics['loss']}); the "
            "update was skipped and training stopped. Lower the learning rate, enable clipping, "
            "or set train.nonfinite_policy='skip' to skip such updates and go on.")
    result.losses.append(metrics["loss"])
    window.append(metrics)
    if at_step % log_period == 0 or at_step == end:
      seconds = max(time.time() - window_start, 1e-9)
      logged = {k: v for k, v in metrics.items() if k not in ("num_tokens", "num_sequences")}
      logged["nonfinite_updates"] = nonfinite_total
      logged.update(dropped_metrics())
      logged["timing/steps_per_second"] = len(window) / seconds
      logged["timing/seqs_per_second"] = len(window) * train_dataset_cfg.batch_size / seconds
      logged["timing/target_tokens_per_second"] = (
          len(window) * train_dataset_cfg.batch_size * targets_len / seconds)
      logged["timing/mfu"] = flops.mfu(step_flops * len(window), seconds, peak)
      writer.write(at_step, logged)
      progress.update(at_step, logged)
      window, window_start = [], time.time()

  try:
    with _StopSignals() as stop, partitioner.activate():
      pending = None
      step = last_saved = start
      while step < end and not stop.stop_after(step):
        batch = partitioner.shard_batch(next(batches))
        state, metrics = train_step(state, batch)
        step += 1
        if pending is not None:
          finish_step(*pending)
        pending = (step, metrics)
        if step == start + 1 and primary:
          _write_operative_config(model_dir)
        if ckpt.save(step, state, {"batches": step}):
          last_saved = step
        if (eval_dataset_cfg or infer_eval) and eval_period and step % eval_period == 0 \
            and step < end:
          run_eval(step)
      if last_saved != step:  # The end of the run, or a signal: always leave a checkpoint.
        ckpt.save(step, state, {"batches": step}, force=True)
      if pending is not None:
        finish_step(*pending)
      if step == total_steps and (eval_dataset_cfg or infer_eval):
        run_eval(step)
      result.step = step
      result.interrupted = stop.received
      if stop.received:
        print(f"Received {stop.received}: saved a checkpoint at step {step}; rerun the same "
              "command to resume.", flush=True)
  finally:
    ckpt.close()
    progress.close()
    writer.close()
    if eval_writer:
      eval_writer.close()
    if infer_eval:
      infer_eval.close()
  result.state = state
  return result


def _write_operative_config(model_dir: str) -> None:
  """Saves the gin bindings this run actually used, as T5X does (MODEL_DIR/config.gin)."""
  with open(os.path.join(model_dir, "config.gin"), "w", encoding="utf-8") as f:
    f.write(gin.operative_config_str())
