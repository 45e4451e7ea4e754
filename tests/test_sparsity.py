"""Gradual magnitude pruning: schedule, exact sparsity, exact zeros, N:M, sharding, resume, gin."""

import dataclasses
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from polyglot_jax.commands import gin_setup, prune, train
from polyglot_jax.compression.sparsity import Sparsity
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.models.model import EncoderDecoderModel
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import checkpoints, step as step_lib, train_state
from polyglot_jax.training.loop import TrainResult
from polyglot_jax.training.metrics import read_jsonl
from polyglot_jax.training.optimizers import Adafactor, AdamW
from test_training import TINY, _batch, _run_steps, _SGD  # The train-step harness, tiny model.

# Tiny params with every kind of leaf: a kernel, a 3-D attention-out kernel, a scanned kernel
# ('layers' is a BATCH axis: pruned per layer), an embedding and a norm scale.
AXES = {"mlp": {"wi": {"kernel": ("embed", "mlp")}},
        "attention": {"out": {"kernel": ("heads", "kv", "embed")}},
        "layers": {"wo": {"kernel": ("layers", "mlp", "embed")}},
        "token_embedder": {"embedding": ("vocab", "embed")},
        "norm": {"scale": ("embed",)}}
SHAPES = {"mlp": {"wi": {"kernel": (16, 24)}}, "attention": {"out": {"kernel": (2, 8, 16)}},
          "layers": {"wo": {"kernel": (3, 24, 16)}}, "token_embedder": {"embedding": (40, 16)},
          "norm": {"scale": (16,)}}
KERNELS = ("mlp/wi/kernel", "attention/out/kernel", "layers/wo/kernel")


