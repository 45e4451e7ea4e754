"""Model merging: linear, task arithmetic, TIES, DARE and SLERP, tensor by tensor on the mesh.

The math is in pure functions on arrays (stacked models on a leading axis), with τ_i = θ_i − base
the task vectors and w_i the models' weights:
  linear           Σ w_i θ_i / Σ w_i                                   (weighted average)
  task_arithmetic  base + λ Σ w_i τ_i                                  (Ilharco et al. 2023)
  ties             base + λ Σ_i w_i m_i τ̂_i / Σ_i w_i m_i              (Yadav et al. 2023)
                   τ̂_i keeps the `density` fraction of τ_i largest in magnitude (per tensor),
                   the elected sign is sign(Σ_i w_i τ̂_i), m_i marks entries of τ̂_i of that sign
                   (the disjoint mean; 0 where no model agrees)
  dare_linear      base + λ Σ w_i d_i, d_i = τ_i ⊙ Bernoulli(density) / density  (Yu et al. 2024)
  dare_ties        TIES's sign election and disjoint mean over the d_i instead of the τ̂_i
  slerp            spherical interpolation of two models at t, per tensor, with linear
                   interpolation when the tensors are (anti)parallel (|cos| > DOT_THRESHOLD)
DARE's masks are seeded by (`seed`, the tensor's path), so they do not depend on the mesh or on
the order of the tensors.

`merge_params` applies a `MergeConfig` to every parameter of checkpoints of one architecture,
one jitted call per tensor whose output sharding is the parameter's own: on a mesh each device
computes its shards and nothing is gathered to one host. `fold_adapters` first folds LoRA and IA3
adapters into their base weights (exact); MoV and MoLoRA route per token and cannot be folded.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp

from polyglot_jax.models.config import AdapterConfig
from polyglot_jax.parallel.partitioning import path_str

Array = jax.Array
Params = Any

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")
DOT_THRESHOLD = 0.9995  # SLERP falls back to linear interpolation above this |cos| (mergekit)


# --- the math, on arrays ------------------------------------------------------------------------

def _expand(values: Array, like: Array) -> Array:
  """[models] -> [models, 1, ...] broadcastable against [models, ...] `like`."""
  return values.reshape(values.shape + (1,) * (like.ndim - 1))


def linear(thetas: Array, weights: Array) -> Array:
  """Σ w_i θ_i / Σ w_i of [models, ...] `thetas` and [models] `weights`."""
  weights = weights / jnp.sum(weights)
  return jnp.sum(_expand(weights, thetas) * thetas, axis=0)


def task_arithmetic(base: Array, deltas: Array, weights: Array, scale: float) -> Array:
  """base + λ Σ w_i τ_i of [models, ...] task vectors."""
  return base + scale * jnp.sum(_expand(weights, deltas) * deltas, axis=0)


def trim(delta: Array, density: Array) -> Array:
  """`delta` with its entries below the k-th largest magnitude zeroed, k = round(density · size)
  (at least 1); entries tied with the k-th are all kept."""
  magnitudes = jnp.abs(delta).ravel()  # [size]
  k = jnp.clip(jnp.round(density * magnitudes.size), 1, magnitudes.size).astype(jnp.int32)
  threshold = jnp.sort(magnitudes)[magnitudes.size - k]
  return jnp.where(jnp.abs(delta) >= threshold, delta, 0.0)


def disjoint_merge(deltas: Array, weights: Array) -> Array:
  """TIES's sign election and disjoint weighted mean of [models, ...] (trimmed) task vectors."""
  weighted = _expand(weights, deltas) * deltas  # [models, ...]
  sign = jnp.sign(jnp.sum(weighted, axis=0))  # [...]
  agree = (jnp.sign(deltas) == sign) & (deltas != 0)  # [models, ...]
  total = jnp.sum(jnp.where(agree, weighted, 0.0), axis=0)  # [...]
  mass = jnp.sum(jnp.where(agree, _expand(weights, deltas), 0.0), axis=0)  # [...]
  return jnp.where(mass != 0, total / jnp.where(mass != 0, mass, 1.0), 0.0)


def dare(delta: Array, density: Array, key: Array) -> Array:
  """Drop-and-rescale: each entry kept with probability `density`, kept ones divided by it."""
  keep = jax.random.bernoulli(key, density, delta.shape)
  return jnp.where(keep, delta / density, 0.0)


