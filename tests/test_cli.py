"""The `polyglot-jax` CLI: one-line configuration errors, and SIGTERM -> checkpoint -> resume."""

import json
import os
import signal
import subprocess
import sys
import time

import gin
import pytest

from polyglot_jax import cli

QUICKSTART = "--gin_file=experiments/quickstart.gin"


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("args, fragment", [
    ([QUICKSTART, "--gin.TransformerConfig.emb_dimm=3"],
     "Configurable 'TransformerConfig' doesn't have a parameter named 'emb_dimm'"),
    ([QUICKSTART, "--gin.TransformerConfg.emb_dim=3"],
     "unknown gin configurable 'TransformerConfg' in a binding. Did you mean TransformerConfig?"),
    (["--gin_file=models/mt5/tiny.gin", "--gin_file=runs/pretrain.gin"],
     "gin macro MIXTURE_OR_TASK_NAME is required but not set; pass --gin.MIXTURE_OR_TASK_NAME="),
    (["--gin_file=experiments/no_such_file.gin"], "gin file experiments/no_such_file.gin not found"),
    (["--gin_file=models/mt5/tiny.gin"],  # No run file: gin raises a RuntimeError for this.
     "train needs gin bindings for ['model', 'train_dataset_cfg', 'optimizer', 'model_dir', "
     "'total_steps']; set them in a gin file or with --gin."),
    ([QUICKSTART, "--gin.MIXTURE_OR_TASK_NAME=udhr_spam_corruption"], "udhr_spam_corruption"),
    ([QUICKSTART, "--gin.MeshConfig.data=3"], "needs 3 devices but 8 are visible"),
    ([QUICKSTART, "--gin.MeshConfig.rules=(('embed', 'fsdpp'),)"], "unknown mesh axis 'fsdpp'"),
    ([QUICKSTART, "--gin_file=routing/mov_10.gin", "--gin.AdapterConfig.kind=movv"],
     "AdapterConfig.kind='movv': use one of ia3, lora, mov, molora"),
    ([QUICKSTART, "--gin_file=routing/ia3.gin", "--gin.train.trainable_params=encoder/.*_adaptr/.*"],
     "matches no parameter"),
    ([QUICKSTART, "--gin_file=routing/moe_top2_8.gin", "--gin.MoeConfig.num_selected=9"],
     "MoeConfig.num_selected=9 must be in [1, num_experts=8]"),
])
def test_bad_configuration_is_one_line(args, fragment, capsys, tmp_path):
  code = cli.main(["train", *args, f"--gin.MODEL_DIR={tmp_path}"])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert len(err.splitlines()) == 1, err
  assert fragment in err


def test_folders_named_like_gin_tiers_in_the_working_directory(tmp_path, monkeypatch, capsys):
  """A ./runs or ./models folder (e.g. MODEL_DIR=runs/quickstart) must not break gin includes."""
  for folder in ("runs/quickstart", "models", "experiments"):
    (tmp_path / folder).mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  code = cli.main(["train", QUICKSTART, "--gin.MeshConfig.data=3"])
  assert code == 2
  assert "needs 3 devices but 8 are visible" in capsys.readouterr().err


def _start(model_dir: str, steps: int) -> subprocess.Popen:
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "-m", "polyglot_jax.cli", "train", QUICKSTART,
             f"--gin.MODEL_DIR={model_dir}", f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=4",
             "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
             "--gin.train.log_period=1", "--gin.train.eval_period=0", "--gin.train.eval_steps=1"]
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env)


def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
  model_dir = str(tmp_path / "run")
  proc = _start(model_dir, 10_000)
  lines = []
  deadline = time.time() + 240
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step 3/"):
      proc.send_signal(signal.SIGTERM)
      break
    assert time.time() < deadline, "".join(lines)
  out, _ = proc.communicate(timeout=120)
  lines.append(out)
  log = "".join(lines)
  assert proc.returncode == 143, log
  assert "Received SIGTERM: saved a checkpoint at step" in log
  stopped = int(log.split("saved a checkpoint at step ")[1].split(";")[0])
  assert stopped >= 3
  assert str(stopped) in os.listdir(os.path.join(model_dir, "checkpoints"))
  assert os.path.exists(os.path.join(model_dir, "config.gin"))
  assert any(name.startswith("events.out.tfevents")
             for name in os.listdir(os.path.join(model_dir, "train")))

  resumed = _start(model_dir, stopped + 2)
  out, _ = resumed.communicate(timeout=240)
  assert resumed.returncode == 0, out
  assert f"Resumed from {os.path.join(model_dir, 'checkpoints')} at step {stopped}." in out
  assert f"step {stopped + 2}/{stopped + 2}" in out
  assert "eval udhr_span_corruption @ step" in out


def test_sparsity_report_of_a_dense_checkpoint(capsys, tmp_path):
  model_dir = str(tmp_path / "run")
  out, _ = _start(model_dir, 2).communicate(timeout=240)
  assert cli.main(["sparsity_report", f"--model_dir={model_dir}"]) == 0, out
  report = json.loads(capsys.readouterr().out)
  assert report["step"] == 2.0
  assert report["sparsity/global"] == 0.0
  assert "sparsity/encoder/layers_0/mlp/wi_0/kernel" in report
