"""Multi-host training: 2 real processes of 4 CPU devices each equal 1 process of 8 devices.

Both runs read the global batch as 2 data shards (`DatasetConfig.num_data_shards=2`), so each
of the 2 processes feeds only its own shard and the single process reads both; the losses must
agree, and the checkpoint the 2 processes wrote together must resume in 1 process.
"""

import os
import shlex
import socket
import subprocess
import sys

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


def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  address = f"localhost:{_free_port()}"
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "polyglot_jax.cli", *ARGS, f"--gin.MODEL_DIR={multi}",
       "--gin.TRAIN_STEPS=2", f"--coordinator_address={address}", "--num_processes=2",
       f"--process_id={i}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
      for i in range(2)]
  try:
    _train_in_this_process(single, 3)  # Overlaps with the subprocesses' start-up.
    outputs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:  # A failed peer leaves the other waiting for it: end both.
      p.kill()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
    assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1, 'expert': 1}" in out, out

  reference, two = _losses(single), _losses(multi)
  assert sorted(two) == [1, 2]
  for step in (1, 2):
    assert len(two[step]) == 1  # Only process 0 writes the (global) metrics.
    np.testing.assert_allclose(two[step], reference[step], rtol=1e-5)

  _train_in_this_process(multi, 3)  # Restores the 2-process checkpoint of step 2 on 8 devices.
  resumed = _losses(multi)
  np.testing.assert_allclose(resumed[3], reference[3], rtol=1e-5)


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
  assert remote[start + 1:start + 5] == [".venv/bin/polyglot-jax", "train",
                                         "--gin_file=mesh/v4_128.gin", flag]
