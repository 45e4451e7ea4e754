"""Gathering a sweep: one row per run from what its MODEL_DIR holds, as CSV and Markdown.

Everything is read from the run's files, so runs trained elsewhere (TPU, gs:// paths through
tf.io.gfile) gather the same way as local ones:
  config.gin                      the operative config: model, batch, trainable regex, steps
  train/metrics.jsonl             final step, train `loss`, `sparsity/global` (pruned runs)
  training_eval/<task>/           `loss` and `accuracy` at the final step (eval_loss)
  infer_eval/<task>/step_<N>.json perplexity per language at the final step
  sweep_run.json                  a local run's failure and seconds (launch.py)
Columns:
  params, trainable_params, trainable_pct   from the model built abstractly (no allocation)
  sparsity        fraction of prunable weights that are zero (0 for runs without pruning)
  steps, target_tokens = steps x batch x targets length (padding included, as in training)
  train_flops     steps x `flops.batch_training_flops`: the formula of the `timing/mfu` metric
  language_loss/<group>  mean over the languages of each language's ln(perplexity) (its token
                  cross-entropy; each language counts once), groups all/high/low resource
status is "finished" (final step = train.total_steps), "incomplete" (interrupted, or still
running on a TPU), "failed" (a local run that exited with an error) or "not started".
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from typing import Any, Mapping, Sequence

import gin
import jax
import tensorflow as tf

from polyglot_jax.commands import gin_setup
from polyglot_jax.commands.runner import FAILED, FINISHED
from polyglot_jax.parallel.partitioning import MeshConfig
from polyglot_jax.sweep.grid import Run
from polyglot_jax.sweep.launch import RECORD
from polyglot_jax.training import train_state
from polyglot_jax.training.rundir import METRICS_FILE, RunDir
from polyglot_jax.training.setup import TrainConfig, TrainSetup

INCOMPLETE, NOT_STARTED = "incomplete", "not started"
GROUPS = ("all", "high", "low")
METRICS = ("eval_loss", "train_loss")  # The loss that fits and plots use: first one available.
VALUE_COLUMNS = ("params", "trainable_params", "trainable_pct", "sparsity", "steps",
                 "target_tokens", "train_flops", "train_loss", "eval_loss", "eval_accuracy",
                 "eval_perplexity", *(f"language_loss/{g}" for g in GROUPS), "seconds")


@dataclasses.dataclass
class RunResult:
  """One run's row, its training curve and its per-language rows."""

  run: Run
  status: str
  values: dict[str, float | int | None]
  curve: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (FLOPs, loss)
  languages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  error: str = ""


def _read_text(path: str) -> str | None:
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path, "r") as f:
    return f.read()


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  text = _read_text(path)
  return [json.loads(line) for line in (text or "").splitlines() if line.strip()]


def write_text(path: str, text: str | bytes) -> None:
  """Writes a file under the sweep folder (local or gs://)."""
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.gfile.GFile(path, "wb" if isinstance(text, bytes) else "w") as f:
    f.write(text)


def train_config(config_text: str) -> TrainConfig:
  """The `TrainConfig` of an operative config.gin (clears gin's config before and after)."""
  gin_setup.register_configurables()
  gin.clear_config()
  try:
    gin.parse_config(config_text)
    return TrainConfig()
  finally:
    gin.clear_config()


def model_stats(config: TrainConfig) -> tuple[int, int, float, int]:
  """(parameters, trainable parameters, training FLOPs per step, targets length) of a run.

  The run's setup is built on one device, whatever mesh the run used: its batch shapes are the
  feature converter's, as `train` sees them.
  """
  one_device = dataclasses.replace(config, mesh=MeshConfig(data=1))
  setup = TrainSetup.build(one_device, devices=jax.devices()[:1])
  return (train_state.param_count(setup.spec.abstract.params), setup.spec.trainable_count(),
          setup.step_flops, setup.input_shapes["decoder_target_tokens"][1])