def slerp(a: Array, b: Array, t: float) -> Array:
  """Spherical interpolation from `a` (t=0) to `b` (t=1) along the angle between them (as
  flattened vectors); linear interpolation when |cos| > DOT_THRESHOLD."""
  norm = lambda x: x / jnp.maximum(jnp.linalg.norm(x.ravel()), 1e-12)
  dot = jnp.clip(jnp.sum(norm(a) * norm(b)), -1.0, 1.0)
  parallel = jnp.abs(dot) > DOT_THRESHOLD
  theta = jnp.arccos(dot)
  sin_theta = jnp.where(parallel, 1.0, jnp.sin(theta))
  first = jnp.where(parallel, 1.0 - t, jnp.sin((1.0 - t) * theta) / sin_theta)
  second = jnp.where(parallel, t, jnp.sin(t * theta) / sin_theta)
  return first * a + second * b


# --- the configuration and the per-tensor merge -------------------------------------------------

@gin.configurable
@dataclasses.dataclass(frozen=True)
class MergeConfig:
  """How to merge (gin: `MergeConfig.method = 'ties'`, `MergeConfig.density = 0.2`, ...).

  Attributes:
    method: one of METHODS (see the module docstring).
    weights: one weight per model; None = 1 each (linear then averages).
    density: fraction of each task vector kept by TIES (largest magnitudes) or DARE (random), in
      (0, 1]; one value for all models or one per model.
    scale: λ of task_arithmetic, ties and dare_*.
    t: SLERP's interpolation point, 0 = the first model, 1 = the second.
    seed: DARE's random seed.
  """

  method: str = "linear"
  weights: tuple[float, ...] | None = None
  density: float | tuple[float, ...] = 1.0
  scale: float = 1.0
  t: float = 0.5
  seed: int = 0

  def __post_init__(self) -> None:
    for name in ("weights", "density"):  # gin may give lists; the config must stay hashable
      if isinstance(getattr(self, name), list):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.method not in METHODS:
      raise ValueError(f"MergeConfig.method={self.method!r}: use one of {', '.join(METHODS)}")
    densities = self.density if isinstance(self.density, tuple) else (self.density,)
    if not all(0 < d <= 1 for d in densities):
      raise ValueError(f"MergeConfig.density={self.density}: every density must be in (0, 1]")

  @property
  def needs_base(self) -> bool:
    return self.method not in ("linear", "slerp")

  def check(self, num_models: int, has_base: bool) -> None:
    """One-line errors for a config that does not fit `num_models` models (and a base or not)."""
    if num_models < 1:
      raise ValueError("merging needs at least one model")
    if self.method == "slerp" and num_models != 2:
      raise ValueError(f"slerp merges exactly 2 models, got {num_models}; use linear or ties")
    if self.needs_base and not has_base:
      raise ValueError(f"method {self.method!r} merges task vectors θ_i − base: give the base "
                       "model the models were finetuned from")
    for name in ("weights", "density"):
      value = getattr(self, name)
      if isinstance(value, tuple) and len(value) != num_models:
        raise ValueError(f"MergeConfig.{name} has {len(value)} values for {num_models} models; "
                         "give one per model")

  def per_model(self, name: str, num_models: int) -> Array:
    """[models] float32 weights or densities."""
    value = getattr(self, name)
    if value is None:
      value = 1.0
    values = value if isinstance(value, tuple) else (value,) * num_models
    return jnp.asarray(values, jnp.float32)


def merge_tensor(config: MergeConfig, thetas: Array, base: Array | None,
                 key: Array | None = None) -> Array:
  """The merge of one parameter: [models, ...] `thetas` (and the base [...]) -> [...] float32.

  `key` seeds DARE (see `tensor_key`).
  """
  thetas = thetas.astype(jnp.float32)
  num = thetas.shape[0]
  weights = config.per_model("weights", num)
  if config.method == "linear":
    return linear(thetas, weights)
  if config.method == "slerp":
    return slerp(thetas[0], thetas[1], config.t)
  base = base.astype(jnp.float32)
  deltas = thetas - base  # [models, ...]
  densities = config.per_model("density", num)
  if config.method == "task_arithmetic":
    return task_arithmetic(base, deltas, weights, config.scale)
  if config.method.startswith("dare"):
    keys = jax.random.split(key, num)
    deltas = jnp.stack([dare(deltas[i], densities[i], keys[i]) for i in range(num)])
    if config.method == "dare_linear":
      return task_arithmetic(base, deltas, weights, config.scale)
  else:  # ties
    deltas = jnp.stack([trim(deltas[i], densities[i]) for i in range(num)])
  return base + config.scale * disjoint_merge(deltas, weights)


