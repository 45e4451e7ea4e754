"""Metric sinks: one JSON line per logged step, TensorBoard event files, and a progress bar.

Names follow T5X (`loss`, `accuracy`, `timing/seqs_per_second`, ...). Each scope (`train`,
`training_eval/<task>`) writes under its own folder of MODEL_DIR, as T5X does.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import tensorboardX
import tqdm

from polyglot_jax.training.rundir import METRICS_FILE


class MetricsWriter:
  """Writes scalar metrics of one scope to `<dir>/metrics.jsonl` and TensorBoard events.

  Only the primary process (`primary=True`, process 0 on a multi-host job) writes; the metrics
  are global, so the other hosts' writers do nothing.
  """

  def __init__(self, directory: str, tensorboard: bool = True, primary: bool = True):
    self.path = os.path.join(directory, METRICS_FILE)
    self._jsonl = self._tb = None
    if primary:
      os.makedirs(directory, exist_ok=True)
      self._jsonl = open(self.path, "a", encoding="utf-8")
      self._tb = tensorboardX.SummaryWriter(directory) if tensorboard else None

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if self._jsonl is None:
      return
    values = {k: float(v) for k, v in metrics.items()}
    record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(name, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict[str, float]]:
  """Reads back a metrics.jsonl file (tests and sweeps)."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A progress bar with loss, tokens/s and ETA (plain lines when stdout is not a terminal)."""

  def __init__(self, start_step: int, total_steps: int):
    self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                          disable=None, file=sys.stdout)
    self._plain = self._bar.disable
    self._start = time.time()
    self._start_step = start_step
    self._total = total_steps

  def update(self, step: int, metrics: Mapping[str, float]) -> None:
    loss = metrics.get("loss", float("nan"))
    tps = metrics.get("timing/target_tokens_per_second", 0.0)
    mfu = metrics.get("timing/mfu", 0.0)
    if self._plain:
      done = step - self._start_step
      rate = done / max(time.time() - self._start, 1e-9)
      eta = (self._total - step) / rate if rate > 0 else float("inf")
      print(f"step {step}/{self._total}  loss {loss:.4f}  tokens/s {tps:,.0f}  mfu {mfu:.1%}  "
            f"eta {eta:,.0f}s", flush=True)
    else:
      self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.1%}")
      self._bar.n = step
      self._bar.refresh()

  def close(self) -> None:
    self._bar.close()
