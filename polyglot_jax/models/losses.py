"""Token cross-entropy with z-loss, T5X loss normalisation, and the metric sums the trainer reports.

Losses are returned as *sums* divided by a normaliser that the caller may fix for the whole global
batch. That keeps gradient accumulation exact: summing microbatch losses that share the full
batch's normaliser gives the same number as one pass over the full batch.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

# T5X names for `loss_normalizing_factor`; a float is also accepted (a constant divisor).
NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"
NUM_TOTAL_TARGET_TOKENS = "NUM_TOTAL_TARGET_TOKENS"
AVERAGE_PER_SEQUENCE = "AVERAGE_PER_SEQUENCE"
NORMALIZERS = (NUM_REAL_TARGET_TOKENS, NUM_TOTAL_TARGET_TOKENS, AVERAGE_PER_SEQUENCE)

LossNormalizer = str | float | None


def check_normalizer(factor: LossNormalizer) -> None:
  """Raises a one-line error for an unknown `loss_normalizing_factor`."""
  if factor is None or isinstance(factor, (int, float)) or factor in NORMALIZERS:
    return
  raise ValueError(f"loss_normalizing_factor={factor!r} is unknown; use one of {NORMALIZERS}, "
                   "a number, or None (plain sum).")


def sequence_weights(weights: jax.Array, factor: LossNormalizer) -> jax.Array:
  """Reweights tokens so each sequence sums to 1 under AVERAGE_PER_SEQUENCE; else unchanged.

  Args:
    weights: [batch, length] loss weights (0 on padding).
    factor: the loss normalising factor.
  """
  if factor != AVERAGE_PER_SEQUENCE:
    return weights
  totals = jnp.sum(weights, axis=-1, keepdims=True)  # [batch, 1]
  return weights / jnp.maximum(totals, 1e-9)


def normalizer(weights: jax.Array, factor: LossNormalizer) -> jax.Array:
  """The divisor of the summed loss for a (global) batch of `weights` [batch, length]."""
  check_normalizer(factor)
  if factor is None:
    return jnp.ones((), jnp.float32)
  if isinstance(factor, (int, float)):
    return jnp.asarray(factor, jnp.float32)
  if factor == NUM_TOTAL_TARGET_TOKENS:
    return jnp.asarray(weights.size, jnp.float32)
  if factor == AVERAGE_PER_SEQUENCE:
    return jnp.sum(jnp.any(weights > 0, axis=-1)).astype(jnp.float32)
  return jnp.sum(weights).astype(jnp.float32)


def cross_entropy_loss(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    loss_normalizing_factor: LossNormalizer = NUM_REAL_TARGET_TOKENS,
    loss_normalizer: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted softmax cross-entropy plus z-loss (PaLM), normalised like T5X.

  Args:
    logits: [batch, length, vocab] in any float dtype; computed in f32.
    targets: [batch, length] int token ids.
    weights: [batch, length] loss weights, 0 on padding.
    z_loss: coefficient of log(Z)^2, which keeps the softmax normaliser near 1.
    label_smoothing: probability mass spread over the vocabulary.
    loss_normalizing_factor: see NORMALIZERS.
    loss_normalizer: a precomputed divisor (the global batch's, under gradient accumulation);
      None computes it from `weights`.

  Returns:
    (loss, sums): the scalar loss to differentiate and un-normalised metric sums
    `cross_ent_loss`, `z_loss`, `correct`, `num_tokens`, `num_sequences`, `normalizer`.
  """
  weights = weights.astype(jnp.float32)  # [batch, length]
  loss_weights = sequence_weights(weights, loss_normalizing_factor)
  xent_sum, z_sum, correct = _weighted_sums(logits, targets, weights, loss_weights, z_loss,
                                            label_smoothing)
  return _loss_and_sums(xent_sum, z_sum, correct, weights, loss_normalizing_factor,
                        loss_normalizer)


