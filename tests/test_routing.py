"""Expert routing: sparse MoE FFNs, IA3 / LoRA / MoV / MoLoRA adapters, frozen bases, upcycling.

Reference computations are written here in NumPy from the papers' formulas (docs/routing.md),
independent of the Flax modules they check.
"""

import dataclasses
import glob
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polyglot_jax.commands import gin_setup
from polyglot_jax.models import adapters, moe, routing
from polyglot_jax.models.config import AdapterConfig, MoeConfig, TransformerConfig
from polyglot_jax.models.model import DecoderOnlyModel, EncoderDecoderModel
from polyglot_jax.parallel import partitioning
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import checkpoints, optimizers, train_state
from polyglot_jax.training.optimizers import Adafactor
# The same tiny dimensions and padded random batches as the train-step tests.
from test_training import TINY, _SGD, _batch, _run_steps  # noqa: E402  pylint: disable=wrong-import-position


def _params(model, seed: int = 0):
  shapes = {k: v.shape for k, v in _batch().items()}
  return train_state.unbox(
      model.get_initial_variables(jax.random.key(seed), shapes)["params"])


def _randomize(params, pattern: str, seed: int = 1):
  """Random values for the leaves whose path contains `pattern` (e.g. adapters still at init)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [1.0 + 0.5 * jax.random.normal(k, x.shape) if pattern in jax.tree_util.keystr(p) else x
         for k, (p, x) in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


# --- gating -------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_selected", [None, 1, 2])
def test_routing_weights_sum_to_one_on_real_tokens_and_zero_on_padding(num_selected):
  logits = jax.random.normal(jax.random.key(0), (3, 7, 5)) * 3  # [batch, length, E]
  mask = (np.arange(7)[None, :] < np.array([[7], [4], [1]])).astype(np.float32)
  gate = routing.gate(logits, mask, num_selected)
  sums = np.asarray(gate.weights.sum(-1))
  # Top-1 keeps the raw probability (Switch: renormalising would make it 1 and cut the router's
  # gradient); soft merging and renormalised top-k sum to one.
  expected = np.asarray(gate.probs).max(-1) if num_selected == 1 else 1.0
  np.testing.assert_allclose(sums[mask > 0], np.broadcast_to(expected, sums.shape)[mask > 0],
                             rtol=1e-6)
  np.testing.assert_array_equal(sums[mask == 0], 0.0)
  if num_selected is not None:
    assert int((np.asarray(gate.weights) > 0).sum(-1).max()) == num_selected
    # Selected weights are the top-k probabilities, renormalised when k > 1.
    top = np.sort(np.asarray(gate.probs), -1)[..., ::-1][..., :num_selected]
    expected = top / top.sum(-1, keepdims=True) if num_selected > 1 else top
    got = np.sort(np.asarray(gate.weights), -1)[..., ::-1][..., :num_selected]
    np.testing.assert_allclose(got[mask > 0], expected[mask > 0], rtol=1e-6)


def test_router_statistics_follow_their_formulas_on_real_tokens_only():
  logits = jax.random.normal(jax.random.key(1), (2, 6, 4))  # [batch, length, E]
  mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)

  class Probe(nn.Module):
    @nn.compact
    def __call__(self, logits):
      gate = routing.gate(logits, mask, 2)
      routing.sow_statistics(self, logits, gate, mask)
      return gate

  gate, state = Probe().apply({}, logits, mutable=[routing.STATS_COLLECTION])
  stats = routing.collect_statistics(state[routing.STATS_COLLECTION])
  real = mask > 0
  probs = np.asarray(jax.nn.softmax(logits))[real]  # [tokens, E]
  top2 = np.argsort(-probs, -1)[:, :2]
  f = np.stack([(top2 == e).any(-1).mean() / 2 for e in range(4)])
  np.testing.assert_allclose(stats["load_balance_loss"], 4 * np.sum(f * probs.mean(0)), rtol=1e-5)
  z = np.log(np.exp(np.asarray(logits)[real]).sum(-1)) ** 2
  np.testing.assert_allclose(stats["router_z_loss"], z.mean(), rtol=1e-5)
  np.testing.assert_allclose([stats[f"load_{e}"] for e in range(4)], f, rtol=1e-6)


# --- sparse MoE ---------------------------------------------------------------------------------

def _moe_config(**moe_kwargs) -> TransformerConfig:
  return TransformerConfig(**TINY, moe=MoeConfig(num_experts=4, **moe_kwargs))


def _reference_moe(x, mask, params, config: TransformerConfig):
  """Token by token: softmax router, top-k (renormalised), sum of weighted expert FFNs."""
  x, kernel = np.asarray(x, np.float64), np.asarray(params["router"]["kernel"], np.float64)
  out = np.zeros_like(x)
  k = config.moe.num_selected
  for b, t in zip(*np.nonzero(mask)):
    logits = x[b, t] @ kernel
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:k]
    weights = probs[top] / probs[top].sum() if k > 1 else probs[top]
    for e, w in zip(top, weights):
      h = layers_act(x[b, t] @ params["wi_0"][e]) * (x[b, t] @ params["wi_1"][e])
      out[b, t] += w * (h @ params["wo"][e])
  return out


def layers_act(h):
  """Tanh-approximated GELU (T5.1.1's gated-GELU branch) in NumPy."""
  h = np.asarray(h, np.float64)
  return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))


