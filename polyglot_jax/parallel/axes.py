"""The logical-axis vocabulary: every axis a parameter or activation can carry, and its role.

The models name every dimension with one of these axes; `partitioning` maps them to mesh axes
by rules, Adafactor (`training/optimizers.py`) factors its second moment by their `FactorDim`,
and sparsity (`compression/sparsity.py`) prunes every BATCH slice separately. A new axis is
added here once, with its role, and every one of those users knows it.
"""

from __future__ import annotations

import enum
from typing import Any

LogicalAxes = tuple[str | None, ...]


class FactorDim(enum.Enum):
  """Role of one parameter dim in Adafactor's factored second moment (T5X `FactorDim`)."""
  ROW = "row"  # v_row keeps it, v_col averages it away
  COLUMN = "column"  # v_col keeps it, v_row averages it away
  BATCH = "batch"  # independent slices (scanned layers, experts): never averaged over
  NONE = "none"  # averaged for RMS statistics, but the parameter is not factored


# Logical axis -> its factoring role. These keys are every logical axis the models use; a
# sharding rule or a parameter naming another axis is an error.
FACTOR_RULES: dict[str, FactorDim] = {
    "embed": FactorDim.ROW,
    **{axis: FactorDim.COLUMN for axis in (
        "mlp", "heads", "kv_heads", "kv", "joined_kv", "vocab", "expert_mlp")},
    **{axis: FactorDim.BATCH for axis in ("layers", "expert")},
    **{axis: FactorDim.NONE for axis in (
        "relpos_buckets", "unmodeled", "rank", "length", "batch", "expert_group")},
}

LOGICAL_AXES: tuple[str, ...] = tuple(FACTOR_RULES)


def is_axes(x: Any) -> bool:
  """Whether `x` is one array's logical axes: exactly a tuple of names (None = unnamed dim).

  Exactly a tuple, so optax's empty NamedTuple states are not mistaken for axes; None (a
  leaf without axes) counts too, so trees of axes map leaf for leaf over their arrays.
  """
  return x is None or (type(x) is tuple and all(isinstance(a, (str, type(None))) for a in x))


def factor_role(axis: str) -> FactorDim:
  """`axis`'s FactorDim, with a message that says how to fix an unknown axis."""
  try:
    return FACTOR_RULES[axis]
  except KeyError:
    raise ValueError(f"logical axis {axis!r} has no Adafactor factoring rule; "
                     "add it to polyglot_jax.parallel.axes.FACTOR_RULES") from None


def batch_dims(axes: LogicalAxes) -> tuple[int, ...]:
  """Dims of BATCH axes ('layers', 'expert'): independent slices of one parameter."""
  return tuple(i for i, a in enumerate(axes) if FACTOR_RULES.get(a) is FactorDim.BATCH)
