"""`polyglot-jax sweep`: the grid and its names, printed commands, power-law fits, and a real
tiny sweep on the bundled data (train, fail, resume, skip, gather, fit, plot)."""

import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import re
import shlex
import signal
import threading
import time

import gin
import numpy as np
import pytest

from polyglot_jax import cli
from polyglot_jax.commands import gin_setup, train
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.sweep import grid, launch, plots, results, scaling
from polyglot_jax.training import flops
from polyglot_jax.training.metrics import read_jsonl


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _write_spec(path, spec) -> str:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(spec, f)
  return str(path)


def test_grid_is_the_product_of_the_axes_with_readable_names(tmp_path):
  spec_file = _write_spec(tmp_path / "spec.json", {
      "gin_files": ["sweeps/tiny_lm.gin"], "bindings": ["TRAIN_STEPS=7"],
      "axes": {"size": {"s": ["TransformerConfig.emb_dim=16"],
                        "m": ["TransformerConfig.emb_dim=32", "routing/dense.gin"]}}})
  spec = grid.build_spec(spec_file, gin_files=["sparsity/gmp.gin"],
                         bindings=["PRUNING_FREQUENCY=2"],
                         axis_flags=["routing=routing/dense.gin,routing/mov_10.gin",
                                     "PRUNING_RATIO=0.0,0.5", "Sparsity.method='global',layerwise"])
  runs = spec.runs("/sweeps/x")
  assert len(runs) == 2 * 2 * 2 * 2
  assert [r.name for r in runs[:3]] == [
      "size=s,routing=dense,PRUNING_RATIO=0.0,Sparsity.method=global",
      "size=s,routing=dense,PRUNING_RATIO=0.0,Sparsity.method=layerwise",
      "size=s,routing=dense,PRUNING_RATIO=0.5,Sparsity.method=global"]
  last = runs[-1]
  assert last.labels == {"size": "m", "routing": "mov_10", "PRUNING_RATIO": "0.5",
                         "Sparsity.method": "layerwise"}
  # Base files, then the axes' files in axis order; base bindings, axes' bindings, MODEL_DIR.
  assert last.train_args() == [
      "--gin_file=sweeps/tiny_lm.gin", "--gin_file=sparsity/gmp.gin",
      "--gin_file=routing/dense.gin", "--gin_file=routing/mov_10.gin",
      "--gin.TRAIN_STEPS=7", "--gin.PRUNING_FREQUENCY=2", "--gin.TransformerConfig.emb_dim=32",
      "--gin.PRUNING_RATIO=0.5", "--gin.Sparsity.method=layerwise",
      "--gin.MODEL_DIR=/sweeps/x/size=m,routing=mov_10,PRUNING_RATIO=0.5,Sparsity.method=layerwise"]
  assert grid.split_values("1,(2, 3),{'a': 4, 'b': 5},'x,y'") == [
      "1", "(2, 3)", "{'a': 4, 'b': 5}", "'x,y'"]


@pytest.mark.parametrize("flags, fragment", [
    (["--axis=PRUNING_RATIO"], "write --axis=NAME=VALUE1,VALUE2"),
    (["--axis=routing=routing/dense.gin,0.5"], "mixes gin files and binding values"),
    (["--axis=routing=routing/dense.gin,routing/nope.gin"], "['routing/nope.gin'] of the sweep "
     "not found"),
    (["--axis=A=1", "--axis=A=2"], "sweep axes ['A'] are given more than once"),
    (["--axis=A=1,1"], "sweep axis 'A' has empty or repeated labels"),
    ([], "a sweep needs at least one axis"),
    (["--axis=A=1", "--spec=sweeps/no_such_spec.json"], "sweep spec sweeps/no_such_spec.json "
     "not found"),
    (["--axis=A=1", "--launch=tpu", "--tpu_name=s", "--zone=z", "--sweep_dir=runs/sw"],
     "is relative: TPU runs need storage"),
    (["--axis=A=1", "--launch=tpu"], "--launch=tpu needs --tpu_name and --zone"),
    (["--axis=A=1", "--size_axis=B", "--gather_only"], "--size_axis='B' is not an axis"),
])
def test_bad_sweeps_are_one_line_errors(flags, fragment, tmp_path, capsys):
  code = cli.main(["sweep", f"--sweep_dir={tmp_path}", "--gin_file=sweeps/tiny_lm.gin", *flags])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert len(err.splitlines()) == 1, err
  assert err.startswith("polyglot-jax sweep: error: ") and fragment in err, err