@pytest.mark.parametrize("moe_kwargs", [
    dict(num_selected=2, capacity_factor=2.0),  # capacity = length: nothing can drop
    dict(num_selected=1, capacity_factor=4.0),
    dict(num_selected=2, capacity_factor=None),  # dropless grouped matmul
], ids=["top2_capacity", "top1_capacity", "top2_dropless"])
def test_moe_with_ample_capacity_equals_the_dense_reference_mixture(moe_kwargs):
  config = _moe_config(**moe_kwargs)
  x = jax.random.normal(jax.random.key(2), (3, 8, TINY["emb_dim"]))  # [batch, length, embed]
  mask = (np.arange(8)[None, :] < np.array([[8], [5], [2]])).astype(np.float32)
  layer = moe.MoeMlp(config)
  variables = layer.init(jax.random.key(3), x, mask)
  params = {k: np.asarray(v["kernel"]) if k != "router" else v
            for k, v in jax.tree.map(np.asarray, nn.unbox(variables["params"])).items()}
  out, state = layer.apply(variables, x, mask, mutable=[routing.STATS_COLLECTION])
  want = _reference_moe(x, mask, params, config)
  np.testing.assert_allclose(np.asarray(out)[mask > 0], want[mask > 0], rtol=2e-5, atol=2e-6)
  stats = routing.collect_statistics(state[routing.STATS_COLLECTION])
  assert float(stats["dropped_fraction"]) == 0.0


def test_moe_capacity_drops_overflow_and_reports_it():
  config = _moe_config(num_selected=1, capacity_factor=0.25)  # 8 tokens, 4 experts: 1 slot each
  x = jax.random.normal(jax.random.key(4), (2, 8, TINY["emb_dim"]))
  mask = np.ones((2, 8), np.float32)
  layer = moe.MoeMlp(config)
  variables = layer.init(jax.random.key(5), x, mask)
  out, state = layer.apply(variables, x, mask, mutable=[routing.STATS_COLLECTION])
  stats = routing.collect_statistics(state[routing.STATS_COLLECTION])
  # At most 4 of each row's 8 tokens are processed; the others get exactly zero (pass through).
  processed = np.abs(np.asarray(out)).sum(-1) > 0  # [batch, length]
  assert processed.sum(-1).max() <= 4
  np.testing.assert_allclose(stats["dropped_fraction"], 1 - processed.mean(), rtol=1e-6)