def _params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  scale = iter([1.0, 3.0, 0.1, 1.0, 1.0])  # different scales: global must normalise them
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s) * next(scale), jnp.float32),
                      SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def _get(tree: dict, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return np.asarray(tree)


def test_schedule_values_and_mask_steps():
  sp = Sparsity(initial_sparsity=0.1, final_sparsity=0.9, begin_step=10, end_step=110,
                frequency=20)
  # s_t = 0.9 + (0.1 - 0.9) * (1 - (t - 10) / 100) ** 3, clipped outside [10, 110].
  for t, want in [(0, 0.1), (10, 0.1), (35, 0.9 - 0.8 * 0.75**3), (60, 0.9 - 0.8 * 0.5**3),
                  (110, 0.9), (500, 0.9)]:
    assert float(sp.sparsity_at(t)) == pytest.approx(want, abs=1e-6), t
  assert [t for t in range(130) if sp.is_mask_step(t)] == [10, 30, 50, 70, 90, 110]
  uneven = Sparsity(final_sparsity=0.5, begin_step=0, end_step=7, frequency=3)
  assert [t for t in range(1, 12) if uneven.is_mask_step(t)] == [3, 6, 7]  # t1 always updates
  one_shot = Sparsity(final_sparsity=0.5, begin_step=4, end_step=4)
  assert [float(one_shot.sparsity_at(t)) for t in (3, 4, 9)] == [0.0, 0.5, 0.5]


def test_invalid_configs_say_what_is_wrong():
  with pytest.raises(ValueError, match="final_sparsity"):
    Sparsity(final_sparsity=1.0, end_step=1)
  with pytest.raises(ValueError, match="1 - N/M"):
    Sparsity(final_sparsity=0.9, end_step=1, n_m=(2, 4))
  with pytest.raises(ValueError, match="matches no parameter"):
    Sparsity(final_sparsity=0.5, end_step=1, prunable=".*/kernal").wrap(optax.sgd(1.0), AXES)


def _masks(sp: Sparsity, params: dict, sparsity: float) -> dict:
  return jax.jit(lambda p: sp.masks(p, AXES, sparsity))(params)


def test_prunable_regex_selects_kernels_by_default():
  masks = _masks(Sparsity(final_sparsity=0.5, end_step=1), _params(), 0.5)
  pruned = {path for path in KERNELS + ("token_embedder/embedding", "norm/scale")
            if not _get(masks, path).all()}
  assert pruned == set(KERNELS)
  assert _get(masks, "norm/scale").shape == (1,)  # placeholder, sharded/broadcast like the param
  only_mlp = Sparsity(final_sparsity=0.5, end_step=1,
                      prunable=r"(?!attention).*/kernel|.*embedding")
  masks = _masks(only_mlp, _params(), 0.5)
  assert _get(masks, "attention/out/kernel").all() and not _get(masks, "mlp/wi/kernel").all()
  assert not _get(masks, "token_embedder/embedding").all()


@pytest.mark.parametrize("target", [0.5, 0.83])
def test_layerwise_reaches_exact_sparsity_per_tensor_and_per_layer(target):
  masks = _masks(Sparsity(final_sparsity=target, end_step=1), _params(), target)
  for path in ("mlp/wi/kernel", "attention/out/kernel"):
    mask = _get(masks, path)
    assert (~mask).sum() == round(target * mask.size), path
  scanned = _get(masks, "layers/wo/kernel")
  assert [(~layer).sum() for layer in scanned] == [round(target * 24 * 16)] * 3
  params = _params()
  kept = np.abs(_get(params, "mlp/wi/kernel"))[_get(masks, "mlp/wi/kernel")]
  assert kept.min() >= np.abs(_get(params, "mlp/wi/kernel"))[~_get(masks, "mlp/wi/kernel")].max()


def test_global_reaches_exact_sparsity_with_normalised_scores():
  masks = _masks(Sparsity(final_sparsity=0.8, end_step=1, method="global"), _params(), 0.8)
  sizes = [_get(masks, path).size for path in KERNELS]
  pruned = [(~_get(masks, path)).sum() for path in KERNELS]
  assert sum(pruned) == round(0.8 * sum(sizes))
  # Tensors with 30x different scales are pruned alike: the scores are |w| / RMS(w).
  assert all(0.7 < p / s < 0.9 for p, s in zip(pruned, sizes)), pruned


@pytest.mark.parametrize("method", ["layerwise", "global"])
def test_ties_are_broken_by_flat_index(method):
  params = jax.tree.map(jnp.ones_like, _params())
  masks = _masks(Sparsity(final_sparsity=0.5, end_step=1, method=method), params, 0.5)
  wi = _get(masks, "mlp/wi/kernel").reshape(-1)
  if method == "layerwise":
    assert not wi[:wi.size // 2].any() and wi[wi.size // 2:].all()
  else:  # One group: the first tensors in tree order go first.
    total = sum(_get(masks, p).size for p in KERNELS)
    flat = np.concatenate([_get(masks, p).reshape(-1) for p in sorted(KERNELS)])
    assert not flat[:total // 2].any() and flat[total // 2:].all()


def test_n_of_m_pattern_along_the_input_dim():
  params = _params()
  masks = _masks(Sparsity(final_sparsity=0.5, end_step=1, n_m=(2, 4)), params, 0.5)
  for path, dim in [("mlp/wi/kernel", 0), ("attention/out/kernel", 1), ("layers/wo/kernel", 1)]:
    mask, weight = np.moveaxis(_get(masks, path), dim, -1), np.moveaxis(_get(params, path), dim, -1)
    groups = mask.reshape(mask.shape[:-1] + (-1, 4))
    assert (groups.sum(-1) == 2).all(), path
    magnitude = np.abs(weight).reshape(groups.shape)
    assert (np.where(groups, magnitude, np.inf).min(-1)
            >= np.where(groups, -np.inf, magnitude).max(-1)).all(), path
  with pytest.raises(ValueError, match="not a multiple of M"):
    Sparsity(final_sparsity=0.75, end_step=1, n_m=(1, 4)).masks(
        {"k": {"kernel": jnp.ones((6, 8))}}, {"k": {"kernel": ("embed", "mlp")}}, 0.75)


@pytest.mark.parametrize("optimizer", [
    Adafactor(learning_rate=0.05, beta1=0.9, min_dim_size_to_factor=8, weight_decay=1e-3),
    AdamW(learning_rate=0.05, weight_decay=0.1, decay_matrices_only=False),
], ids=["adafactor", "adamw"])
def test_pruned_weights_are_exactly_zero_after_every_update(optimizer):
  sp = Sparsity(final_sparsity=0.9, begin_step=2, end_step=20, frequency=3)
  tx = sp.wrap(optimizer.build(AXES), AXES)
  params = _params()
  state = tx.init(params)

  @jax.jit
  def step(params, state, seed):
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(seed), p.shape) + p, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(30):
    params, state = step(params, state, i)
    for path in KERNELS:
      mask, weight = _get(state.masks, path), _get(params, path)
      assert (weight[~mask] == 0.0).all() and (weight[mask] != 0.0).all(), (i, path)
  for path in KERNELS:
    assert (~_get(state.masks, path)).mean() == pytest.approx(0.9, abs=2e-3)
  metrics = sp.metrics(state)
  assert float(metrics["sparsity/global"]) == pytest.approx(0.9, abs=2e-3)
  assert set(metrics) == {"sparsity/global", *(f"sparsity/{p}" for p in KERNELS)}


@dataclasses.dataclass(frozen=True)
class _SparseSGD(_SGD):
  """The train-step harness's SGD, wrapped by a Sparsity (as state_spec does)."""

  sparsity: Sparsity = Sparsity(initial_sparsity=0.3, final_sparsity=0.6, begin_step=1,
                                end_step=2, frequency=1)

  def build(self, param_axes) -> optax.GradientTransformation:
    return self.sparsity.wrap(super().build(param_axes), param_axes)


def test_sharded_train_step_masks_equal_single_device():
  optimizer = _SparseSGD()
  ref_state, _, _ = _run_steps(MeshConfig(data=1), devices=jax.devices()[:1], optimizer=optimizer)
  state, _, spec = _run_steps(MeshConfig(data=2, fsdp=2, tensor=2), optimizer=optimizer)
  masks = state.opt_state.masks
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(masks),
               jax.device_get(ref_state.opt_state.masks))
  assert float(optimizer.sparsity.metrics(state.opt_state)["sparsity/global"]) == (
      pytest.approx(0.6, abs=1e-3))
  wi, wi_mask = (tree["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
                 for tree in (state.params, masks))
  assert wi_mask.sharding.spec == wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert spec.shardings.opt_state.masks["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"] == (
      wi.sharding)


def test_skipped_nonfinite_update_is_invisible_to_the_schedule():
  """A skipped update keeps the whole optimizer state (step.py), so the schedule counts applied
  updates like the learning-rate schedule: a non-finite step at the first mask step, then two
  good ones, ends exactly like the two good ones alone (masks at 0.3, then 0.6)."""
  model, optimizer = EncoderDecoderModel(TransformerConfig(**TINY)), _SparseSGD()
  partitioner = Partitioner(MeshConfig(data=1), devices=jax.devices()[:1])
  spec = train_state.state_spec(model, optimizer, partitioner)
  step_fn = step_lib.make_train_step(model, spec, partitioner,
                                     learning_rate_fn=optimizer.learning_rate_fn)
  initial = jax.device_get(train_state.initialize(model, spec, seed=0))
  nan = _batch(7)
  nan["decoder_loss_weights"][0, 0] = np.inf
  finals = []
  with partitioner.activate():
    for batches in ([_batch(0), _batch(1)], [nan, _batch(0), _batch(1)]):
      state = jax.device_put(initial, spec.shardings)  # step_fn donates it
      for batch in batches:
        state, metrics = step_fn(state, partitioner.shard_batch(batch))
        if batch is nan:
          assert float(metrics["nonfinite"]) == 1.0 and int(state.opt_state.count) == 0
          assert all(np.asarray(m).all() for m in jax.tree.leaves(state.opt_state.masks))
      finals.append(jax.device_get(state))
  assert int(finals[1].step) == 3 and int(finals[1].opt_state.count) == 2
  jax.tree.map(np.testing.assert_array_equal, finals[1].opt_state, finals[0].opt_state)
  jax.tree.map(np.testing.assert_array_equal, finals[1].params, finals[0].params)


@pytest.mark.parametrize("config", [dict(method="global"), dict(n_m=(2, 4), final_sparsity=0.5)],
                         ids=["global", "2of4"])
def test_sharded_masks_equal_unsharded(config):
  sp = Sparsity(**{"final_sparsity": 0.7, "end_step": 1, **config})
  partitioner = Partitioner(MeshConfig(data=2, fsdp=2, tensor=2))
  params = jax.device_put(_params(), partitioner.shardings(AXES))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(_masks(sp, params, sp.final_sparsity)),
               jax.device_get(_masks(sp, jax.device_get(_params()), sp.final_sparsity)))


# --- The loop through gin: PRUNING_RATIO, metrics, resume, report, one-shot pruning -----------

def _gin_train(model_dir: str, stop_after_step: int | None = None) -> TrainResult:
  """6 steps of tiny mT5 on UDHR through gin with sparsity/gmp_80.gin; masks at steps 2, 4, 6."""
  bindings = {
      "MIXTURE_OR_TASK_NAME": "'udhr_span_corruption'",
      "TASK_FEATURE_LENGTHS": "{'inputs': 32, 'targets': 16}", "TRAIN_STEPS": "6",
      "BATCH_SIZE": "8", "MODEL_DIR": repr(model_dir), "ACTIVATION_DTYPE": "'float32'",
      **TINY_MT5, "PRUNING_FREQUENCY": "2", "MeshConfig.data": "2", "MeshConfig.fsdp": "4",
      "train.eval_dataset_cfg": "None", "train.checkpoint_period": "3",
      "train.log_period": "1", "train.tensorboard": "False"}
  gin_setup.parse(["models/mt5/tiny.gin", "runs/pretrain.gin", "mesh/fsdp.gin",
                   "sparsity/gmp_80.gin"], [f"{k}={v}" for k, v in bindings.items()])
  try:
    return train.train(stop_after_step=stop_after_step)
  finally:
    gin.clear_config()


TINY_MT5 = {"TransformerConfig.vocab_size": "8192", "TransformerConfig.emb_dim": "32",
            "TransformerConfig.mlp_dim": "64", "TransformerConfig.num_heads": "4",
            "TransformerConfig.head_dim": "8"}


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
  """Stops after step 2 (a mask step), then resumes to step 6 (TRAIN_STEPS = PRUNING_END_STEP)."""
  model_dir = str(tmp_path_factory.mktemp("gmp_80"))
  with pytest.MonkeyPatch.context() as patch:  # Skip the CPU peak-FLOP/s benchmark (MFU only).
    patch.setattr(train, "peak_flops", lambda: (1e12, "test"))
    first = _gin_train(model_dir, stop_after_step=2)
    return model_dir, first, _gin_train(model_dir)


def _expected_global(masks, ratio: float) -> float:
  """Sparsity of layerwise pruning at `ratio`: round(ratio * size) zeros in each kernel."""
  sizes = [m.size for m in jax.tree.leaves(masks) if m.size > 1]
  return sum(round(ratio * n) for n in sizes) / sum(sizes)


def test_gin_pruning_ratio_trains_to_the_target_sparsity(resumed_run):
  model_dir, _, result = resumed_run
  assert result.step == 6 and all(np.isfinite(result.losses))
  records = read_jsonl(os.path.join(model_dir, "train", "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  curve = [r["sparsity/global"] for r in records]
  masks = result.state.opt_state.masks
  for step, s in [(2, 0.8 - 0.8 * (2 / 3)**3), (4, 0.8 - 0.8 * (1 / 3)**3), (6, 0.8)]:
    assert curve[step - 1] == pytest.approx(_expected_global(masks, s), abs=1e-6), step
  assert curve[0] == 0.0 and curve[2] == curve[1] and curve[4] == curve[3]
  assert records[-1]["sparsity/encoder/layers_0/mlp/wi_0/kernel"] == pytest.approx(0.8, abs=1e-3)
  assert not any("embedding" in k or "scale" in k for k in records[-1] if k.startswith("sparsity/"))
  report = prune.sparsity_report(model_dir)
  assert report["step"] == 6
  assert report["sparsity/global"] == pytest.approx(curve[-1], abs=1e-6)  # zeros == masks
  assert 0 < report["sparsity/all_parameters"] < report["sparsity/global"]


def test_resume_keeps_masks(resumed_run):
  model_dir, first, _ = resumed_run
  records = read_jsonl(os.path.join(model_dir, "train", "metrics.jsonl"))
  # Step 3 is no mask step: its sparsity is that of the masks restored from step 2 (fresh masks
  # would give 0), and the checkpoint holds exactly the masks the first run ended with.
  assert records[2]["sparsity/global"] == records[1]["sparsity/global"] > 0.5
  spec_masks = first.state.opt_state.masks
  restored, _ = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), period=1).restore(
      2, jax.eval_shape(lambda: first.state))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.opt_state.masks),
               jax.device_get(spec_masks))


def test_one_shot_prune_of_a_checkpoint(resumed_run, tmp_path):
  model_dir, _, _ = resumed_run
  gin_setup.parse(["models/mt5/tiny.gin"],
                  [f"{k}={v}" for k, v in TINY_MT5.items()] + ["prune_checkpoint.model=%MODEL"])
  try:
    report = prune.prune_checkpoint(
        sparsity=Sparsity(final_sparsity=0.9, end_step=0, method="global"),
        checkpoint_dir=model_dir, output_dir=str(tmp_path), mesh=MeshConfig(data=2, fsdp=4))
  finally:
    gin.clear_config()
  assert report["step"] == 6
  assert report["sparsity/global"] == pytest.approx(0.9, abs=1e-5)
  assert prune.sparsity_report(str(tmp_path)) == report
