"""`polyglot-jax sweep`: expand a grid, train it (or print its commands), gather, fit and plot.

    polyglot-jax sweep --sweep_dir=runs/sweep --spec=sweeps/tiny_scaling.json
    polyglot-jax sweep --sweep_dir=runs/sweep --gin_file=sweeps/tiny_lm.gin \
        --axis=TransformerConfig.emb_dim=32,64,128 --axis=PRUNING_RATIO=0.0,0.5
    ... --dry_run          print the train commands, run nothing
    ... --gather_only      only gather the runs' results (e.g. after TPU runs)
    ... --launch=tpu --tpu_name=sweep --zone=us-central2-b   print tpu/pod.py launch commands

Local runs go one after another (launch.py); then SWEEP_DIR gets results.csv, languages.csv,
results.md and plots/*.png, and the scaling fit (scaling.py) is printed. The size axis is the
one named by --size_axis, else an axis named "size", else the one axis that changes the
parameter count.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
from typing import Any, Sequence

from polyglot_jax.commands import runner
from polyglot_jax.sweep import grid, launch, results as results_lib, scaling
from polyglot_jax.sweep.grid import SweepSpec

Key = tuple[tuple[str, str], ...]


@dataclasses.dataclass
class SweepReport:
  """What gathering found: rows, the loss used, fits per group of the other axes, figures."""

  results: list[results_lib.RunResult]
  axes: list[str]
  metric: str
  size_axis: str | None
  fits: dict[Key, scaling.PowerLaw]
  floor_fits: dict[Key, scaling.PowerLaw]
  figures: dict[str, Any]  # name -> matplotlib Figure
  notes: list[str]
  markdown: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The `sweep` subcommand's flags (its --gin.NAME=value flags are the base bindings)."""
  parser.add_argument("--sweep_dir", required=True,
                      help="folder of the sweep: one MODEL_DIR per run, results, plots.")
  parser.add_argument("--spec", default=None, help="JSON sweep spec (as given or under gin/, "
                      "e.g. sweeps/tiny_scaling.json); flags add to it.")
  parser.add_argument("--gin_file", action="append", default=[],
                      help="base gin file of every run (repeatable).")
  parser.add_argument("--gin_search_paths", default="",
                      help="comma-separated folders searched for gin files and includes.")
  parser.add_argument("--axis", action="append", default=[], help="NAME=V1,V2,...: values of "
                      "the gin binding NAME, or gin files (repeatable; the grid is the product).")
  parser.add_argument("--in_process", action="store_true", help="train in this process instead "
                      "of one subprocess per run (notebooks, tiny CPU sweeps).")
  parser.add_argument("--dry_run", action="store_true", help="print the train commands only.")
  parser.add_argument("--gather_only", action="store_true",
                      help="train nothing; gather results, fit and plot.")
  parser.add_argument("--launch", choices=("local", "tpu"), default="local",
                      help="tpu: print one tpu/pod.py launch command per run, run nothing.")
  parser.add_argument("--tpu_name", default=None,
                      help="--launch=tpu: run i goes to the slice <tpu_name>-<i>.")
  parser.add_argument("--zone", default=None, help="--launch=tpu: the slices' zone.")
  parser.add_argument("--project", default=None, help="--launch=tpu: GCP project.")
  parser.add_argument("--size_axis", default=None, help="the model-size axis of the scaling "
                      "fit (default: 'size', else the one axis that changes the parameters).")
  parser.add_argument("--metric", default=None, help="loss column for fits and plots (default: "
                      "eval_loss when every finished run has it, else train_loss).")


def _size_axis(found: Sequence[results_lib.RunResult], axes: Sequence[str],
               requested: str | None) -> str | None:
  if requested is not None:
    if requested not in axes:
      raise ValueError(f"--size_axis={requested!r} is not an axis of the sweep ({axes}).")
    return requested
  if "size" in axes:
    return "size"
  drivers = results_lib.axes_driving(found, axes, "params")
  return drivers[0] if len(drivers) == 1 else None