def test_experts_choose_gives_each_expert_its_top_capacity_tokens():
  config = _moe_config(router="experts_choose", capacity_factor=1.0, num_selected=1)
  x = jax.random.normal(jax.random.key(6), (1, 8, TINY["emb_dim"]))
  mask = np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.float32)
  layer = moe.MoeMlp(config)
  variables = layer.init(jax.random.key(7), x, mask)
  params = {k: np.asarray(v["kernel"]) if k != "router" else v
            for k, v in jax.tree.map(np.asarray, nn.unbox(variables["params"])).items()}
  out, state = layer.apply(variables, x, mask, mutable=[routing.STATS_COLLECTION])
  out = np.asarray(out)
  stats = routing.collect_statistics(state[routing.STATS_COLLECTION])
  # Every expert fills its 2 slots with real tokens: equal load by construction.
  np.testing.assert_allclose([stats[f"load_{e}"] for e in range(4)], 0.25, rtol=1e-6)
  probs = np.array(jax.nn.softmax(np.asarray(x[0]) @ params["router"]["kernel"]))  # [l, E]
  probs[mask[0] == 0] = -1.0
  want = np.zeros((8, TINY["emb_dim"]))
  cap = moe.capacity(config.moe, 8)
  for e in range(4):
    for t in np.argsort(-probs[:, e], kind="stable")[:cap]:
      if mask[0, t]:
        h = layers_act(x[0, t] @ params["wi_0"][e]) * (x[0, t] @ params["wi_1"][e])
        want[t] += probs[t, e] * (h @ params["wo"][e])
  np.testing.assert_allclose(out[0], want, rtol=2e-5, atol=2e-6)


def _padding_variants():
  """Two batches equal on real tokens, with different token ids at padded (segment 0) positions."""
  batch = _batch()
  other = {k: v.copy() for k, v in batch.items()}
  batch["encoder_segment_ids"] = (batch["encoder_input_tokens"] > 0).astype(np.int32)
  batch["decoder_segment_ids"] = (batch["decoder_target_tokens"] > 0).astype(np.int32)
  other["encoder_segment_ids"] = batch["encoder_segment_ids"]
  other["decoder_segment_ids"] = batch["decoder_segment_ids"]
  pad = batch["encoder_segment_ids"] == 0
  other["encoder_input_tokens"] = np.where(pad, 7, batch["encoder_input_tokens"])
  return batch, other


@pytest.mark.parametrize("config", [
    TransformerConfig(**TINY, moe=MoeConfig(num_experts=4, num_selected=2, capacity_factor=0.5)),
    TransformerConfig(**TINY, adapters=AdapterConfig(kind="mov", num_experts=3)),
    TransformerConfig(**TINY, adapters=AdapterConfig(kind="molora", num_experts=3)),
], ids=["moe_tight_capacity", "mov", "molora"])
def test_padding_does_not_change_outputs_for_real_tokens(config):
  model = EncoderDecoderModel(config)
  params = _randomize(_params(model), "_adapter")
  batch, other = _padding_variants()
  logits = lambda b: np.asarray(model._logits(params, b))  # pylint: disable=protected-access
  real = batch["decoder_segment_ids"] > 0
  np.testing.assert_array_equal(logits(batch)[real], logits(other)[real])


# --- parameter-efficient experts ----------------------------------------------------------------

def _adapter_model(kind: str, **kwargs) -> EncoderDecoderModel:
  return EncoderDecoderModel(TransformerConfig(**TINY, adapters=AdapterConfig(kind=kind, **kwargs)))


