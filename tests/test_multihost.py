"""Multi-host training: 2 real processes of 4 CPU devices each equal 1 process of 8 devices.

Both runs read the global batch as 2 data shards (`DatasetConfig.num_data_shards=2`), so each
of the 2 processes feeds only its own shard and the single process reads both; the losses must
agree, and the checkpoint the 2 processes wrote together must resume in 1 process. A SIGTERM
that reaches one host stops both after the same step. Start-up checks: a missing or different
host ends every process with one line.
"""

import importlib.util
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import gin
import numpy as np
import pytest

from polyglot_jax import cli
from polyglot_jax.training.metrics import read_jsonl

ARGS = ["train", "--gin_file=experiments/quickstart.gin", "--gin.BATCH_SIZE=8",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
        "--gin.train/DatasetConfig.num_data_shards=2", "--gin.train.eval_dataset_cfg=None",
        "--gin.train.log_period=1", "--gin.train.tensorboard=False",
        "--gin.train.async_checkpointing=False"]


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _losses(model_dir: str) -> dict[int, list[float]]:
  """Step -> the losses logged for it (one entry per run that logged it)."""
  by_step: dict[int, list[float]] = {}
  for record in read_jsonl(os.path.join(model_dir, "train", "metrics.jsonl")):
    by_step.setdefault(int(record["step"]), []).append(record["loss"])
  return by_step


def _train_in_this_process(model_dir: str, steps: int) -> None:
  gin.clear_config()  # A parsed config is locked; each run parses its own.
  assert cli.main([*ARGS, f"--gin.MODEL_DIR={model_dir}", f"--gin.TRAIN_STEPS={steps}"]) == 0


def _start_processes(model_dir: str, steps: int, num_devices: tuple[int, int] = (4, 4),
                     extra: tuple[list[str], list[str]] = ([], []),
                     timeout: int = 60, which: tuple[int, ...] = (0, 1)) -> list[subprocess.Popen]:
  """`polyglot-jax train` processes `which` of a 2-process job on this machine (gloo)."""
  address = f"localhost:{_free_port()}"
  return [subprocess.Popen(
      [sys.executable, "-m", "polyglot_jax.cli", *ARGS, f"--gin.MODEL_DIR={model_dir}",
       f"--gin.TRAIN_STEPS={steps}", f"--coordinator_address={address}", "--num_processes=2",
       f"--process_id={i}", f"--startup_timeout={timeout}", *extra[i]],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env={**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu",
           "JAX_NUM_CPU_DEVICES": str(num_devices[i])}) for i in which]


def _outputs(procs: list[subprocess.Popen], timeout: int = 300) -> list[str]:
  try:
    return [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:  # A failed peer leaves the other waiting for it: end both.
      p.kill()


def test_two_processes_match_one_stop_together_on_one_sigterm_and_resume_in_one(tmp_path):
  """SIGTERM reaches one host of a pod first: both must save the same step and exit."""
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  procs = _start_processes(multi, steps=100_000)
  metrics = os.path.join(multi, "train", "metrics.jsonl")
  deadline = time.monotonic() + 300
  while not (os.path.exists(metrics) and pathlib.Path(metrics).read_text().count("\n") >= 2):
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _outputs(procs)
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)  # Only process 1 is "preempted".
  outputs = _outputs(procs)
  saved = set()
  for p, out in zip(procs, outputs):
    assert p.returncode == 143, out
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1}" in out, out
    saved.update(re.findall(r"saved a checkpoint at step (\d+)", out))
  assert len(saved) == 1, outputs  # The same step on both processes.
  stopped = int(saved.pop())

  _train_in_this_process(single, stopped + 1)
  reference, two = _losses(single), _losses(multi)
  assert sorted(two) == list(range(1, stopped + 1))
  for step in two:
    assert len(two[step]) == 1  # Only process 0 writes the (global) metrics.
    np.testing.assert_allclose(two[step], reference[step], rtol=1e-5)

  _train_in_this_process(multi, stopped + 1)  # Restores the 2-process checkpoint on 8 devices.
  np.testing.assert_allclose(_losses(multi)[stopped + 1], reference[stopped + 1], rtol=1e-5)