def _fits(found: Sequence[results_lib.RunResult], axes: Sequence[str], size_axis: str,
          metric: str, notes: list[str]
          ) -> tuple[dict[Key, scaling.PowerLaw], dict[Key, scaling.PowerLaw]]:
  """Power-law fits of each group of the other axes; a note for each group that has none."""
  rows = [{**r.run.labels, **r.values} for r in found if r.status == results_lib.FINISHED]
  fits, floor_fits = {}, {}
  for key, points in scaling.scaling_points(rows, size_axis, axes, "train_flops",
                                            metric).items():
    name = ", ".join(f"{a}={v}" for a, v in key) or "all runs"
    compute, loss = [p[1] for p in points], [p[2] for p in points]
    try:
      fits[key] = scaling.fit_power_law(compute, loss)
    except ValueError as exc:
      notes.append(f"scaling fit ({name}) skipped: {exc}")
      continue
    if len(points) >= 4:
      floor_fits[key] = scaling.fit_power_law_with_floor(compute, loss)
    if fits[key].exponent <= 0:
      notes.append(f"scaling fit ({name}): {metric} does not fall with compute "
                   f"(alpha {fits[key].exponent:.4g}); train longer or use larger sizes.")
  return fits, floor_fits


def _fit_section(report: SweepReport) -> list[str]:
  if not report.fits:
    return []
  others = [a for a in report.axes if a != report.size_axis]
  lines = [f"## Scaling fit: {report.metric} = A * C^-alpha over {report.size_axis}", "",
           "C is the analytic training FLOPs of the run (`training/flops.py`); one point per "
           "size: its final value.", "",
           "| " + " | ".join([*others, "sizes", "A", "alpha", "R^2 (log L)",
                              "with E: E + A C^-alpha"]) + " |",
           "|" + "---|" * (len(others) + 5)]
  for key, fit in report.fits.items():
    floor = report.floor_fits.get(key)
    floor_text = (f"E {floor.irreducible:.4g}, A {floor.coefficient:.4g}, alpha "
                  f"{floor.exponent:.4g}" if floor else "needs 4+ sizes")
    lines.append("| " + " | ".join([*(v for _, v in key), str(fit.num_points),
                                    f"{fit.coefficient:.4g}", f"{fit.exponent:.4g}",
                                    f"{fit.r2:.4f}", floor_text]) + " |")
  return lines + [""]


def _markdown(report: SweepReport, sweep_dir: str) -> str:
  counts: dict[str, int] = {}
  for r in report.results:
    counts[r.status] = counts.get(r.status, 0) + 1
  status = ", ".join(f"{n} {s}" for s, n in counts.items())
  lines = [f"# Sweep {sweep_dir}", "",
           f"{len(report.results)} runs: {status}. Loss in fits and plots: `{report.metric}`.",
           "", results_lib.markdown_table(report.results, report.axes), ""]
  lines += _fit_section(report)
  if report.figures:
    lines += ["## Plots", ""] + [f"![{name}](plots/{name}.png)" for name in report.figures] + [""]
  if report.notes:
    lines += ["## Notes", ""] + [f"- {note}" for note in report.notes] + [""]
  return "\n".join(lines)