def test_mov_with_one_expert_equals_ia3():
  ia3, mov = _adapter_model("ia3"), _adapter_model("mov", num_experts=1)
  ia3_params = _randomize(_params(ia3), "_adapter")
  mov_params = _params(mov)

  def copy_scales(path, x):
    path = tuple(getattr(k, "key") for k in path)
    if path[-1] == "experts":
      return np.asarray(_get(ia3_params, path[:-1] + ("scale",)))[None]
    return _get(ia3_params, path) if path[-1] != "kernel" or "router" not in path else x
  mov_params = jax.tree_util.tree_map_with_path(copy_scales, mov_params)
  batch = _batch()
  real = batch["decoder_loss_weights"] > 0  # MoV leaves padding unscaled; IA3 scales it too.
  np.testing.assert_allclose(mov._logits(mov_params, batch)[real],  # pylint: disable=protected-access
                             ia3._logits(ia3_params, batch)[real], rtol=1e-6, atol=1e-6)  # pylint: disable=protected-access
  assert not np.allclose(ia3._logits(ia3_params, batch), ia3._logits(_params(ia3), batch))  # pylint: disable=protected-access


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@pytest.mark.parametrize("kind", ["mov", "molora"])
def test_soft_merge_with_a_one_hot_router_equals_that_expert_alone(kind):
  """A router saturated on expert j (logits 1e4 apart) must reproduce the single adapter j."""
  mixture = AdapterConfig(kind=kind, num_experts=3)
  single = AdapterConfig(kind={"mov": "ia3", "molora": "lora"}[kind])
  x = jnp.abs(jax.random.normal(jax.random.key(8), (2, 5, 16))) + 0.1  # positive: x·1 > 0
  mask = np.ones((2, 5), np.float32)
  if kind == "mov":
    make = lambda cfg: adapters.ScaleAdapter(cfg, ("mlp",))
    h = jax.random.normal(jax.random.key(9), (2, 5, 32))
    args = (h, x, mask)
  else:
    make = lambda cfg: adapters.LoraAdapter(cfg, (32,), "embed", ("mlp",))
    args = (x, mask)
  mix_vars = nn.unbox(make(mixture).init(jax.random.key(10), *args))
  mix_vars = jax.tree.map(lambda v: v + jax.random.normal(jax.random.key(11), v.shape), mix_vars)
  for j in range(3):
    router = np.zeros((16, 3), np.float32)
    router[:, j] = 1e4
    params = {**mix_vars["params"], "router": {"kernel": router}}
    expert = {name: value[j] for name, value in params.items() if name != "router"}
    if kind == "mov":
      expert = {"scale": expert["experts"]}
    got = make(mixture).apply({"params": params}, *args)
    want = make(single).apply({"params": expert}, *args)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_adapters_start_as_the_base_model():
  """IA3/MoV vectors start at one and LoRA B at zero: adapted logits equal the base model's."""
  base = EncoderDecoderModel(TransformerConfig(**TINY))
  base_params = _params(base)
  batch = _batch()
  want = base._logits(base_params, batch)  # pylint: disable=protected-access
  for kind in ("ia3", "lora", "mov", "molora"):
    model = _adapter_model(kind, num_experts=3)
    params = _params(model)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: _get(base_params, [k.key for k in p]) if "_adapter" not in
        jax.tree_util.keystr(p) else x, params)
    np.testing.assert_allclose(model._logits(params, batch), want, rtol=1e-5, atol=1e-6,  # pylint: disable=protected-access
                               err_msg=kind)


def test_parameter_counts_match_the_paper_on_t5_xl_dims():
  """IA3 on T5-XL dims (d_model 2048, d_ff 5120, 32 heads x 64, 24+24 layers) is 540,672
  parameters (keys, values, FFN intermediate; cross-attention included); MoV-10 is ten times
  that plus one d_model x 10 router per site (192 sites)."""
  xl = dict(vocab_size=32128, emb_dim=2048, num_heads=32, head_dim=64, mlp_dim=5120,
            num_encoder_layers=24, num_decoder_layers=24)
  shapes = {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4)}

  def adapter_count(kind, **kwargs):
    model = EncoderDecoderModel(TransformerConfig(**xl, adapters=AdapterConfig(kind=kind, **kwargs)))
    params = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
    flat = jax.tree_util.tree_flatten_with_path(params["params"])[0]
    return sum(x.size for p, x in flat if "_adapter" in jax.tree_util.keystr(p))

  assert adapter_count("ia3") == 540_672
  assert adapter_count("mov", num_experts=10) == 5_406_720 + 192 * 2048 * 10


# --- training: frozen base, auxiliary losses, sharding, upcycling --------------------------------

