"""The training state and its sharded initialisation.

State = (step, params, opt_state). Its shardings come from the parameters' logical axes; the
optimizer state inherits them leaf by leaf (`partitioning.derived_state_axes`), so FSDP splits
Adam moments and Adafactor statistics exactly like the weights they track.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from polyglot_jax.parallel import partitioning
from polyglot_jax.training import optimizers



class WeightMasks(Protocol):
  """An optimizer wrapper that keeps weight masks in its state (`compression.sparsity.Sparsity`)."""

  def wrap(self, tx: optax.GradientTransformation, param_axes: Any
           ) -> optax.GradientTransformation:
    """`tx` with the masks' state and their application added."""

  def metrics(self, opt_state: optax.OptState) -> dict[str, jax.Array]:
    """Metrics of the masks in `opt_state` (e.g. `sparsity/global`)."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: number of optimizer updates applied.
  params: Any
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """What the trainer needs to know about a state without holding one.

  Attributes:
    abstract: TrainState of ShapeDtypeStructs carrying their shardings (a restore target).
    shardings: TrainState of NamedShardings.
    param_axes: tree of logical-axis tuples, one per parameter.
    tx: the optimizer built for these parameters (wrapped by `sparsity` when given).
    sparsity: the weight masks `tx` keeps (gradual pruning), or None (dense).
    trainable_params: regex of the parameters the optimizer updates; None = all.
  """

  abstract: TrainState
  shardings: TrainState
  param_axes: Any
  tx: optax.GradientTransformation
  sparsity: WeightMasks | None = None
  trainable_params: str | None = None

  def trainable_count(self) -> int:
    """Parameters the optimizer updates."""
    if self.trainable_params is None:
      return param_count(self.abstract.params)
    mask = optimizers.trainable_mask(self.param_axes, self.trainable_params)
    return int(sum(x.size for x, keep in zip(jax.tree.leaves(self.abstract.params),
                                             jax.tree.leaves(mask)) if keep))


class ParamsOnly:
  """An optimizer without state, for state specs of evaluation, inference and checkpoint surgery."""

  @staticmethod
  def build(param_axes: Any) -> optax.GradientTransformation:
    del param_axes
    return optax.identity()


def unbox(boxed: Any) -> Any:
  """Plain arrays from nn.LogicallyPartitioned boxes, without sharding constraints.

  `nn.unbox` constrains each value to its logical sharding when a mesh is active, which fails
  for the abstract mesh of `jax.set_mesh`; shardings here come from `out_shardings` instead, so
  state can be built inside or outside `Partitioner.activate()`.
  """
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False), boxed,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def state_spec(model: Any, optimizer: Any, partitioner: partitioning.Partitioner,
               sparsity: WeightMasks | None = None,
               trainable_params: str | None = None) -> StateSpec:
  """Builds the abstract state, its shardings and the optimizer, allocating nothing.

  With `trainable_params` (a regex over parameter paths), only matching parameters are updated
  and only they get optimizer state (`optimizers.freeze_untrainable`). With `sparsity`, the
  optimizer is wrapped by `sparsity.wrap`: its masks join the optimizer state, sharded like the
  parameters.
  """
  boxed = model.param_shapes()
  param_axes = partitioning.logical_axes(boxed)
  abstract_params = unbox(boxed)
  tx = optimizer.build(param_axes)
  if trainable_params is not None:
    tx = optimizers.freeze_untrainable(tx, param_axes, trainable_params)
  if sparsity is not None:
    tx = sparsity.wrap(tx, param_axes)
  abstract = jax.eval_shape(
      lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
      abstract_params)
  axes = TrainState(
      step=(), params=param_axes,
      opt_state=partitioning.derived_state_axes(abstract.opt_state, param_axes, abstract_params))
  shardings = partitioner.shardings(axes)
  partitioner.check_divisible(abstract, shardings, "parameter or optimizer state")
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return StateSpec(abstract=abstract, shardings=shardings, param_axes=param_axes, tx=tx,
                   sparsity=sparsity, trainable_params=trainable_params)


def params_spec(model: Any, partitioner: partitioning.Partitioner) -> StateSpec:
  """The state spec of parameters alone (evaluation, inference, checkpoint surgery)."""
  return state_spec(model, ParamsOnly(), partitioner)


def initialize(model: Any, spec: StateSpec, seed: int) -> TrainState:
  """Initialises parameters and optimizer state directly into their shardings."""
  def init(rng: jax.Array) -> TrainState:
    params = unbox(model.init_params(rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=spec.tx.init(params))

  return jax.jit(init, out_shardings=spec.shardings)(jax.random.key(seed))


def with_params(spec: StateSpec, state: TrainState, params: Any) -> TrainState:
  """A state whose params are replaced (e.g. from a partial restore) with fresh optimizer state."""
  def fresh(p: Any) -> TrainState:
    return TrainState(step=state.step, params=p, opt_state=spec.tx.init(p))
  return jax.jit(fresh, out_shardings=spec.shardings)(params)


def param_count(abstract_params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(abstract_params)))


def tree_bytes(tree: Any) -> int:
  """Bytes of every array (or ShapeDtypeStruct) in `tree`."""
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