def _language_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
  """Per-language rows of an infer_eval step_<N>.json: loss = ln(perplexity)."""
  high = report.get("high_resource")
  rows = []
  for language, metrics in sorted(report["languages"].items()):
    group = "" if high is None else ("high" if language in high else "low")
    rows.append({"language": language, "group": group,
                 "num_examples": int(metrics["num_examples"]),
                 "perplexity": metrics["perplexity"], "loss": math.log(metrics["perplexity"])})
  return rows


def _group_losses(rows: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
  out = {}
  for group in GROUPS:
    losses = [r["loss"] for r in rows if group == "all" or r["group"] == group]
    out[f"language_loss/{group}"] = sum(losses) / len(losses) if losses else None
  return out


def _final_eval(run_dir: RunDir, eval_cfg: Any, steps: int) -> dict[str, float]:
  """eval_loss and eval_accuracy of training_eval/<task>/ at the run's last step."""
  if eval_cfg is None:
    return {}
  records = [r for r in _read_jsonl(os.path.join(run_dir.training_eval(
      eval_cfg.mixture_or_task_name), METRICS_FILE))
             if r["step"] == steps]
  if not records:
    return {}
  return {"eval_loss": float(records[-1]["loss"]), "eval_accuracy": float(records[-1]["accuracy"])}


def _final_languages(run_dir: RunDir, infer_cfg: Any, steps: int
                     ) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
  """(eval_perplexity and language_loss/<group>, per-language rows) of infer_eval/<task>/ at
  the run's last step."""
  if infer_cfg is None:
    return {}, []
  text = _read_text(os.path.join(run_dir.infer_eval(infer_cfg.mixture_or_task_name),
                                 f"step_{steps}.json"))
  if text is None:
    return {}, []
  report = json.loads(text)
  rows = _language_rows(report)
  return {"eval_perplexity": float(report["metrics"]["perplexity"]), **_group_losses(rows)}, rows


def gather_run(run: Run) -> RunResult:
  """The row of one run from its MODEL_DIR (see the module docstring)."""
  record = json.loads(_read_text(os.path.join(run.model_dir, RECORD)) or "null")
  values: dict[str, Any] = dict.fromkeys(VALUE_COLUMNS)
  values["seconds"] = record["seconds"] if record else None
  failed = bool(record) and record["status"] == FAILED
  error = record["error"] if failed else ""
  run_dir = RunDir(run.model_dir)
  config = _read_text(run_dir.config_gin)
  if config is None:
    return RunResult(run, FAILED if failed else NOT_STARTED, values, error=error)
  try:
    train_cfg = train_config(config)
    dataset_cfg = train_cfg.train_dataset_cfg
    params, trainable, step_flops, targets_length = model_stats(train_cfg)
  except (ValueError, KeyError, ImportError) as exc:
    raise ValueError(f"run {run.name}: its config.gin does not build a model here "
                     f"({gin_setup.one_line_error(exc)}); gather with the same checkout.") from exc
  train = [r for r in _read_jsonl(os.path.join(run_dir.train, METRICS_FILE))
           if "loss" in r]
  steps = train[-1]["step"] if train else 0
  values.update(params=params, trainable_params=trainable,
                trainable_pct=100.0 * trainable / params, steps=steps,
                target_tokens=steps * dataset_cfg.batch_size * targets_length,
                train_flops=steps * step_flops)
  if train:
    values["train_loss"] = float(train[-1]["loss"])
    # 1 - kept / total in float32 can round to -0.0 or -1e-8: a dense layer is 0.
    values["sparsity"] = 0.0 if train_cfg.sparsity is None else max(
        0.0, float(train[-1]["sparsity/global"]))
  values.update(_final_eval(run_dir, train_cfg.eval_dataset_cfg, steps))
  language_values, languages = _final_languages(run_dir, train_cfg.infer_eval_dataset_cfg, steps)
  values.update(language_values)
  if failed:
    status = FAILED
  elif steps:
    status = FINISHED if steps == train_cfg.total_steps else INCOMPLETE
  else:
    status = NOT_STARTED
  curve = [(r["step"] * step_flops, float(r["loss"])) for r in train]
  return RunResult(run, status, values, curve, languages, error)


def gather(runs: Sequence[Run]) -> list[RunResult]:
  return [gather_run(run) for run in runs]


def pick_metric(results: Sequence[RunResult], requested: str | None = None) -> str:
  """The loss column for fits and plots: `requested`, else the first of METRICS that every
  finished run has."""
  finished = [r for r in results if r.status == FINISHED]
  if requested is not None:
    if requested not in VALUE_COLUMNS:
      raise ValueError(f"--metric={requested!r} is not a column; use one of "
                       f"{', '.join(VALUE_COLUMNS)}.")
    return requested
  for metric in METRICS:
    if finished and all(r.values[metric] is not None for r in finished):
      return metric
  return METRICS[-1]


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  writer.writerows([["" if v is None else v for v in row] for row in rows])
  return buffer.getvalue()


def results_csv(results: Sequence[RunResult], axes: Sequence[str]) -> str:
  """results.csv: name, status, the axes' labels, VALUE_COLUMNS, error."""
  return _csv(["name", "status", *axes, *VALUE_COLUMNS, "error"],
              [[r.run.name, r.status, *(r.run.labels[a] for a in axes),
                *(r.values[c] for c in VALUE_COLUMNS), r.error] for r in results])


def languages_csv(results: Sequence[RunResult], axes: Sequence[str]) -> str:
  """languages.csv: one row per (run, language) of the per-language evaluation."""
  fields = ("language", "group", "num_examples", "loss", "perplexity")
  return _csv(["name", *axes, *fields],
              [[r.run.name, *(r.run.labels[a] for a in axes), *(row[f] for f in fields)]
               for r in results for row in r.languages])


def _format(column: str, value: Any) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ""
  if column in ("params", "trainable_params", "steps", "target_tokens"):
    return f"{int(value):,}"
  if column == "train_flops":
    return f"{value:.3e}"
  if column in ("trainable_pct", "seconds"):
    return f"{value:.2f}"
  return f"{value:.4f}" if isinstance(value, float) else str(value)


MARKDOWN_COLUMNS = ("params", "trainable_pct", "sparsity", "steps", "train_flops", "train_loss",
                    "eval_loss", "eval_perplexity", "language_loss/high", "language_loss/low")


def markdown_table(results: Sequence[RunResult], axes: Sequence[str]) -> str:
  """The runs as a Markdown table (a subset of the CSV columns; empty columns dropped)."""
  columns = [c for c in MARKDOWN_COLUMNS if any(r.values[c] is not None for r in results)]
  lines = ["| " + " | ".join([*axes, "status", *columns]) + " |",
           "|" + "---|" * (len(axes) + 1 + len(columns))]
  for r in results:
    cells = [*(r.run.labels[a] for a in axes), r.status + (f": {r.error}" if r.error else ""),
             *(_format(c, r.values[c]) for c in columns)]
    lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
  return "\n".join(lines)


def axes_driving(results: Sequence[RunResult], axes: Sequence[str], column: str) -> list[str]:
  """The axes that change `column`: those with two runs differing only on that axis whose
  values of `column` differ (e.g. a size axis drives `params`, a pruning axis `sparsity`)."""
  rows = [r for r in results if isinstance(r.values[column], (int, float))]
  drivers = []
  for axis in axes:
    by_rest: dict[tuple[str, ...], list[float]] = {}
    for r in rows:
      rest = tuple(r.run.labels[a] for a in axes if a != axis)
      by_rest.setdefault(rest, []).append(float(r.values[column]))
    if any(max(v) - min(v) > 1e-9 * max(abs(max(v)), abs(min(v)), 1.0)
           for v in by_rest.values()):
      drivers.append(axis)
  return drivers
