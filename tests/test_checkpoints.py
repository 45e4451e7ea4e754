"""Checkpoint round trips, restore onto another mesh, and regex partial restore."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import checkpoints
from polyglot_jax.training.train_state import TrainState

AXES = {"encoder": {"mlp": {"wi": ("embed", "mlp")}}, "decoder": {"mlp": {"wi": ("embed", "mlp")}}}


def _params(seed: int = 0):
  rng = np.random.default_rng(seed)
  return {"encoder": {"mlp": {"wi": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)}},
          "decoder": {"mlp": {"wi": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)}}}


def _abstract(partitioner: Partitioner, tree, axes):
  shardings = partitioner.shardings(axes)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _save(directory, params, step=5):
  state = TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                     opt_state={"mu": jax.tree.map(jnp.ones_like, params)})
  ckpt = checkpoints.Checkpointer(str(directory), period=1, keep=2)
  ckpt.save(step, state, {"batches": step})
  ckpt.close()
  return state


def test_round_trip_onto_a_different_mesh(tmp_path):
  saved = _save(tmp_path, _params())
  fsdp = Partitioner(MeshConfig(data=1, fsdp=8, rules="fsdp"))
  axes = TrainState(step=(), params=AXES, opt_state={"mu": AXES})
  abstract = _abstract(fsdp, saved, axes)
  ckpt = checkpoints.Checkpointer(str(tmp_path), period=1)
  assert ckpt.latest_step() == 5
  restored, data = ckpt.restore(5, abstract)
  ckpt.close()
  assert data == {"batches": 5}
  assert int(restored.step) == 5
  wi = restored.params["encoder"]["mlp"]["wi"]
  np.testing.assert_array_equal(wi, saved.params["encoder"]["mlp"]["wi"])
  assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert {s.data.shape for s in wi.addressable_shards} == {(1, 16)}


def test_keep_n_deletes_old_checkpoints(tmp_path):
  params = _params()
  ckpt = checkpoints.Checkpointer(str(tmp_path), period=1, keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, TrainState(step=jnp.asarray(step), params=params, opt_state={}), {"batches": step})
  ckpt.close()
  assert checkpoints.Checkpointer(str(tmp_path), period=1).manager.all_steps() == [2, 3]


def test_assignment_map_and_fallback(tmp_path):
  saved = _save(tmp_path, _params(0))
  partitioner = Partitioner(MeshConfig(data=8))
  target_axes = {**AXES, "adapter": {"scale": ("embed",)}}
  init = {**_params(1), "adapter": {"scale": jnp.ones((8,))}}
  abstract = _abstract(partitioner, init, target_axes)
  # Decoder loads the encoder's weights; the adapter (absent) falls back to its init.
  loaded = checkpoints.restore_params(
      str(tmp_path), abstract, init,
      assignment_map=[(r"decoder/(.*)", r"encoder/\1")], fallback_to_scratch=True)
  enc = saved.params["encoder"]["mlp"]["wi"]
  np.testing.assert_array_equal(loaded["decoder"]["mlp"]["wi"], enc)
  np.testing.assert_array_equal(loaded["encoder"]["mlp"]["wi"], enc)
  np.testing.assert_array_equal(loaded["adapter"]["scale"], init["adapter"]["scale"])
  # A None replacement keeps the fresh initialisation even though the checkpoint has it.
  fresh = checkpoints.restore_params(str(tmp_path), abstract, init,
                                     assignment_map=[(r"encoder/.*", None)],
                                     fallback_to_scratch=True)
  np.testing.assert_array_equal(fresh["encoder"]["mlp"]["wi"], init["encoder"]["mlp"]["wi"])


def test_missing_or_misshaped_parameter_is_one_line(tmp_path):
  _save(tmp_path, _params(0))
  partitioner = Partitioner(MeshConfig(data=8))
  init = {**_params(1), "adapter": {"scale": jnp.ones((8,))}}
  abstract = _abstract(partitioner, init, {**AXES, "adapter": {"scale": ("embed",)}})
  with pytest.raises(ValueError, match="adapter/scale .* is not in the checkpoint") as info:
    checkpoints.restore_params(str(tmp_path), abstract, init)
  assert "\n" not in str(info.value)
  wrong = {"encoder": {"mlp": {"wi": jnp.ones((8, 32))}}}
  abstract = _abstract(partitioner, wrong, {"encoder": AXES["encoder"]})
  with pytest.raises(ValueError, match=r"expected shape \(8, 32\) but checkpoint tensor "
                     r"encoder/mlp/wi has shape \(8, 16\)"):
    checkpoints.restore_params(str(tmp_path), abstract, wrong)


def test_no_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    checkpoints.restore_params(str(tmp_path / "nothing"), {}, {})
