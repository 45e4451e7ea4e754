"""The jitted train and eval steps.

One `jax.jit` per step with explicit in/out shardings; the train state is donated. Gradient
accumulation scans over microbatches and divides every microbatch loss by the *global* batch's
normaliser, so accumulating M microbatches equals one pass over the whole batch.

What is minimised is an `Objective`: token cross-entropy (`CrossEntropy`, the model's `loss_fn`)
by default, or e.g. a preference loss (`training.preference.PreferenceLoss`).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax

from polyglot_jax.models import losses
from polyglot_jax.parallel import partitioning
from polyglot_jax.training.train_state import StateSpec, TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class Objective(Protocol):
  """A loss the train step differentiates, normalised so that microbatch losses add up.

  `normalizer(model, batch)` is the divisor of the global batch, shared by its microbatches;
  `loss_fn(model, params, batch, dropout_rng, normalizer, global_num_tokens)` returns (loss,
  metric sums) for a (micro)batch, the loss being a sum divided by `normalizer` (None: this
  batch's own) and the sums including `num_tokens` and `num_sequences`; `summarize(sums)` turns
  the sums, added over microbatches and with `normalizer` set back to the global one, into
  metrics including `loss`.
  """

  def normalizer(self, model: Any, batch: Batch) -> jax.Array: ...

  def loss_fn(self, model: Any, params: Any, batch: Batch, dropout_rng: jax.Array | None,
              normalizer: jax.Array | None = None, global_num_tokens: jax.Array | None = None
              ) -> tuple[jax.Array, Metrics]: ...

  def summarize(self, sums: Metrics) -> Metrics: ...


class CrossEntropy:
  """The model's own token loss (`model.loss_fn`, T5X normalisation): the default objective."""

  def normalizer(self, model: Any, batch: Batch) -> jax.Array:
    return losses.normalizer(batch["decoder_loss_weights"], model.loss_normalizing_factor)

  def loss_fn(self, model: Any, params: Any, batch: Batch, dropout_rng: jax.Array | None,
              normalizer: jax.Array | None = None, global_num_tokens: jax.Array | None = None
              ) -> tuple[jax.Array, Metrics]:
    return model.loss_fn(params, batch, dropout_rng, loss_normalizer=normalizer,
                         global_num_tokens=global_num_tokens)

  def summarize(self, sums: Metrics) -> Metrics:
    return losses.summarize(sums)


def _split_microbatches(batch: Batch, num_microbatches: int,
                        partitioner: partitioning.Partitioner) -> Batch:
  """[batch, ...] -> [microbatches, batch / microbatches, ...], rows still split over devices."""
  def split(x: jax.Array) -> jax.Array:
    if x.shape[0] % num_microbatches:
      raise ValueError(f"batch size {x.shape[0]} is not divisible by num_microbatches="
                       f"{num_microbatches}.")
    x = x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])
    spec = partitioner.spec(("batch",))
    return jax.lax.with_sharding_constraint(
        x, jax.sharding.NamedSharding(partitioner.mesh, jax.sharding.PartitionSpec(None, *spec)))
  return jax.tree.map(split, batch)


def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(model: Any, spec: StateSpec, partitioner: partitioning.Partitioner, *,
                    learning_rate_fn: Callable[[jax.Array], jax.Array],
                    num_microbatches: int = 1,
                    dropout_seed: int = 0,
                    objective: Objective | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Returns `train_step(state, batch) -> (state, metrics)`, jitted with shardings.

  `objective` (default `CrossEntropy()`) says what is minimised. Dropout randomness is
  `fold_in(key(dropout_seed), step)`: a function of the step alone, so a resumed run draws the
  same masks as an uninterrupted one. An update whose loss or gradients are not finite is
  skipped (state kept, step advanced) and reported as `nonfinite` = 1; the loop decides whether
  to stop. With `spec.sparsity`, the metrics add `sparsity/global` and `sparsity/<param path>`,
  counted from the masks in the optimizer state.
  """
  objective = objective or CrossEntropy()

  def grads_and_sums(params: Any, batch: Batch, rng: jax.Array) -> tuple[Any, Metrics]:
    norm = objective.normalizer(model, batch)
    num_tokens = jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32))

    def loss_fn(p: Any, mb: Batch, r: jax.Array) -> tuple[jax.Array, Metrics]:
      return objective.loss_fn(model, p, mb, r, norm, num_tokens)

    grad_fn = jax.grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
      return grad_fn(params, batch, rng)
    micro = _split_microbatches(batch, num_microbatches, partitioner)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    zero_sums = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng)[1])
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_sums)

    def body(carry, inputs):
      grads_acc, sums_acc = carry
      index, mb = inputs
      grads, sums = grad_fn(params, mb, jax.random.fold_in(rng, index))
      return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None

    (grads, sums), _ = jax.lax.scan(body, (zero_grads, zero_sums),
                                    (jnp.arange(num_microbatches), micro))
    sums["normalizer"] = norm  # Shared by every microbatch, not a sum.
    return grads, sums

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
    grads, sums = grads_and_sums(state.params, batch, rng)
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = objective.summarize(sums)
    finite = _all_finite(grads) & jnp.isfinite(metrics["loss"])
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state))
    metrics.update(
        learning_rate=learning_rate_fn(state.step),
        grad_norm=optax.global_norm(grads),
        nonfinite=1.0 - finite.astype(jnp.float32),
        num_tokens=sums["num_tokens"],
        num_sequences=sums["num_sequences"],
    )
    if spec.sparsity is not None:
      metrics.update(spec.sparsity.metrics(new_state.opt_state))
    return new_state, metrics

  batch_sharding = partitioner.batch_sharding
  return jax.jit(train_step, in_shardings=(spec.shardings, batch_sharding),
                 out_shardings=(spec.shardings, partitioner.replicated), donate_argnums=(0,))


def make_eval_step(model: Any, spec: StateSpec, partitioner: partitioning.Partitioner,
                   objective: Objective | None = None) -> Callable[[Any, Batch], Metrics]:
  """Returns `eval_step(params, batch) -> metric sums` (add them over batches, then summarize
  with the objective's `summarize`); the default objective evaluates `model.eval_fn`."""
  def eval_step(params: Any, batch: Batch) -> Metrics:
    if objective is None:
      return model.eval_fn(params, batch)[1]
    return objective.loss_fn(model, params, batch, None)[1]

  return jax.jit(eval_step, in_shardings=(spec.shardings.params, partitioner.batch_sharding),
                 out_shardings=partitioner.replicated)
