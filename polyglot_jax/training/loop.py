"""The training loop: step until done or stopped, with every other concern a `Hook`.

    loop = TrainLoop(train_step, partitioner, batches, start=step0, end=total_steps)
    loop.add_hook(CheckpointHook(...))        # hooks.py: checkpoints, metrics, evaluation
    state, step, interrupted = loop.run(state)

Per step the loop dispatches the jitted step, then gives the host metrics of the *previous* step
to `Hook.on_metrics` (the host never stalls the device, yet every step's metrics are seen), then
calls `Hook.after_step` of the hooks due at this step with the new state. SIGTERM/SIGINT
(preemption, Ctrl-C) end the loop after the current step; `Hook.at_end` then runs (the
checkpoint hook always leaves a checkpoint). Time spent in hooks that evaluate is kept apart,
so throughput counts training time only.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any, Iterator, Mapping

import jax
from jax.experimental import multihost_utils
import numpy as np

from polyglot_jax.parallel.partitioning import Partitioner
from polyglot_jax.training.train_state import TrainState


class NonFiniteLossError(RuntimeError):
  """Raised when a step's loss or gradients are NaN/Inf under nonfinite_policy='stop'."""


@dataclasses.dataclass
class TrainResult:
  """What a run did: its final step, the loss of every step it ran, the last eval metrics."""

  step: int
  losses: list[float]
  eval_metrics: dict[str, float]
  interrupted: str | None = None  # Name of the signal that stopped it, if any.
  state: TrainState | None = None


class Hook:
  """One concern of a run (checkpoints, logging, evaluation...); every method is optional.

  Attributes:
    every: `after_step` runs at steps that are multiples of it (0: never).
    pauses_throughput: time in `after_step` is not training time (evaluation).
  """

  every: int = 0
  pauses_throughput: bool = False

  def after_step(self, step: int, state: TrainState) -> None:
    """Runs right after `step` is dispatched; `state` is the state after it (on device)."""

  def on_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
    """The host metrics of `step`, every step, one step late (none are skipped)."""

  def at_end(self, step: int, state: TrainState, interrupted: str | None) -> None:
    """Once, after the last step (`interrupted`: the signal that stopped the run, if any)."""

  def close(self) -> None:
    """Releases files and threads; runs even when the loop raised."""


class StopSignals:
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

  def __enter__(self) -> StopSignals:
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


class Stopwatch:
  """Wall time since the last `reset`, less the time hooks spent paused (evaluation)."""

  def __init__(self):
    self._start = time.time()
    self._paused = 0.0

  def pause_for(self, seconds: float) -> None:
    self._paused += seconds

  def training_seconds(self) -> float:
    return time.time() - self._start - self._paused

  def reset(self) -> None:
    self._start, self._paused = time.time(), 0.0


class TrainLoop:
  """Runs `train_step` from step `start` to `end` over `batches`, calling the hooks."""

  def __init__(self, train_step: Any, partitioner: Partitioner,
               batches: Iterator[Mapping[str, np.ndarray]], start: int, end: int):
    self.train_step = train_step
    self.partitioner = partitioner
    self.batches = batches
    self.start = start
    self.end = end
    self.hooks: list[Hook] = []
    self.stopwatch = Stopwatch()

  def add_hook(self, hook: Hook) -> Hook:
    """Adds `hook`; hooks run in the order they were added. Returns it."""
    self.hooks.append(hook)
    return hook

  def _after_step(self, step: int, state: TrainState) -> None:
    for hook in self.hooks:
      if hook.every and step % hook.every == 0:
        began = time.time()
        hook.after_step(step, state)
        if hook.pauses_throughput:
          self.stopwatch.pause_for(time.time() - began)

  def _metrics(self, step: int, device_metrics: Any) -> None:
    metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    for hook in self.hooks:
      hook.on_metrics(step, metrics)

  def run(self, state: TrainState) -> tuple[TrainState, int, str | None]:
    """Trains until `end` or a stop signal; returns (state, last step, signal name or None)."""
    try:
      with StopSignals() as stop, self.partitioner.activate():
        pending = None
        step = self.start
        self.stopwatch.reset()
        while step < self.end and not stop.stop_after(step):
          batch = self.partitioner.shard_batch(next(self.batches))
          state, metrics = self.train_step(state, batch)
          step += 1
          if pending is not None:
            self._metrics(*pending)
          pending = (step, metrics)
          self._after_step(step, state)
        if pending is not None:
          self._metrics(*pending)
        for hook in self.hooks:
          hook.at_end(step, state, stop.received)
    finally:
      for hook in self.hooks:
        hook.close()
    return state, step, stop.received