def test_gradients_reach_only_trainable_parameters_which_alone_get_optimizer_state():
  model = _adapter_model("mov", num_experts=3)
  state, _, spec = _run_steps(MeshConfig(data=4, fsdp=2, rules="fsdp"), model=model,
                             optimizer=Adafactor(learning_rate=0.1),
                             trainable_params=adapters.TRAINABLE_REGEX)
  final = jax.device_get(state.params)
  initial = jax.device_get(train_state.initialize(model, spec, seed=0).params)
  for path, before in jax.tree_util.tree_flatten_with_path(initial)[0]:
    after = _get(final, [k.key for k in path])
    if "_adapter" in jax.tree_util.keystr(path):
      assert not np.array_equal(before, after), path
    else:
      np.testing.assert_array_equal(before, after, err_msg=str(path))
  flat = jax.tree_util.tree_flatten_with_path(spec.abstract.params)[0]
  assert spec.trainable_count() == sum(x.size for p, x in flat if "_adapter" in
                                       jax.tree_util.keystr(p))
  # Optimizer state exists for adapter parameters only: none of its leaves is a base parameter's.
  adapter_shapes = {x.shape for p, x in flat if "_adapter" in jax.tree_util.keystr(p)}
  base_only = {x.shape for p, x in flat} - adapter_shapes
  state_shapes = {x.shape for x in jax.tree.leaves(spec.abstract.opt_state)}
  assert not state_shapes & {s for s in base_only if len(s) >= 2}


def test_unknown_trainable_regex_is_one_clear_error():
  with pytest.raises(ValueError, match="matches no parameter"):
    _run_steps(MeshConfig(data=8), model=_adapter_model("ia3"), trainable_params="nothing/.*",
               steps=0)


def test_auxiliary_losses_are_added_with_their_gin_weights_and_reported():
  config = TransformerConfig(**TINY, moe=MoeConfig(num_experts=4, load_balance_weight=0.5,
                                                   router_z_loss_weight=0.25))
  params = _params(EncoderDecoderModel(config))
  batch = _batch()
  loss, sums = EncoderDecoderModel(config).loss_fn(params, batch, None)
  no_aux = dataclasses.replace(config, moe=dataclasses.replace(
      config.moe, load_balance_weight=0.0, router_z_loss_weight=0.0))
  base_loss, _ = EncoderDecoderModel(no_aux).loss_fn(params, batch, None)
  tokens = sums["num_tokens"]
  lb, z = sums["experts/load_balance_loss"] / tokens, sums["experts/router_z_loss"] / tokens
  assert float(lb) >= 1.0 - 1e-6  # E * sum(f * P) >= 1, equality only when perfectly balanced
  np.testing.assert_allclose(loss - base_loss, 0.5 * lb + 0.25 * z, rtol=1e-5)
  # A microbatch holding a third of the global batch's tokens adds a third of its aux loss.
  micro_loss, _ = EncoderDecoderModel(config).loss_fn(params, batch, None,
                                                      global_num_tokens=3 * tokens)
  np.testing.assert_allclose(micro_loss - base_loss, (0.5 * lb + 0.25 * z) / 3, rtol=1e-5)


def test_moe_expert_sharded_steps_equal_single_device():
  model = EncoderDecoderModel(_moe_config(num_selected=2, capacity_factor=1.0))
  ref_state, ref_metrics, _ = _run_steps(MeshConfig(data=1), devices=jax.devices()[:1],
                                         model=model)
  state, metrics, _ = _run_steps(MeshConfig(data=2, expert=4, rules="fsdp"), model=model)
  for got, want in zip(metrics, ref_metrics):
    for name in ("loss", "grad_norm", "experts/load_balance_loss", "experts/dropped_fraction"):
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(state.params), jax.device_get(ref_state.params))
  wi = state.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]  # [expert, embed, mlp]
  assert wi.sharding.spec[0] == "expert"
  assert {s.data.shape[0] for s in wi.addressable_shards} == {1}


