"""Behaviour of the Flax networks and the T5X-style model API on tiny configs.

CPU compile time dominates: params are drawn with numpy (no init compile), forward passes go
through one cached `jax.jit` per config, and inputs are batched so each test compiles little.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polyglot_jax.models import decoding
from polyglot_jax.models import layers
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.models.model import DecoderOnlyModel, EncoderDecoderModel

EOS_ID = TransformerConfig().eos_token_ids[0]  # seqio/T5's EOS, the configs' default
# T5.1.1-like: relative bias, gated-GELU, untied logits.
T5 = TransformerConfig(vocab_size=32, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                       num_encoder_layers=2, num_decoder_layers=2,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16)
# Cohere-like: RoPE (interleaved), GQA, SwiGLU, LayerNorm, parallel block, tied + logit_scale.
COHERE = TransformerConfig(vocab_size=32, emb_dim=16, num_heads=4, num_kv_heads=2, head_dim=8,
                           mlp_dim=32, num_encoder_layers=0, num_decoder_layers=2,
                           mlp_activations=("silu", "linear"), position_embedding="rope",
                           rope_interleaved=True, scale_attention=True, norm_type="layer",
                           parallel_block=True, logits_via_embedding=True,
                           scale_tied_logits=False, logit_scale=0.5)
# One-layer variants for gradient tests: a backward pass doubles the graph XLA compiles.
T5_1 = dataclasses.replace(T5, num_encoder_layers=1, num_decoder_layers=1)
COHERE_1 = dataclasses.replace(COHERE, num_decoder_layers=1)
ENC_SHAPES = {"encoder_input_tokens": (2, 6), "decoder_input_tokens": (2, 5)}
DEC_SHAPES = {"decoder_input_tokens": (2, 8)}


@functools.cache
def _model(config: TransformerConfig, bidirectional: bool = False):
  if config.num_encoder_layers:
    return EncoderDecoderModel(config)
  return DecoderOnlyModel(config, inputs_bidirectional_attention=bidirectional)


def _abstract_params(config: TransformerConfig):
  """Boxed ShapeDtypeStructs of the params: tracing only, nothing is compiled or allocated."""
  shapes = ENC_SHAPES if config.num_encoder_layers else DEC_SHAPES
  init = functools.partial(_model(config).get_initial_variables, input_shapes=shapes)
  return jax.eval_shape(init, jax.random.key(0))["params"]


@functools.cache
def _params(config: TransformerConfig):
  """Random params with init-like scales, drawn with numpy (real inits compile slowly on CPU)."""
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if path[-1].key == "scale":
      return jnp.asarray(1.0 + 0.1 * noise)
    fan_in = leaf.shape[-2] if path[-1].key == "kernel" else 4
    return jnp.asarray(noise * fan_in**-0.5)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(_abstract_params(config)))


@functools.cache
def _apply(config: TransformerConfig):
  """jit-compiled `module.apply(params, *features)` of the config's network, no mesh context."""
  module = _model(config).module
  return jax.jit(lambda params, *args, **kwargs: module.apply({"params": params}, *args, **kwargs))


def _restack(tree):
  """Unscanned params (layers_{i}) -> the nn.scan layout (one `layers` subtree, leading axis)."""
  if not isinstance(tree, dict):
    return tree
  num = sum(key.startswith("layers_") for key in tree)
  out = {k: _restack(v) for k, v in tree.items() if not k.startswith("layers_")}
  if num:
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                 *[tree[f"layers_{i}"] for i in range(num)])
  return out


def _shift_right(targets: np.ndarray) -> np.ndarray:
  return np.concatenate([np.zeros((targets.shape[0], 1), np.int32), targets[:, :-1]], axis=1)


def _enc_dec_batch() -> dict[str, np.ndarray]:
  enc = np.array([[4, 9, 3, 7, 1, 0], [5, 6, 1, 0, 0, 0]], np.int32)
  targets = np.array([[8, 3, 5, 1, 0], [9, 2, 1, 0, 0]], np.int32)
  return {"encoder_input_tokens": enc, "decoder_input_tokens": _shift_right(targets),
          "decoder_target_tokens": targets,
          "decoder_loss_weights": (targets > 0).astype(np.float32)}