def test_a_host_that_never_starts_ends_the_others_with_one_line(tmp_path):
  """Each side of a job whose peer never comes exits with status 2 and one line."""
  alone = [_start_processes(str(tmp_path / f"run{i}"), steps=1, timeout=3, which=(i,))[0]
           for i in range(2)]  # Process 0 of one job, process 1 of another.
  expected = ["process(es) [1] of 2 did not start within 3 s",
              "process 1 could not reach process 0 at localhost:"]
  for p, out, message in zip(alone, _outputs(alone), expected):
    errors = [line for line in out.splitlines() if "polyglot-jax train: error:" in line]
    assert p.returncode == 2 and len(errors) == 1, out
    assert out.rstrip().endswith(errors[0]) and message in errors[0], out


@pytest.mark.parametrize("num_devices, extra, expected", [
    ((4, 2), ([], []), "differs from process 0 in its local devices (2 x cpu vs 4 x cpu)"),
    ((4, 4), ([], ["--gin.BATCH_SIZE=16"]), "differs from process 0 in its gin config"),
])
def test_hosts_that_differ_all_exit_with_one_line(tmp_path, num_devices, extra, expected):
  procs = _start_processes(str(tmp_path / "run"), steps=1, num_devices=num_devices, extra=extra)
  for p, out in zip(procs, _outputs(procs)):
    assert p.returncode == 2, out
    assert out.rstrip().splitlines()[-1].startswith("polyglot-jax train: error: process 1 "), out
    assert expected in out, out


def test_partial_multihost_flags_are_one_line(capsys):
  code = cli.main([*ARGS, "--gin.MODEL_DIR=/tmp/unused", "--gin.TRAIN_STEPS=1",
                   "--num_processes=2"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1
  assert "needs --coordinator_address (or JAX_COORDINATOR_ADDRESS), --num_processes and " \
      "--process_id together" in err


POD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tpu", "pod.py")


def _dry_run(*args: str) -> list[list[str]]:
  """The commands tpu/pod.py would run, each split as a shell would."""
  out = subprocess.run([sys.executable, POD, "--name=run1", "--zone=us-central2-b", "--dry-run",
                        *args], capture_output=True, text=True, check=True).stdout
  return [shlex.split(line) for line in out.splitlines()]


def test_tpu_pod_dry_run_prints_the_exact_gcloud_commands():
  assert _dry_run("create", "--accelerator=v4-128", "--queued", "--spot") == [[
      "gcloud", "compute", "tpus", "queued-resources", "create", "run1", "--node-id=run1",
      "--zone=us-central2-b", "--accelerator-type=v4-128",
      "--runtime-version=tpu-ubuntu2204-base", "--spot"]]
  assert _dry_run("create", "--accelerator=v4-8") == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "run1", "--zone=us-central2-b",
      "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"]]
  archive, scp, setup = _dry_run("install")
  assert archive == ["git", "archive", "--format=tar.gz", "--output=polyglot_jax.tar.gz", "HEAD"]
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "polyglot_jax.tar.gz"]
  assert "--worker=all" in scp and "--worker=all" in setup
  assert "'jax[tpu]==0.10.2'" in setup[-1]
  assert _dry_run("stop") == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "run1",
                               "--zone=us-central2-b", "--worker=all",
                               "--command=pkill -TERM -f '[p]olyglot-jax train' || true"]]
  assert _dry_run("delete", "--queued") == [[
      "gcloud", "compute", "tpus", "queued-resources", "delete", "run1", "--zone=us-central2-b",
      "--force", "--quiet"]]