def test_upcycled_moe_reproduces_the_dense_model(tmp_path):
  """Every expert a copy of the dense FFN, top-2 renormalised, nothing dropped: the MoE model's
  logits equal the dense model's."""
  dense = EncoderDecoderModel(TransformerConfig(**TINY))
  partitioner = Partitioner(MeshConfig(data=2, expert=4, rules="fsdp"))
  dense_spec = train_state.state_spec(dense, _SGD(), partitioner)
  dense_state = train_state.initialize(dense, dense_spec, seed=0)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), period=1, async_save=False)
  ckpt.save(0, dense_state, {"batches": 0}, force=True)
  ckpt.close()

  sparse = EncoderDecoderModel(_moe_config(num_selected=2, capacity_factor=2.0))
  spec = train_state.state_spec(sparse, _SGD(), partitioner)
  init = train_state.initialize(sparse, spec, seed=1)
  params = checkpoints.restore_params(str(tmp_path / "checkpoints"), spec.abstract.params,
                                      init.params, fallback_to_scratch=True,
                                      tile_axes=checkpoints.expert_axes(spec.param_axes))
  wi = np.asarray(params["encoder"]["layers_1"]["mlp"]["wi_1"]["kernel"])
  dense_wi = np.asarray(dense_state.params["encoder"]["layers_1"]["mlp"]["wi_1"]["kernel"])
  for e in range(4):
    np.testing.assert_array_equal(wi[e], dense_wi)
  batch = _batch()
  real = batch["decoder_loss_weights"] > 0  # Padding goes to no expert; the dense FFN runs on it.
  np.testing.assert_allclose(sparse._logits(params, batch)[real],  # pylint: disable=protected-access
                             dense._logits(dense_state.params, batch)[real],  # pylint: disable=protected-access
                             rtol=1e-5, atol=1e-5)


def test_decoder_only_with_moe_and_lora_decodes_with_the_cache():
  """Routed layers work in the KV-cached decoding path: cached == uncached greedy tokens."""
  for extra in (dict(moe=MoeConfig(num_experts=4, capacity_factor=None)),
                dict(adapters=AdapterConfig(kind="molora", num_experts=3))):
    config = TransformerConfig(**{**TINY, "position_embedding": "rope", "scale_attention": True},
                               **extra)
    model = DecoderOnlyModel(config)
    prompt = np.zeros((2, 12), np.int32)
    prompt[:, 1:4] = [[5, 6, 7], [8, 9, 10]]
    causal = np.zeros((2, 12), np.int32)
    causal[:, :4] = 1
    batch = {"decoder_input_tokens": prompt, "decoder_target_tokens": prompt,
             "decoder_causal_attention": causal}
    params = _randomize(_params_decoder(model), "_adapter")
    cached = model.predict_batch(params, batch)
    uncached = model.predict_batch(params, batch, decoder_params={"use_cache": False})
    np.testing.assert_array_equal(cached, uncached)


def _params_decoder(model):
  shapes = {"decoder_input_tokens": (2, 12), "decoder_target_tokens": (2, 12)}
  return train_state.unbox(
      model.get_initial_variables(jax.random.key(0), shapes)["params"])


@pytest.mark.parametrize("routing_file", sorted(
    os.path.relpath(p, gin_setup.GIN_DIR)
    for p in glob.glob(os.path.join(gin_setup.GIN_DIR, "routing", "*.gin"))))
def test_every_routing_file_composes_with_both_model_families(routing_file):
  """Each gin/routing file on an encoder-decoder and a decoder-only model: the routed parameters
  exist, and the trainable regex (if any) selects exactly them."""
  for model_file in ("models/mt5/tiny.gin", "models/llama/tiny.gin"):
    gin.clear_config()
    try:
      gin_setup.parse([model_file, "runs/pretrain.gin", routing_file],
                      ["MIXTURE_OR_TASK_NAME='udhr_lm'", "TASK_FEATURE_LENGTHS={'targets': 8}",
                       "TRAIN_STEPS=1", "MODEL_DIR='/tmp/unused'"])
      model = gin.query_parameter("train.model").scoped_configurable_fn()
      try:
        trainable = gin.query_parameter("train.trainable_params")
      except ValueError:  # Not bound: every parameter trains.
        trainable = None
    finally:
      gin.clear_config()
    shapes = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}
    boxed = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(boxed["params"])[0]]
    routed = [p for p in paths if "_adapter" in p or "router" in p]
    assert bool(routed) == (not routing_file.endswith("dense.gin")), (model_file, routing_file)
    if trainable is not None:
      mask = optimizers.trainable_mask(partitioning.logical_axes(boxed["params"]), trainable)
      assert sum(jax.tree.leaves(mask)) == len(routed)
