"""The sweep's figures (matplotlib, the `plots` extra), each returned with a note when skipped.

  loss_vs_flops         the scaling plot: train-loss curves against cumulative training FLOPs
                        (log-log), one line per model size, the final `metric` points and the
                        fitted power law; one panel per combination of the other axes
  language_loss_vs_sparsity  per-language loss (ln perplexity) against measured weight sparsity:
                        one faint line per language, the resource-group means in colour; one
                        panel per combination of the axes that do not change sparsity
  loss_vs_trainable     `metric` against the trainable-parameter percentage
A plot whose x quantity is the same for every finished run says so in its note instead.
Figures are `matplotlib.figure.Figure`s, made without pyplot: no global state, no backend, and
a notebook shows them with `display(fig)`.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from polyglot_jax.sweep.results import FINISHED, GROUPS, RunResult, axes_driving
from polyglot_jax.sweep.scaling import PowerLaw

Key = tuple[tuple[str, str], ...]
_GROUP_COLOURS = {"all": "black", "high": "tab:blue", "low": "tab:orange"}


def _key_text(key: Key) -> str:
  return ", ".join(f"{axis}={label}" for axis, label in key) or "all runs"


def _panels(count: int, width: float = 5.0, height: float = 3.8) -> tuple[Figure, list]:
  cols = min(count, 3)
  rows = math.ceil(count / cols)
  fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
  return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(count)]


def _finished(results: Sequence[RunResult], column: str) -> list[RunResult]:
  return [r for r in results if r.status == FINISHED and isinstance(r.values[column], (int, float))
          and math.isfinite(r.values[column])]


def _constant(results: Sequence[RunResult], column: str) -> bool:
  values = [r.values[column] for r in results]
  return max(values) - min(values) <= 1e-9 * max(abs(max(values)), 1.0)


def _series(results: Sequence[RunResult], axes: Sequence[str], column: str
            ) -> dict[Key, list[RunResult]]:
  """Runs grouped by the axes that do not change `column`, sorted by `column`."""
  drivers = axes_driving(results, axes, column)
  series: dict[Key, list[RunResult]] = {}
  for r in results:
    key = tuple((a, r.run.labels[a]) for a in axes if a not in drivers)
    series.setdefault(key, []).append(r)
  return {k: sorted(v, key=lambda r: r.values[column]) for k, v in series.items()}


def loss_vs_flops(results: Sequence[RunResult], axes: Sequence[str], size_axis: str | None,
                  metric: str, fits: Mapping[Key, PowerLaw]) -> tuple[Figure | None, str]:
  """Train-loss curves against training FLOPs, one line per size, with the fits."""
  runs = [r for r in results if r.curve]
  if not runs:
    return None, "loss vs FLOPs skipped: no run has logged training metrics yet."
  facets: dict[Key, list[RunResult]] = {}
  for r in runs:  # Without a size axis, one panel with a line per run.
    key = tuple((a, r.run.labels[a]) for a in axes if a != size_axis) if size_axis else ()
    facets.setdefault(key, []).append(r)
  fig, panels = _panels(len(facets))
  for ax, (key, members) in zip(panels, facets.items()):
    members = sorted(members, key=lambda r: r.values["params"] or 0)
    colours = [f"C{i % 10}" for i in range(len(members))]
    for r, colour in zip(members, colours):
      label = r.run.labels[size_axis] if size_axis else r.run.name
      x, y = zip(*r.curve)
      ax.plot(x, y, color=colour, lw=1.2, label=f"{label} ({r.values['params']:,} params)")
      if r.status == FINISHED and r.values[metric] is not None:
        ax.plot([r.values["train_flops"]], [r.values[metric]], "o", color=colour, ms=6)
    if key in fits:
      fit = fits[key]
      xs = sorted(r.values["train_flops"] for r in members if r.status == FINISHED)
      grid = [xs[0] * (xs[-1] / xs[0]) ** (i / 50) for i in range(51)]
      ax.plot(grid, fit(grid), "k--", lw=1,
              label=f"fit: {metric} = {fit.coefficient:.3g} C^{-fit.exponent:+.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("training FLOPs (analytic)")
    ax.set_ylabel(f"train loss; dots: final {metric}")
    ax.set_title(_key_text(key), fontsize=9)
    ax.legend(fontsize=7)
  return fig, ""


def language_loss_vs_sparsity(results: Sequence[RunResult], axes: Sequence[str]
                              ) -> tuple[Figure | None, str]:
  """Per-language loss against weight sparsity; one panel per series of runs."""
  runs = [r for r in _finished(results, "sparsity") if r.languages]
  if not runs:
    return None, ("per-language loss vs sparsity skipped: no finished run has a per-language "
                  "evaluation (bind train.infer_eval_dataset_cfg, as gin/sweeps/tiny_lm.gin does).")
  if _constant(runs, "sparsity"):
    return None, (f"per-language loss vs sparsity skipped: sparsity is "
                  f"{runs[0].values['sparsity']:.3f} in every finished run.")
  series = {k: v for k, v in _series(runs, axes, "sparsity").items() if len(v) > 1}
  if not series:
    return None, ("per-language loss vs sparsity skipped: no two finished runs differ only in "
                  "sparsity.")
  fig, panels = _panels(len(series))
  for ax, (key, members) in zip(panels, series.items()):
    x = [r.values["sparsity"] for r in members]
    per_run = [{row["language"]: row["loss"] for row in r.languages} for r in members]
    shared = set.intersection(*(set(p) for p in per_run))
    for language in sorted(shared):
      ax.plot(x, [p[language] for p in per_run], color="0.75", lw=0.6, zorder=1)
    for group in GROUPS:
      y = [r.values[f"language_loss/{group}"] for r in members]
      if all(v is not None for v in y):
        label = "mean, all languages" if group == "all" else f"mean, {group}-resource languages"
        ax.plot(x, y, "o-", color=_GROUP_COLOURS[group], lw=2, zorder=2, label=label)
    ax.set_xlabel("weight sparsity (prunable weights)")
    ax.set_ylabel("eval loss per language, ln(perplexity)")
    ax.set_title(f"{_key_text(key)}; grey: {len(shared)} languages", fontsize=9)
    ax.legend(fontsize=7)
  return fig, ""


def loss_vs_trainable(results: Sequence[RunResult], axes: Sequence[str], metric: str
                      ) -> tuple[Figure | None, str]:
  """`metric` against the trainable-parameter percentage, one line or marker set per series."""
  runs = [r for r in _finished(results, "trainable_pct") if r.values[metric] is not None]
  if not runs:
    return None, f"loss vs trainable % skipped: no finished run has {metric}."
  if _constant(runs, "trainable_pct"):
    return None, (f"loss vs trainable % skipped: {runs[0].values['trainable_pct']:.3g}% of the "
                  "parameters are trainable in every finished run.")
  fig, (ax,) = _panels(1, width=6.0, height=4.5)
  for key, members in _series(runs, axes, "trainable_pct").items():
    varying = [a for a in axes if len({r.run.labels[a] for r in members}) > 1]
    x, y = [r.values["trainable_pct"] for r in members], [r.values[metric] for r in members]
    ax.plot(x, y, "o-" if len(varying) <= 1 else "o", label=_key_text(key))
    if len(varying) > 1:  # Markers only: say which run each one is.
      for r, xi, yi in zip(members, x, y):
        ax.annotate(",".join(r.run.labels[a] for a in varying), (xi, yi), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
  ax.set_xscale("log")
  ax.set_xlabel("trainable parameters (%)")
  ax.set_ylabel(metric)
  ax.legend(fontsize=7)
  return fig, ""
