"""Running a sweep's runs one after another on this machine, or printing their commands.

Local runs are subprocesses by default: each run gets fresh gin and JAX state, its own device
memory (freed when it exits, which matters on a GPU) and its own crash. `in_process=True` calls
the same `polyglot-jax train` entry in this process instead, for notebooks and tiny CPU sweeps
where importing TensorFlow, seqio and JAX (~10 s) would cost more than the run itself. Either
way the run's output goes to MODEL_DIR/train.log and its outcome to MODEL_DIR/sweep_run.json:

  {"name", "command" (the train flags), "status", "exit_code", "seconds", "error"}

status is "running" while it runs, then "finished", "failed" or "interrupted". A rerun skips a
run whose record says "finished" for the same command; any other run is started again and train
resumes it from its latest checkpoint in MODEL_DIR. A failed run is recorded and the sweep goes
on. SIGINT/SIGTERM (Ctrl-C, preemption) reach the running train, which saves a checkpoint; the
sweep then stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Sequence, TextIO

import gin
import jax

from polyglot_jax.commands import GIN_COMMANDS, runner
from polyglot_jax.commands.runner import FAILED, FINISHED, INTERRUPTED
from polyglot_jax.sweep.grid import Run

RECORD = "sweep_run.json"
LOG = "train.log"
OUTCOME = "train_outcome.json"  # the subprocess's runner.Outcome
RUNNING = "running"


@dataclasses.dataclass(frozen=True)
class Outcome:
  """How one run ended (a run skipped as finished before keeps its recorded outcome)."""

  name: str
  status: str
  exit_code: int | None = None
  seconds: float = 0.0
  error: str = ""
  stopped_by: str | None = None  # SIGINT or SIGTERM, which also stopped the sweep.


def command_line(run: Run) -> str:
  """The shell command that trains `run` (what --dry_run prints)."""
  return shlex.join(["polyglot-jax", "train", *run.train_args()])


def tpu_launch_lines(runs: Sequence[Run], tpu_name: str, zone: str,
                     project: str | None = None) -> list[str]:
  """One `tpu/pod.py launch` command per run, each on its own slice `<tpu_name>-<index>`.

  A launch starts train in the background on every worker of a slice, so two runs launched on
  one slice would share its chips; create (and install) the slices first with tpu/pod.py. Each
  command is preceded by a `# <run name>` comment line.
  """
  lines = []
  for index, run in enumerate(runs):
    flags = [f"--name={tpu_name}-{index}", f"--zone={zone}"]
    flags += [f"--project={project}"] if project else []
    lines.append(f"# {run.name}")
    lines.append(shlex.join(["python", "tpu/pod.py", "launch", *flags, "--", *run.train_args()]))
  return lines


def read_record(model_dir: str) -> dict[str, Any] | None:
  """The run's sweep_run.json, or None when the sweep never started it on this machine."""
  path = os.path.join(model_dir, RECORD)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_record(run: Run, status: str, exit_code: int | None = None, seconds: float = 0.0,
                  error: str = "") -> None:
  record = {"name": run.name, "command": run.train_args(), "status": status,
            "exit_code": exit_code, "seconds": round(seconds, 3), "error": error}
  with open(os.path.join(run.model_dir, RECORD), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)


def _error(outcome: runner.Outcome | None, log_path: str, exit_code: int) -> str:
  """The run's one-line error (its runner outcome), else the last line it printed."""
  if exit_code < 0:
    return f"killed by {signal.Signals(-exit_code).name}"
  if outcome is not None and outcome.error:
    return outcome.error
  with open(log_path, encoding="utf-8", errors="replace") as f:
    lines = [line.strip() for line in f if line.strip()]
  return lines[-1] if lines else f"exit code {exit_code}"


def _stopped_by(code: int) -> str | None:
  """The signal behind train's exit code 130/143, else None."""
  return next((name for name, value in runner.INTERRUPT_EXIT_CODES.items() if value == code),
              None)