def report(spec: SweepSpec, sweep_dir: str, size_axis: str | None = None,
           metric: str | None = None) -> SweepReport:
  """Gathers every run of `spec`, fits, plots; writes the tables and figures to `sweep_dir`."""
  axes = [axis.name for axis in spec.axes]
  clash = sorted(set(axes) & {"name", "status", "error", *results_lib.VALUE_COLUMNS})
  if clash:
    raise ValueError(f"sweep axes {clash} are named like result columns; rename them.")
  found = results_lib.gather(spec.runs(sweep_dir))
  metric = results_lib.pick_metric(found, metric)
  size = _size_axis(found, axes, size_axis)
  notes: list[str] = []
  fits, floor_fits = ({}, {})
  if size is None:
    notes.append("scaling fit skipped: no size axis; name the model-size axis 'size' or pass "
                  "--size_axis.")
  else:
    fits, floor_fits = _fits(found, axes, size, metric, notes)
  figures = {}
  try:
    from polyglot_jax.sweep import plots  # pylint: disable=import-outside-toplevel
  except ImportError:
    notes.append("plots skipped: matplotlib is not installed (pip install "
                 "'polyglot-jax[plots]').")
  else:
    made = {"loss_vs_flops": plots.loss_vs_flops(found, axes, size, metric, fits),
            "language_loss_vs_sparsity": plots.language_loss_vs_sparsity(found, axes),
            "loss_vs_trainable": plots.loss_vs_trainable(found, axes, metric)}
    for name, (figure, note) in made.items():
      if figure is None:
        notes.append(note)
        continue
      figures[name] = figure
      buffer = io.BytesIO()
      figure.savefig(buffer, format="png", dpi=110)
      results_lib.write_text(os.path.join(sweep_dir, "plots", f"{name}.png"), buffer.getvalue())
  out = SweepReport(found, axes, metric, size, fits, floor_fits, figures, notes, "")
  out.markdown = _markdown(out, sweep_dir)
  results_lib.write_text(os.path.join(sweep_dir, "results.csv"),
                         results_lib.results_csv(found, axes))
  if any(r.languages for r in found):
    results_lib.write_text(os.path.join(sweep_dir, "languages.csv"),
                           results_lib.languages_csv(found, axes))
  results_lib.write_text(os.path.join(sweep_dir, "results.md"), out.markdown)
  return out


def _print_report(out: SweepReport, sweep_dir: str) -> None:
  print(results_lib.markdown_table(out.results, out.axes))
  for key, fit in out.fits.items():
    name = ", ".join(f"{a}={v}" for a, v in key) or "all runs"
    print(f"scaling fit ({name}): {out.metric} {fit.format()}")
    if key in out.floor_fits:
      print(f"scaling fit with irreducible loss ({name}): {out.floor_fits[key].format()}")
  for note in out.notes:
    print(f"note: {note}")
  print(f"Wrote {os.path.join(sweep_dir, 'results.md')}, results.csv and "
        f"{len(out.figures)} plots.", flush=True)


def _check_tpu_flags(args: argparse.Namespace) -> None:
  if not args.tpu_name or not args.zone:
    raise ValueError("--launch=tpu needs --tpu_name and --zone (the slices: <tpu_name>-<i>).")
  if "://" not in args.sweep_dir and not os.path.isabs(args.sweep_dir):
    raise ValueError(f"--sweep_dir={args.sweep_dir} is relative: TPU runs need storage that "
                     "outlives the slice and that this machine can gather from, e.g. "
                     "gs://bucket/sweeps/name.")


def main(args: argparse.Namespace, bindings: Sequence[str]) -> int:
  """The CLI entry: 0 when every run finished, 1 when some failed, 130/143 when interrupted."""
  search_paths = [p for p in args.gin_search_paths.split(",") if p]
  spec = grid.build_spec(args.spec, args.gin_file, bindings, args.axis, search_paths)
  runs = spec.runs(args.sweep_dir)
  if args.launch == "tpu":
    _check_tpu_flags(args)
    print("\n".join(launch.tpu_launch_lines(runs, args.tpu_name, args.zone, args.project)))
    return 0
  if args.dry_run:
    print("\n".join(f"# {run.name}\n{launch.command_line(run)}" for run in runs))
    return 0
  if "://" in args.sweep_dir and not args.gather_only:
    raise ValueError(f"--sweep_dir={args.sweep_dir}: local runs write their logs there; use a "
                     "local folder (or --gather_only for runs trained elsewhere).")
  outcomes = [] if args.gather_only else launch.run_locally(runs, args.in_process)
  out = report(spec, args.sweep_dir, args.size_axis, args.metric)
  _print_report(out, args.sweep_dir)
  interrupted = [o for o in outcomes if o.status == runner.INTERRUPTED]
  if interrupted:
    return runner.INTERRUPT_EXIT_CODES[interrupted[0].stopped_by]
  return 1 if any(o.status == runner.FAILED for o in outcomes) else 0
