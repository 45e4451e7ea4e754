"""Device mesh, logical-axis rules and the shardings of parameters, optimizer state and batches.

The model names every parameter dimension with a logical axis ("embed", "mlp", ...). A rule
table maps logical axes to mesh axes (`data`, `fsdp`, `tensor`, `expert`); flax resolves each
array's rules in order and never uses one mesh axis twice in an array, so the activation
`[batch, length, embed]` keeps `embed` unsharded when `batch` already took `fsdp`.

Everything here is a plain function of (mesh, rules, abstract tree): no global state besides the
context that `Partitioner.activate()` opens for the model's activation constraints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from polyglot_jax.parallel.axes import LOGICAL_AXES, is_axes

MESH_AXES = ("data", "fsdp", "tensor", "expert")

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Activations: the batch is split over every axis that does not split the model.
# MoE capacity buffers [expert_group, expert, capacity, embed] keep the expert axis for experts.
_BATCH_RULES: LogicalRules = (("batch", ("data", "fsdp", "expert")),
                              ("expert_group", ("data", "fsdp")))
# FSDP (ZeRO-3): parameters and optimizer state split along their model dimension.
_FSDP_RULES: LogicalRules = (("embed", "fsdp"),)
# Megatron-style tensor parallelism along heads and the MLP / vocabulary dimensions.
_TENSOR_RULES: LogicalRules = (
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("joined_kv", "tensor"),
    ("vocab", "tensor"),
    ("expert_mlp", "tensor"),
)
_EXPERT_RULES: LogicalRules = (("expert", "expert"),)

RULE_PRESETS: dict[str, LogicalRules] = {
    "data_parallel": _BATCH_RULES,
    "fsdp": _BATCH_RULES + _FSDP_RULES + _EXPERT_RULES,
    "fsdp_tensor": _BATCH_RULES + _FSDP_RULES + _TENSOR_RULES + _EXPERT_RULES,
}

def resolve_rules(rules: str | Sequence[Sequence[Any]]) -> LogicalRules:
  """Returns a validated rule table from a preset name or explicit (logical, mesh) pairs."""
  if isinstance(rules, str):
    if rules not in RULE_PRESETS:
      raise ValueError(f"unknown logical-axis rule preset {rules!r}; "
                       f"choose one of {sorted(RULE_PRESETS)} or give (logical, mesh) pairs.")
    return RULE_PRESETS[rules]
  resolved = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"logical-axis rule {tuple(rule)!r} must be a (logical_axis, mesh_axes) pair.")
    logical, mesh_axes = rule[0], rule[1]
    if logical not in LOGICAL_AXES:
      raise ValueError(f"logical-axis rule names unknown logical axis {logical!r}; "
                       f"known: {', '.join(LOGICAL_AXES)}.")
    names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    for name in names:
      if name not in MESH_AXES:
        raise ValueError(f"logical-axis rule ({logical!r}, {mesh_axes!r}) names unknown mesh axis "
                         f"{name!r}; mesh axes are {', '.join(MESH_AXES)}.")
    resolved.append((logical, mesh_axes if isinstance(mesh_axes, str) or mesh_axes is None
                     else tuple(mesh_axes)))
  return tuple(resolved)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills in the one axis given as -1 and checks the product equals `num_devices`."""
  unknown = [name for name in shape if name not in MESH_AXES]
  if unknown:
    raise ValueError(f"unknown mesh axis {unknown[0]!r}; mesh axes are {', '.join(MESH_AXES)}.")
  sizes = {name: int(shape.get(name, 1)) for name in MESH_AXES}
  described = ", ".join(f"{k}={v}" for k, v in sizes.items())
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f"mesh ({described}): every axis needs a positive size and at most one "
                     "may be -1 (the rest of the devices).")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"mesh ({described}) does not divide the {num_devices} devices: the fixed "
                       f"axes need a multiple of {fixed}; change the sizes.")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh ({described}) needs {fixed} devices but {num_devices} are visible; "
                     f"choose sizes whose product is {num_devices}, or set one axis to -1.")
  return sizes


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape and logical-axis rules, bound from gin files under `gin/mesh/`.

  Attributes:
    data, fsdp, tensor, expert: mesh axis sizes; one may be -1 (all remaining devices).
    rules: a RULE_PRESETS name or explicit (logical_axis, mesh_axes) pairs.
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1
  rules: str | tuple[tuple[str, Any], ...] = "fsdp_tensor"