def chunked_cross_entropy_loss(
    pre_logits: jax.Array,
    project: Callable[[jax.Array], jax.Array],
    targets: jax.Array,
    weights: jax.Array,
    *,
    chunk_size: int,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    loss_normalizing_factor: LossNormalizer = NUM_REAL_TARGET_TOKENS,
    loss_normalizer: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`cross_entropy_loss(project(pre_logits), ...)` without materialising the whole logits.

  The length axis is cut into chunks of `chunk_size` positions (the last one padded with zero
  weights); a scan projects one chunk at a time to [batch, chunk_size, vocab] f32 logits and adds
  up its loss terms, and `jax.checkpoint` recomputes each chunk's logits in the backward pass
  instead of keeping them. Values and gradients equal the unchunked loss up to f32 summation
  order.

  Args:
    pre_logits: [batch, length, embed] final activations.
    project: [batch, chunk_size, embed] -> [batch, chunk_size, vocab] output projection.
    targets, weights, z_loss, label_smoothing, loss_normalizing_factor, loss_normalizer: as in
      `cross_entropy_loss`.
    chunk_size: positions per row in one chunk.
  """
  weights = weights.astype(jnp.float32)  # [batch, length]
  loss_weights = sequence_weights(weights, loss_normalizing_factor)
  batch, length = targets.shape
  num_chunks = -(-length // chunk_size)
  pad = num_chunks * chunk_size - length

  def chunks(x: jax.Array) -> jax.Array:
    """[batch, length, ...] -> [num_chunks, batch, chunk_size, ...], zero-padded."""
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((batch, num_chunks, chunk_size) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  @jax.checkpoint
  def add_chunk(totals: tuple[jax.Array, ...], chunk: tuple[jax.Array, ...]
                ) -> tuple[tuple[jax.Array, ...], None]:
    y, chunk_targets, chunk_weights, chunk_loss_weights = chunk
    sums = _weighted_sums(project(y), chunk_targets, chunk_weights, chunk_loss_weights, z_loss,
                          label_smoothing)  # logits: [batch, chunk_size, vocab]
    return tuple(total + value for total, value in zip(totals, sums)), None

  zero = jnp.zeros((), jnp.float32)
  (xent_sum, z_sum, correct), _ = jax.lax.scan(
      add_chunk, (zero, zero, zero),
      (chunks(pre_logits), chunks(targets), chunks(weights), chunks(loss_weights)))
  return _loss_and_sums(xent_sum, z_sum, correct, weights, loss_normalizing_factor,
                        loss_normalizer)


def _weighted_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                   loss_weights: jax.Array, z_loss: float, label_smoothing: float
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(cross-entropy, z-loss) summed with `loss_weights`, and correct argmaxes with `weights`.

  Args:
    logits: [batch, length, vocab] in any float dtype; computed in f32.
    targets: [batch, length] int token ids.
    weights: [batch, length] float32 loss weights, 0 on padding.
    loss_weights: [batch, length] the weights after `sequence_weights`.
  """
  logits = logits.astype(jnp.float32)  # [batch, length, vocab]
  vocab = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab - 1) if vocab > 1 else 0.0
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  log_probs = logits - log_z[..., None]  # [batch, length, vocab]
  soft_targets = jax.nn.one_hot(targets, vocab) * (confidence - low) + low  # [b, l, vocab]
  # Subtract the entropy of the smoothed targets so a perfect model has loss 0 (as T5X does).
  min_entropy = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20)
                  ) if label_smoothing else 0.0
  token_xent = -jnp.sum(soft_targets * log_probs, axis=-1) - min_entropy  # [batch, length]
  token_z = z_loss * jnp.square(log_z)  # [batch, length]
  xent_sum = jnp.sum(token_xent * loss_weights)
  z_sum = jnp.sum(token_z * loss_weights)
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
  return xent_sum, z_sum, correct


def _loss_and_sums(xent_sum: jax.Array, z_sum: jax.Array, correct: jax.Array,
                   weights: jax.Array, loss_normalizing_factor: LossNormalizer,
                   loss_normalizer: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The normalised loss and the metric sums of a batch with float32 `weights` [batch, length]."""
  if loss_normalizer is None:
    loss_normalizer = normalizer(weights, loss_normalizing_factor)
  loss = (xent_sum + z_sum) / loss_normalizer
  sums = {
      "cross_ent_loss": xent_sum,
      "z_loss": z_sum,
      "correct": correct,
      "num_tokens": jnp.sum(weights),
      "num_sequences": jnp.sum(jnp.any(weights > 0, axis=-1)).astype(jnp.float32),
      "normalizer": jnp.asarray(loss_normalizer, jnp.float32),
  }
  return loss, sums


def summarize(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Turns metric sums (possibly added over microbatches) into T5X-named metrics."""
  norm = sums["normalizer"]
  tokens = jnp.maximum(sums["num_tokens"], 1.0)
  metrics = {
      "loss": (sums["cross_ent_loss"] + sums["z_loss"]) / norm,
      "cross_ent_loss": sums["cross_ent_loss"] / norm,
      "z_loss": sums["z_loss"] / norm,
      "accuracy": sums["correct"] / tokens,
  }
  # Router statistics arrive as token-weighted sums: their token-weighted means.
  metrics.update({name: value / tokens for name, value in sums.items()
                  if name.startswith("experts/")})
  return metrics
