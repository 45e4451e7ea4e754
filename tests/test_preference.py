"""Preference training: DPO/IPO/SimPO against NumPy, the frozen reference (adapters off,
precomputed), paired batching and packing, preference files and the bundled UDHR pairs."""

import dataclasses
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio
import tensorflow as tf

from polyglot_jax.data import aya, mixing, pipeline, preference as data_pref, quality, tasks
from polyglot_jax.data.udhr import SPLIT_ARTICLES
from polyglot_jax.models.config import AdapterConfig, TransformerConfig
from polyglot_jax.models.model import DecoderOnlyModel, EncoderDecoderModel, adapter_free
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import preference, step as step_lib, train_state

tasks.register_bundled()  # this module looks bundled tasks up in seqio directly

LORA = AdapterConfig(kind="lora", rank=4, alpha=16.0,
                     targets=("query", "key", "value", "out", "wi", "wo"))  # routing/lora_r4.gin
DECODER = TransformerConfig(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                            num_encoder_layers=0, num_decoder_layers=1,
                            mlp_activations=("silu", "linear"), position_embedding="rope",
                            scale_attention=True, adapters=LORA)
ENC_DEC = TransformerConfig(vocab_size=64, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                            num_encoder_layers=1, num_decoder_layers=1,
                            relative_attention_num_buckets=8, adapters=LORA)
LENGTHS = {"inputs": 8, "chosen": 7, "rejected": 7}


# --- the losses on constructed log-probs --------------------------------------------------------

def _constructed(n: int = 7):
  rng = np.random.default_rng(0)
  return dict(chosen=-rng.uniform(1, 30, n), rejected=-rng.uniform(1, 30, n),
              chosen_ref=-rng.uniform(1, 30, n), rejected_ref=-rng.uniform(1, 30, n),
              chosen_len=rng.integers(1, 20, n).astype(np.float64),
              rejected_len=rng.integers(1, 20, n).astype(np.float64))


def _numpy_loss_and_grads(kind, beta, gamma, v):
  """Loss per pair and d(mean loss)/d(chosen, rejected), written from the papers' formulas."""
  n = len(v["chosen"])
  sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))
  if kind == "simpo":
    z = beta * (v["chosen"] / v["chosen_len"] - v["rejected"] / v["rejected_len"]) - gamma
    loss = np.logaddexp(0.0, -z)
    return (loss, -sigmoid(-z) * beta / v["chosen_len"] / n,
            sigmoid(-z) * beta / v["rejected_len"] / n)
  h = (v["chosen"] - v["chosen_ref"]) - (v["rejected"] - v["rejected_ref"])
  if kind == "dpo":
    loss = np.logaddexp(0.0, -beta * h)
    return loss, -beta * sigmoid(-beta * h) / n, beta * sigmoid(-beta * h) / n
  loss = (h - 1.0 / (2.0 * beta)) ** 2
  return loss, 2.0 * (h - 1.0 / (2.0 * beta)) / n, -2.0 * (h - 1.0 / (2.0 * beta)) / n


