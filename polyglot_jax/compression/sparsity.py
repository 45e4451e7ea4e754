"""Weight sparsity: gradual magnitude pruning (Zhu & Gupta 2017) as an optax wrapper.

`Sparsity` (gin: `train.sparsity = @Sparsity()`, see gin/sparsity/) wraps the optimizer that the
trainer builds. Its state holds one boolean mask per parameter, next to the inner optimizer's
state:

  SparsityState(count, masks, inner_state)

A prunable parameter's mask has the parameter's shape (True = kept), the others a (1,) * ndim
True placeholder that broadcasts. Masks mirror the params tree and keep each parameter's rank, so
`partitioning.derived_state_axes` shards them exactly like their parameters and checkpoints save
them with the rest of the optimizer state: a resumed run keeps its masks.

One update, producing step t = count + 1:
  1. gradients of pruned weights are zeroed before the inner optimizer (the gradient a forward
     pass through `w * mask` would give), so its moments never see them;
  2. at a mask step (below) the masks are recomputed from the magnitudes of the weights this
     update would produce under the current masks (pruned weights score 0, so with a
     non-decreasing schedule the pruned set only grows);
  3. the returned update is `where(mask, update, -param)`: kept weights move as the inner
     optimizer says, pruned ones land on exactly 0.0 (p + (-p) is exactly zero in IEEE
     arithmetic), after every update and in every dtype.

Schedule (Zhu & Gupta's cubic): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3, clipped to
s_i before t0 and s_f after t1 = `end_step` (Zhu & Gupta's t0 + n*dt). Masks are recomputed at
t0, t0 + dt, ... <= t1 and always at t1 itself, so the exact target is reached at t1 even when
dt does not divide t1 - t0. Step numbers count applied updates (the first makes step 1): those
the loop logs, except after an update the trainer skipped as non-finite. A skipped update keeps
the whole optimizer state, this count included, so the schedule lags the logged step by the
skips, exactly like the learning-rate schedule (optax counts inside the optimizer state), and a
mask step that fell on a skipped update happens at the next applied one: masks are never computed
from non-finite weights, and none is lost.

Selection: each group prunes exactly k = round(s * size) weights, the k smallest scores; ties at
the threshold go to the lowest flat index first (deterministic). Groups are
  - "layerwise" (default of both papers): every prunable tensor, and every slice of a BATCH axis
    ('layers' when scanned, 'expert') separately, at s_t; scores |w|;
  - "global": one threshold over all prunable tensors together; scores |w| / RMS(w) per tensor
    (per BATCH slice). We normalise by the RMS (L2 norm / sqrt(size)) rather than the bare L2
    norm: both remove each tensor's scale (without it the largest-scale tensors keep
    everything), but the bare norm also shrinks scores as 1/sqrt(size), so the biggest matrices
    (FFN, logits) would be pruned far harder than attention for no reason but their size. With
    the RMS, sparsity differs between tensors only through the shape of their distributions.
The k-th smallest score is found by bisection on float32 bit patterns (32 counting passes, then
32 more among ties), never by sorting: counts are sharded reductions, so no tensor is gathered
on one device, and integer counts give the same masks on every mesh.

N:M (`n_m=(2, 4)`): in every run of M consecutive weights along a kernel's input dimension the N
largest |w| are kept (ties: lower index kept). The pattern is chosen at the first mask step and
later ones keep it (pruned weights score 0); `final_sparsity` must equal 1 - N/M. The input dimension is the last input axis of our DenseGeneral kernels: the dim before
a trailing 'embed' (attention out [heads, kv, embed] -> kv; wo [mlp, embed] -> mlp), otherwise
the first non-BATCH dim ([embed, mlp] -> embed).

Parameters are prunable when their path ('encoder/layers_0/mlp/wi_0/kernel') fully matches the
`prunable` regex: by default every matmul kernel; embeddings, norm scales and relative-position
tables only when the regex names them. Exclude with a lookahead:
`(?!decoder/logits_dense).*/kernel`.
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
import numpy as np
import optax

from polyglot_jax.parallel.axes import batch_dims, is_axes
from polyglot_jax.parallel.partitioning import path_str
from polyglot_jax.training.optimizers import ParamAxes

METHODS = ("layerwise", "global")
DEFAULT_PRUNABLE = r".*/kernel"
_MAX_BITS = 0x7FFFFFFF  # int32 bit pattern above every non-negative float32 (inf, NaN included)


class SparsityState(NamedTuple):
  """Optimizer state of `Sparsity.wrap`."""
  count: jax.Array  # [] int32, updates applied
  masks: Any  # params tree of bool: param shape if prunable, else (1,) * ndim (all True)
  inner_state: optax.OptState


def input_dim(axes: tuple[str, ...]) -> int:
  """The kernel dim N:M groups run along: the last input dim (see the module docstring)."""
  batch = batch_dims(axes)
  inner = [i for i in range(len(axes)) if i not in batch]
  if axes[-1] == "embed" and len(inner) >= 2:
    return inner[-2]
  return inner[0]


def _flat_index(shape: tuple[int, ...], dims: tuple[int, ...]) -> jax.Array:
  """Row-major flat index over `dims` (other dims contribute 0), as int32 of `shape`."""
  index = jnp.zeros(shape, jnp.int32)
  stride = 1
  for d in reversed(dims):
    index = index + jax.lax.broadcasted_iota(jnp.int32, shape, d) * stride
    stride *= shape[d]
  return index


def _bisect(counts: list[Callable[[jax.Array], jax.Array]], ks: list[jax.Array], low: int,
            highs: list[int]) -> list[jax.Array]:
  """Per problem i: the smallest integer x in [low, highs[i]] with counts[i](x) >= ks[i].

  Elementwise over each k's groups; all problems share one loop (one compiled while, however
  many tensors). high - low must fit in int32; 32 halvings cover any such range.
  """
  def body(_, bounds: list[tuple[jax.Array, jax.Array]]) -> list[tuple[jax.Array, jax.Array]]:
    out = []
    for (lo, hi), count, k in zip(bounds, counts, ks):
      mid = lo + (hi - lo) // 2
      enough = count(mid) >= k
      out.append((jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)))
    return out

  bounds = [(jnp.full(k.shape, low, jnp.int32), jnp.full(k.shape, high, jnp.int32))
            for k, high in zip(ks, highs)]
  return [hi for _, hi in jax.lax.fori_loop(0, 32, body, bounds)]


def _count(mask: jax.Array, dims: tuple[int, ...]) -> jax.Array:
  """Trues over `dims`: a scalar when `dims` are all dims, else keepdims (one per group)."""
  total = jnp.sum(mask, axis=dims, keepdims=True, dtype=jnp.int32)
  return total.reshape(()) if len(dims) == mask.ndim else total


def _smallest(groups: list[list[tuple[jax.Array, tuple[int, ...]]]], ks: list[jax.Array]
              ) -> list[list[jax.Array]]:
  """Marks exactly the ks[g] smallest non-negative scores of each group g; True = pruned.

  A group is a list of (scores, reduce_dims): a lone tensor reduced over some dims (its other
  dims index separate sub-groups: BATCH slices, k broadcasts against them), or several tensors
  reduced over all their dims, pooled. Ties at the threshold are pruned lowest (tensor, flat
  index over reduce_dims) first.
  """
  bits = [[jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32) for x, _ in group]
          for group in groups]
  dims = [[d for _, d in group] for group in groups]

  def count(g: int, masks: list[jax.Array]) -> jax.Array:
    return sum(_count(m, d) for m, d in zip(masks, dims[g]))

  ks = [jnp.broadcast_to(k, jax.eval_shape(lambda b, g=g: count(g, b), bits[g]).shape)
        for g, k in enumerate(ks)]
  thresholds = _bisect([lambda x, g=g: count(g, [b <= x for b in bits[g]])
                        for g in range(len(groups))], ks, 0, [_MAX_BITS] * len(groups))
  ties, takes, below, index = [], [], [], []  # per tensor, in group order
  for g, threshold in enumerate(thresholds):
    remaining = ks[g] - count(g, [b < threshold for b in bits[g]])  # ties still to prune
    for b, d in zip(bits[g], dims[g]):
      ties.append(b == threshold)
      below.append(b < threshold)
      index.append(_flat_index(b.shape, d))
      takes.append(jnp.minimum(remaining, _count(ties[-1], d)))
      remaining = remaining - takes[-1]
  flat_dims = [d for group_dims in dims for d in group_dims]
  lasts = _bisect([lambda j, t=t, i=i, d=d: _count(t & (i <= j), d)
                   for t, i, d in zip(ties, index, flat_dims)], takes, -1,
                  [math.prod(t.shape[a] for a in d) - 1 for t, d in zip(ties, flat_dims)])
  pruned = iter([low | (t & (i <= last)) for low, t, i, last in zip(below, ties, index, lasts)])
  return [[next(pruned) for _ in group] for group in groups]


def _n_of_m(weights: jax.Array, n: int, m: int, dim: int) -> jax.Array:
  """Keep mask with the n largest |w| of every m consecutive entries along `dim`."""
  x = jnp.moveaxis(jnp.abs(weights.astype(jnp.float32)), dim, -1)  # [..., in]
  groups = x.reshape(x.shape[:-1] + (x.shape[-1] // m, m))  # [..., in / m, m]
  a, b = groups[..., :, None], groups[..., None, :]  # [..., in / m, m, 1], [..., in / m, 1, m]
  earlier = jnp.arange(m)[None, :] < jnp.arange(m)[:, None]  # [m, m]: b's index < a's index
  rank = jnp.sum((b > a) | ((b == a) & earlier), axis=-1)  # [..., in / m, m]: entries before a
  return jnp.moveaxis((rank < n).reshape(x.shape), -1, dim)


@gin.configurable
@dataclasses.dataclass(frozen=True, kw_only=True)
class Sparsity:
  """Gradual magnitude pruning of the parameters matching `prunable` (module docstring).

  Attributes:
    final_sparsity: s_f, the fraction of prunable weights that are zero from `end_step` on
      (gin macro PRUNING_RATIO).
    end_step: t1 = t0 + n*dt, the step at which s_f is reached.
    initial_sparsity: s_i, the sparsity of the first mask step.
    begin_step: t0, the first step of the ramp.
    frequency: dt, steps between mask updates.
    method: "layerwise" (each tensor at s_t) or "global" (one threshold over RMS-normalised
      scores).
    prunable: regex that a parameter path must fully match to be pruned.
    n_m: (N, M) for N:M structured sparsity instead of magnitude thresholds.
  """
  final_sparsity: float
  end_step: int
  initial_sparsity: float = 0.0
  begin_step: int = 0
  frequency: int = 100
  method: str = "layerwise"
  prunable: str = DEFAULT_PRUNABLE
  n_m: tuple[int, int] | None = None

  def __post_init__(self):
    if not 0.0 <= self.initial_sparsity <= self.final_sparsity < 1.0:
      raise ValueError(f"Sparsity needs 0 <= initial_sparsity ({self.initial_sparsity}) <= "
                       f"final_sparsity ({self.final_sparsity}) < 1.")
    if not 0 <= self.begin_step <= self.end_step or self.frequency < 1:
      raise ValueError(f"Sparsity needs 0 <= begin_step ({self.begin_step}) <= end_step "
                       f"({self.end_step}) and frequency ({self.frequency}) >= 1.")
    if self.method not in METHODS:
      raise ValueError(f"Sparsity.method={self.method!r}; use one of {METHODS}.")
    if self.n_m is not None:
      n, m = self.n_m
      if not 0 < n < m or not math.isclose(self.final_sparsity, 1 - n / m):
        raise ValueError(f"Sparsity.n_m={self.n_m} needs 0 < N < M and final_sparsity = 1 - N/M "
                         f"= {1 - n / m:g} (got {self.final_sparsity}).")

  def sparsity_at(self, step: jax.typing.ArrayLike) -> jax.Array:
    """s_t of the cubic schedule, clipped outside [begin_step, end_step]."""
    t = jnp.asarray(step, jnp.float32)
    span = self.end_step - self.begin_step
    progress = jnp.clip((t - self.begin_step) / span, 0.0, 1.0) if span else (
        (t >= self.begin_step).astype(jnp.float32))
    return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1 - progress) ** 3

  def is_mask_step(self, step: jax.typing.ArrayLike) -> jax.Array:
    """True at begin_step + i * frequency <= end_step, and at end_step."""
    t = jnp.asarray(step, jnp.int32)
    on_grid = (t >= self.begin_step) & ((t - self.begin_step) % self.frequency == 0)
    return (on_grid & (t <= self.end_step)) | (t == self.end_step)

  def is_prunable(self, path: str) -> bool:
    return re.fullmatch(self.prunable, path) is not None

  def _prunable_tree(self, param_axes: ParamAxes) -> Any:
    """Bool per parameter; raises when the regex selects nothing (a typo prunes nothing)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=is_axes)
    selected = [self.is_prunable(path_str(path)) for path, _ in flat]
    if not any(selected):
      raise ValueError(f"Sparsity.prunable={self.prunable!r} matches no parameter; paths look "
                       f"like {path_str(flat[0][0])!r}.")
    return jax.tree.unflatten(treedef, selected)

  def masks(self, weights: Any, param_axes: ParamAxes, sparsity: jax.typing.ArrayLike) -> Any:
    """Keep masks (True = kept) at `sparsity` for the params-structured `weights`.

    Prunable parameters get a mask of their shape, the others a (1,) * ndim True placeholder.
    """
    prunable = self._prunable_tree(param_axes)
    leaves, treedef = jax.tree.flatten(weights)
    axes = treedef.flatten_up_to(param_axes)
    chosen = [i for i, p in enumerate(treedef.flatten_up_to(prunable)) if p]
    out = [jnp.ones((1,) * w.ndim, bool) for w in leaves]
    s = jnp.asarray(sparsity, jnp.float32)
    if self.n_m is not None:
      for i in chosen:
        dim = input_dim(axes[i])
        if leaves[i].shape[dim] % self.n_m[1]:
          raise ValueError(f"N:M sparsity {self.n_m}: dim {dim} of a prunable parameter with "
                           f"shape {leaves[i].shape} and axes {axes[i]} is not a multiple of M.")
        out[i] = _n_of_m(leaves[i], *self.n_m, dim)
      return jax.tree.unflatten(treedef, out)
    scores, dims, sizes = [], [], []
    for i in chosen:
      inner = tuple(d for d in range(leaves[i].ndim) if d not in batch_dims(axes[i]))
      x = jnp.abs(leaves[i].astype(jnp.float32))  # [*param]
      if self.method == "global":  # RMS over each BATCH slice, kept as size-1 dims
        rms = jnp.sqrt(jnp.mean(jnp.square(x), axis=inner, keepdims=True))
        x = x / jnp.maximum(rms, jnp.finfo(jnp.float32).tiny)
      scores.append(x)
      dims.append(inner)
      sizes.append(math.prod(leaves[i].shape[d] for d in inner))
    if self.method == "global":
      total = sum(math.prod(leaves[i].shape) for i in chosen)
      groups = [[(x, tuple(range(x.ndim))) for x in scores]]
      ks = [jnp.round(s * total).astype(jnp.int32)]
    else:
      groups = [[(x, d)] for x, d in zip(scores, dims)]
      ks = [jnp.round(s * n).astype(jnp.int32) for n in sizes]
    pruned = [p for group in _smallest(groups, ks) for p in group]
    for i, p in zip(chosen, pruned):
      out[i] = ~p
    return jax.tree.unflatten(treedef, out)

  def wrap(self, inner: optax.GradientTransformation,
           param_axes: ParamAxes) -> optax.GradientTransformation:
    """`inner` with masked gradients, scheduled mask updates and exactly-zero pruned weights."""
    prunable = self._prunable_tree(param_axes)  # Fails at build time on a regex typo.

    def init_fn(params: optax.Params) -> SparsityState:
      masks = jax.tree.map(lambda p, keep: jnp.ones(p.shape if keep else (1,) * p.ndim, bool),
                           params, prunable)
      return SparsityState(count=jnp.zeros([], jnp.int32), masks=masks,
                           inner_state=inner.init(params))

    def update_fn(updates: optax.Updates, state: SparsityState, params: optax.Params | None = None
                  ) -> tuple[optax.Updates, SparsityState]:
      if params is None:
        raise ValueError("Sparsity.wrap needs `params` in update() to zero pruned weights.")
      step = state.count + 1  # the step this update produces
      grads = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), updates, state.masks)
      updates, inner_state = inner.update(grads, state.inner_state, params)

      def recompute() -> Any:
        weights = jax.tree.map(lambda p, u, m: jnp.where(m, p + u, jnp.zeros_like(p)),
                               params, updates, state.masks)
        return self.masks(weights, param_axes, self.sparsity_at(step))

      masks = jax.lax.cond(self.is_mask_step(step), recompute, lambda: state.masks)
      updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), updates, params, masks)
      return updates, SparsityState(count=optax.safe_increment(state.count), masks=masks,
                                    inner_state=inner_state)

    return optax.GradientTransformation(init_fn, update_fn)

  def metrics(self, opt_state: optax.OptState) -> dict[str, jax.Array]:
    """`sparsity/global` (over prunable weights) and `sparsity/<path>` per prunable parameter."""
    masks = find_state(opt_state).masks
    metrics, kept, total = {}, 0, 0
    for path, mask in jax.tree_util.tree_flatten_with_path(masks)[0]:
      name = path_str(path)
      if self.is_prunable(name):
        nonzero = jnp.sum(mask, dtype=jnp.float32)
        metrics[f"sparsity/{name}"] = 1.0 - nonzero / mask.size
        kept, total = kept + nonzero, total + mask.size
    metrics["sparsity/global"] = 1.0 - kept / max(total, 1)
    return metrics