def _lm_batch() -> dict[str, np.ndarray]:
  targets = np.array([[4, 9, 3, 7, 12, 5, 1, 0], [5, 6, 8, 1, 0, 0, 0, 0]], np.int32)
  return {"decoder_input_tokens": _shift_right(targets), "decoder_target_tokens": targets,
          "decoder_loss_weights": (targets > 0).astype(np.float32),
          "decoder_causal_attention": np.array([[1, 1, 1, 0, 0, 0, 0, 0],
                                                [1, 1, 0, 0, 0, 0, 0, 0]], np.int32)}


def _paths(tree) -> dict[str, nn.LogicallyPartitioned]:
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


def test_param_tree_names_and_logical_axes():
  boxed = _paths(_abstract_params(T5))
  assert all(isinstance(x, nn.LogicallyPartitioned) and x.value.ndim == len(x.names)
             for x in boxed.values())
  expected = {
      "token_embedder/embedding": ("vocab", "embed"),
      "encoder/relpos_bias/rel_embedding": ("heads", "relpos_buckets"),
      "encoder/layers_1/pre_attention_layer_norm/scale": ("embed",),
      "encoder/layers_0/attention/query/kernel": ("embed", "heads", "kv"),
      "encoder/layers_0/attention/key/kernel": ("embed", "kv_heads", "kv"),
      "encoder/layers_0/attention/out/kernel": ("heads", "kv", "embed"),
      "encoder/layers_0/mlp/wi_0/kernel": ("embed", "mlp"),
      "encoder/layers_0/mlp/wi_1/kernel": ("embed", "mlp"),
      "encoder/layers_0/mlp/wo/kernel": ("mlp", "embed"),
      "encoder/layers_1/pre_mlp_layer_norm/scale": ("embed",),
      "encoder/encoder_norm/scale": ("embed",),
      "decoder/relpos_bias/rel_embedding": ("heads", "relpos_buckets"),
      "decoder/layers_1/pre_self_attention_layer_norm/scale": ("embed",),
      "decoder/layers_1/self_attention/query/kernel": ("embed", "heads", "kv"),
      "decoder/layers_1/pre_cross_attention_layer_norm/scale": ("embed",),
      "decoder/layers_1/encoder_decoder_attention/value/kernel": ("embed", "kv_heads", "kv"),
      "decoder/layers_1/pre_mlp_layer_norm/scale": ("embed",),
      "decoder/decoder_norm/scale": ("embed",),
      "decoder/logits_dense/kernel": ("embed", "vocab"),
  }
  for path, axes in expected.items():
    assert boxed[path].names == axes, path
  assert boxed["encoder/layers_0/attention/out/kernel"].value.shape == (2, 8, 16)

  scanned = _paths(_abstract_params(dataclasses.replace(COHERE, scan_layers=True)))
  assert all(x.value.ndim == len(x.names) for x in scanned.values())
  key = scanned["decoder/layers/self_attention/key/kernel"]
  assert key.names == ("layers", "embed", "kv_heads", "kv") and key.value.shape == (2, 16, 2, 8)
  assert "decoder/token_embedder/embedding" in scanned
  # Parallel block: one shared pre-norm; tied embeddings: no logits_dense.
  assert not any("pre_mlp_layer_norm" in p or "logits_dense" in p for p in scanned)