SWEEP_FLAGS = ["--gin_file=sweeps/tiny_lm.gin", "--gin_file=sparsity/gmp.gin",
               "--gin.TRAIN_STEPS=100", "--axis=PRUNING_RATIO=0.0,0.5"]


def test_dry_run_prints_the_train_commands(capsys):
  assert cli.main(["sweep", "--sweep_dir=runs/sw", *SWEEP_FLAGS, "--dry_run"]) == 0
  assert capsys.readouterr().out.splitlines() == [
      "# PRUNING_RATIO=0.0",
      "polyglot-jax train --gin_file=sweeps/tiny_lm.gin --gin_file=sparsity/gmp.gin "
      "--gin.TRAIN_STEPS=100 --gin.PRUNING_RATIO=0.0 --gin.MODEL_DIR=runs/sw/PRUNING_RATIO=0.0",
      "# PRUNING_RATIO=0.5",
      "polyglot-jax train --gin_file=sweeps/tiny_lm.gin --gin_file=sparsity/gmp.gin "
      "--gin.TRAIN_STEPS=100 --gin.PRUNING_RATIO=0.5 --gin.MODEL_DIR=runs/sw/PRUNING_RATIO=0.5"]


def test_tpu_launch_prints_one_pod_command_per_run_that_pod_py_accepts(capsys):
  assert cli.main(["sweep", "--sweep_dir=gs://bucket/sw", *SWEEP_FLAGS, "--launch=tpu",
                   "--tpu_name=sw", "--zone=us-central2-b", "--project=p1"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines == [
      "# PRUNING_RATIO=0.0",
      "python tpu/pod.py launch --name=sw-0 --zone=us-central2-b --project=p1 -- "
      "--gin_file=sweeps/tiny_lm.gin --gin_file=sparsity/gmp.gin --gin.TRAIN_STEPS=100 "
      "--gin.PRUNING_RATIO=0.0 --gin.MODEL_DIR=gs://bucket/sw/PRUNING_RATIO=0.0",
      "# PRUNING_RATIO=0.5",
      "python tpu/pod.py launch --name=sw-1 --zone=us-central2-b --project=p1 -- "
      "--gin_file=sweeps/tiny_lm.gin --gin_file=sparsity/gmp.gin --gin.TRAIN_STEPS=100 "
      "--gin.PRUNING_RATIO=0.5 --gin.MODEL_DIR=gs://bucket/sw/PRUNING_RATIO=0.5"]
  # The printed command is one tpu/pod.py understands: its dry run starts train with our flags.
  pod_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tpu",
                          "pod.py")
  module_spec = importlib.util.spec_from_file_location("pod", pod_path)
  pod = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(pod)
  argv = shlex.split(lines[3])[2:]
  assert pod.main(argv[:argv.index("--")] + ["--dry-run"] + argv[argv.index("--"):]) == 0
  assert ("train --gin_file=sweeps/tiny_lm.gin --gin_file=sparsity/gmp.gin "
          "--gin.TRAIN_STEPS=100 --gin.PRUNING_RATIO=0.5 "
          "--gin.MODEL_DIR=gs://bucket/sw/PRUNING_RATIO=0.5") in capsys.readouterr().out


def test_power_law_fits_recover_known_exponents():
  compute = np.array([1e15, 4e15, 2e16, 1e17, 6e17])
  fit = scaling.fit_power_law(compute, 12.5 * compute ** -0.076)
  assert fit.exponent == pytest.approx(0.076, rel=1e-10)
  assert fit.coefficient == pytest.approx(12.5, rel=1e-8)
  assert fit.r2 == pytest.approx(1.0, abs=1e-12)
  loss = 1.7 + 50.0 * compute ** -0.1
  floor = scaling.fit_power_law_with_floor(compute, loss)
  assert (floor.irreducible, floor.coefficient, floor.exponent) == pytest.approx(
      (1.7, 50.0, 0.1), rel=1e-6)
  np.testing.assert_allclose(floor(compute), loss, rtol=1e-9)
  # Without the floor the same points give a flatter, wrong law.
  assert scaling.fit_power_law(compute, loss).exponent < 0.05


def test_power_law_fits_need_enough_sizes():
  with pytest.raises(ValueError, match=r"^a power-law fit needs at least 2 model sizes "
                     r"\(distinct compute values\), got 1; add sizes to the sweep\.$"):
    scaling.fit_power_law([1e15, 1e15], [3.0, 2.9])
  with pytest.raises(ValueError, match="with an irreducible loss needs at least 4 model sizes"):
    scaling.fit_power_law_with_floor([1e15, 1e16, 1e17], [3.0, 2.5, 2.2])
  with pytest.raises(ValueError, match="positive, finite"):
    scaling.fit_power_law([1e15, 1e16], [3.0, float("nan")])


SIZES = {  # Tiny decoders; everything else comes from gin/sweeps/tiny_lm.gin.
    "d16": dict(emb_dim=16, mlp_dim=32, num_heads=1, head_dim=16),
    "d32": dict(emb_dim=32, mlp_dim=64, num_heads=2, head_dim=16),
}
STEPS, BATCH, LENGTH = 10, 8, 16


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """Runs a 2 sizes x 2 pruning settings sweep in this process, twice.

  The "bad" setting (PRUNING_RATIO=1.5) fails both times; the first run was interrupted at
  step 5 before the sweep started, so the sweep resumes it. (Dense against pruned runs, and
  the per-language plot on real runs: notebooks/scaling_curves.ipynb, executed by
  tests/test_notebooks.py.)
  """
  root = tmp_path_factory.mktemp("sweep")
  spec_file = _write_spec(root / "spec.json", {
      "gin_files": ["sweeps/tiny_lm.gin"],
      "bindings": [f"TRAIN_STEPS={STEPS}", f"BATCH_SIZE={BATCH}",
                   f"TASK_FEATURE_LENGTHS={{'targets': {LENGTH}}}", "PRUNING_FREQUENCY=5",
                   "train.log_period=2", "train.eval_steps=1",
                   "train.tensorboard=False"],
      "axes": {
          "size": {name: [f"TransformerConfig.{k}={v}" for k, v in dims.items()]
                   for name, dims in SIZES.items()},
          "pruning": {"gmp50": ["sparsity/gmp_50.gin"],
                      "bad": ["sparsity/gmp.gin", "PRUNING_RATIO=1.5"]},
      }})
  sweep_dir = str(root / "sweep")
  runs = grid.build_spec(spec_file).runs(sweep_dir)
  first = runs[0]
  gin_setup.parse(first.gin_files, [*first.bindings, f"MODEL_DIR={first.model_dir}"])
  train.train(stop_after_step=5)
  gin.clear_config()
  command = ["sweep", f"--sweep_dir={sweep_dir}", f"--spec={spec_file}"]
  out = {}
  for name in ("first", "again"):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
      code = cli.main([*command, "--in_process"])
    out[name] = (code, buffer.getvalue())
  with open(os.path.join(sweep_dir, "results.csv"), encoding="utf-8") as f:
    rows = {row["name"]: row for row in csv.DictReader(f)}
  return {"dir": sweep_dir, "runs": runs, "out": out, "rows": rows}


def test_sweep_trains_every_run_records_failures_and_resumes(sweep):
  code, out = sweep["out"]["first"]
  assert code == 1  # Some runs failed.
  assert "[1/4] size=d16,pruning=gmp50: finished in" in out
  assert re.search(r"\[2/4\] size=d16,pruning=bad: failed in [\d.]+ s: Sparsity needs 0 <= "
                   r"initial_sparsity \(0.0\) <= final_sparsity \(1.5\) < 1\.", out)
  assert "[3/4] size=d32,pruning=gmp50: finished in" in out  # The sweep went on.
  statuses = {name: row["status"] for name, row in sweep["rows"].items()}
  assert statuses == {f"size={s},pruning={p}": "failed" if p == "bad" else "finished"
                      for s in SIZES for p in ("gmp50", "bad")}
  first = sweep["runs"][0]
  with open(os.path.join(first.model_dir, launch.LOG), encoding="utf-8") as f:
    assert f"Resumed from {first.model_dir}/checkpoints at step 5." in f.read()
  steps = [r["step"] for r in read_jsonl(os.path.join(first.model_dir, "train", "metrics.jsonl"))]
  assert steps == [2, 4, 5, 6, 8, 10]


def test_a_rerun_skips_finished_runs(sweep):
  code, out = sweep["out"]["again"]
  assert code == 1
  assert out.count("finished before, skipped.") == 2
  assert out.count(": failed in ") == 2


def test_results_hold_the_runs_own_numbers(sweep):
  for run in sweep["runs"]:
    row = sweep["rows"][run.name]
    if row["status"] != "finished":
      assert "final_sparsity (1.5)" in row["error"] and row["train_loss"] == ""
      continue
    dims = SIZES[run.labels["size"]]
    config = TransformerConfig(vocab_size=8192, num_kv_heads=1, num_decoder_layers=2,
                               num_encoder_layers=0, mlp_activations=("silu", "linear"), **dims)
    step_flops = flops.training_flops(config, encoder_decoder=False, batch_size=BATCH,
                                      targets_length=LENGTH)
    assert float(row["train_flops"]) == pytest.approx(STEPS * step_flops, rel=1e-12)
    with open(os.path.join(run.model_dir, launch.LOG), encoding="utf-8") as f:
      model_line = re.search(r"Model: ([\d,]+) parameters; .*; ([\d.e+]+) training FLOPs/step",
                             f.read())
    assert int(row["params"]) == int(model_line.group(1).replace(",", ""))
    assert float(model_line.group(2)) == pytest.approx(step_flops, rel=1e-3)  # As train logs it.
    assert (int(row["steps"]), int(row["target_tokens"])) == (STEPS, STEPS * BATCH * LENGTH)
    assert (float(row["trainable_pct"]), row["trainable_params"]) == (100.0, row["params"])
    assert float(row["sparsity"]) == pytest.approx(0.5, abs=1e-6)
    train = read_jsonl(os.path.join(run.model_dir, "train", "metrics.jsonl"))
    assert float(row["train_loss"]) == train[-1]["loss"]
    evals = read_jsonl(os.path.join(run.model_dir, "training_eval", "udhr_lm", "metrics.jsonl"))
    assert float(row["eval_loss"]) == evals[-1]["loss"] and evals[-1]["step"] == STEPS
    with open(os.path.join(run.model_dir, "infer_eval", "udhr_lm_mix",
                           f"step_{STEPS}.json"),
              encoding="utf-8") as f:
      languages = json.load(f)["languages"]
    assert float(row["language_loss/all"]) == pytest.approx(
        np.mean([math.log(v["perplexity"]) for v in languages.values()]), rel=1e-12)
  with open(os.path.join(sweep["dir"], "languages.csv"), encoding="utf-8") as f:
    per_language = list(csv.DictReader(f))
  assert {r["name"] for r in per_language} == {n for n, r in sweep["rows"].items()
                                               if r["status"] == "finished"}


def test_scaling_fit_plots_and_markdown(sweep):
  _, out = sweep["out"]["first"]
  small, large = sweep["rows"]["size=d16,pruning=gmp50"], sweep["rows"]["size=d32,pruning=gmp50"]
  alpha = -math.log(float(large["eval_loss"]) / float(small["eval_loss"])) / math.log(
      float(large["train_flops"]) / float(small["train_flops"]))
  fitted = re.search(r"scaling fit \(pruning=gmp50\): eval_loss L = [\d.e+-]+ \* "
                     r"C\^([+-][\d.e+-]+)  \(2 points", out)
  assert -float(fitted.group(1)) == pytest.approx(alpha, rel=1e-3)  # Printed to 4 digits.
  assert "note: per-language loss vs sparsity skipped: sparsity is 0.500 in every finished run." \
      in out
  assert ("note: loss vs trainable % skipped: 100% of the parameters are trainable in every "
          "finished run.") in out
  assert os.listdir(os.path.join(sweep["dir"], "plots")) == ["loss_vs_flops.png"]
  with open(os.path.join(sweep["dir"], "plots", "loss_vs_flops.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(sweep["dir"], "results.md"), encoding="utf-8") as f:
    markdown = f.read()
  assert "4 runs: 2 finished, 2 failed. Loss in fits and plots: `eval_loss`." in markdown
  assert "## Scaling fit: eval_loss = A * C^-alpha over size" in markdown
  assert "| d16 | bad | failed: Sparsity needs" in markdown


def test_subprocess_runs_record_their_one_line_error_and_gather_only_reads_it(tmp_path, capsys):
  (run,) = grid.build_spec(gin_files=["sweeps/tiny_lm.gin"],
                           axis_flags=["TransformerConfig.emb_dimm=3"]).runs(str(tmp_path))
  (outcome,) = launch.run_locally([run])
  assert (outcome.status, outcome.exit_code) == ("failed", 2)
  error = "Configurable 'TransformerConfig' doesn't have a parameter named 'emb_dimm'."
  assert outcome.error == error
  assert launch.read_record(run.model_dir)["error"] == error
  capsys.readouterr()
  assert cli.main(["sweep", f"--sweep_dir={tmp_path}", "--gin_file=sweeps/tiny_lm.gin",
                   "--axis=TransformerConfig.emb_dimm=3", "--gather_only"]) == 0
  assert "training (log:" not in capsys.readouterr().out  # Nothing ran again.
  with open(os.path.join(tmp_path, "results.csv"), encoding="utf-8") as f:
    (row,) = csv.DictReader(f)
  assert (row["name"], row["status"], row["error"]) == ("TransformerConfig.emb_dimm=3", "failed",
                                                        error)


def _result(labels, status="finished", **values):
  run = grid.Run(",".join(f"{k}={v}" for k, v in labels.items()), labels, "/unused", (), ())
  return results.RunResult(run, status, {**dict.fromkeys(results.VALUE_COLUMNS), **values})


def test_plots_find_the_axes_behind_each_quantity_and_skip_constant_ones():
  """size x routing: width changes params, routing and width change the trainable %."""
  found = [_result({"width": w, "routing": r}, params=p, trainable_pct=t, eval_loss=loss,
                   sparsity=0.0, train_flops=1e12 * p)
           for w, r, p, t, loss in (("s", "dense", 100, 100.0, 4.0), ("s", "mov", 101, 1.0, 4.5),
                                    ("m", "dense", 400, 100.0, 3.5), ("m", "mov", 401, 0.5, 4.2))]
  found.append(_result({"width": "l", "routing": "dense"}, status="failed"))
  axes = ["width", "routing"]
  assert results.axes_driving(found, axes, "params") == ["width", "routing"]
  assert results.axes_driving(found, axes, "trainable_pct") == ["width", "routing"]
  assert results.axes_driving(found, axes, "sparsity") == []
  figure, note = plots.loss_vs_trainable(found, axes, "eval_loss")
  (line,) = figure.axes[0].lines  # One series (both axes drive x): markers, no line.
  assert note == "" and line.get_linestyle() == "None"
  assert list(line.get_xdata()) == [0.5, 1.0, 100.0, 100.0]
  assert [t.get_text() for t in figure.axes[0].texts] == ["m,mov", "s,mov", "s,dense", "m,dense"]
  assert plots.language_loss_vs_sparsity(found, axes) == (None, (
      "per-language loss vs sparsity skipped: no finished run has a per-language evaluation "
      "(bind train.infer_eval_dataset_cfg, as gin/sweeps/tiny_lm.gin does)."))
  for r in found[:4]:
    r.languages = [{"language": "swh", "group": "low", "loss": 4.0}]
  assert plots.language_loss_vs_sparsity(found, axes) == (
      None, "per-language loss vs sparsity skipped: sparsity is 0.000 in every finished run.")


def test_language_plot_has_a_panel_per_size_with_languages_and_group_means():
  found = []
  for width in ("s", "m"):
    for ratio, shift in (("0.0", 0.0), ("0.5", 0.3)):
      languages = [{"language": lang, "group": group, "loss": base + shift}
                   for lang, group, base in (("deu", "high", 3.0), ("swh", "low", 4.0))]
      r = _result({"width": width, "PRUNING_RATIO": ratio}, params={"s": 1, "m": 2}[width],
                  sparsity=float(ratio), **{"language_loss/all": 3.5 + shift,
                                            "language_loss/high": 3.0 + shift,
                                            "language_loss/low": 4.0 + shift})
      r.languages = languages
      found.append(r)
  figure, note = plots.language_loss_vs_sparsity(found, ["width", "PRUNING_RATIO"])
  assert note == "" and [ax.get_title() for ax in figure.axes] == [
      "width=s; grey: 2 languages", "width=m; grey: 2 languages"]
  lines = figure.axes[0].lines  # 2 languages, then the all / high / low means.
  assert [list(line.get_ydata()) for line in lines] == [
      [3.0, 3.3], [4.0, 4.3], [3.5, 3.8], [3.0, 3.3], [4.0, 4.3]]
  assert [line.get_label() for line in lines[2:]] == [
      "mean, all languages", "mean, high-resource languages", "mean, low-resource languages"]


def test_a_signal_to_the_sweep_reaches_the_running_train_and_stops_the_sweep(tmp_path):
  runs = grid.build_spec(gin_files=["sweeps/tiny_lm.gin"],
                         axis_flags=["TRAIN_STEPS=5,6"]).runs(str(tmp_path))

  def terminate_once_the_first_run_started() -> None:
    while not os.path.exists(os.path.join(runs[0].model_dir, launch.LOG)):
      time.sleep(0.05)
    time.sleep(1.0)  # Well inside its ~10 s of imports.
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=terminate_once_the_first_run_started, daemon=True).start()
  outcomes = launch.run_locally(runs)
  assert [(o.name, o.status, o.stopped_by) for o in outcomes] == [
      ("TRAIN_STEPS=5", "interrupted", "SIGTERM")]  # The second run never started.
  assert launch.read_record(runs[0].model_dir)["status"] == "interrupted"
  assert not os.path.exists(runs[1].model_dir)
