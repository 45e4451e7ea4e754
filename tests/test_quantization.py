"""int8 post-training quantization through qwix: error bounds, known answers, model wrapping.

Tiny configs with numpy-drawn params (test_models' helpers). Symmetric int8 with s = absmax/127.5
guarantees |x - q*s| <= s/2 in exact arithmetic; XLA divides in float32 (possibly through a
reciprocal), which moves x/s (|x/s| <= 127.5) by a few ulps of 2^-17, so the tests allow
s * 2^-15 on top.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from test_decoding import _params_for
from test_models import T5, _enc_dec_batch, _model

from polyglot_jax.commands import gin_setup
from polyglot_jax.compression import quantization
from polyglot_jax.compression.quantization import QuantizedModel, quantized_model
from polyglot_jax.models import layers

T5_SCAN = dataclasses.replace(T5, scan_layers=True)
ROUNDING = 2.0**-15  # float32 division slack on |x/s| <= 127.5, in units of s


def _kernels(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else key
    if isinstance(value, dict):
      yield from _kernels(value, path)
    else:
      yield path, value


@pytest.mark.parametrize("config", [T5, T5_SCAN], ids=["unrolled", "scanned"])
def test_int8_weights_per_output_channel_within_half_a_step(config):
  params = _params_for(config)
  quantized = jax.jit(QuantizedModel(_model(config), "int8_weight_only").quantize_params)(params)
  checked = 0
  for path, w in _kernels(params):
    q = dict(_kernels(quantized))[path]
    if not path.endswith("/kernel"):  # embeddings, norms, relative bias: untouched
      np.testing.assert_array_equal(q, w)
      continue
    w = np.asarray(w, np.float64)
    qvalue, scale = np.asarray(q.array.qvalue), np.asarray(q.array.scale, np.float64)
    assert qvalue.dtype == np.int8
    # Contracted (input) dims: the leading one, two for attention out [heads, kv, embed]; the
    # scanned 'layers' axis in front is one slice per layer.
    first = 1 if "/layers/" in path else 0
    contracted = tuple(range(first, first + (2 if path.endswith("out/kernel") else 1)))
    expected = np.max(np.abs(w), axis=contracted, keepdims=True) / 127.5
    np.testing.assert_allclose(scale, expected, rtol=1e-6)
    assert np.all(np.abs(w - qvalue * scale) <= scale * (0.5 + ROUNDING)), path
    checked += 1
  # Every projection: per layer 4 attention + 3 MLP kernels (encoder), 8 + 3 (decoder), logits.
  layers_per_stack = 1 if config.scan_layers else 2
  assert checked == layers_per_stack * (7 + 11) + 1


def _constructed(rng: np.random.Generator, shape: tuple[int, int], axis: int):
  """(x, q, s): x = s * (q + u), |u| <= 0.3, q integer in [-120, 120], one entry +127.5 per
  slice along `axis` so that absmax / 127.5 = s exactly and every x/s is far from a rounding
  boundary: the int8 values and scales are known in advance."""
  q = rng.integers(-120, 121, shape).astype(np.float64)
  u = rng.uniform(-0.3, 0.3, shape)
  values = q + u
  index = [slice(None)] * 2
  index[1 - axis] = 0
  values[tuple(index)] = 127.5
  q[tuple(index)] = 127  # round(127.5) = 128 saturates to 127
  s = 2.0 ** rng.integers(-6, 2, (shape[0], 1) if axis == 0 else (1, shape[1]))
  return (values * s).astype(np.float32), q, s


def test_w8a8_projection_is_the_int8_product_of_per_token_and_per_channel_scales():
  rng = np.random.default_rng(0)
  x, qx, sx = _constructed(rng, (6, 16), axis=0)  # 6 tokens: one scale per token (row)
  w, qw, sw = _constructed(rng, (16, 12), axis=1)  # 12 output channels: one scale per column
  dense = layers.DenseGeneral((12,), ("embed", "mlp"))
  expected = (qx @ qw) * sx * sw  # int8 x int8 exactly, then both scales
  for scheme, want in (("w8a8", expected), ("int8_weight_only", (x @ (qw * sw)))):
    network = qwix.quantize_model(dense, qwix.PtqProvider(quantization.rules(scheme)))
    abstract = jax.eval_shape(lambda n=network: n.init(jax.random.key(0), x))["params"]
    params = qwix.quantize_params({"kernel": jnp.asarray(w)}, nn.unbox(abstract))
    np.testing.assert_array_equal(np.asarray(params["kernel"].array.qvalue), qw)
    y = network.apply({"params": params}, x[None])[0]  # [tokens, channels]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_per_token_activation_quantization_within_half_a_step():
  """The projection input's quantization (channelwise = the non-contracted batch and length
  dims, as qwix derives it from our dot_general) on activation-like data with outliers."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, 7, 32)).astype(np.float32)  # [batch, length, embed]
  x[:, :, 5] *= 40.0  # an outlier dimension: per-token scales absorb it
  quantized = qwix.quantize(jnp.asarray(x), jnp.int8, channelwise_axes=(0, 1))
  qvalue, s = np.asarray(quantized.qvalue), np.asarray(quantized.scale, np.float64)
  assert s.shape == (4, 7, 1)
  np.testing.assert_allclose(s, np.abs(x).max(axis=-1, keepdims=True) / 127.5, rtol=1e-6)
  assert np.all(np.abs(x - qvalue * s) <= s * (0.5 + ROUNDING))


