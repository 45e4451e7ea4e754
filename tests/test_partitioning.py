"""Mesh construction, rule validation and derived optimizer-state axes."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from polyglot_jax.parallel import partitioning
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner


def test_minus_one_takes_the_remaining_devices():
  assert partitioning.resolve_mesh_shape({"data": -1, "tensor": 2}, 8) == {
      "data": 4, "fsdp": 1, "tensor": 2, "expert": 1}


@pytest.mark.parametrize("shape, fragment", [
    ({"data": 3}, "needs 3 devices but 8 are visible"),
    ({"data": -1, "tensor": 3}, "does not divide the 8 devices"),
    ({"data": -1, "fsdp": -1}, "at most one may be -1"),
    ({"dta": 8}, "unknown mesh axis 'dta'"),
])
def test_bad_mesh_is_one_readable_line(shape, fragment):
  with pytest.raises(ValueError, match=fragment) as info:
    partitioning.resolve_mesh_shape(shape, 8)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("rules, fragment", [
    ((("embed", "fsdpp"),), "unknown mesh axis 'fsdpp'"),
    ((("embedd", "fsdp"),), "unknown logical axis 'embedd'"),
    ("zero3", "unknown logical-axis rule preset 'zero3'"),
])
def test_bad_rules_are_one_readable_line(rules, fragment):
  with pytest.raises(ValueError, match=fragment) as info:
    partitioning.resolve_rules(rules)
  assert "\n" not in str(info.value)


def test_rules_map_params_and_activations():
  p = Partitioner(MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tensor"))
  assert p.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  assert p.spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert p.spec(("vocab", "embed")) == P("tensor", "fsdp")
  # The batch takes fsdp, so the activation's embed dimension stays whole.
  assert p.spec(("batch", "length", "embed")) == P(("data", "fsdp", "expert"), None, None)
  dp = Partitioner(MeshConfig(data=8, rules="data_parallel"))
  assert dp.spec(("embed", "mlp")) == P(None, None)


def test_indivisible_parameter_is_reported_by_name():
  p = Partitioner(MeshConfig(data=1, fsdp=8, rules="fsdp"))
  abstract = {"layer": {"kernel": jax.ShapeDtypeStruct((12, 16), jnp.float32)}}
  shardings = p.shardings({"layer": {"kernel": ("embed", "mlp")}})
  with pytest.raises(ValueError, match=r"layer/kernel has shape \(12, 16\): dimension 0 \(12\)"):
    p.check_divisible(abstract, shardings, "parameter")


def test_optimizer_state_inherits_param_axes():
  params = {"dense": {"kernel": jnp.zeros((4, 6))}, "norm": {"scale": jnp.zeros((4,))}}
  axes = {"dense": {"kernel": ("embed", "mlp")}, "norm": {"scale": ("embed",)}}
  state = ({"count": jnp.zeros(())},
           {"mu": params, "v_row": {"dense": {"kernel": jnp.zeros((4, 1))},
                                    "norm": {"scale": jnp.zeros((1,))}}})
  derived = partitioning.derived_state_axes(state, axes, params)
  assert derived[0]["count"] == ()
  assert derived[1]["mu"] == axes
  assert derived[1]["v_row"]["dense"]["kernel"] == ("embed", None)
  assert derived[1]["v_row"]["norm"]["scale"] == (None,)


def test_shard_batch_splits_rows_over_data_axes():
  p = Partitioner(MeshConfig(data=2, fsdp=4))
  batch = p.shard_batch({"decoder_target_tokens": jnp.arange(16 * 3).reshape(16, 3)})
  arr = batch["decoder_target_tokens"]
  assert arr.sharding.spec == P(("data", "fsdp", "expert"))
  assert {shard.data.shape for shard in arr.addressable_shards} == {(2, 3)}
