"""The hooks of a training run (`loop.Hook`): checkpoints, metrics and throughput, evaluation.

Each hook owns one concern and its files in MODEL_DIR (training/rundir.py):
  CheckpointHook   checkpoints/: saves every `period` steps, and always at the end
  MetricsHook      train/: loss and every step metric, throughput, MFU; checks finiteness
  EvalHook         training_eval/<task>/: teacher-forced metrics every `eval_period` steps
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from polyglot_jax.models import losses
from polyglot_jax.parallel.partitioning import Partitioner
from polyglot_jax.training import checkpoints, flops
from polyglot_jax.training.loop import Hook, NonFiniteLossError, Stopwatch
from polyglot_jax.training.metrics import MetricsWriter, Progress
from polyglot_jax.training.train_state import TrainState


class CheckpointHook(Hook):
  """Saves the state and the data position every step the checkpointer's period allows, and
  always at the end (the last step, or the step a signal stopped at)."""

  every = 1

  def __init__(self, checkpointer: checkpoints.Checkpointer, start: int):
    self.checkpointer = checkpointer
    self._last_saved = start

  def after_step(self, step: int, state: TrainState) -> None:
    if self.checkpointer.save(step, state, {"batches": step}):
      self._last_saved = step

  def at_end(self, step: int, state: TrainState, interrupted: str | None) -> None:
    if self._last_saved != step:
      self.checkpointer.save(step, state, {"batches": step}, force=True)
    if interrupted:
      print(f"Received {interrupted}: saved a checkpoint at step {step}; rerun the same "
            "command to resume.", flush=True)

  def close(self) -> None:
    self.checkpointer.close()


class MetricsHook(Hook):
  """Checks every step's loss, and every `log_period` steps (and at the last) writes the step's
  metrics with throughput and MFU to train/ and the progress bar.

  Attributes:
    losses: the loss of every step seen, in order.
  """

  def __init__(self, writer: MetricsWriter, progress: Progress, stopwatch: Stopwatch, *,
               log_period: int, end: int, batch_size: int, targets_length: int,
               step_flops: float, peak_flops: float, nonfinite_policy: str,
               extra_metrics: Callable[[], Mapping[str, float]] = dict):
    self.writer = writer
    self.progress = progress
    self.stopwatch = stopwatch
    self.log_period = log_period
    self.end = end
    self.batch_size = batch_size
    self.targets_length = targets_length
    self.step_flops = step_flops
    self.peak_flops = peak_flops
    self.nonfinite_policy = nonfinite_policy
    self.extra_metrics = extra_metrics
    self.losses: list[float] = []
    self._nonfinite = 0
    self._window = 0

  def on_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
    if metrics["nonfinite"]:
      self._nonfinite += 1
      if self.nonfinite_policy == "stop":
        raise NonFiniteLossError(
            f"loss or gradients are not finite at step {step} (loss={metrics['loss']}); the "
            "update was skipped and training stopped. Lower the learning rate, enable clipping, "
            "or set train.nonfinite_policy='skip' to skip such updates and go on.")
    self.losses.append(metrics["loss"])
    self._window += 1
    if step % self.log_period and step != self.end:
      return
    seconds = max(self.stopwatch.training_seconds(), 1e-9)
    steps = self._window
    logged = {k: v for k, v in metrics.items() if k not in ("num_tokens", "num_sequences")}
    logged["nonfinite_updates"] = self._nonfinite
    logged.update(self.extra_metrics())
    logged["timing/steps_per_second"] = steps / seconds
    logged["timing/seqs_per_second"] = steps * self.batch_size / seconds
    logged["timing/target_tokens_per_second"] = (
        steps * self.batch_size * self.targets_length / seconds)
    logged["timing/mfu"] = flops.mfu(self.step_flops * steps, seconds, self.peak_flops)
    self.writer.write(step, logged)
    self.progress.update(step, logged)
    self._window = 0
    self.stopwatch.reset()

  def close(self) -> None:
    self.progress.close()
    self.writer.close()


def teacher_forced_metrics(params: Any, eval_step: Any, partitioner: Partitioner,
                           batches: Iterator[Mapping[str, np.ndarray]], max_batches: int
                           ) -> dict[str, float]:
  """T5X-named metrics of `eval_step`'s sums over up to `max_batches` batches."""
  total: dict[str, Any] | None = None
  for _, batch in zip(range(max_batches), batches):
    sums = eval_step(params, partitioner.shard_batch(batch))
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  if total is None:
    raise ValueError("the evaluation dataset produced no batch; check its split and batch size.")
  total = jax.device_get(total)
  return {k: float(v) for k, v in losses.summarize(total).items()}


class EvalHook(Hook):
  """Every `period` steps before `end`, and at `total_steps`, calls `evaluate(params, step)`.

  `evaluate` is teacher-forced evaluation (`TeacherForcedEval`) or decoding (infer_eval).
  """

  pauses_throughput = True

  def __init__(self, evaluate: Callable[[Any, int], Mapping[str, float]], period: int, end: int,
               total_steps: int):
    self.evaluate = evaluate
    self.every = period
    self.end = end
    self.total_steps = total_steps

  def after_step(self, step: int, state: TrainState) -> None:
    if step < self.end:
      self.evaluate(state.params, step)

  def at_end(self, step: int, state: TrainState, interrupted: str | None) -> None:
    if step == self.total_steps:
      self.evaluate(state.params, step)

  def close(self) -> None:
    close = getattr(self.evaluate, "close", None)
    if close:
      close()


class TeacherForcedEval:
  """Loss and accuracy on `eval_steps` batches of a dataset, written to training_eval/<task>/.

  Attributes:
    last: the metrics of the latest evaluation.
  """

  def __init__(self, name: str, make_batches: Callable[[], Iterator[Mapping[str, np.ndarray]]],
               eval_step: Any, partitioner: Partitioner, writer: MetricsWriter, eval_steps: int):
    self.name = name
    self.make_batches = make_batches
    self.eval_step = eval_step
    self.partitioner = partitioner
    self.writer = writer
    self.eval_steps = eval_steps
    self.last: dict[str, float] = {}

  def __call__(self, params: Any, step: int) -> dict[str, float]:
    metrics = teacher_forced_metrics(params, self.eval_step, self.partitioner,
                                     self.make_batches(), self.eval_steps)
    self.writer.write(step, metrics)
    self.last = metrics
    shown = "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
    print(f"eval {self.name} @ step {step}: {shown}", flush=True)
    return metrics

  def close(self) -> None:
    self.writer.close()
