"""Cross-entropy, z-loss and T5X loss normalisation against a NumPy reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from polyglot_jax.models import losses

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(3, 5, 7)).astype(np.float32)
TARGETS = RNG.integers(0, 7, size=(3, 5)).astype(np.int32)
WEIGHTS = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], np.float32)


def _reference(factor, z_loss=1e-2):
  log_z = np.log(np.exp(LOGITS).sum(-1))
  nll = log_z - np.take_along_axis(LOGITS, TARGETS[..., None], -1)[..., 0]
  token = nll + z_loss * log_z**2
  weights = WEIGHTS
  if factor == losses.AVERAGE_PER_SEQUENCE:
    weights = WEIGHTS / WEIGHTS.sum(-1, keepdims=True)
    return (token * weights).sum() / 3
  divisor = {losses.NUM_REAL_TARGET_TOKENS: WEIGHTS.sum(),
             losses.NUM_TOTAL_TARGET_TOKENS: WEIGHTS.size, None: 1.0, 4.0: 4.0}[factor]
  return (token * weights).sum() / divisor


FACTORS = [losses.NUM_REAL_TARGET_TOKENS, losses.NUM_TOTAL_TARGET_TOKENS,
           losses.AVERAGE_PER_SEQUENCE, None, 4.0]


@pytest.mark.parametrize("factor", FACTORS)
def test_loss_matches_reference(factor):
  loss, sums = losses.cross_entropy_loss(jnp.asarray(LOGITS), jnp.asarray(TARGETS),
                                         jnp.asarray(WEIGHTS), z_loss=1e-2,
                                         loss_normalizing_factor=factor)
  np.testing.assert_allclose(loss, _reference(factor), rtol=1e-5)
  metrics = losses.summarize(sums)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  correct = ((LOGITS.argmax(-1) == TARGETS) * WEIGHTS).sum() / WEIGHTS.sum()
  np.testing.assert_allclose(metrics["accuracy"], correct, rtol=1e-6)


@pytest.mark.parametrize("factor", FACTORS)
def test_microbatches_with_the_global_normalizer_add_up(factor):
  full, _ = losses.cross_entropy_loss(LOGITS, TARGETS, WEIGHTS, z_loss=1e-2,
                                      loss_normalizing_factor=factor)
  norm = losses.normalizer(jnp.asarray(WEIGHTS), factor)
  parts = [losses.cross_entropy_loss(LOGITS[s], TARGETS[s], WEIGHTS[s], z_loss=1e-2,
                                     loss_normalizing_factor=factor, loss_normalizer=norm)[0]
           for s in (slice(0, 1), slice(1, 3))]
  np.testing.assert_allclose(sum(parts), full, rtol=1e-6)


def test_label_smoothing_is_zero_at_the_smoothed_target():
  smoothing, vocab = 0.1, 7
  soft = np.full((1, 1, vocab), smoothing / (vocab - 1), np.float32)
  soft[0, 0, 3] = 1 - smoothing
  loss, _ = losses.cross_entropy_loss(jnp.log(soft), jnp.array([[3]]), jnp.ones((1, 1)),
                                      label_smoothing=smoothing)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_unknown_normalizer_is_one_line():
  with pytest.raises(ValueError, match="loss_normalizing_factor='PER_TOKEN' is unknown") as info:
    losses.check_normalizer("PER_TOKEN")
  assert "\n" not in str(info.value)