def test_initializers_follow_t5x():
  cfg = dataclasses.replace(T5, emb_dim=64, num_heads=4, head_dim=64)
  x = jnp.ones((1, 2, 64))

  @jax.jit
  def init(key):
    attention = layers.Attention(cfg).init(key, x, x, jnp.zeros((1, 1, 2, 2)))
    embed = layers.Embed(64, 64).init(key, jnp.zeros((1, 2), jnp.int32))
    norm = layers.Norm().init(key, x)
    return nn.unbox((attention, embed, norm))

  attention, embed, norm = init(jax.random.key(0))
  kernels = attention["params"]
  # T5X folds 1/sqrt(head_dim) into the query init when q.k is not rescaled.
  ratio = np.std(kernels["query"]["kernel"]) * 64**0.5 / np.std(kernels["key"]["kernel"])
  assert 0.95 < ratio < 1.05
  assert 0.95 < np.std(kernels["key"]["kernel"]) * 64**0.5 < 1.05  # fan_in 64
  assert 0.95 < np.std(kernels["out"]["kernel"]) * 256**0.5 < 1.05  # fan_in heads*kv
  assert 0.9 < np.std(embed["params"]["embedding"]) < 1.1
  np.testing.assert_array_equal(norm["params"]["scale"], np.ones(64))


def test_plain_apply_without_mesh_and_padding():
  batch = _enc_dec_batch()
  enc, dec = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
  logits = _apply(T5)(_params(T5), enc, dec)  # plain module.apply: no mesh, no rules
  assert logits.shape == (2, 5, T5.vocab_size) and logits.dtype == jnp.float32
  # Row 1 is padded (encoder 3 real tokens, decoder 3): its real logits equal an unpadded run.
  alone = _apply(T5)(_params(T5), enc[1:, :3], dec[1:, :3])
  np.testing.assert_allclose(logits[1, :3], alone[0], atol=1e-5)
  logits = _apply(COHERE)(_params(COHERE), _lm_batch()["decoder_input_tokens"])
  assert logits.shape == (2, 8, COHERE.vocab_size)


def test_packing_matches_separate_sequences():
  # Row 0 packs two examples; rows 1 and 2 hold each alone (padded to the same length).
  segments = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
  positions = np.array([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
  enc = np.array([[4, 9, 3, 5, 6, 0], [4, 9, 3, 0, 0, 0], [5, 6, 0, 0, 0, 0]])
  dec = np.array([[0, 8, 3, 0, 7, 0], [0, 8, 3, 0, 0, 0], [0, 7, 0, 0, 0, 0]])
  logits = _apply(T5)(_params(T5), enc, dec, None, segments, segments, positions, positions)
  np.testing.assert_allclose(logits[0, :3], logits[1, :3], atol=1e-5)
  np.testing.assert_allclose(logits[0, 3:5], logits[2, :2], atol=1e-5)

  segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 0, 0, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0, 0, 0]])
  positions = np.array([[0, 1, 2, 0, 1, 2, 3, 0]] + [list(range(8))] * 2)
  tokens = np.array([[0, 4, 9, 0, 5, 6, 2, 0], [0, 4, 9, 0, 0, 0, 0, 0],
                     [0, 5, 6, 2, 0, 0, 0, 0]])
  logits = _apply(COHERE)(_params(COHERE), tokens, decoder_segment_ids=segments,
                          decoder_positions=positions)
  np.testing.assert_allclose(logits[0, :3], logits[1, :3], atol=1e-5)
  np.testing.assert_allclose(logits[0, 3:7], logits[2, :4], atol=1e-5)


def test_prefix_lm_mask_is_bidirectional_exactly_within_prefix():
  causal_attention = jnp.array([[1, 1, 1, 0, 0]])
  mask = np.asarray(layers.decoder_self_mask(jnp.ones((1, 5), jnp.int32), causal_attention))[0, 0]
  i, j = np.indices((5, 5))
  np.testing.assert_array_equal(mask, (j <= i) | ((i < 3) & (j < 3)))

  # Row 0 of the batch has a 3-token prefix. Change a token inside it, then one after it.
  batch = _lm_batch()
  prefix = batch["decoder_causal_attention"]
  base = _apply(COHERE)(_params(COHERE), batch["decoder_input_tokens"],
                        decoder_causal_attention=prefix)[0]
  diffs = []
  for position in (2, 4):
    tokens = batch["decoder_input_tokens"].copy()
    tokens[0, position] = 20
    logits = _apply(COHERE)(_params(COHERE), tokens, decoder_causal_attention=prefix)[0]
    diffs.append(np.abs(logits - base).max(axis=-1))  # [length]
  inside, after = diffs
  assert inside[0] > 1e-4 and inside[1] > 1e-4  # earlier prefix positions see position 2
  assert after[:4].max() == 0 and after[4] > 1e-4  # strictly causal after the prefix