@pytest.mark.parametrize("kind", preference.KINDS)
def test_losses_and_gradients_equal_numpy(kind):
  v = _constructed()
  beta, gamma = 0.3, 0.7
  loss_np, grad_c_np, grad_r_np = _numpy_loss_and_grads(kind, beta, gamma, v)
  args = {k: jnp.asarray(x, jnp.float32) for k, x in v.items()}

  def mean_loss(chosen, rejected):
    return jnp.mean(preference.pair_losses(kind, beta, gamma, **{**args, "chosen": chosen,
                                                                 "rejected": rejected})[0])

  loss = preference.pair_losses(kind, beta, gamma, **args)[0]
  np.testing.assert_allclose(loss, loss_np, rtol=1e-5)
  grad_c, grad_r = jax.grad(mean_loss, argnums=(0, 1))(args["chosen"], args["rejected"])
  np.testing.assert_allclose(grad_c, grad_c_np, rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(grad_r, grad_r_np, rtol=1e-4, atol=1e-8)


def test_small_beta_limits():
  v = {k: jnp.asarray(x, jnp.float32) for k, x in _constructed().items()}
  h = np.asarray((v["chosen"] - v["chosen_ref"]) - (v["rejected"] - v["rejected_ref"]))
  # -log σ(βh) = log 2 - βh/2 + (βh)²/8 + O((βh)⁴): the value tends to log 2, the slope to -h/2
  # (float32 rounding of log 2 adds up to 1e-7).
  for beta in (1e-2, 1e-4, 1e-6):
    dpo = np.asarray(preference.pair_losses("dpo", beta, 0.0, **v)[0], np.float64)
    assert np.all(np.abs(dpo - (math.log(2.0) - beta * h / 2)) <= (beta * h) ** 2 / 8 + 1e-7)
  simpo = np.asarray(preference.pair_losses("simpo", 1e-6, 0.0, **v)[0], np.float64)
  assert np.all(np.abs(simpo - math.log(2.0)) <= 1e-6 * 30 / 2 + 1e-7)  # |log π / |y|| <= 30
  # IPO's target margin 1/(2β) dominates: β²·loss -> 1/4.
  ipo = np.asarray(preference.pair_losses("ipo", beta, 0.0, **v)[0], np.float64)
  np.testing.assert_allclose(beta**2 * ipo, 0.25, rtol=1e-3)


def test_bad_settings_are_one_line_errors():
  with pytest.raises(ValueError, match="kind='kto'"):
    preference.PreferenceLoss(kind="kto")
  with pytest.raises(ValueError, match="beta=0"):
    preference.PreferenceLoss(beta=0)


# --- tiny models on converted pairs -------------------------------------------------------------

EXAMPLES = [  # token ids < 64; responses of both lengths, prompts of several
    dict(inputs=[5, 6, 7, 1], chosen=[8, 9, 10, 1], rejected=[11, 1]),
    dict(inputs=[12, 1], chosen=[13, 14, 1], rejected=[15, 16, 17, 18, 1]),
    dict(inputs=[19, 20, 21, 22, 23, 1], chosen=[24, 1], rejected=[25, 26, 1]),
    dict(inputs=[27, 28, 1], chosen=[29, 30, 31, 32, 33, 1], rejected=[34, 35, 36, 1]),
]


def _examples_ds(examples, reference=None):
  signature = {f: tf.TensorSpec([None], tf.int32) for f in data_pref.FEATURES}
  rows = [dict(ex) for ex in examples]
  if reference is not None:
    signature.update({f: tf.TensorSpec([], tf.float32) for f in data_pref.REFERENCE_FIELDS})
    for row, (c, r) in zip(rows, reference):
      row.update(chosen_ref_logps=c, rejected_ref_logps=r)
  return tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=signature)


def _convert(model, examples=EXAMPLES, pack=False, reference=None):
  """All rows of the converted examples as one numpy batch (an even number of rows)."""
  converter = data_pref.converter_cls(model.FEATURE_CONVERTER_CLS, reference is not None)
  rows = list(converter(pack=pack)(_examples_ds(examples, reference), LENGTHS)
              .as_numpy_iterator())
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@functools.cache
def _model(config):
  return (EncoderDecoderModel if config.num_encoder_layers else DecoderOnlyModel)(config)


@functools.cache
def _params(config, lora_b_scale: float = 0.0):
  """Random base weights (numpy, no init compile); LoRA B = lora_b_scale * noise (0: at init)."""
  model = _model(config)
  batch = _convert(model)
  shapes = {k: v.shape for k, v in batch.items()}
  abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))
  rng = np.random.default_rng(1)

  def draw(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == "scale":
      return jnp.asarray(1.0 + 0.1 * noise)
    if name == "lora_b":
      return jnp.asarray(lora_b_scale * noise)
    return jnp.asarray(noise * leaf.shape[-2] ** -0.5 if leaf.ndim > 1 else noise)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract["params"]))