def tensor_key(seed: int, path: str) -> Array:
  """DARE's key for the parameter at `path`: independent of the mesh and of tensor order."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _flat(tree: Params) -> dict[str, Any]:
  return {path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_same_layout(models: Sequence[Params], base: Params | None) -> None:
  """One line naming the first parameter whose path or shape differs between the checkpoints."""
  trees = list(models) + ([base] if base is not None else [])
  first = {path: tuple(x.shape) for path, x in _flat(trees[0]).items()}
  for i, tree in enumerate(trees[1:], 1):
    other = {path: tuple(x.shape) for path, x in _flat(tree).items()}
    for path in sorted(set(first) | set(other)):
      if first.get(path) != other.get(path):
        raise ValueError(f"checkpoint {i} differs from checkpoint 0 at {path}: "
                         f"{other.get(path, 'missing')} vs {first.get(path, 'missing')}; merging "
                         "needs one architecture (fold adapters first, or merge models that "
                         "carry the same ones)")


def merge_params(config: MergeConfig, models: Sequence[Params], base: Params | None = None
                 ) -> Params:
  """The merged parameters of `models` (trees of one architecture; `base` for task vectors).

  Each tensor is merged by one jitted call with the first model's sharding as output sharding
  (on a mesh: computed shard by shard on the devices) and returned in the first model's dtype.
  Non-float tensors are taken from the first model.
  """
  config.check(len(models), base is not None)
  _check_same_layout(models, base)
  flats = [_flat(m) for m in models]
  base_flat = _flat(base) if base is not None else None
  merged = {}
  jitted: dict[Any, Any] = {}
  for path, first in flats[0].items():
    if not jnp.issubdtype(first.dtype, jnp.floating):
      merged[path] = first
      continue
    sharding = getattr(first, "sharding", None)
    if sharding not in jitted:
      jitted[sharding] = jax.jit(
          lambda thetas, base, key: merge_tensor(config, jnp.stack(thetas), base, key),
          out_shardings=sharding)
    result = jitted[sharding]([flat[path] for flat in flats],
                              None if base_flat is None else base_flat[path],
                              tensor_key(config.seed, path))
    merged[path] = result.astype(first.dtype)
  treedef = jax.tree.structure(models[0])
  return jax.tree.unflatten(treedef, [merged[path] for path in flats[0]])


# --- adapters -----------------------------------------------------------------------------------

def _lora_delta(a: Array, b: Array, kernel_shape: tuple[int, ...], scale: float) -> Array:
  """(α/r) A B of [..., d_in, r] A and [..., r, *features] B, shaped like the kernel."""
  lead = a.shape[:-2]
  b_flat = b.reshape(lead + (b.shape[len(lead)], -1))  # [..., r, features]
  delta = jnp.einsum("...ir,...rf->...if", a.astype(jnp.float32), b_flat.astype(jnp.float32))
  return (scale * delta).reshape(kernel_shape)


def _fold_node(node: Mapping[str, Any], adapters: AdapterConfig) -> dict[str, Any]:
  """One module's children with its `<site>_adapter` children folded into their kernels."""
  out = {name: _fold_node(child, adapters) if isinstance(child, Mapping) else child
         for name, child in node.items() if not name.endswith("_adapter")}
  for name, adapter in node.items():
    if not name.endswith("_adapter"):
      continue
    site = name[:-len("_adapter")]
    if "lora_a" in adapter:
      target = site
      fold = lambda k, ad=adapter: k.astype(jnp.float32) + _lora_delta(
          ad["lora_a"], ad["lora_b"], k.shape, adapters.alpha / adapters.rank)
    elif site in ("key", "value"):  # IA3 scales the projection's [kv_heads, kv] outputs
      target = site
      fold = lambda k, s=adapter["scale"]: k.astype(jnp.float32) * jnp.expand_dims(s, -3)
    else:  # IA3 on the FFN intermediate: scales the rows of wo
      target = "wo"
      fold = lambda k, s=adapter["scale"]: k.astype(jnp.float32) * s[..., None]
    kernel = out[target]["kernel"]
    folded = jax.jit(fold, out_shardings=getattr(kernel, "sharding", None))(kernel)
    out[target] = {**out[target], "kernel": folded.astype(kernel.dtype)}
  return out


def fold_adapters(params: Params, adapters: AdapterConfig) -> Params:
  """Base parameters with the LoRA or IA3 adapters of `params` folded in (exact up to float
  rounding): W + (α/r) A B for LoRA, the projection's outputs (or wo's rows, for the FFN site)
  scaled for IA3. The result loads into the same architecture without adapters."""
  if adapters.mixture:
    raise ValueError(f"{adapters.kind} adapters route each token to a mixture of experts and "
                     "cannot be folded into the base weights; merge the adapter-bearing models as "
                     "they are (same adapter config)")
  return _fold_node(params, adapters)
