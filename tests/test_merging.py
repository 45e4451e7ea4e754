"""Model merging against hand computations, sharded merges, and exact adapter folding."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polyglot_jax.models.config import AdapterConfig, TransformerConfig
from polyglot_jax.models.model import DecoderOnlyModel, EncoderDecoderModel, adapter_free
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import merging
from polyglot_jax.training.merging import MergeConfig

BASE = np.ones(5, np.float32)
TASKS = np.array([[3.0, -1.0, 0.5, -4.0, 2.0],
                  [-2.0, 0.2, 1.0, -3.0, -5.0]], np.float32)  # task vectors θ_i − base


def _merge(config, thetas, base=BASE):
  base = None if base is None else {"w": base}
  return np.asarray(merging.merge_params(config, [{"w": t} for t in thetas], base)["w"])


def test_ties_equals_hand_computation():
  thetas = BASE + TASKS
  # density 0.6 keeps 3 of 5: τ̂1 = [3, 0, 0, -4, 2], τ̂2 = [-2, 0, 0, -3, -5].
  # Equal weights: Σ = [1, 0, 0, -7, -3] elects [+, 0, 0, -, -]; the agreeing entries average to
  # [3, 0, 0, -3.5, -5].
  np.testing.assert_allclose(_merge(MergeConfig("ties", density=0.6), thetas),
                             BASE + [3.0, 0.0, 0.0, -3.5, -5.0], rtol=1e-6)
  # Weights (1, 2) and λ = 0.5: Σ w τ̂ = [-1, 0, 0, -10, -8] elects [-, 0, 0, -, -]; the weighted
  # means of the agreeing entries are [-2, 0, 0, -10/3, -5].
  np.testing.assert_allclose(
      _merge(MergeConfig("ties", weights=(1.0, 2.0), density=0.6, scale=0.5), thetas),
      BASE + 0.5 * np.array([-2.0, 0.0, 0.0, -10.0 / 3.0, -5.0]), rtol=1e-6)
  # Per-model densities: model 2 keeps only its largest entry (-5).
  np.testing.assert_allclose(_merge(MergeConfig("ties", density=(0.6, 0.2)), thetas),
                             BASE + [3.0, 0.0, 0.0, -4.0, -5.0], rtol=1e-6)


def test_task_arithmetic_and_linear_equal_hand_computation():
  thetas = BASE + TASKS
  np.testing.assert_allclose(
      _merge(MergeConfig("task_arithmetic", weights=(0.5, 0.25), scale=2.0), thetas),
      BASE + 2.0 * (0.5 * TASKS[0] + 0.25 * TASKS[1]), rtol=1e-6)
  np.testing.assert_allclose(_merge(MergeConfig("linear", weights=(1.0, 3.0)), thetas),
                             (thetas[0] + 3.0 * thetas[1]) / 4.0, rtol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_hand_computation_with_a_fixed_seed(method):
  rng = np.random.default_rng(0)
  base = rng.standard_normal((64, 32)).astype(np.float32)
  tasks = rng.standard_normal((3, 64, 32)).astype(np.float32)
  weights, density, seed = (1.0, 0.5, 2.0), 0.3, 7
  config = MergeConfig(method, weights=weights, density=density, seed=seed)
  got = _merge(config, base + tasks, base)
  # The masks: Bernoulli(density) draws of the documented keys; everything else by hand.
  keys = jax.random.split(merging.tensor_key(seed, "w"), 3)
  keep = np.stack([np.asarray(jax.random.bernoulli(k, density, base.shape)) for k in keys])
  assert abs(keep.mean() - density) < 0.02
  d = np.where(keep, tasks / np.float32(density), 0.0)  # drop and rescale
  w = np.asarray(weights)[:, None, None]
  if method == "dare_linear":
    expected = base + np.sum(w * d, axis=0)
  else:
    sign = np.sign(np.sum(w * d, axis=0))
    agree = (np.sign(d) == sign) & (d != 0)
    mass = np.sum(np.where(agree, w, 0.0), axis=0)
    expected = base + np.where(mass > 0, np.sum(np.where(agree, w * d, 0.0), axis=0)
                               / np.where(mass > 0, mass, 1.0), 0.0)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # The same seed gives the same merge; another seed another one.
  np.testing.assert_array_equal(_merge(config, base + tasks, base), got)
  other = _merge(dataclasses.replace(config, seed=8), base + tasks, base)
  assert np.abs(other - got).max() > 0.1


def test_slerp_endpoints_midpoint_and_parallel_fallback():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((4, 6)).astype(np.float32)
  b = rng.standard_normal((4, 6)).astype(np.float32)
  b *= np.linalg.norm(a) / np.linalg.norm(b)  # equal norms: slerp stays on the sphere
  at = lambda t, x=a, y=b: _merge(MergeConfig("slerp", t=t), [x, y], None)
  np.testing.assert_array_equal(at(0.0), a)
  np.testing.assert_array_equal(at(1.0), b)
  mid = at(0.5).ravel()
  cos = lambda x, y: x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
  theta = np.arccos(cos(a.ravel(), b.ravel()))
  np.testing.assert_allclose(np.linalg.norm(mid), np.linalg.norm(a), rtol=1e-5)
  np.testing.assert_allclose([cos(mid, a.ravel()), cos(mid, b.ravel())], np.cos(theta / 2),
                             rtol=1e-5)
  # Parallel tensors: linear interpolation.
  np.testing.assert_allclose(at(0.25, a, 3.0 * a), 1.5 * a, rtol=1e-6)


# --- whole parameter trees -----------------------------------------------------------------------

AXES = {"token_embedder": {"embedding": ("vocab", "embed")},
        "mlp": {"wi": {"kernel": ("embed", "mlp")}, "wo": {"kernel": ("mlp", "embed")},
                "scale": ("embed",)}}
SHAPES = {"token_embedder": {"embedding": (64, 16)},
          "mlp": {"wi": {"kernel": (16, 32)}, "wo": {"kernel": (32, 16)}, "scale": (16,)}}


def _tree(seed: int):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s).astype(np.float32), SHAPES,
                      is_leaf=lambda x: isinstance(x, tuple))


def test_linear_of_identical_checkpoints_is_the_identity():
  params = _tree(0)
  for config in (MergeConfig("linear"), MergeConfig("linear", weights=(0.2, 0.3, 0.5))):
    merged = merging.merge_params(config, [params] * (2 if config.weights is None else 3))
    jax.tree.map(lambda m, p: np.testing.assert_allclose(m, p, rtol=1e-6), merged, params)
  exact = merging.merge_params(MergeConfig("linear"), [params, params])
  jax.tree.map(np.testing.assert_array_equal, exact, params)
  for method in ("task_arithmetic", "ties", "dare_ties"):  # zero task vectors: the base
    merged = merging.merge_params(MergeConfig(method, density=0.5), [params, params], params)
    jax.tree.map(np.testing.assert_array_equal, merged, params)


@pytest.mark.parametrize("config", [MergeConfig("ties", weights=(1.0, 0.5), density=0.3),
                                    MergeConfig("dare_ties", density=0.4, seed=3),
                                    MergeConfig("slerp", t=0.3)], ids=lambda c: c.method)
def test_sharded_merge_equals_host_merge(config):
  """8 devices (fsdp 2 x tensor 4): every tensor is merged in place, with its own sharding."""
  partitioner = Partitioner(MeshConfig(data=1, fsdp=2, tensor=4, rules="fsdp_tensor"))
  shardings = partitioner.shardings(AXES)
  models = [_tree(1), _tree(2)]
  base = None if config.method == "slerp" else _tree(0)
  host = merging.merge_params(config, models, base)
  place = lambda tree: jax.device_put(tree, shardings)
  sharded = merging.merge_params(config, [place(m) for m in models],
                                 None if base is None else place(base))
  jax.tree.map(lambda s, h: np.testing.assert_allclose(s, h, rtol=1e-6, atol=1e-7), sharded, host)
  jax.tree.map(lambda s, want: s.sharding.is_equivalent_to(want, s.ndim) or pytest.fail(
      f"{s.sharding} != {want}"), sharded, shardings)
  wi = sharded["mlp"]["wi"]["kernel"]
  assert {shard.data.shape for shard in wi.addressable_shards} == {(8, 8)}


def test_merge_errors_are_one_line():
  params = _tree(0)
  with pytest.raises(ValueError, match="slerp merges exactly 2 models, got 3"):
    merging.merge_params(MergeConfig("slerp"), [params] * 3)
  with pytest.raises(ValueError, match="give the base model"):
    merging.merge_params(MergeConfig("ties"), [params] * 2)
  with pytest.raises(ValueError, match="weights has 3 values for 2 models"):
    merging.merge_params(MergeConfig("linear", weights=(1, 2, 3)), [params] * 2)
  with pytest.raises(ValueError, match="density"):
    MergeConfig("dare_linear", density=0.0)
  with pytest.raises(ValueError, match="method='average'"):
    MergeConfig("average")
  other = {**params, "mlp": {**params["mlp"], "wi": {"kernel": np.zeros((16, 8), np.float32)}}}
  with pytest.raises(ValueError, match="checkpoint 1 differs from checkpoint 0 at mlp/wi/kernel"):
    merging.merge_params(MergeConfig("linear"), [params, other])


# --- adapters ------------------------------------------------------------------------------------

TINY = dict(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
            relative_attention_num_buckets=8)


def _random_params(model, shapes):
  """Random weights, adapters included (LoRA B and IA3 scales away from their identity init)."""
  abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
  rng = np.random.default_rng(0)

  def draw(path, x):
    noise = 0.3 * rng.standard_normal(x.shape).astype(np.float32)
    return jnp.asarray(1.0 + noise if path[-1].key == "scale" else noise)  # norms and IA3 scales

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract["params"]))


@pytest.mark.parametrize("kind,encoder", [("lora", False), ("ia3", True)])
def test_folded_adapters_give_the_adapted_model(kind, encoder):
  adapters = AdapterConfig(kind=kind, rank=4, alpha=16.0)
  config = TransformerConfig(**TINY, num_encoder_layers=1 if encoder else 0, num_decoder_layers=2,
                             scan_layers=not encoder, adapters=adapters)
  model = (EncoderDecoderModel if encoder else DecoderOnlyModel)(config)
  rng = np.random.default_rng(3)
  tokens = rng.integers(2, 64, (2, 6)).astype(np.int32)
  batch = {"decoder_input_tokens": tokens, "decoder_target_tokens": tokens}
  if encoder:
    batch["encoder_input_tokens"] = rng.integers(2, 64, (2, 5)).astype(np.int32)
  params = _random_params(model, {k: v.shape for k, v in batch.items()})
  inputs = {k: v for k, v in batch.items() if k != "decoder_target_tokens"}
  adapted = jax.jit(model.module.apply)({"params": params}, **inputs)
  folded = merging.fold_adapters(params, adapters)
  base_params = adapter_free(params)
  assert jax.tree.structure(folded) == jax.tree.structure(base_params)
  changed = jax.tree.leaves(jax.tree.map(lambda f, b: bool(np.any(f != b)), folded, base_params))
  assert sum(changed) >= 2  # the adapters did reach the base kernels
  logits = jax.jit(model.without_adapters().module.apply)({"params": folded}, **inputs)
  np.testing.assert_allclose(logits, adapted, rtol=1e-4, atol=1e-5)


def test_routed_adapters_cannot_be_folded():
  with pytest.raises(ValueError, match="mov adapters route each token .* merge the adapter-"):
    merging.fold_adapters({}, AdapterConfig(kind="mov", num_experts=3))
