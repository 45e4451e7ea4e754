"""Fused attention kernels and the chunked cross-entropy against their references.

Every kernel is checked against `einsum` (the model's reference attention) on CPU, the Pallas ones
(flash, splash) in interpret mode: outputs on real query rows and gradients of q, k, v and the
bias, with padding, packing, causal, PrefixLM and sliding-window masks, GQA and a T5-style bias.
Then tiny models end to end (loss, gradients, cached decoding), a sharded mesh, and a compile for
a TPU v4 topology when libtpu is installed. Pallas tiles need lengths that are multiples of 128,
so the shapes are [2, 128] with few heads; each (case, kernel) compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decoding import _cached_teacher_forced
from test_models import COHERE, T5, _model, _params

from polyglot_jax.models import attention, losses
from polyglot_jax.models.attention import AttentionMask
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.models.model import DecoderOnlyModel
from polyglot_jax.parallel import partitioning

HEADS, KV_HEADS, HEAD_DIM, LENGTH = 4, 2, 16, 128
# Row 0 packs two sequences and ends in padding; row 1 is one sequence with a little padding.
SEGMENTS = np.array([[1] * 50 + [2] * 60 + [0] * 18, [1] * 120 + [0] * 8], np.int32)
# PrefixLM prefixes open each packed sequence, as seqio's PrefixLM feature converter makes them.
PREFIX = np.zeros_like(SEGMENTS)
PREFIX[0, :20], PREFIX[0, 50:70], PREFIX[1, :40] = 1, 1, 1
ENCODER_SEGMENTS = np.array([[1] * 100 + [2] * 120 + [0] * 36, [1] * 256], np.int32)
WINDOW = 40


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention problem: mask kind, GQA, bias, and the kernels that can express it."""

  kernels: tuple[str, ...]
  causal: bool = False
  prefix: bool = False
  window: int | None = None
  bias: bool = False
  kv_heads: int = HEADS
  cross: bool = False  # queries attend to a 256-long memory with its own segments


CASES = {
    "bidirectional_t5_bias": Case(("dot_product", "flash"), bias=True),
    "causal_t5_bias": Case(("dot_product", "flash"), causal=True, bias=True),
    "cross_attention": Case(("dot_product", "flash", "splash"), cross=True),
    "causal_gqa": Case(("dot_product", "flash", "splash"), causal=True, kv_heads=KV_HEADS),
    "prefix_lm_gqa": Case(("dot_product", "splash"), causal=True, prefix=True,
                          kv_heads=KV_HEADS),
    "sliding_window_gqa": Case(("dot_product", "splash"), causal=True, window=WINDOW,
                               kv_heads=KV_HEADS),
}


def _inputs(case: Case, batch: int = 2) -> tuple[dict[str, np.ndarray], AttentionMask]:
  """q, k, v, bias and the output cotangent (zero on padding queries) with the case's mask."""
  rng = np.random.default_rng(0)
  rows = np.arange(batch) % 2
  q_segments = SEGMENTS[rows]
  kv_segments = ENCODER_SEGMENTS[rows] if case.cross else q_segments
  kv_length = kv_segments.shape[1]
  arrays = {
      "q": rng.standard_normal((batch, LENGTH, HEADS, HEAD_DIM)),
      "k": rng.standard_normal((batch, kv_length, case.kv_heads, HEAD_DIM)),
      "v": rng.standard_normal((batch, kv_length, case.kv_heads, HEAD_DIM)),
      "bias": rng.standard_normal((batch, HEADS, LENGTH, kv_length)) if case.bias else None,
      "cotangent": rng.standard_normal((batch, LENGTH, HEADS, HEAD_DIM))
                   * (q_segments > 0)[:, :, None, None],
  }
  arrays = {name: None if x is None else np.asarray(x, np.float32) for name, x in arrays.items()}
  mask = AttentionMask(jnp.asarray(q_segments), jnp.asarray(kv_segments),
                       jnp.asarray(PREFIX[rows]) if case.prefix else None, causal=case.causal,
                       window=case.window)
  return arrays, mask