@pytest.mark.parametrize("config", [T5, COHERE], ids=["t5", "cohere"])
def test_scan_equals_unscanned(config):
  scanned = dataclasses.replace(config, scan_layers=True)
  scanned_params = _restack(_params(config))
  assert jax.tree.structure(scanned_params) == jax.tree.structure(
      nn.unbox(_abstract_params(scanned)))
  if config.num_encoder_layers:
    inputs = (_enc_dec_batch()["encoder_input_tokens"], _enc_dec_batch()["decoder_input_tokens"])
  else:
    inputs = (_lm_batch()["decoder_input_tokens"],)
  np.testing.assert_allclose(_apply(scanned)(scanned_params, *inputs),
                             _apply(config)(_params(config), *inputs), atol=1e-5)


@functools.cache
def _loss_and_grads(config: TransformerConfig):
  model = _model(config)
  params = _restack(_params(COHERE_1)) if config.scan_layers else _params(COHERE_1)
  return jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, _lm_batch(), None)[0]))(params)


@pytest.mark.parametrize("policy, scan", [("full", False), ("save_attention_out", True)])
def test_remat_keeps_outputs_and_grads(policy, scan):
  loss, grads = _loss_and_grads(COHERE_1)
  remat_loss, remat_grads = _loss_and_grads(
      dataclasses.replace(COHERE_1, scan_layers=scan, remat_policy=policy))
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  grads = _restack(grads) if scan else grads
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), remat_grads, grads)


def test_bfloat16_compute_with_float32_params():
  config = dataclasses.replace(T5, dtype="bfloat16", param_dtype="float32")
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(_abstract_params(config))))
  logits = _apply(config)(_params(T5), _enc_dec_batch()["encoder_input_tokens"],
                          _enc_dec_batch()["decoder_input_tokens"])
  assert logits.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(logits)))
  reference = _apply(T5)(_params(T5), _enc_dec_batch()["encoder_input_tokens"],
                         _enc_dec_batch()["decoder_input_tokens"])
  assert np.abs(np.asarray(logits, np.float32) - reference).max() < 0.1 * np.abs(reference).max()


def test_loss_fn_gradients_finite_and_dropout():
  model = _model(dataclasses.replace(T5_1, dropout_rate=0.3))
  params, batch = _params(T5_1), _enc_dec_batch()
  # An "rbg" key: threefry dropout masks make this tiny graph slow to compile on CPU.
  (loss, sums), grads = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))(
      params, batch, jax.random.key(1, impl="rbg"))
  assert np.isfinite(loss) and sums["num_tokens"] == 7
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["token_embedder"]["embedding"]).sum()) > 0
  evaluate = jax.jit(lambda p, b: (model.eval_fn(p, b), model.score_batch(p, b, True)))
  (eval_loss, eval_sums), (scores, intermediates) = evaluate(params, batch)
  assert eval_loss != loss and evaluate(params, batch)[0][0] == eval_loss  # dropout needs an rng
  # score_batch is the negated per-sequence cross-entropy (z-loss is reported separately).
  assert scores.shape == (2,)
  np.testing.assert_allclose(-scores.sum(), eval_sums["cross_ent_loss"], rtol=1e-5)
  assert intermediates["decoder"]["pre_logits"][0].shape == (2, 5, T5.emb_dim)


def _toy_logits(tokens):
  """A fake model: the next token is the current one + 2, and EOS after token 4."""
  nxt = jnp.where(tokens == 4, EOS_ID, tokens + 2)  # [batch, length]
  return jax.nn.one_hot(nxt, 32) * 10.0  # [batch, length, vocab]