@functools.cache
def _outputs(config):
  """One jitted function per config computing everything the tests compare (few compiles)."""
  model = _model(config)
  base = model.without_adapters()
  loss = preference.PreferenceLoss(kind="dpo", beta=0.5)

  def outputs(params, batch):
    return {
        "sums": loss.loss_fn(model, params, batch, None)[1],
        "values": loss.pair_values(model, params, batch),
        "reference": preference.reference_log_probs(model, params, batch),
        "policy": preference.sequence_log_probs(model, params, batch)[0],
        "base_scores": base.score_batch(adapter_free(params), batch),
        "reference_feature": preference.reference_feature(base, adapter_free(params), batch),
    }

  return jax.jit(outputs)


@pytest.mark.parametrize("config", [DECODER, ENC_DEC], ids=["decoder", "enc_dec"])
def test_policy_at_init_equals_its_adapters_off_reference_loss_is_log2(config):
  """LoRA B starts at 0: policy == reference, so DPO starts at log 2 with zero margin."""
  sums = _outputs(config)(_params(config), _convert(_model(config)))["sums"]
  metrics = preference.PreferenceLoss().summarize(sums)
  np.testing.assert_allclose(metrics["dpo/loss"], math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(metrics["dpo/reward_margin"], 0.0, atol=1e-6)
  assert float(sums["num_pairs"]) == len(EXAMPLES)


@pytest.mark.parametrize("config", [DECODER, ENC_DEC], ids=["decoder", "enc_dec"])
def test_lora_reference_is_the_base_model(config):
  """With trained (non-zero) LoRA deltas, the reference is the base model without adapters,
  evaluated on the same arrays; the same reference precomputed with packed data (and the
  feature `make_reference_step` adds) gives the same loss."""
  model = _model(config)
  params = _params(config, lora_b_scale=0.5)
  out = _outputs(config)(params, _convert(model))
  np.testing.assert_allclose(out["reference"][:, 1], out["base_scores"], rtol=1e-6)
  np.testing.assert_array_equal(out["reference"][:, 2:], 0.0)
  # The adapters do change the policy.
  assert np.min(np.abs(out["policy"][:, 1] - out["base_scores"])) > 1e-3
  adapters_off = preference.PreferenceLoss(beta=0.5).summarize(out["sums"])
  ref_pairs = [tuple(r) for r in np.asarray(out["base_scores"]).reshape(-1, 2)]
  packed = _convert(model, pack=True, reference=ref_pairs)
  assert packed["decoder_target_tokens"].shape[0] < len(out["base_scores"])  # pairs were packed
  packed_out = _outputs(config)(params, packed)
  computed = {**packed, preference.REFERENCE_FEATURE: packed_out["reference_feature"]}
  for batch in (packed, computed):
    precomputed = preference.PreferenceLoss(beta=0.5).summarize(
        _outputs(config)(params, batch)["sums"])
    for name in preference.METRICS:
      np.testing.assert_allclose(precomputed[name], adapters_off[name], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(packed_out["reference_feature"], packed[preference.REFERENCE_FEATURE],
                             rtol=1e-5, atol=1e-6)


def test_without_reference_or_adapters_is_a_one_line_error():
  model = DecoderOnlyModel(dataclasses.replace(DECODER, adapters=None))
  with pytest.raises(ValueError, match="need reference log-probs"):
    preference.PreferenceLoss().pair_values(model, {}, _convert(model))


def test_per_example_values_follow_the_batch_order():
  params = _params(DECODER, lora_b_scale=0.5)
  out = jax.device_get(_outputs(DECODER)(params, _convert(_model(DECODER))))
  values = preference.per_example(out["values"])
  policy = np.asarray(out["policy"])[:, 1].reshape(-1, 2)
  np.testing.assert_allclose(values["chosen_logps"], policy[:, 0], rtol=1e-6)
  np.testing.assert_allclose(values["rejected_logps"], policy[:, 1], rtol=1e-6)
  table = preference.language_metrics(values, ["swh", "yor", "swh", "swh"])
  assert table["swh"]["num_examples"] == 3
  np.testing.assert_allclose(table["yor"]["dpo/chosen_logps"], policy[1, 0], rtol=1e-6)


def test_dpo_train_step_sharded_with_microbatches_equals_single_device():
  """The preference objective through `make_train_step`: 8 devices (data x fsdp) with two
  microbatches give the single-device full-batch step (adapters trained, base frozen)."""
  model = _model(DECODER)
  examples = EXAMPLES * 2  # 16 rows: 8 pairs
  batch = _convert(model, examples)
  objective = preference.PreferenceLoss(beta=0.5)
  optimizer = _Sgd()
  results = []
  for mesh, devices, micro in ((MeshConfig(data=1), jax.devices()[:1], 1),
                               (MeshConfig(data=4, fsdp=2, rules="fsdp"), None, 2)):
    partitioner = Partitioner(mesh, devices=devices)
    spec = train_state.state_spec(model, optimizer, partitioner,
                                  trainable_params=r".*_adapter/.*")
    params = jax.tree.map(np.asarray, _params(DECODER, 0.5))  # fresh buffers: state is donated
    state = jax.device_put(train_state.TrainState(
        step=np.zeros((), np.int32), params=params, opt_state=spec.tx.init(params)),
                           spec.shardings)
    step = step_lib.make_train_step(model, spec, partitioner, objective=objective,
                                    learning_rate_fn=optimizer.learning_rate_fn,
                                    num_microbatches=micro)
    with partitioner.activate():
      state, metrics = step(state, partitioner.shard_batch(batch))
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (params_1, metrics_1), (params_8, metrics_8) = results
  for name in (*preference.METRICS, "loss", "grad_norm"):
    np.testing.assert_allclose(metrics_8[name], metrics_1[name], rtol=2e-5, atol=1e-7)
  assert metrics_1["nonfinite"] == 0 and metrics_1["grad_norm"] > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
               params_8, params_1)
  # The base stayed frozen; only adapters moved.
  base = _params(DECODER, 0.5)
  jax.tree.map(np.testing.assert_array_equal, adapter_free(params_1), adapter_free(base))


def test_reference_step_on_a_mesh_adds_the_reference_feature():
  """`make_reference_step` (a reference checkpoint, here the base) on 8 devices adds the
  feature the host computes."""
  partitioner = Partitioner(MeshConfig(data=8))
  base_params = adapter_free(_params(DECODER, 0.5))
  batch = _convert(_model(DECODER))
  add_reference = preference.make_reference_step(
      _model(DECODER).without_adapters(), jax.tree.map(lambda _: partitioner.replicated,
                                                       base_params), partitioner)
  with partitioner.activate():
    out = add_reference(base_params, partitioner.shard_batch(batch))
  host = _outputs(DECODER)(_params(DECODER, 0.5), batch)["reference_feature"]
  np.testing.assert_allclose(out[preference.REFERENCE_FEATURE], host, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out["decoder_target_tokens"], batch["decoder_target_tokens"])


@dataclasses.dataclass(frozen=True)
class _Sgd:
  learning_rate: float = 0.1

  def learning_rate_fn(self, step):
    return jnp.asarray(self.learning_rate, jnp.float32)

  def build(self, param_axes):
    del param_axes
    return optax.sgd(self.learning_rate)


# --- data: pairs stay together, files, the bundle -----------------------------------------------

def _prompt_and_responses(batch, row: int, segment: int):
  """(prompt tokens, response tokens) of one segment of one row of a converted batch."""
  seg = batch.get("decoder_segment_ids", (batch["decoder_target_tokens"] > 0).astype(int))[row]
  weights = batch["decoder_loss_weights"][row]
  tokens = batch["decoder_target_tokens"][row]
  response = tokens[(seg == segment) & (weights > 0)]
  if "encoder_input_tokens" in batch:
    enc_seg = batch.get("encoder_segment_ids",
                        (batch["encoder_input_tokens"] > 0).astype(int))[row]
    return batch["encoder_input_tokens"][row][enc_seg == segment], response
  return tokens[(seg == segment) & (weights == 0)], response


@pytest.mark.parametrize("converter,pack", [(seqio.DecoderFeatureConverter, True),
                                            (seqio.EncDecFeatureConverter, False)],
                         ids=["decoder_packed", "enc_dec_unpacked"])
def test_pairs_stay_together_across_batching(converter, pack):
  """Real bundled pairs through a UniMax mixture, 2 data shards, batches of 8 rows: every row
  pair shares its prompts segment by segment, and its responses are the record's."""
  languages = {f"udhr_preference.{c}": tasks.iso639_3(c) for c in ("swh", "spa", "ukr", "hin")}
  mixing.register_language_mixture("test_preference_unimax", languages, sampling="unimax",
                                    budget=400)
  lengths = {"inputs": 160, "chosen": 96, "rejected": 96}  # drops the longest articles
  cfg = pipeline.DatasetConfig("test_preference_unimax", lengths, "train", batch_size=8,
                               num_data_shards=2, pack=pack)
  vocab = seqio.get_mixture_or_task("udhr_preference.swh").output_features["chosen"].vocabulary
  encode = lambda text: tuple(vocab.encode(text)) + (1,)  # with EOS, as the task tokenizes
  records = {(encode(r["prompt"]), encode(r["chosen"]), encode(r["rejected"]))
             for r in data_pref.udhr_preference_records("train") if r["language"] in
             ("swh", "spa", "ukr", "hin")}
  batches = pipeline.iterate_batches(pipeline.get_dataset(cfg, data_pref.converter_cls(converter)))
  pairs = 0
  for batch in [next(batches) for _ in range(2)]:
    segment_ids = batch.get("decoder_segment_ids", np.ones((8, 1), int))
    for row in range(0, 8, 2):
      np.testing.assert_array_equal(segment_ids[row].max(), segment_ids[row + 1].max())
      for segment in range(1, segment_ids[row].max() + 1):
        prompt, chosen = _prompt_and_responses(batch, row, segment)
        prompt_rejected, rejected = _prompt_and_responses(batch, row + 1, segment)
        np.testing.assert_array_equal(prompt, prompt_rejected)
        assert (tuple(prompt), tuple(chosen), tuple(rejected)) in records
        pairs += 1
  assert pairs > 8 if pack else pairs == 8


def test_bundled_preference_set_keeps_held_out_articles_held_out():
  train = data_pref.udhr_preference_records("train")
  validation = data_pref.udhr_preference_records("validation")
  assert {r["article"] for r in train} <= set(SPLIT_ARTICLES["train"])
  assert {r["article"] for r in validation} == set(SPLIT_ARTICLES["validation"])
  assert {r["rejected_article"] for r in train} <= set(SPLIT_ARTICLES["train"])
  held_out_text = {r["chosen"] for r in validation} | {r["rejected"] for r in validation}
  assert not held_out_text & ({r["chosen"] for r in train} | {r["rejected"] for r in train}
                              | {r["prompt"] for r in train})
  for r in train + validation:
    assert r["chosen"] != r["rejected"]
    if r["rejection"] == "related_language":
      assert r["rejected_language"] != r["language"] and r["rejected_article"] == r["article"]
    else:
      assert r["rejected_language"] == r["language"]
      assert abs(r["rejected_article"] - r["article"]) == 1
  assert len({r["language"] for r in train}) == 27
  assert data_pref.UDHR_PREFERENCE_PATH.stat().st_size < 2 * 2**20


GOOD = [
    {"prompt": "Translate: jambo", "chosen": "hello", "rejected": "bye", "language": "swh"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
     "chosen": [{"role": "assistant", "content": "Hi."}], "rejected": "Go away.",
     "language": "eng"},
]


def _task_examples(name, split="train"):
  return list(seqio.get_mixture_or_task(name).source.get_dataset(split, shuffle=False)
              .as_numpy_iterator())


@pytest.mark.parametrize("suffix", ["jsonl.gz", "parquet"])
def test_preference_files_load_with_messages_and_reference(tmp_path, suffix):
  records = [{**r, "chosen_ref_logps": -1.5 * (i + 1), "rejected_ref_logps": -2.0}
             for i, r in enumerate(GOOD)]
  path = tmp_path / f"train.{suffix}"
  if suffix == "parquet":
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    rows = [{**r, "prompt": r.get("prompt"), "messages": r.get("messages"),
             "chosen": r["chosen"] if isinstance(r["chosen"], str) else r["chosen"][-1]["content"]}
            for r in records]
    pq.write_table(pa.Table.from_pylist(rows), path)
  else:
    aya.write_jsonl(records, path)
  data_pref.register_preference_task("test_pref_files", {"train": str(path)},
                                     reference_log_probs=True)
  examples = _task_examples("test_pref_files")
  assert [e["inputs"].decode() for e in examples] == ["Translate: jambo", "Be brief.\nHi?"]
  assert [e["chosen"].decode() for e in examples] == ["hello", "Hi."]
  assert [float(e["chosen_ref_logps"]) for e in examples] == [-1.5, -3.0]
  # Through the model pipeline the reference values land at each response's first token.
  cfg = pipeline.DatasetConfig("test_pref_files", {"inputs": 16, "chosen": 8, "rejected": 8},
                               "train", batch_size=4, shuffle=False, pack=False)
  batch = next(pipeline.iterate_batches(pipeline.get_dataset(
      cfg, data_pref.converter_cls(seqio.EncDecFeatureConverter, True), num_epochs=1)))
  np.testing.assert_array_equal(batch[preference.REFERENCE_FEATURE][:, 0], [-1.5, -2, -3, -2])
  np.testing.assert_array_equal(batch[preference.REFERENCE_FEATURE][:, 1:], 0.0)


def test_bad_preference_records_are_counted_and_schema_errors_are_one_line(tmp_path):
  quality.reset_dropped()
  path = tmp_path / "bad.jsonl"
  lines = [json.dumps(GOOD[0]), "not json", json.dumps({**GOOD[0], "chosen": " "}),
           json.dumps({**GOOD[0], "prompt": None, "messages": "oops"}),
           json.dumps({k: v for k, v in GOOD[0].items() if k != "rejected"})]
  path.write_text("\n".join(lines) + "\n")
  data_pref.register_preference_task("test_pref_bad", {"train": str(path)})
  assert len(_task_examples("test_pref_bad")) == 1
  dropped = quality.dropped_metrics()
  assert (dropped["data/dropped_malformed"], dropped["data/dropped_empty"],
          dropped["data/dropped_missing_field"]) == (2, 1, 1)
  with pytest.raises(ValueError, match="field_map keys \\['answer'\\]"):
    data_pref.register_preference_task("x", {"train": str(path)}, field_map={"answer": "a"})
  with pytest.raises(ValueError, match="not supported for preference data"):
    data_pref.register_preference_task("x", {"train": str(path)}, file_format="tfrecord")
  with pytest.raises(ValueError, match="reference_log_probs=True but the examples have no"):
    data_pref.DecoderPreferenceConverter(reference_log_probs=True)(
        _examples_ds(EXAMPLES), LENGTHS)
