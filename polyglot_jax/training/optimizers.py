"""Optimizers: T5X-style Adafactor with factoring by logical axes, and AdamW.

Both are gin-configurable frozen dataclasses with
`build(param_axes) -> optax.GradientTransformation`. `param_axes` mirrors the params tree (nested
dicts) with a tuple of logical axis names per leaf, e.g. ('embed', 'mlp'); Adafactor needs it to
decide, per parameter, which dims it factors (T5X's `logical_factor_rules`), and AdamW uses it to
decay matrices only.

Adafactor state layout (the sharding code relies on it): `FactoredRulesState(count, v_row, v_col,
v)`, where v_row, v_col and v each mirror the params tree, so every per-parameter state leaf's key
path ends with that parameter's key path. Factored moments keep the reduced dims as size 1 (v_row
and v_col have the parameter's rank, so the parameter's logical axes shard them too); unused slots
are arrays of shape (1,) * param.ndim.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax

from polyglot_jax.parallel.axes import FactorDim, LogicalAxes, factor_role, is_axes
from polyglot_jax.parallel.partitioning import path_str

ParamAxes = Any  # pytree of LogicalAxes with the params' structure


@dataclasses.dataclass(frozen=True)
class FactorLayout:
  """How Adafactor treats one parameter.

  Attributes:
    row_dims: dims kept by v_row (all ROW axes); empty when the parameter is not factored.
    col_dims: dims kept by v_col (all COLUMN axes); empty when the parameter is not factored.
    averaging_dims: every non-BATCH dim. Update clipping and parameter scale take their RMS over
      these, so a scanned stack ('layers', ...) behaves exactly like its unscanned layers.
  """
  row_dims: tuple[int, ...]
  col_dims: tuple[int, ...]
  averaging_dims: tuple[int, ...]

  @property
  def factored(self) -> bool:
    return bool(self.row_dims)


def factor_layout(logical_axes: LogicalAxes, shape: tuple[int, ...], *, factored: bool = True,
                  min_dim_size_to_factor: int = 128) -> FactorLayout:
  """Decides from logical axes which dims of a parameter Adafactor factors.

  A parameter is factored iff it has at least one ROW and one COLUMN axis, no NONE axis, and the
  total sizes of its ROW dims and of its COLUMN dims are both >= `min_dim_size_to_factor`.
  Several COLUMN axes (the q kernel: embed ROW, heads COLUMN, kv COLUMN) form one joint column,
  as in T5X: v_col keeps all of them and v_row averages over all of them. We chose this over
  picking one COLUMN axis because it makes the statistics invariant to fusing axes: the unfused
  ('embed', 'heads', 'kv') kernel is optimized exactly like the fused ('embed', 'joined_kv') one,
  and it also stores the least state.
  """
  axes = tuple(logical_axes)
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match parameter shape {shape}")
  roles = [factor_role(axis) for axis in axes]
  row_dims = tuple(i for i, role in enumerate(roles) if role is FactorDim.ROW)
  col_dims = tuple(i for i, role in enumerate(roles) if role is FactorDim.COLUMN)
  averaging_dims = tuple(i for i, role in enumerate(roles) if role is not FactorDim.BATCH)
  use_factoring = (factored and row_dims and col_dims and FactorDim.NONE not in roles
                   and math.prod(shape[d] for d in row_dims) >= min_dim_size_to_factor
                   and math.prod(shape[d] for d in col_dims) >= min_dim_size_to_factor)
  if not use_factoring:
    return FactorLayout((), (), averaging_dims)
  return FactorLayout(row_dims, col_dims, averaging_dims)


def _layouts(tree: Any, param_axes: ParamAxes, **kwargs: Any) -> Any:
  """Maps every array of the params-structured `tree` to its FactorLayout.

  Subtrees without arrays (`optax.MaskedNode` under `optax.masked` / `multi_transform`) are kept
  as they are, so later tree maps over `tree` and the layouts still line up.
  """
  def layout(axes: LogicalAxes, x: Any) -> Any:
    return factor_layout(axes, x.shape, **kwargs) if hasattr(x, "shape") else x

  return jax.tree.map(layout, param_axes, tree, is_leaf=is_axes)


def _reduced_shape(shape: tuple[int, ...], dims: tuple[int, ...]) -> tuple[int, ...]:
  """`shape` with `dims` set to 1: the shape of a keepdims mean over `dims`."""
  return tuple(1 if i in dims else n for i, n in enumerate(shape))


def _block_rms(x: jax.Array, layout: FactorLayout) -> jax.Array:
  """RMS of `x` within each BATCH slice; averaged dims kept as size 1 (broadcasts against x)."""
  return jnp.sqrt(jnp.mean(jnp.square(x), axis=layout.averaging_dims, keepdims=True))


class FactoredRulesState(NamedTuple):
  """State of `scale_by_factored_rms_with_rules`; each tree mirrors the params tree."""
  count: jax.Array  # [] int32, update steps taken
  v_row: Any  # factored: param shape with COLUMN dims -> 1; else (1,) * ndim
  v_col: Any  # factored: param shape with ROW dims -> 1; else (1,) * ndim
  v: Any  # not factored: param shape; else (1,) * ndim


def scale_by_factored_rms_with_rules(
    param_axes: ParamAxes, *, factored: bool = True, decay_rate: float = 0.8,
    step_offset: int = 0, min_dim_size_to_factor: int = 128,
    epsilon: float = 1e-30) -> optax.GradientTransformation:
  """`optax.scale_by_factored_rms` with factored dims chosen by logical axes (`factor_layout`).

  Divides each gradient by the RMS estimate sqrt(v), where v is an exponential moving average of
  grad**2 + epsilon with the Adafactor decay 1 - (step - step_offset + 1) ** -decay_rate. For a
  factored parameter v is rank-1 per BATCH slice: v ~= v_row * v_col / mean(v_row). Statistics
  are float32 whatever the parameter dtype.
  """
  layout_kwargs = dict(factored=factored, min_dim_size_to_factor=min_dim_size_to_factor)

  def slot_shapes(param: jax.Array, layout: FactorLayout) -> dict[str, tuple[int, ...]]:
    unused = (1,) * param.ndim
    if layout.factored:
      return {"v_row": _reduced_shape(param.shape, layout.col_dims),
              "v_col": _reduced_shape(param.shape, layout.row_dims), "v": unused}
    return {"v_row": unused, "v_col": unused, "v": param.shape}

  def init_fn(params: optax.Params) -> FactoredRulesState:
    layouts = _layouts(params, param_axes, **layout_kwargs)
    slots = {slot: jax.tree.map(
        lambda p, layout, s=slot: jnp.zeros(slot_shapes(p, layout)[s], jnp.float32),
        params, layouts) for slot in ("v_row", "v_col", "v")}
    return FactoredRulesState(count=jnp.zeros([], jnp.int32), **slots)

  def update_fn(updates: optax.Updates, state: FactoredRulesState,
                params: optax.Params | None = None) -> tuple[optax.Updates, FactoredRulesState]:
    del params  # the layout needs only shapes and logical axes
    decay = 1.0 - (state.count - step_offset + 1.0) ** -decay_rate  # [], weight of the old v
    layouts = _layouts(updates, param_axes, **layout_kwargs)

    def one(grad: jax.Array, v_row: jax.Array, v_col: jax.Array, v: jax.Array,
            layout: FactorLayout) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
      grad_sqr = jnp.square(grad.astype(jnp.float32)) + epsilon  # [*param]
      if layout.factored:
        v_row = decay * v_row + (1.0 - decay) * jnp.mean(
            grad_sqr, axis=layout.col_dims, keepdims=True)  # [*param], COLUMN dims -> 1
        v_col = decay * v_col + (1.0 - decay) * jnp.mean(
            grad_sqr, axis=layout.row_dims, keepdims=True)  # [*param], ROW dims -> 1
        row_mean = jnp.mean(v_row, axis=layout.row_dims, keepdims=True)  # non-BATCH dims -> 1
        scaled = grad * (v_row / row_mean) ** -0.5 * v_col ** -0.5  # [*param]
      else:
        v = decay * v + (1.0 - decay) * grad_sqr  # [*param]
        scaled = grad * v ** -0.5  # [*param]
      return scaled.astype(grad.dtype), v_row, v_col, v

    out = jax.tree.map(one, updates, state.v_row, state.v_col, state.v, layouts)

    def field(i: int) -> Any:  # i-th output of `one`, as a params-structured tree
      return jax.tree.map(lambda _, o: o[i], updates, out)

    new_state = FactoredRulesState(optax.safe_increment(state.count), field(1), field(2), field(3))
    return field(0), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _scale_by_block_fn(param_axes: ParamAxes, needs_params: bool,
                       fn: Callable[[jax.Array, jax.Array, FactorLayout], jax.Array]
                       ) -> optax.GradientTransformation:
  """Stateless transformation: update <- fn(update, param, layout) leaf by leaf."""

  def update_fn(updates: optax.Updates, state: optax.EmptyState,
                params: optax.Params | None = None) -> tuple[optax.Updates, optax.EmptyState]:
    if needs_params and params is None:
      raise ValueError("this transformation needs `params` in update()")
    layouts = _layouts(updates, param_axes)  # only averaging_dims are read
    params = updates if params is None else params
    scaled = jax.tree.map(lambda u, p, layout: fn(u, p, layout).astype(u.dtype),
                          updates, params, layouts)
    return scaled, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def clip_by_block_rms_with_rules(threshold: float,
                                 param_axes: ParamAxes) -> optax.GradientTransformation:
  """`optax.clip_by_block_rms`, with the RMS taken per BATCH slice (per layer when scanned)."""
  return _scale_by_block_fn(
      param_axes, False,
      lambda u, p, layout: u / jnp.maximum(1.0, _block_rms(u, layout) / threshold))


def scale_by_param_block_rms_with_rules(
    param_axes: ParamAxes, min_scale: float = 1e-3) -> optax.GradientTransformation:
  """`optax.scale_by_param_block_rms`, with the RMS taken per BATCH slice (per scanned layer)."""
  return _scale_by_block_fn(
      param_axes, True,
      lambda u, p, layout: u * jnp.maximum(_block_rms(p, layout), min_scale))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Optimizer:
  """Fields and helpers shared by the optimizers.

  Attributes:
    learning_rate: a constant or an optax schedule (gin: `@create_learning_rate_schedule()`).
    grad_clip_norm: clip gradients to this global L2 norm before anything else; None = off.
  """
  learning_rate: float | optax.Schedule
  grad_clip_norm: float | None = None

  def learning_rate_fn(self, step: jax.typing.ArrayLike) -> jax.Array:
    """The learning rate at `step`, for the `learning_rate` metric."""
    lr = self.learning_rate
    return jnp.asarray(lr(step) if callable(lr) else lr, jnp.float32)

  def _chain(self, *transforms: optax.GradientTransformation) -> optax.GradientTransformation:
    """Chains `transforms`, preceded by global-norm clipping when it is on."""
    clip = () if self.grad_clip_norm is None else (optax.clip_by_global_norm(self.grad_clip_norm),)
    return optax.chain(*clip, *transforms)


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class Adafactor(_Optimizer):
  """Adafactor with T5X defaults, factored by logical axes (see `factor_layout`).

  Same chain order as `optax.adafactor`: factored RMS scaling, update clipping, learning rate,
  parameter scale, momentum, weight decay, sign flip. Update clipping and parameter scale
  average within BATCH slices (T5X semantics); with no BATCH axis they equal optax's.

  Attributes:
    decay_rate: second-moment decay exponent.
    step_offset: restart the second-moment decay schedule at this step (fine-tuning).
    multiply_by_parameter_scale: scale updates by max(RMS(param), epsilon2).
    clipping_threshold: clip each update to this RMS; None = off.
    epsilon1: added to grad**2.
    epsilon2: lower bound of the parameter scale.
    beta1: momentum of the final update (costs one param-sized buffer); None = off.
    factored: factor second moments where the rules allow it.
    min_dim_size_to_factor: factor only when ROW and COLUMN sizes both reach this.
    weight_decay: decoupled decay param -= weight_decay * param (not scaled by the LR, as T5X).
  """
  decay_rate: float = 0.8
  step_offset: int = 0
  multiply_by_parameter_scale: bool = True
  clipping_threshold: float | None = 1.0
  epsilon1: float = 1e-30
  epsilon2: float = 1e-3
  beta1: float | None = None
  factored: bool = True
  min_dim_size_to_factor: int = 128
  weight_decay: float | None = None

  def build(self, param_axes: ParamAxes) -> optax.GradientTransformation:
    """The optax transformation for parameters annotated with `param_axes`."""
    transforms = [scale_by_factored_rms_with_rules(
        param_axes, factored=self.factored, decay_rate=self.decay_rate,
        step_offset=self.step_offset, min_dim_size_to_factor=self.min_dim_size_to_factor,
        epsilon=self.epsilon1)]
    if self.clipping_threshold is not None:
      transforms.append(clip_by_block_rms_with_rules(self.clipping_threshold, param_axes))
    transforms.append(optax.scale_by_learning_rate(self.learning_rate, flip_sign=False))
    if self.multiply_by_parameter_scale:
      transforms.append(scale_by_param_block_rms_with_rules(param_axes, self.epsilon2))
    if self.beta1 is not None:
      transforms.append(optax.ema(self.beta1, debias=False))
    if self.weight_decay is not None:
      transforms.append(optax.add_decayed_weights(self.weight_decay))
    transforms.append(optax.scale(-1.0))
    return self._chain(*transforms)


def matrix_mask(param_axes: ParamAxes) -> Any:
  """True for parameters with >= 2 non-BATCH axes (kernels, embeddings), False for scales/biases.

  Counting non-BATCH axes keeps a scanned norm scale ('layers', 'embed') out of weight decay.
  """
  return jax.tree.map(
      lambda axes: sum(factor_role(a) is not FactorDim.BATCH for a in axes) >= 2,
      param_axes, is_leaf=is_axes)


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class AdamW(_Optimizer):
  """`optax.adamw` with a learning-rate schedule and optional matrices-only weight decay.

  Attributes:
    b1, b2, eps: Adam moments and denominator epsilon.
    weight_decay: decoupled weight decay, multiplied by the learning rate (optax/PyTorch AdamW).
    decay_matrices_only: decay only `matrix_mask` parameters (not norm scales or biases).
  """
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  decay_matrices_only: bool = True

  def build(self, param_axes: ParamAxes) -> optax.GradientTransformation:
    """The optax transformation for parameters annotated with `param_axes`."""
    mask = matrix_mask(param_axes) if self.decay_matrices_only else None
    return self._chain(optax.adamw(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps,
                                   weight_decay=self.weight_decay, mask=mask))


def trainable_mask(param_axes: ParamAxes, pattern: str) -> Any:
  """True for parameters whose path ('decoder/layers_0/mlp/wi_0/kernel') fully matches `pattern`.

  Raises a one-line ValueError when nothing matches (a typo would otherwise train nothing).
  """
  regex = re.compile(pattern)
  mask = jax.tree_util.tree_map_with_path(lambda path, _: bool(regex.fullmatch(path_str(path))),
                                          param_axes, is_leaf=is_axes)
  if not any(jax.tree.leaves(mask)):
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(param_axes,
                                                                         is_leaf=is_axes)]
    raise ValueError(f"trainable_params={pattern!r} matches no parameter; paths look like "
                     f"{', '.join(paths[:3])}, ...")
  return mask


def freeze_untrainable(tx: optax.GradientTransformation, param_axes: ParamAxes,
                       pattern: str) -> optax.GradientTransformation:
  """`tx` on the parameters matching `pattern` only; the rest get zero updates and no state.

  `optax.multi_transform` hands `tx` the trainable subtree (frozen leaves become
  `optax.MaskedNode`), so a frozen base model costs no optimizer memory.
  """
  labels = jax.tree.map(lambda trainable: "train" if trainable else "freeze",
                        trainable_mask(param_axes, pattern))
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