def test_decode_loop_stops_at_eos_and_pads():
  prompt = jnp.array([[0, 0, 0, 0, 0, 0], [0, 5, 0, 0, 0, 0]])  # row 1's prompt is (0, 5)
  start = jnp.array([0, 1])
  toy = decoding.recompute_step(_toy_logits, prompt, start, (EOS_ID,), 0)
  out, scores = decoding.sample(toy, None, decoding.DecoderParams())
  # Row 0 stops at EOS and is 0-padded; row 1 never emits EOS and fills length - start tokens.
  np.testing.assert_array_equal(out, [[2, 4, EOS_ID, 0, 0, 0], [7, 9, 11, 13, 15, 0]])
  assert scores.shape == (2,) and bool(jnp.all(scores <= 0))
  hot, _ = decoding.sample(toy, jax.random.key(0), decoding.DecoderParams(temperature=100.0))
  assert not np.array_equal(hot, out)  # sampling at a high temperature leaves the greedy path


def _reference_greedy(logits_fn, prompt: np.ndarray, start: np.ndarray) -> np.ndarray:
  """Python-loop argmax decoding, recomputing the full prefix each step; row b emits the
  prediction at positions start[b], start[b] + 1, ... until EOS."""
  tokens = prompt.copy()
  batch, length = tokens.shape
  out = np.zeros_like(tokens)
  for row in range(batch):
    for step in range(length - start[row]):
      position = start[row] + step
      token = int(np.argmax(logits_fn(tokens)[row, position]))
      out[row, step] = token
      if token == EOS_ID:
        break
      if position + 1 < length:
        tokens[row, position + 1] = token
  return out


def test_predict_batch_matches_python_greedy_loop():
  batch = _enc_dec_batch()
  tokens, aux = jax.jit(_model(T5).predict_batch_with_aux)(_params(T5), batch)
  assert tokens.shape == (2, 5) and aux["scores"].shape == (2,)
  logits_fn = lambda dec: _apply(T5)(_params(T5), batch["encoder_input_tokens"], dec)
  expected = _reference_greedy(logits_fn, np.zeros((2, 5), np.int32), np.zeros(2, np.int32))
  np.testing.assert_array_equal(tokens, expected)

  batch = _lm_batch()
  prefix = batch["decoder_causal_attention"]
  tokens = jax.jit(_model(COHERE, bidirectional=True).predict_batch)(_params(COHERE), batch)
  logits_fn = lambda dec: _apply(COHERE)(_params(COHERE), dec, decoder_causal_attention=prefix)
  expected = _reference_greedy(logits_fn, batch["decoder_input_tokens"] * prefix,
                               prefix.sum(axis=1) - 1)
  np.testing.assert_array_equal(tokens, expected)


def test_initial_variables_under_eval_shape_xxl():
  config = TransformerConfig(vocab_size=250112, emb_dim=4096, num_heads=64, head_dim=64,
                             mlp_dim=10240, num_encoder_layers=24, num_decoder_layers=24,
                             dtype="bfloat16", scan_layers=True)
  model = EncoderDecoderModel(config)
  shapes = {"encoder_input_tokens": (8, 512), "decoder_input_tokens": (8, 128)}
  abstract = jax.eval_shape(functools.partial(model.get_initial_variables, input_shapes=shapes),
                            jax.random.key(0))
  kernel = abstract["params"]["encoder"]["layers"]["attention"]["query"]["kernel"]
  assert isinstance(kernel, nn.LogicallyPartitioned)
  assert isinstance(kernel.value, jax.ShapeDtypeStruct)
  assert kernel.value.shape == (24, 4096, 64, 64) and kernel.value.dtype == jnp.float32
  count = sum(x.size for x in jax.tree.leaves(nn.unbox(abstract["params"])))
  assert 12.5e9 < count < 13.5e9  # mT5-XXL has ~13B parameters