def _train_subprocess(run: Run, log: TextIO) -> tuple[int, str | None, runner.Outcome | None]:
  """`python -m polyglot_jax.cli train ...`: (exit code, the signal that stopped it or None, its
  outcome). SIGINT/SIGTERM sent to the sweep are passed on to train, which checkpoints and exits.
  """
  received: list[str] = []
  procs: list[subprocess.Popen] = []

  def forward(signum: int, frame: Any) -> None:
    del frame
    received.append(signal.Signals(signum).name)
    for proc in procs:
      proc.send_signal(signum)

  outcome_path = os.path.join(run.model_dir, OUTCOME)
  if os.path.exists(outcome_path):
    os.remove(outcome_path)
  previous = {}
  for sig in (signal.SIGINT, signal.SIGTERM):
    with contextlib.suppress(ValueError):  # Not the main thread: nothing to install.
      previous[sig] = signal.signal(sig, forward)
  try:
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "polyglot_jax.cli", "train", *run.train_args()],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, runner.OUTCOME_ENV: outcome_path}))
    if received:  # A signal came before the process existed.
      procs[0].send_signal(signal.Signals[received[0]])
    code = procs[0].wait()
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return code, received[0] if received else _stopped_by(code), runner.read_outcome(outcome_path)


def _train_in_process(run: Run, log: TextIO) -> tuple[int, str | None, runner.Outcome | None]:
  """The train command in this process through the runner, with output to `log`."""
  train = GIN_COMMANDS["train"]
  try:
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
      try:
        outcome = runner.run_gin_command(
            lambda: train.entry()(), run.gin_files,
            [*run.bindings, f"MODEL_DIR={run.model_dir}"], run.search_paths)
      except KeyboardInterrupt:  # Ctrl-C before train's own handler was installed.
        return 130, "SIGINT", None
      except Exception:  # pylint: disable=broad-except  A crash fails this run, not the sweep.
        traceback.print_exc()
        return 1, None, None
  finally:
    gin.clear_config()
    jax.clear_caches()
  return outcome.exit_code, outcome.stopped_by, outcome


def run_locally(runs: Sequence[Run], in_process: bool = False) -> list[Outcome]:
  """Trains the runs one after another (see the module docstring); stops after an interrupt."""
  outcomes = []
  for index, run in enumerate(runs):
    prefix = f"[{index + 1}/{len(runs)}] {run.name}:"
    record = read_record(run.model_dir)
    if record and record["status"] == FINISHED and record["command"] == run.train_args():
      outcomes.append(Outcome(run.name, FINISHED, record["exit_code"], record["seconds"]))
      print(f"{prefix} finished before, skipped.", flush=True)
      continue
    os.makedirs(run.model_dir, exist_ok=True)
    _write_record(run, RUNNING)
    log_path = os.path.join(run.model_dir, LOG)
    print(f"{prefix} training (log: {log_path})", flush=True)
    start = time.time()
    with open(log_path, "a", encoding="utf-8") as log:
      print(f"$ {command_line(run)}", file=log, flush=True)
      code, stopped_by, train_outcome = (_train_in_process if in_process else _train_subprocess)(
          run, log)
    seconds = time.time() - start
    if stopped_by:
      outcome = Outcome(run.name, INTERRUPTED, code, seconds, f"stopped by {stopped_by}; rerun "
                        "the sweep to resume from the last checkpoint", stopped_by)
    elif code == 0:
      outcome = Outcome(run.name, FINISHED, code, seconds)
    else:
      outcome = Outcome(run.name, FAILED, code, seconds, _error(train_outcome, log_path, code))
    _write_record(run, outcome.status, code, seconds, outcome.error)
    print(f"{prefix} {outcome.status} in {seconds:.1f} s"
          + (f": {outcome.error}" if outcome.error else ""), flush=True)
    outcomes.append(outcome)
    if outcome.status == INTERRUPTED:
      print("Sweep stopped; rerun the same command to resume.", flush=True)
      break
  return outcomes
