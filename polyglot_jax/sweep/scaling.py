"""Scaling-law fits of loss against training compute: L(C) = A * C^-alpha, or E + A * C^-alpha.

Kaplan et al. (2020) fit the first form, Hoffmann et al. (2022) the second, with E the
irreducible loss. Both are fitted here with numpy alone:
  * `fit_power_law`: least squares of log L = log A - alpha * log C, a straight line in log-log
    space (exact on exact power-law points).
  * `fit_power_law_with_floor`: for a fixed E the best A and alpha are again a straight-line fit
    (of log(L - E)), so E is searched on its own: a grid over [0, min L), then golden-section
    refinement around the best grid point, minimising the squared error of log L. The grid makes
    the result independent of any initial guess (no local optimizer that starts at a bad E).
    Three parameters need at least 4 points; with few sizes E is poorly determined, so compare
    its alpha with the pure power law's before reading much into it.
`scaling_points` picks the points from a sweep: the final point (training FLOPs, loss) of each
model size, separately for every combination of the other axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

_GRID = 256
_GOLDEN_STEPS = 200


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """L(C) = irreducible + coefficient * C^-exponent, fitted on `num_points` points."""

  coefficient: float  # A
  exponent: float  # alpha
  irreducible: float = 0.0  # E
  num_points: int = 0
  r2: float = float("nan")  # Of log L.

  def __call__(self, compute: np.ndarray | float) -> np.ndarray:
    return self.irreducible + self.coefficient * np.asarray(compute, np.float64) ** -self.exponent

  def format(self) -> str:
    floor = f"{self.irreducible:.4g} + " if self.irreducible else ""
    return (f"L = {floor}{self.coefficient:.4g} * C^{-self.exponent:+.4g}  "
            f"({self.num_points} points, R^2 of log L {self.r2:.4f})")


def _check(compute: Sequence[float], loss: Sequence[float], minimum: int, what: str
           ) -> tuple[np.ndarray, np.ndarray]:
  c, l = np.asarray(compute, np.float64), np.asarray(loss, np.float64)
  if c.shape != l.shape or c.ndim != 1:
    raise ValueError(f"compute {c.shape} and loss {l.shape} must be two lists of equal length.")
  if not (np.all(np.isfinite(c)) and np.all(np.isfinite(l)) and np.all(c > 0) and np.all(l > 0)):
    raise ValueError("a power-law fit needs positive, finite compute and loss values.")
  if len(np.unique(c)) < minimum:
    raise ValueError(f"{what} needs at least {minimum} model sizes (distinct compute values), "
                     f"got {len(np.unique(c))}; add sizes to the sweep.")
  return c, l


def _r2(log_loss: np.ndarray, predicted: np.ndarray) -> float:
  total = float(np.sum((log_loss - log_loss.mean()) ** 2))
  residual = float(np.sum((log_loss - np.log(predicted)) ** 2))
  return 1.0 - residual / total if total > 0 else float("nan")


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> PowerLaw:
  """L = A * C^-alpha by least squares in log-log space; needs 2 or more sizes."""
  c, l = _check(compute, loss, 2, "a power-law fit")
  slope, intercept = np.polyfit(np.log(c), np.log(l), 1)
  law = PowerLaw(coefficient=math.exp(intercept), exponent=-float(slope), num_points=len(c))
  return dataclasses.replace(law, r2=_r2(np.log(l), law(c)))


def _fit_given_floor(c: np.ndarray, l: np.ndarray, floor: float) -> tuple[float, PowerLaw]:
  """(squared error of log L, the law) with E fixed: a straight line through log(L - E)."""
  slope, intercept = np.polyfit(np.log(c), np.log(l - floor), 1)
  law = PowerLaw(coefficient=math.exp(intercept), exponent=-float(slope), irreducible=floor,
                 num_points=len(c))
  return float(np.sum((np.log(law(c)) - np.log(l)) ** 2)), law


def fit_power_law_with_floor(compute: Sequence[float], loss: Sequence[float]) -> PowerLaw:
  """L = E + A * C^-alpha, E in [0, min L), by a grid then golden-section search over E."""
  c, l = _check(compute, loss, 4, "a power-law fit with an irreducible loss")
  top = float(l.min())
  grid = top * np.arange(_GRID) / _GRID  # [grid]: 0 <= E < min L
  errors = [_fit_given_floor(c, l, e)[0] for e in grid]
  best = int(np.argmin(errors))
  low, high = grid[max(best - 1, 0)], (grid[best + 1] if best + 1 < _GRID else top)
  ratio = (math.sqrt(5) - 1) / 2
  for _ in range(_GOLDEN_STEPS):  # Golden-section search of the bracket [low, high].
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    if _fit_given_floor(c, l, a)[0] <= _fit_given_floor(c, l, b)[0]:
      high = b
    else:
      low = a
  law = _fit_given_floor(c, l, (low + high) / 2)[1]
  return dataclasses.replace(law, r2=_r2(np.log(l), law(c)))


def scaling_points(rows: Sequence[Mapping[str, object]], size_axis: str, axes: Sequence[str],
                   compute: str, metric: str) -> dict[tuple[tuple[str, str], ...],
                                                      list[tuple[str, float, float]]]:
  """Groups rows (dicts with axis labels and values) by the axes other than `size_axis`.

  Returns {((axis, label), ...): [(size label, compute, loss), ...]} sorted by compute; rows
  without a finite positive compute or loss are left out.
  """
  groups: dict[tuple[tuple[str, str], ...], list[tuple[str, float, float]]] = {}
  for row in rows:
    c, l = row.get(compute), row.get(metric)
    if not (isinstance(c, (int, float)) and isinstance(l, (int, float))
            and math.isfinite(c) and math.isfinite(l) and c > 0 and l > 0):
      continue
    key = tuple((a, str(row[a])) for a in axes if a != size_axis)
    groups.setdefault(key, []).append((str(row[size_axis]), float(c), float(l)))
  return {key: sorted(points, key=lambda p: p[1]) for key, points in groups.items()}