def test_tpu_pod_launch_passes_train_flags_through_both_shells():
  flag = "--gin.TASK_FEATURE_LENGTHS={'inputs': 512, 'targets': 114}"
  [command] = _dry_run("launch", "--", "--gin_file=mesh/v4_128.gin", flag)
  assert command[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "run1",
                         "--zone=us-central2-b"]
  assert command[7] == "--worker=all"
  remote = shlex.split(command[8][len("--command="):])  # What the workers' shell runs.
  start = remote.index("nohup")
  assert remote[start + 1:start + 3] == ["sh", "-c"]
  job = remote[start + 3]  # What `sh -c` runs: train, then it records train's exit status.
  record = "; echo $? > ~/polyglot_jax_train.exit"
  assert job.endswith(record)
  assert shlex.split(job[:-len(record)]) == [".venv/bin/polyglot-jax", "train",
                                             "--gin_file=mesh/v4_128.gin", flag]


def _pod_module():
  spec = importlib.util.spec_from_file_location("pod", POD)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class _Cloud:
  """Cloud TPU as `tpu/pod.py supervise` sees it through gcloud: a slice and the job on it.

  `events` is the timeline: each `sleep` of the supervisor applies the next one, e.g.
  {"state": "PREEMPTED"} (spot capacity reclaimed: the job dies with it) or {"exit": 0}.
  """

  def __init__(self, events: list[dict], state: str = "NOT_FOUND", job: str = "absent"):
    self.events, self.state, self.job, self.actions = list(events), state, job, []

  def run(self, command: list[str]) -> tuple[int, str]:
    line = shlex.join(command)
    for action, marker in (("create", " create "), ("delete", " delete "),
                           ("install", "git archive"), ("launch", "nohup")):
      if marker in line:
        self.actions.append(action)
    if " describe " in line:
      return (0, self.state) if self.state != "NOT_FOUND" else (1, "")
    if " create " in line:
      self.state = "READY"
    elif " delete " in line:
      self.state = "NOT_FOUND"
    elif "nohup" in line:
      self.job = "running"
    elif "polyglot_jax_train.exit 2>/dev/null" in line:
      return 0, self.job
    return 0, ""

  def sleep(self, seconds: float) -> None:
    assert self.events, "the supervisor is still polling after the scripted timeline ended"
    event = self.events.pop(0)
    if "state" in event:
      self.state, self.job = event["state"], "absent"
    if "exit" in event:
      self.job = str(event["exit"])


def _supervise(cloud: _Cloud, *flags: str) -> int:
  pod = _pod_module()
  args = pod._parser().parse_args(["supervise", "--name=run1", "--zone=us-central2-b",
                                   "--queued", "--spot", *flags])
  args.train_args = ["--gin_file=experiments/quickstart.gin"]
  return pod.supervise(args, run=cloud.run, sleep=cloud.sleep)


def test_tpu_pod_supervise_recreates_a_preempted_slice_and_relaunches_until_done():
  cloud = _Cloud([{}, {"state": "PREEMPTED"}, {}, {"exit": 143}, {}, {}, {"exit": 0}])
  assert _supervise(cloud) == 0
  assert cloud.actions == ["create", "install", "launch",  # First round.
                           "delete", "create", "install", "launch",  # After the preemption.
                           "install", "launch"]  # After a SIGTERM exit on a live slice.


def test_tpu_pod_supervise_stops_on_a_real_failure_and_does_not_launch_twice():
  cloud = _Cloud([{"exit": 2}])
  assert _supervise(cloud) == 2  # A config error: relaunching would fail again.
  assert cloud.actions == ["create", "install", "launch"]
  running = _Cloud([{}, {"exit": 0}], state="ACTIVE", job="running")
  assert _supervise(running) == 0  # A restarted supervisor watches the running job.
  assert running.actions == []
  lost = _Cloud([{"state": "PREEMPTED"}] * 5)  # Preempted in every round.
  assert _supervise(lost, "--max_restarts=2") == 1
  assert lost.actions.count("launch") == 3