def find_state(opt_state: optax.OptState) -> SparsityState:
  """The SparsityState inside an optimizer state (`Sparsity.wrap` makes it the outermost)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SparsityState))
           if isinstance(s, SparsityState)]
  if len(found) != 1:
    raise ValueError(f"expected one SparsityState in the optimizer state, found {len(found)}; "
                     "build the optimizer with Sparsity.wrap.")
  return found[0]


def prune_params(params: Any, param_axes: ParamAxes, sparsity: Sparsity) -> Any:
  """One-shot pruning: zeroes what `sparsity` masks at its final_sparsity (jit with shardings)."""
  masks = sparsity.masks(params, param_axes, sparsity.final_sparsity)
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def zero_fractions(params: Any, prunable: str = DEFAULT_PRUNABLE) -> dict[str, float]:
  """Fractions of exactly-zero weights of host `params`, named like the train metrics.

  `sparsity/global` counts the parameters matching `prunable`, `sparsity/<path>` each of them,
  `sparsity/all_parameters` every parameter.
  """
  report, zeros, total, all_zeros, all_total = {}, 0, 0, 0, 0
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    name, value_zeros = path_str(path), int(np.count_nonzero(value == 0))
    all_zeros, all_total = all_zeros + value_zeros, all_total + value.size
    if re.fullmatch(prunable, name):
      report[f"sparsity/{name}"] = value_zeros / value.size
      zeros, total = zeros + value_zeros, total + value.size
  report["sparsity/global"] = zeros / max(total, 1)
  report["sparsity/all_parameters"] = all_zeros / max(all_total, 1)
  return report
