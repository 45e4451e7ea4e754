"""Learning-rate schedules written as T5X factor strings.

`create_learning_rate_schedule("constant * linear_warmup * rsqrt_decay")` multiplies the named
factors, exactly as `t5x.utils.create_learning_rate_scheduler` does, so T5X gin bindings such as
`utils.create_learning_rate_scheduler.factors = "constant * rsqrt_decay"` translate line for line.
The result is an `optax.Schedule` (step -> float32 learning rate) that optimizers take directly.
"""

from __future__ import annotations

from collections.abc import Callable

import gin
import jax
import jax.numpy as jnp
import optax


@gin.configurable
def create_learning_rate_schedule(
    factors: str = "constant * linear_warmup * rsqrt_decay",
    base_learning_rate: float = 0.5,
    warmup_steps: int = 1000,
    decay_factor: float = 0.5,
    steps_per_decay: int = 20000,
    steps_per_cycle: int = 100000,
    step_offset: int = 0,
    min_learning_rate: float = 1e-8,
) -> optax.Schedule:
  """Returns step -> learning rate, the product of the '*'-separated `factors`.

  Factors (T5X semantics; `step` is `max(0, step - step_offset)`):
    constant: base_learning_rate.
    linear_warmup: min(1, step / warmup_steps).
    rsqrt_decay: 1 / sqrt(max(step, warmup_steps)).
    rsqrt_normalized_decay: sqrt(warmup_steps) / sqrt(max(step, warmup_steps)), i.e. 1 after warmup.
    decay_every: decay_factor ** (step // steps_per_decay).
    linear_decay: base_learning_rate * min(step / warmup_steps,
      1 + decay_factor * (warmup_steps - step)); it already contains warmup and the constant, so
      do not combine it with `constant` or `linear_warmup`.
    cosine_decay: cyclic 0.5 * (1 + cos(pi * (progress % 1))), with
      progress = max(0, (step - warmup_steps) / steps_per_cycle).
  The product is floored at `min_learning_rate`, so a misconfigured decay never goes negative.

  Raises:
    ValueError: a factor name is unknown (checked here, not at the first step).
  """

  def warmup_fraction(step: jax.Array) -> jax.Array:
    # T5X divides by warmup_steps; with no warmup the factor is simply 1.
    return step / warmup_steps if warmup_steps else jnp.ones_like(step)

  def cosine(step: jax.Array) -> jax.Array:
    progress = jnp.maximum(0.0, (step - warmup_steps) / steps_per_cycle)
    return jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0))))

  factor_fns: dict[str, Callable[[jax.Array], jax.Array | float]] = {
      "constant": lambda step: base_learning_rate,
      "linear_warmup": lambda step: jnp.minimum(1.0, warmup_fraction(step)),
      "rsqrt_decay": lambda step: jax.lax.rsqrt(jnp.maximum(step, warmup_steps)),
      "rsqrt_normalized_decay": lambda step: (
          jnp.sqrt(float(warmup_steps)) * jax.lax.rsqrt(jnp.maximum(step, warmup_steps))),
      "decay_every": lambda step: decay_factor ** jnp.floor_divide(step, steps_per_decay),
      "linear_decay": lambda step: base_learning_rate * jnp.minimum(
          warmup_fraction(step), 1.0 + decay_factor * (warmup_steps - step)),
      "cosine_decay": cosine,
  }
  names = [name.strip() for name in factors.split("*")]
  unknown = [name for name in names if name not in factor_fns]
  if unknown:
    raise ValueError(f"unknown learning-rate factor(s) {unknown} in {factors!r}; "
                     f"valid factors: {', '.join(factor_fns)}")
  fns = [factor_fns[name] for name in names]

  def schedule(step: jax.typing.ArrayLike) -> jax.Array:
    step = jnp.maximum(0.0, jnp.asarray(step, jnp.float32) - step_offset)  # []
    lr = jnp.float32(1.0)
    for fn in fns:
      lr = lr * fn(step)
    return jnp.maximum(lr, min_learning_rate).astype(jnp.float32)

  return schedule