class Partitioner:
  """Turns logical axis names into NamedShardings on one mesh, and moves batches onto it."""

  def __init__(self, config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None):
    devices = list(devices if devices is not None else jax.devices())
    self.rules = resolve_rules(config.rules)
    sizes = resolve_mesh_shape({k: getattr(config, k) for k in MESH_AXES}, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    if len(devices) == len(jax.devices()):
      self.mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                                devices=devices)
    else:  # A sub-mesh (tests): keep the given device order.
      self.mesh = Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES))

  @contextlib.contextmanager
  def activate(self) -> Iterator[None]:
    """Makes the mesh and rules visible to `nn.with_logical_constraint` inside the model."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def spec(self, logical_axes: Sequence[str | None] | None) -> P:
    """Mesh PartitionSpec for one array's logical axis names (None: replicated)."""
    if logical_axes is None:
      return P()
    return nn.logical_to_mesh_axes(tuple(logical_axes), self.rules)

  def sharding(self, logical_axes: Sequence[str | None] | None) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(logical_axes))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self) -> NamedSharding:
    """Sharding of a global batch: leading dimension split like the logical `batch` axis."""
    return self.sharding(("batch",))

  def shardings(self, axes_tree: Any) -> Any:
    """Maps a tree whose leaves are tuples of logical names to NamedShardings."""
    return jax.tree.map(self.sharding, axes_tree, is_leaf=is_axes)

  def check_divisible(self, abstract_tree: Any, sharding_tree: Any, what: str) -> None:
    """Raises one line naming the first array whose dimension the mesh cannot split evenly."""
    flat_abstract = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    flat_shardings = jax.tree.leaves(sharding_tree)
    for (path, leaf), sharding in zip(flat_abstract, flat_shardings):
      for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        parts = math.prod(self.mesh.shape[name] for name in names)
        if size % parts:
          raise ValueError(
              f"{what} {path_str(path)} has shape {tuple(leaf.shape)}: dimension {dim} ({size}) "
              f"is split over mesh axes {names} of total size {parts}, which does not divide it; "
              "change the mesh or the logical-axis rules.")

  def shard_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles global arrays from this host's rows (each host passes only its own shard)."""
    sharding = self.batch_sharding
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for name, value in host_batch.items()}


def path_str(path: Sequence[Any]) -> str:
  """'encoder/layers_0/mlp/wi_0/kernel' for a jax key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def logical_axes(boxed_params: Any) -> Any:
  """Tree of logical-axis tuples from a tree of nn.LogicallyPartitioned boxes."""
  specs = nn.get_partition_spec(boxed_params)
  return jax.tree.map(lambda spec: tuple(spec), specs, is_leaf=lambda x: isinstance(x, P))


def derived_state_axes(abstract_state: Any, params_axes: Any, abstract_params: Any) -> Any:
  """Logical axes for optimizer state (or any tree derived from the params).

  A state leaf whose key path ends with a parameter's key path and has the parameter's rank
  gets that parameter's axes, with size-1 (reduced, e.g. Adafactor's factored) dimensions left
  unsharded. Everything else (step counters, scalars) is replicated. This keeps the optimizer
  state sharded exactly like the parameters without per-optimizer code.
  """
  by_path = {}
  for (path, axes), leaf in zip(
      jax.tree_util.tree_flatten_with_path(params_axes, is_leaf=is_axes)[0],
      jax.tree.leaves(abstract_params)):
    by_path[tuple(path_str([k]) for k in path)] = (axes, tuple(leaf.shape))
  depths = sorted({len(p) for p in by_path}, reverse=True)

  def axes_for(path, leaf) -> tuple[str | None, ...]:
    keys = tuple(path_str([k]) for k in path)
    for depth in depths:
      match = by_path.get(keys[-depth:]) if len(keys) >= depth else None
      if match and len(match[1]) == leaf.ndim:
        axes, shape = match
        return tuple(a if size == full else None for a, size, full in zip(axes, leaf.shape, shape))
    return ()  # Replicated.

  return jax.tree_util.tree_map_with_path(axes_for, abstract_state)