def _shift(targets: np.ndarray) -> np.ndarray:
  return np.pad(targets[:, :-1], ((0, 0), (1, 0)))


def test_quantized_models_score_decode_and_stay_close_to_float():
  model, batch = _model(T5), _enc_dec_batch()
  # The real initialisation: test_models' numpy draws (fan-in 2 on the query kernels) make the
  # attention nearly one-hot, a network so chaotic that any 1/255 weight change moves logits by 1.
  shapes = {name: value.shape for name, value in batch.items()}
  params = nn.unbox(jax.jit(lambda key: model.get_initial_variables(key, shapes))(
      jax.random.key(0))["params"])
  weight_only = quantized_model(model, "int8_weight_only")
  w8a8 = quantized_model(model, "w8a8")
  assert quantized_model(model, "none") is model
  float_score, weight_only_score = jax.jit(model.score_batch), jax.jit(weight_only.score_batch)
  float_scores = np.asarray(float_score(params, batch))
  # Weight-only is exactly the float network on the dequantized kernels q * s.
  dequantized = jax.tree.map(lambda x: x.array.qvalue * x.array.scale if hasattr(x, "array") else x,
                             jax.jit(weight_only.quantize_params)(params),
                             is_leaf=lambda x: hasattr(x, "array"))
  np.testing.assert_allclose(weight_only_score(params, batch), float_score(dequantized, batch),
                             rtol=1e-5)
  tokens = batch["decoder_loss_weights"].sum()
  for score in (weight_only_score, jax.jit(w8a8.score_batch)):
    # Per-token log-likelihoods move by 0.004 (weight-only) and 0.007 (W8A8) nats here.
    assert np.abs(np.asarray(score(params, batch)) - float_scores).sum() / tokens < 0.02
  # Decoding (KV cache, EncoderDecoder.encode/decode) runs the same quantized network: its
  # scores are the teacher-forced scores of the tokens it chose.
  decode_batch = {"encoder_input_tokens": batch["encoder_input_tokens"],
                  "decoder_target_tokens": np.zeros((2, 5), np.int32)}
  decoded, aux = jax.jit(weight_only.predict_batch_with_aux)(params, decode_batch)
  decoded = np.asarray(decoded)
  rescored = {"encoder_input_tokens": batch["encoder_input_tokens"],
              "decoder_target_tokens": decoded, "decoder_input_tokens": _shift(decoded),
              "decoder_loss_weights": (decoded > 0).astype(np.float32)}
  np.testing.assert_allclose(aux["scores"], weight_only_score(params, rescored), rtol=1e-5)


def test_module_path_selects_and_bad_settings_are_one_line():
  model, params = _model(T5), _params_for(T5)
  decoder_only = QuantizedModel(model, "int8_weight_only", module_path="decoder/.*")
  quantized = jax.eval_shape(decoder_only.quantize_params, params)
  assert not hasattr(quantized["encoder"]["layers_0"]["mlp"]["wo"]["kernel"], "array")
  assert hasattr(quantized["decoder"]["layers_0"]["mlp"]["wo"]["kernel"], "array")
  with pytest.raises(ValueError, match="matches no projection"):
    QuantizedModel(model, "w8a8", module_path="encoderr/.*").quantize_params(params)
  with pytest.raises(ValueError, match="use one of"):
    quantized_model(model, "int4")


def test_outlier_statistics_find_a_planted_outlier_dimension():
  """Norm outputs are ~N(0, 1) * scale: a scale of 50 on dim 3 of two of the seven Norm sites
  of a one-layer T5 (29% >= 25% of the sites) makes dim 3, and only it, an outlier."""
  config = dataclasses.replace(T5, num_encoder_layers=1, num_decoder_layers=1)
  params = jax.tree.map(np.array, _params_for(config))
  for norm in (params["encoder"]["layers_0"]["pre_mlp_layer_norm"],
               params["decoder"]["layers_0"]["pre_self_attention_layer_norm"]):
    norm["scale"][3] = 50.0
  batch = _enc_dec_batch()
  stats = quantization.outlier_statistics(_model(config), params, [batch, batch])
  assert stats["outliers/sites"] == 7
  assert stats["outliers/dims"] == 1
  assert stats["outliers/dim_fraction"] == 1 / config.emb_dim
  assert stats["outliers/max_abs"] > 6.0
  with pytest.raises(ValueError, match="scan_layers=False"):
    quantization.outlier_statistics(_model(T5_SCAN), _params_for(T5_SCAN), [batch])


def test_gin_switch_quantizes_eval_and_infer():
  gin.clear_config()
  try:
    gin_setup.parse(["models/mt5/tiny.gin", "runs/eval.gin", "quantization/w8a8.gin"],
                    ["MIXTURE_OR_TASK_NAME='udhr_span_corruption'", "MODEL_DIR='/tmp/unused'",
                     "TASK_FEATURE_LENGTHS={'inputs': 8, 'targets': 8}"])
    model = gin.query_parameter("evaluate.model").scoped_configurable_fn()
    assert isinstance(model, QuantizedModel) and model.scheme == "w8a8"
  finally:
    gin.clear_config()
