"""Checkpoints: orbax CheckpointManager (async, keep-N), resume, and partial restore.

A checkpoint holds the whole TrainState (params, optimizer state, step) and the data iterator's
position as JSON, so a restarted run continues with exactly the batches it would have seen.
Arrays restore straight into the shardings of the *current* mesh, whatever mesh wrote them.
`restore_params` loads a subset of parameters through a regex assignment map (T5X's
`assignment_map` + `fallback_to_scratch`), which PEFT and MoE upcycling build on.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from polyglot_jax.parallel.axes import is_axes
from polyglot_jax.parallel.partitioning import Partitioner, path_str
from polyglot_jax.training import train_state
from polyglot_jax.training.rundir import RunDir
from polyglot_jax.training.train_state import StateSpec, TrainState

AssignmentMap = Sequence[tuple[str, str | None]]


def _handlers() -> dict[str, ocp.CheckpointHandler]:
  return {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}


def _as_dict(state: TrainState) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


class Checkpointer:
  """Saves every `period` steps (asynchronously), keeps the newest `keep`, restores the latest."""

  def __init__(self, directory: str, *, period: int, keep: int | None = 3,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(save_interval_steps=period, max_to_keep=keep,
                                             enable_async_checkpointing=async_save),
        item_handlers=_handlers())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: Mapping[str, Any],
           force: bool = False) -> bool:
    """Starts saving (returns at once when async); True when a save was started."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(_as_dict(state)), data=ocp.args.JsonSave(dict(data_state))),
                             force=force)

  def restore(self, step: int, abstract_state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Restores onto the shardings carried by `abstract_state` (any mesh)."""
    target = _as_dict(abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
        data=ocp.args.JsonRestore()))
    tree = restored["state"]
    return TrainState(step=tree["step"], params=tree["params"],
                      opt_state=tree["opt_state"]), dict(restored["data"])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _flat(tree: Any) -> dict[str, Any]:
  return {path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = out
    *parents, name = path.split("/")
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = leaf
  return out


def source_path(target: str, assignment_map: AssignmentMap) -> str | None:
  """The checkpoint path a target parameter loads from; None means 'initialise from scratch'.

  The first rule whose regex fully matches `target` decides: its replacement (with \\1-style
  groups) names the source, or None keeps the fresh initialisation. No match: the same path.
  """
  for pattern, replacement in assignment_map:
    if re.fullmatch(pattern, target):
      return None if replacement is None else re.sub(f"^(?:{pattern})$", replacement, target)
  return target


def restore_params(directory: str, abstract_params: Any, init_params: Any | None = None, *,
                   step: int | None = None, assignment_map: AssignmentMap = (),
                   fallback_to_scratch: bool = False,
                   tile_axes: Mapping[str, int] | None = None) -> Any:
  """Loads parameters from the checkpoint in `directory` into the current model's layout.

  Args:
    directory: a checkpoint directory written by `Checkpointer`.
    abstract_params: ShapeDtypeStructs with shardings for every target parameter.
    init_params: freshly initialised parameters, used where nothing is loaded; None when every
      parameter must come from the checkpoint (evaluation, inference).
    step: checkpoint step; None = the latest.
    assignment_map: (regex, replacement-or-None) rules, see `source_path`.
    fallback_to_scratch: keep the fresh value of a parameter missing from the checkpoint
      instead of raising.
    tile_axes: target path -> axis; a checkpoint tensor whose shape is the target's without
      that axis is copied along it (sparse upcycling: a dense FFN kernel into every expert).
  """
  tile_axes = tile_axes or {}
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_handlers=_handlers(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {directory}; point at a directory written "
                            "by `polyglot-jax train` (it holds numbered step folders).")
  stored = _flat(manager.item_metadata(step)["state"].tree["params"])
  targets = _flat(abstract_params)
  wanted: dict[str, Any] = {}
  for path, abstract in targets.items():
    source = source_path(path, assignment_map)
    if source is None and init_params is not None:
      continue
    if source not in stored:
      if fallback_to_scratch and init_params is not None:
        continue
      raise ValueError(f"parameter {path} (from checkpoint path {source}) is not in the checkpoint "
                       f"at {directory} step {step}; add an assignment_map rule or set "
                       "fallback_to_scratch=True.")
    found, expected = tuple(stored[source].shape), tuple(abstract.shape)
    if path in tile_axes and found == _without_axis(expected, tile_axes[path]):
      abstract = jax.ShapeDtypeStruct(found, abstract.dtype, sharding=NamedSharding(
          abstract.sharding.mesh, PartitionSpec()))
    elif found != expected:
      raise ValueError(f"parameter {path}: expected shape {expected} but checkpoint "
                       f"tensor {source} has shape {found}.")
    wanted[source] = abstract
  target = {"params": _nest(wanted)}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True)))
  loaded = _flat(restored["state"]["params"])
  manager.close()
  init_flat = _flat(init_params) if init_params is not None else {}
  merged = [loaded.get(source_path(path, assignment_map)) for path in targets]
  merged = [init_flat[path] if value is None else _tiled(value, targets[path], tile_axes.get(path))
            for path, value in zip(targets, merged)]
  return jax.tree.unflatten(jax.tree.structure(abstract_params), merged)


def _without_axis(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
  return shape[:axis] + shape[axis + 1:]


def _tiled(value: jax.Array, target: jax.ShapeDtypeStruct, axis: int | None) -> jax.Array:
  """`value` copied along `axis` up to the target's shape, in the target's sharding."""
  if axis is None or value.shape == target.shape:
    return value
  tile = lambda v: jnp.broadcast_to(jnp.expand_dims(v, axis), target.shape)
  return jax.jit(tile, out_shardings=target.sharding)(value)


def expert_axes(param_axes: Any) -> dict[str, int]:
  """Path -> index of the "expert" logical axis, for every parameter that has one."""
  flat = jax.tree_util.tree_leaves_with_path(param_axes, is_leaf=is_axes)
  return {path_str(path): axes.index("expert") for path, axes in flat
          if "expert" in axes}


def load_params(model: Any, model_dir: str, partitioner: Partitioner,
                step: int | None = None) -> tuple[Any, StateSpec]:
  """The parameters of a run (MODEL_DIR's latest checkpoint, or `step`) on `partitioner`'s mesh.

  Only the parameters are read (no optimizer state), each straight into its shard. Returns
  (params, params-only state spec: shardings and logical axes of the parameters).
  """
  spec = train_state.params_spec(model, partitioner)
  params = restore_params(RunDir(model_dir).checkpoints, spec.abstract.params, step=step)
  return params, spec


def latest_step(model_dir: str) -> int:
  """The newest checkpoint step of MODEL_DIR; a one-line FileNotFoundError when there is none."""
  directory = os.path.abspath(RunDir(model_dir).checkpoints)
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise FileNotFoundError(f"no checkpoint found in {directory}; point at a MODEL_DIR written "
                            "by `polyglot-jax train`.")
  return step


def read_host_params(model_dir: str, step: int | None = None) -> tuple[int, Any]:
  """(step, parameters as host NumPy arrays) of MODEL_DIR's latest checkpoint (or `step`).

  Needs no model config: the tree is read as stored (sparsity reports, checkpoint surgery).
  """
  step = latest_step(model_dir) if step is None else step
  manager = ocp.CheckpointManager(os.path.abspath(RunDir(model_dir).checkpoints),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  target = {"params": manager.item_metadata(step)["state"].tree["params"]}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True)))
  manager.close()
  return step, restored["state"]["params"]
