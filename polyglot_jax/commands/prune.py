"""`polyglot-jax prune` (one-shot magnitude pruning of a checkpoint) and `sparsity_report`."""

from __future__ import annotations

from typing import Any

import gin
import jax
import jax.numpy as jnp

from polyglot_jax.compression.sparsity import DEFAULT_PRUNABLE, Sparsity, prune_params, \
    zero_fractions
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import checkpoints, train_state
from polyglot_jax.training.rundir import RunDir


def sparsity_report(checkpoint_dir: str, step: int | None = None,
                    prunable: str = DEFAULT_PRUNABLE) -> dict[str, float]:
  """Fractions of exactly-zero weights in a checkpoint (MODEL_DIR), named like the train metrics
  (`sparsity.zero_fractions`), plus its `step`. Reads the parameters onto the host, so it works
  on any checkpoint (trained with masks or pruned one-shot) without the model's gin config.
  """
  step, params = checkpoints.read_host_params(checkpoint_dir, step)
  return {"step": float(step), **zero_fractions(params, prunable)}


@gin.configurable(denylist=["step"])
def prune_checkpoint(*, model: Any = gin.REQUIRED, sparsity: Sparsity = gin.REQUIRED,
                     checkpoint_dir: str = gin.REQUIRED, output_dir: str = gin.REQUIRED,
                     step: int | None = None, mesh: MeshConfig = MeshConfig()) -> dict[str, float]:
  """One-shot magnitude pruning of a trained checkpoint to `sparsity.final_sparsity`.

  Restores the parameters of MODEL_DIR=`checkpoint_dir` (latest step unless `step`) into `mesh`'s
  shardings, prunes them with `prune_params` and writes a parameters-only checkpoint at the same
  step to `output_dir`/checkpoints, which eval, infer and `InitCheckpoint` read (it holds no
  optimizer state, so `train` cannot resume from it). Returns its `sparsity_report`.
  """
  partitioner = Partitioner(mesh)
  step = checkpoints.latest_step(checkpoint_dir) if step is None else step
  params, spec = checkpoints.load_params(model, checkpoint_dir, partitioner, step)
  pruned = jax.jit(lambda p: prune_params(p, spec.param_axes, sparsity),
                   out_shardings=spec.shardings.params)(params)
  writer = checkpoints.Checkpointer(RunDir(output_dir).checkpoints, period=1, keep=None,
                                    async_save=False)
  writer.save(step, train_state.TrainState(step=jnp.asarray(step, jnp.int32), params=pruned,
                                           opt_state={}), {"batches": step}, force=True)
  writer.close()
  return sparsity_report(output_dir, step, sparsity.prunable)
