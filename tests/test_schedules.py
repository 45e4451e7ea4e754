"""T5X factor-string learning-rate schedules against hand-computed values."""

import math

import pytest

from polyglot_jax.training.schedules import create_learning_rate_schedule


def lr(factors: str, step: int, **kwargs: float) -> float:
  return float(create_learning_rate_schedule(factors, **kwargs)(step))


@pytest.mark.parametrize("factors, step, kwargs, expected", [
    ("constant", 7, {}, 0.5),
    # min(1, step / warmup)
    ("constant * linear_warmup", 250, {}, 0.5 * 0.25),
    ("constant * linear_warmup", 5000, {}, 0.5),
    # T5 default: 1/sqrt(max(step, warmup))
    ("constant * linear_warmup * rsqrt_decay", 500, {}, 0.5 * 0.5 / math.sqrt(1000)),
    ("constant * linear_warmup * rsqrt_decay", 4000, {}, 0.5 / math.sqrt(4000)),
    ("rsqrt_decay", 10, {"warmup_steps": 10_000}, 1 / 100),
    # sqrt(warmup) / sqrt(max(step, warmup))
    ("rsqrt_normalized_decay", 500, {}, 1.0),
    ("rsqrt_normalized_decay", 4000, {}, math.sqrt(1000 / 4000)),
    # decay_factor ** (step // steps_per_decay)
    ("constant * decay_every", 45_000, {}, 0.5 * 0.5**2),
    # base * min(step / warmup, 1 + decay_factor * (warmup - step))
    ("linear_decay", 500, {"decay_factor": 1e-3}, 0.5 * 0.5),
    ("linear_decay", 1500, {"decay_factor": 1e-3}, 0.5 * (1 + 1e-3 * (1000 - 1500))),
    # 0.5 * (1 + cos(pi * (max(0, (step - warmup) / cycle) % 1)))
    ("cosine_decay", 500, {}, 1.0),
    ("cosine_decay", 1000 + 25_000, {}, 0.5 * (1 + math.cos(math.pi * 0.25))),
    ("cosine_decay", 1000 + 125_000, {}, 0.5 * (1 + math.cos(math.pi * 0.25))),  # cyclic
    # step_offset shifts the step, floored at 0.
    ("constant * linear_warmup", 1250, {"step_offset": 1000}, 0.5 * 0.25),
    ("constant * linear_warmup", 10, {"step_offset": 1000}, 1e-8),  # min_learning_rate
])
def test_factor_values(factors: str, step: int, kwargs: dict, expected: float) -> None:
  assert lr(factors, step, **kwargs) == pytest.approx(expected, rel=1e-5)


def test_min_learning_rate_floors_decay() -> None:
  # linear_decay goes negative after 1 + 0.5 * (1000 - step) < 0; the floor catches it.
  assert lr("linear_decay", 5000, min_learning_rate=1e-6) == pytest.approx(1e-6)


def test_unknown_factor_lists_valid_ones() -> None:
  with pytest.raises(ValueError) as err:
    create_learning_rate_schedule("constant * cosine")
  # Gin appends "In call to configurable ..." on a line of its own; our message is the first line.
  first_line = str(err.value).splitlines()[0]
  assert first_line.startswith("unknown learning-rate factor(s) ['cosine'] in 'constant * cosine'")
  assert first_line.endswith("valid factors: constant, linear_warmup, rsqrt_decay, "
                             "rsqrt_normalized_decay, decay_every, linear_decay, cosine_decay")