def _attend_and_grads(kernel: str, arrays: dict[str, np.ndarray | None], mask: AttentionMask):
  """(output, grads of <output, cotangent> w.r.t. q, k, v[, bias]) of one kernel, jitted."""

  @jax.jit
  def run(q, k, v, bias, cotangent, mask):
    def attend(q, k, v, bias):
      return attention.attend(q, k, v, bias, mask, kernel=kernel, interpret=True)

    out, vjp = jax.vjp(attend, q, k, v, bias)
    return out, vjp(cotangent)

  return run(arrays["q"], arrays["k"], arrays["v"], arrays["bias"], arrays["cotangent"], mask)


@functools.cache
def _einsum_reference(name: str):
  arrays, mask = _inputs(CASES[name])
  return _attend_and_grads("einsum", arrays, mask)


def _assert_close(actual, expected, what: str, relative: float = 5e-6) -> None:
  """max |actual - expected| <= relative * max |expected|: f32 round-off of a reordered sum."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  error, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert error <= relative * scale, f"{what}: max error {error:.2e} vs scale {scale:.2e}"


def _assert_matches(result, reference, real: np.ndarray, what: str) -> None:
  """Outputs on real query rows and every gradient agree to f32 round-off."""
  (out, grads), (ref_out, ref_grads) = result, reference
  _assert_close(np.asarray(out)[real], np.asarray(ref_out)[real], f"{what}: output")
  for name, grad, ref in zip(("q", "k", "v", "bias"), grads, ref_grads):
    if ref is not None:
      _assert_close(grad, ref, f"{what}: d{name}")


@pytest.mark.parametrize("name,kernel", [(name, kernel) for name, case in CASES.items()
                                         for kernel in case.kernels])
def test_kernel_equals_einsum(name, kernel):
  arrays, mask = _inputs(CASES[name])
  result = _attend_and_grads(kernel, arrays, mask)
  _assert_matches(result, _einsum_reference(name), SEGMENTS > 0, f"{kernel} on {name}")


def test_kernels_refuse_what_they_cannot_express():
  arrays, mask = _inputs(CASES["sliding_window_gqa"])
  q, k, v = arrays["q"], arrays["k"], arrays["v"]
  bias = np.zeros((2, HEADS, LENGTH, LENGTH), np.float32)
  checks = [
      ("flash", None, mask, "cannot express a sliding window; use 'splash'"),
      ("flash", None, dataclasses.replace(mask, window=None, prefix=mask.q_segments),
       "cannot express a PrefixLM mask; use 'splash'"),
      ("splash", bias, dataclasses.replace(mask, window=None), "takes no additive bias"),
      ("splash", None, dataclasses.replace(mask, prefix=mask.q_segments),
       "cannot combine a PrefixLM mask with a sliding window"),
  ]
  for kernel, b, m, message in checks:
    with pytest.raises(ValueError, match=message):
      attention.attend(q, k, v, b, m, kernel=kernel, interpret=True)
  with pytest.raises(ValueError, match="multiples of 128, got 64"):
    attention.attend(q[:, :64], k[:, :64], v[:, :64], None, None, kernel="splash")
  with pytest.raises(ValueError, match="cannot apply dropout"):
    attention.attend(q, k, v, None, None, kernel="flash", dropout=lambda w: w)
  with partitioning.Partitioner(partitioning.MeshConfig(data=-1)).activate():
    with pytest.raises(ValueError, match="interpret mode runs on one device only"):
      attention.attend(q, k, v, None, None, kernel="flash", interpret=True)
  # On CPU `auto` is the einsum reference; it picks Pallas kernels only for TPUs (see below).
  assert attention.resolve_kernel("auto", has_bias=True, mask=None, q_length=128,
                                  kv_length=128, dropout=False) == "einsum"
  for field, value in [("attention_kernel", "xla"), ("sliding_window", 0),
                       ("loss_chunk_size", -1)]:
    with pytest.raises(ValueError, match=field):
      TransformerConfig(**{field: value})


def test_sharded_splash_equals_unsharded():
  """Splash under a data 2 x fsdp 2 x tensor 2 mesh (batch over data x fsdp, heads over tensor,
  via the model's logical-axis rules) and without a mesh, on a batch of 4. (flash shards the
  same way, compiled for a TPU below; its CPU interpret mode is one-device only.)"""
  kernel = "splash"
  arrays, mask = _inputs(CASES["prefix_lm_gqa"], batch=4)
  plain = _attend_and_grads(kernel, arrays, mask)
  partitioner = partitioning.Partitioner(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
  with partitioner.activate():
    specs = {"q": ("batch", "length", "heads", "kv"), "k": ("batch", "length", "kv_heads", "kv"),
             "v": ("batch", "length", "kv_heads", "kv"), "bias": ("batch", "heads", None, None),
             "cotangent": ("batch", "length", "heads", "kv")}
    placed = {key: None if x is None else jax.device_put(x, partitioner.sharding(specs[key]))
              for key, x in arrays.items()}
    sharded = _attend_and_grads(kernel, placed, mask)
    traced = jax.make_jaxpr(functools.partial(attention.attend, kernel=kernel, interpret=True))(
        placed["q"], placed["k"], placed["v"], None, mask)
  assert "shard_map" in str(traced)
  assert sharded[0].sharding.spec[0] == ("data", "fsdp", "expert")
  np.testing.assert_allclose(sharded[0], plain[0], rtol=1e-6, atol=1e-6)
  for grad, ref in zip(sharded[1], plain[1]):
    if ref is not None:
      np.testing.assert_allclose(grad, ref, rtol=1e-6, atol=1e-6)


# Tiny models whose sequences fit the Pallas tiles (one layer each: gradients double the graph).
T5_128 = dataclasses.replace(T5, num_encoder_layers=1, num_decoder_layers=1,
                             attention_interpret=True)
PREFIX_LM_128 = dataclasses.replace(COHERE, num_decoder_layers=1, attention_interpret=True)
WINDOW_128 = dataclasses.replace(COHERE, num_decoder_layers=1, parallel_block=False,
                                 sliding_window=WINDOW, attention_interpret=True)
MODELS = {"t5": (T5_128, ("dot_product", "flash")),
          "prefix_lm": (PREFIX_LM_128, ("dot_product", "splash")),
          "sliding_window": (WINDOW_128, ("splash",))}


def _model_batch(config: TransformerConfig) -> dict[str, np.ndarray]:
  """A packed, padded [2, 128] batch (for T5 the encoder gets one too)."""
  rng = np.random.default_rng(1)
  targets = rng.integers(2, config.vocab_size, SEGMENTS.shape).astype(np.int32) * (SEGMENTS > 0)
  positions = np.concatenate([np.arange(50), np.arange(60), np.zeros(18)])[None].astype(np.int32)
  positions = np.concatenate([positions, np.arange(128)[None] * (SEGMENTS[1:] > 0)])
  inputs = np.where(positions == 0, 0, np.roll(targets, 1, axis=1)) * (SEGMENTS > 0)
  batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
           "decoder_loss_weights": (SEGMENTS > 0).astype(np.float32),
           "decoder_segment_ids": SEGMENTS, "decoder_positions": positions}
  if config.num_encoder_layers:
    encoder = rng.integers(2, config.vocab_size, SEGMENTS.shape).astype(np.int32)
    batch.update({"encoder_input_tokens": encoder * (SEGMENTS > 0),
                  "encoder_segment_ids": SEGMENTS, "encoder_positions": positions})
  elif config is PREFIX_LM_128:
    batch["decoder_causal_attention"] = PREFIX
  return batch


def _loss_model(config: TransformerConfig):
  if config.num_encoder_layers:
    return _model(config)
  return DecoderOnlyModel(config, inputs_bidirectional_attention=config is PREFIX_LM_128)


@functools.cache
def _loss_and_grads(config: TransformerConfig, kernel: str):
  model = _loss_model(dataclasses.replace(config, attention_kernel=kernel))
  params = _params(config)
  loss_fn = jax.jit(jax.value_and_grad(
      lambda p: model.loss_fn(p, _model_batch(config), None), has_aux=True))
  return loss_fn(params)


@pytest.mark.parametrize("name,kernel", [(name, kernel) for name, (_, kernels) in MODELS.items()
                                         for kernel in kernels])
def test_model_loss_and_grads_equal_einsum(name, kernel):
  config = MODELS[name][0]
  (loss, sums), grads = _loss_and_grads(config, kernel)
  (ref_loss, ref_sums), ref_grads = _loss_and_grads(config, "einsum")
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_array_equal(sums["correct"], ref_sums["correct"])
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    ref = functools.reduce(lambda tree, key: tree[key.key], path, ref_grads)
    _assert_close(grad, ref, jax.tree_util.keystr(path), relative=2e-5)  # measured <= 4e-6


@pytest.mark.parametrize("name,kernel", [("t5", "flash"), ("prefix_lm", "splash"),
                                         ("sliding_window", "splash")])
def test_cached_decoding_equals_uncached(name, kernel):
  """The prefill runs the kernel over the whole buffer, the steps run einsum on the cache; the
  logits equal a teacher-forced forward pass with the same kernel."""
  config = dataclasses.replace(MODELS[name][0], attention_kernel=kernel)
  params, steps = _params(MODELS[name][0]), 3
  rng = np.random.default_rng(2)
  full = rng.integers(2, config.vocab_size, (2, LENGTH)).astype(np.int32)
  if config.num_encoder_layers:
    model, start = _model(config), np.zeros(2, np.int32)
    full[:, 0] = 0
    encoder = _model_batch(config)["encoder_input_tokens"]
    batch = {"encoder_input_tokens": encoder, "decoder_target_tokens": np.zeros_like(full)}
    reference = model.module.apply({"params": params}, encoder, full)
  else:
    prefix = (np.arange(LENGTH)[None] < np.array([[5], [9]])).astype(np.int32)
    model = DecoderOnlyModel(config, inputs_bidirectional_attention=name == "prefix_lm")
    start = prefix.sum(1) - 1
    batch = {"decoder_input_tokens": full * prefix, "decoder_causal_attention": prefix,
             "decoder_target_tokens": full * prefix}
    reference = model.module.apply({"params": params}, full, decoder_causal_attention=(
        prefix if name == "prefix_lm" else None))
  rows = np.arange(2)
  slots = start[:, None] + 1 + np.arange(steps)[None]  # [batch, steps]
  first, logits = _cached_teacher_forced(model, params, batch, full[rows[:, None], slots])
  np.testing.assert_allclose(first, reference[rows, start], rtol=1e-5, atol=2e-5)
  for step in range(steps):
    np.testing.assert_allclose(logits[step], reference[rows, slots[:, step]], rtol=1e-5,
                               atol=2e-5, err_msg=f"step {step}")


def _chunked_and_full(chunk_size: int, factor: losses.LossNormalizer):
  rng = np.random.default_rng(3)
  pre_logits = jnp.asarray(rng.standard_normal((3, 37, 16)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((16, 50)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 50, (3, 37)), jnp.int32)
  weights = jnp.asarray(rng.random((3, 37)) < 0.8, jnp.float32).at[2].set(0.0)
  settings = dict(z_loss=1e-3, label_smoothing=0.1, loss_normalizing_factor=factor)

  def full(y, w):
    return losses.cross_entropy_loss(y @ w, targets, weights, **settings)

  def chunked(y, w):
    return losses.chunked_cross_entropy_loss(y, lambda chunk: chunk @ w, targets, weights,
                                             chunk_size=chunk_size, **settings)

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
  return grad(chunked)(pre_logits, kernel), grad(full)(pre_logits, kernel)


@pytest.mark.parametrize("chunk_size,factor", [(8, losses.NUM_REAL_TARGET_TOKENS),
                                               (37, losses.AVERAGE_PER_SEQUENCE)])
def test_chunked_cross_entropy_equals_full(chunk_size, factor):
  ((loss, sums), grads), ((ref_loss, ref_sums), ref_grads) = _chunked_and_full(chunk_size, factor)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for name in ref_sums:
    np.testing.assert_allclose(sums[name], ref_sums[name], rtol=1e-6, err_msg=name)
  for grad, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("config", [T5, COHERE], ids=["t5_untied", "cohere_tied_scaled"])
def test_model_chunked_loss_equals_full_and_never_materialises_logits(config):
  rng = np.random.default_rng(4)
  vocab = 512
  config = dataclasses.replace(config, vocab_size=vocab, num_encoder_layers=min(
      config.num_encoder_layers, 1), num_decoder_layers=1)
  targets = rng.integers(1, vocab, (2, 24)).astype(np.int32)
  batch = {"decoder_input_tokens": targets, "decoder_target_tokens": targets,
           "decoder_loss_weights": (rng.random((2, 24)) < 0.9).astype(np.float32)}
  if config.num_encoder_layers:
    batch["encoder_input_tokens"] = targets
  params = _params(config)
  results, programs = [], []
  for chunk in (0, 5):
    model = _loss_model(dataclasses.replace(config, loss_chunk_size=chunk))
    step = jax.jit(jax.value_and_grad(lambda p, m=model: m.loss_fn(p, batch, None),
                                      has_aux=True))
    programs.append(step.lower(params).compile().as_text())
    results.append(step(params))
  ((loss, sums), grads), ((ref_loss, ref_sums), ref_grads) = results
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for name in ref_sums:
    np.testing.assert_allclose(sums[name], ref_sums[name], rtol=1e-6, err_msg=name)
  for grad, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-7)
  whole = (f"f32[2,24,{vocab}]", f"f32[48,{vocab}]")  # [batch, length, vocab] or flattened
  assert any(shape in programs[0] for shape in whole)
  assert not any(shape in programs[1] for shape in whole)
  assert f"f32[2,5,{vocab}]" in programs[1]  # one chunk's logits


def test_fused_kernels_compile_for_a_tpu_v4_topology():
  """Tiny T5 (auto -> flash) and PrefixLM (auto -> splash) train-step gradients compile for a
  TPU v4 2x2x1 slice from this host, sharded data 2 x tensor 2, with the Mosaic kernels in."""
  pytest.importorskip("libtpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu
  from jax.experimental import topologies
  devices = topologies.get_topology_desc(
      platform="tpu", topology_name="v4:2x2x1", chip_config_name="megacore",
      chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
  partitioner = partitioning.Partitioner(partitioning.MeshConfig(data=2, tensor=2), devices)
  window = AttentionMask(jnp.ones((2, LENGTH)), jnp.ones((2, LENGTH)), causal=True, window=WINDOW)
  for config in (T5_128, PREFIX_LM_128):
    config = dataclasses.replace(config, attention_kernel="auto", attention_interpret=False,
                                 dtype="bfloat16")
    model = _loss_model(config)
    batch = _model_batch(MODELS["t5"][0] if config.num_encoder_layers else PREFIX_LM_128)
    boxed = jax.eval_shape(functools.partial(
        model.get_initial_variables, input_shapes={k: v.shape for k, v in batch.items()}),
        jax.random.key(0))["params"]
    param_shardings = partitioner.shardings(partitioning.logical_axes(boxed))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.unbox(boxed), param_shardings)
    features = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=partitioner.batch_sharding)
                for k, v in batch.items()}
    with partitioner.activate():
      kernels = [attention.resolve_kernel("auto", has_bias=bool(config.num_encoder_layers),
                                          mask=mask, q_length=LENGTH, kv_length=LENGTH,
                                          dropout=False) for mask in (None, window)]
      compiled = jax.jit(jax.grad(lambda p, b: model.loss_fn(p, b, None)[0])).lower(
          abstract, features).compile()
    # A sliding window: flash cannot express it (einsum); splash can.
    assert kernels == (["flash", "einsum"] if config.num_encoder_layers else ["splash"] * 2)
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') >= 3
