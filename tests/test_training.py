"""The train step across meshes, gradient accumulation, the non-finite guard, and the loop's
exact resume on real bundled data."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from polyglot_jax.compression import quantization
from polyglot_jax.data.pipeline import DatasetConfig
from polyglot_jax.commands import evaluate, infer, train
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.models.model import DecoderOnlyModel, EncoderDecoderModel
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import loop, step as step_lib, train_state
from polyglot_jax.training.metrics import read_jsonl
from polyglot_jax.training.optimizers import Adafactor, AdamW

TINY = dict(vocab_size=128, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
            num_encoder_layers=2, num_decoder_layers=2)
BATCH, IN_LEN, OUT_LEN = 8, 12, 10


@dataclasses.dataclass(frozen=True)
class _SGD:
  """Plain SGD: parameters move by exactly -lr * gradient, so comparing them compares gradients
  (Adam would amplify last-ulp differences of near-zero gradients)."""

  learning_rate: float = 0.5

  def learning_rate_fn(self, step: jax.Array) -> jax.Array:
    return jnp.asarray(self.learning_rate, jnp.float32)

  def build(self, param_axes) -> optax.GradientTransformation:
    return optax.sgd(self.learning_rate)


def _batch(seed: int = 0, encoder: bool = True) -> dict[str, np.ndarray]:
  """Random tokens with right padding of varying length in both streams."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, TINY["vocab_size"], size=(BATCH, IN_LEN)).astype(np.int32)
  tgt = rng.integers(3, TINY["vocab_size"], size=(BATCH, OUT_LEN)).astype(np.int32)
  for row in range(BATCH):
    enc[row, IN_LEN - row:] = 0
    tgt[row, OUT_LEN - row // 2:] = 0
  dec_in = np.concatenate([np.zeros((BATCH, 1), np.int32), tgt[:, :-1]], axis=1)
  batch = {"decoder_input_tokens": dec_in, "decoder_target_tokens": tgt,
           "decoder_loss_weights": (tgt > 0).astype(np.float32)}
  return {"encoder_input_tokens": enc, **batch} if encoder else batch


def _run_steps(mesh: MeshConfig, devices=None, num_microbatches: int = 1, steps: int = 2,
               optimizer=None, model=None, trainable_params=None):
  """Initialises a tiny model on `mesh` and runs `steps` train steps; returns (state, metrics,
  spec)."""
  model = model or EncoderDecoderModel(TransformerConfig(**TINY), z_loss=1e-4)
  encoder = isinstance(model, EncoderDecoderModel)
  optimizer = optimizer or _SGD()
  partitioner = Partitioner(mesh, devices=devices)
  spec = train_state.state_spec(model, optimizer, partitioner,
                                trainable_params=trainable_params)
  state = train_state.initialize(model, spec, seed=0)
  step_fn = step_lib.make_train_step(model, spec, partitioner,
                                     learning_rate_fn=optimizer.learning_rate_fn,
                                     num_microbatches=num_microbatches)
  history = []
  with partitioner.activate():
    for i in range(steps):
      state, metrics = step_fn(state, partitioner.shard_batch(_batch(i, encoder)))
      history.append(jax.device_get(metrics))
  return state, history, spec


@pytest.fixture(scope="module")
def single_device_run():
  return _run_steps(MeshConfig(data=1), devices=jax.devices()[:1])


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_train_steps_equal_single_device(single_device_run, shape):
  data, fsdp, tensor = shape
  ref_state, ref_metrics, _ = single_device_run
  state, metrics, spec = _run_steps(MeshConfig(data=data, fsdp=fsdp, tensor=tensor,
                                               rules="fsdp_tensor"))
  for got, want in zip(metrics, ref_metrics):
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(state.params), jax.device_get(ref_state.params))
  # Parameters and Adam moments carry the shardings the rules give their logical axes.
  wi = state.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert tuple(spec.param_axes["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]) == ("embed", "mlp")
  assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert {s.data.shape for s in wi.addressable_shards} == {(32 // fsdp, 64 // tensor)}


def test_fsdp_gives_each_device_one_eighth_of_large_parameters_and_moments():
  state, _, _ = _run_steps(MeshConfig(data=1, fsdp=8, rules="fsdp"), steps=1,
                           optimizer=AdamW(learning_rate=1e-2))
  adam = state.opt_state[0][0]
  trees = {"params": state.params, "mu": adam.mu, "nu": adam.nu}
  for name, tree in trees.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if leaf.ndim >= 2 and leaf.size >= 32 * 32:
        per_device = {s.data.size for s in leaf.addressable_shards}
        assert per_device == {leaf.size // 8}, (name, path)


def test_gradient_accumulation_equals_full_batch(single_device_run):
  ref_state, ref_metrics, _ = single_device_run
  state, metrics, _ = _run_steps(MeshConfig(data=2, fsdp=2, tensor=2), num_microbatches=2)
  for got, want in zip(metrics, ref_metrics):
    for name in ("loss", "cross_ent_loss", "accuracy", "grad_norm"):
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(state.params), jax.device_get(ref_state.params))


def test_adafactor_state_is_sharded_like_params():
  state, _, spec = _run_steps(MeshConfig(data=1, fsdp=8, rules="fsdp"), steps=1,
                              optimizer=Adafactor(learning_rate=1e-2, min_dim_size_to_factor=16))
  factored = state.opt_state[0]
  v_row = factored.v_row["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]  # [embed, 1]
  assert v_row.shape == (32, 1)
  assert v_row.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)


def test_nonfinite_update_is_skipped():
  model = EncoderDecoderModel(TransformerConfig(**TINY))
  optimizer = AdamW(learning_rate=1e-2)
  partitioner = Partitioner(MeshConfig(data=8))
  batch = _batch()
  spec = train_state.state_spec(model, optimizer, partitioner)
  state = train_state.initialize(model, spec, seed=0)
  before = jax.device_get(state.params)
  step_fn = step_lib.make_train_step(model, spec, partitioner,
                                     learning_rate_fn=optimizer.learning_rate_fn)
  batch["decoder_loss_weights"][0, 0] = np.inf
  with partitioner.activate():
    state, metrics = step_fn(state, partitioner.shard_batch(batch))
  assert float(metrics["nonfinite"]) == 1.0
  assert int(state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)


# --- The loop on real bundled data -------------------------------------------------------------

LOOP_LENGTHS = {"inputs": 32, "targets": 16}


EVAL_CFG = DatasetConfig(mixture_or_task_name="udhr_span_corruption",
                         task_feature_lengths=LOOP_LENGTHS, split="validation", batch_size=8,
                         shuffle=False, pack=False)


def _loop_model() -> EncoderDecoderModel:
  return EncoderDecoderModel(TransformerConfig(**{**TINY, "vocab_size": 8192}))


def _train(model_dir: str, total_steps: int, mesh: MeshConfig = MeshConfig(data=8),
           optimizer=None, **kwargs):
  data = DatasetConfig(mixture_or_task_name="udhr_span_corruption",
                       task_feature_lengths=LOOP_LENGTHS, split="train", batch_size=8,
                       shuffle=True, seed=3, pack=True)
  kwargs.setdefault("eval_dataset_cfg", None)
  return train.train(model=_loop_model(), train_dataset_cfg=data,
                    optimizer=optimizer or AdamW(learning_rate=3e-3), model_dir=model_dir,
                    total_steps=total_steps, mesh=mesh, checkpoint_period=3, log_period=1,
                    tensorboard=False, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("uninterrupted"))
  return model_dir, _train(model_dir, 6, eval_dataset_cfg=EVAL_CFG, eval_steps=2, eval_period=3)


def test_loop_writes_metrics_checkpoints_and_eval(uninterrupted):
  model_dir, result = uninterrupted
  assert result.step == 6 and len(result.losses) == 6
  assert all(np.isfinite(result.losses))
  records = read_jsonl(os.path.join(model_dir, "train", "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for name in ("loss", "accuracy", "cross_ent_loss", "z_loss", "learning_rate",
               "timing/seqs_per_second", "timing/target_tokens_per_second", "timing/mfu"):
    assert name in records[-1], name
  evals = read_jsonl(os.path.join(model_dir, "training_eval", "udhr_span_corruption",
                                  "metrics.jsonl"))
  assert [r["step"] for r in evals] == [3, 6]
  assert set(result.eval_metrics) >= {"loss", "accuracy"}
  assert {"3", "6"} <= set(os.listdir(os.path.join(model_dir, "checkpoints")))


def test_resume_reproduces_the_uninterrupted_losses_exactly(uninterrupted, tmp_path):
  _, full = uninterrupted
  first = _train(str(tmp_path), 6, stop_after_step=3)
  assert first.step == 3
  second = _train(str(tmp_path), 6)
  assert first.losses + second.losses == full.losses


def test_resume_onto_a_different_mesh(uninterrupted, tmp_path):
  _, full = uninterrupted
  _train(str(tmp_path), 6, stop_after_step=3)
  resumed = _train(str(tmp_path), 6, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
  np.testing.assert_allclose(resumed.losses, full.losses[3:], rtol=1e-5)


def test_decoder_only_sharded_equals_single_device():
  config = TransformerConfig(**{**TINY, "num_encoder_layers": 0, "position_embedding": "rope",
                                "mlp_activations": ("silu", "linear"), "scale_attention": True,
                                "num_kv_heads": 2})
  ref_state, ref_metrics, _ = _run_steps(MeshConfig(data=1), devices=jax.devices()[:1],
                                         model=DecoderOnlyModel(config))
  state, metrics, _ = _run_steps(MeshConfig(data=2, fsdp=2, tensor=2), model=DecoderOnlyModel(config))
  for got, want in zip(metrics, ref_metrics):
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(state.params), jax.device_get(ref_state.params))


def test_eval_and_infer_read_the_trained_checkpoint(uninterrupted):
  model_dir, result = uninterrupted
  metrics = evaluate.evaluate(model=_loop_model(), dataset_cfg=EVAL_CFG, model_dir=model_dir,
                         mesh=MeshConfig(data=2, fsdp=4), eval_steps=2)
  for name in ("loss", "accuracy"):
    assert metrics[name] == pytest.approx(result.eval_metrics[name], rel=1e-5)
  evaluate.evaluate(model=quantization.quantized_model(_loop_model(), "int8_weight_only"),
               dataset_cfg=EVAL_CFG, model_dir=model_dir, eval_steps=1)
  task = EVAL_CFG.mixture_or_task_name  # The quantized eval is written beside the float one.
  with open(os.path.join(model_dir, "eval", f"{task}.json"), encoding="utf-8") as f:
    assert json.load(f)["metrics"]["loss"] == pytest.approx(metrics["loss"], rel=1e-6)
  assert os.path.exists(os.path.join(model_dir, "eval", f"{task}.int8_weight_only.json"))
  path = infer.infer(model=_loop_model(), dataset_cfg=EVAL_CFG, model_dir=model_dir, max_batches=1)
  records = read_jsonl(path)
  assert len(records) == 8
  assert set(records[0]) == {"inputs", "targets", "prediction", "score"}
  assert all(r["inputs"] for r in records)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_policy(policy, tmp_path):
  nan_lr = AdamW(learning_rate=float("nan"))  # Step 1 makes every parameter NaN.
  if policy == "stop":
    with pytest.raises(loop.NonFiniteLossError, match="not finite at step 2 "):
      _train(str(tmp_path), 4, optimizer=nan_lr, nonfinite_policy=policy)
    return
  result = _train(str(tmp_path), 4, optimizer=nan_lr, nonfinite_policy=policy)
  assert result.step == 4
  records = read_jsonl(os.path.join(str(tmp_path), "train", "metrics.jsonl"))
  assert [r["nonfinite_updates"] for r in records] == [0, 1, 2, 3]


def test_state_can_be_built_inside_an_active_mesh():
  model = EncoderDecoderModel(TransformerConfig(**TINY))
  partitioner = Partitioner(MeshConfig(data=2, fsdp=2, tensor=2))
  with partitioner.activate():
    spec = train_state.state_spec(model, _SGD(), partitioner)
    state = train_state.initialize(model, spec, seed=0)
  wi = state.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
  assert wi.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
