"""Decoding with the KV cache: cached == uncached, samplers, beam search vs brute force.

Tiny configs, params drawn with numpy (test_models' helpers), one jit per decoding setup.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_models import COHERE, T5, _abstract_params, _model, _params, _restack

from polyglot_jax.models import decoding
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.models.model import DecoderOnlyModel
from polyglot_jax.parallel import partitioning

EOS_ID = TransformerConfig().eos_token_ids[0]  # the configs' default (seqio/T5)

# Llama-like: RoPE on halves, GQA, SwiGLU, RMSNorm, untied logits.
LLAMA = TransformerConfig(vocab_size=32, emb_dim=16, num_heads=4, num_kv_heads=2, head_dim=8,
                          mlp_dim=32, num_encoder_layers=0, num_decoder_layers=2,
                          mlp_activations=("silu", "linear"), position_embedding="rope",
                          scale_attention=True)
UMT5_SCAN = dataclasses.replace(T5, per_layer_relative_bias=True, scan_layers=True)
COHERE_SCAN = dataclasses.replace(COHERE, scan_layers=True)

# Decoder-only prompts (BOS 0 + inputs) of lengths 2, 4 and 3, left-aligned in an [3, 8] buffer.
PROMPTS = np.array([[0, 5, 0, 0, 0, 0, 0, 0], [0, 7, 3, 9, 0, 0, 0, 0], [0, 4, 4, 0, 0, 0, 0, 0]],
                   np.int32)
PREFIX = (np.arange(8)[None] < np.array([[2], [4], [3]])).astype(np.int32)


def _lm_prompt_batch(rows: slice = slice(None)) -> dict[str, np.ndarray]:
  return {"decoder_input_tokens": PROMPTS[rows], "decoder_causal_attention": PREFIX[rows],
          "decoder_target_tokens": PROMPTS[rows]}


def _enc_batch(decode_length: int) -> dict[str, np.ndarray]:
  enc = np.array([[4, 9, 3, 7, 1, 0], [5, 2, 1, 0, 0, 0]], np.int32)
  return {"encoder_input_tokens": enc,
          "decoder_target_tokens": np.zeros((2, decode_length), np.int32)}


def _params_for(config: TransformerConfig):
  """Test params of `config`; scanned configs reuse their unscanned twin's, restacked."""
  if config.scan_layers:
    return _restack(_params(dataclasses.replace(config, scan_layers=False)))
  return _params(config)


@functools.partial(jax.jit, static_argnums=0)
def _cached_teacher_forced(model, params, batch, teacher):
  """Prefill logits [batch, vocab] and per-step logits [steps, batch, vocab] feeding `teacher`."""
  start = model.decoding_start(params, batch)

  def body(state, token):
    logits, state = start.step_fn(token, state)  # [batch, vocab]
    return state, logits

  _, logits = jax.lax.scan(body, start.state, teacher.T)
  return start.logits, logits


@pytest.mark.parametrize("config", [T5, UMT5_SCAN, COHERE, COHERE_SCAN],
                         ids=["t5", "umt5_scan", "cohere_prefixlm", "cohere_scan"])
def test_cached_logits_equal_teacher_forced(config):
  params = _params_for(config)
  if config.num_encoder_layers:
    model, length = _model(config), 5
    batch = _enc_batch(length)
    full = np.array([[0, 8, 3, 5, 9], [0, 9, 2, 6, 4]], np.int32)  # BOS + teacher tokens
    start = np.zeros(2, np.int32)
    reference = model.module.apply({"params": params}, batch["encoder_input_tokens"], full)
  else:
    prefix_lm = config is COHERE
    model = DecoderOnlyModel(config, inputs_bidirectional_attention=prefix_lm)
    batch = _lm_prompt_batch()
    full = PROMPTS + (1 - PREFIX) * np.arange(10, 18)[None]  # prompts, then teacher tokens
    start = PREFIX.sum(1) - 1
    reference = model.module.apply({"params": params}, full,
                                   decoder_causal_attention=PREFIX if prefix_lm else None)
  rows = np.arange(full.shape[0])
  steps = full.shape[1] - 1 - start.min()
  slots = np.minimum(start[:, None] + 1 + np.arange(steps)[None], full.shape[1] - 1)  # [b, s]
  first, logits = _cached_teacher_forced(model, params, batch, full[rows[:, None], slots])
  np.testing.assert_allclose(first, reference[rows, start], atol=2e-5)
  for step in range(steps):
    valid = start + 1 + step < full.shape[1]  # rows still inside the buffer
    np.testing.assert_allclose(logits[step][valid], reference[rows, slots[:, step]][valid],
                               atol=2e-5, err_msg=f"step {step}")


@functools.cache
def _predict(config: TransformerConfig, decoder_params: tuple = (), all_decodes: bool = False):
  model = _model(config) if config.num_encoder_layers else DecoderOnlyModel(config)
  return jax.jit(functools.partial(model.predict_batch_with_aux, decoder_params=dict(
      decoder_params), return_all_decodes=all_decodes))


def test_mixed_prompt_lengths_equal_each_prompt_alone_and_uncached():
  params = _params(LLAMA)
  tokens, aux = _predict(LLAMA)(params, _lm_prompt_batch())
  uncached, uncached_aux = _predict(LLAMA, (("use_cache", False),))(params, _lm_prompt_batch())
  np.testing.assert_array_equal(tokens, uncached)
  np.testing.assert_allclose(aux["scores"], uncached_aux["scores"], rtol=1e-5)
  for row in range(3):
    alone, _ = _predict(LLAMA)(params, _lm_prompt_batch(slice(row, row + 1)))
    np.testing.assert_array_equal(alone[0], tokens[row])
  limits = 8 - PREFIX.sum(1) + 1  # each row emits at most length - prompt length + 1 tokens
  assert all(np.all(tokens[row, limits[row]:] == 0) for row in range(3))


def test_sampling_top_k_top_p_and_determinism():
  params, batch = _params(LLAMA), _lm_prompt_batch()
  greedy, _ = _predict(LLAMA)(params, batch)
  top1, _ = _predict(LLAMA, (("temperature", 1.0), ("top_k", 1)))(params, batch,
                                                                     jax.random.key(3))
  np.testing.assert_array_equal(top1, greedy)

  sample = _predict(LLAMA, (("temperature", 2.0), ("num_decodes", 4)), True)
  tokens, aux = sample(params, batch, jax.random.key(0))
  assert tokens.shape == (3, 4, 8) and aux["scores"].shape == (3, 4)
  np.testing.assert_array_equal(sample(params, batch, jax.random.key(0))[0], tokens)
  assert not np.array_equal(sample(params, batch, jax.random.key(1))[0], tokens)
  assert np.all(np.diff(aux["scores"], axis=1) <= 0)  # best first
  for row in np.asarray(tokens).reshape(-1, 8):  # 0-padded after EOS
    eos = np.flatnonzero(row == EOS_ID)
    assert not eos.size or np.all(row[eos[0] + 1:] == 0)

  # Every first token drawn with top_p lies in the nucleus of the first-step distribution.
  first_logits = jax.jit(lambda p, b: DecoderOnlyModel(LLAMA).decoding_start(p, b).logits)
  probs = np.asarray(jax.nn.softmax(first_logits(params, batch) / 2.0))  # [batch, vocab]
  nucleus = _predict(LLAMA, (("temperature", 2.0), ("top_p", 0.5), ("num_decodes", 16)), True)
  first = np.asarray(nucleus(params, batch, jax.random.key(2))[0][:, :, 0])  # [batch, 16]
  for row in range(3):
    order = np.argsort(-probs[row])
    size = np.searchsorted(np.cumsum(probs[row][order]), 0.5) + 1
    assert set(first[row]) <= set(order[:size]), (row, first[row], order[:size])


def test_filter_logits_nucleus_and_top_k():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
  kept = np.isfinite(decoding.filter_logits(logits, 0, 0.7))
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [0, 0, 1, 1]])
  kept = np.isfinite(decoding.filter_logits(logits, 3, 0.95))
  np.testing.assert_array_equal(kept, [[1, 1, 1, 0], [0, 1, 1, 1]])


def _chain_logits(tokens):
  """A fake model: the next token is the current one + 2, except 4 -> 9 and 7 -> 1 -> 12."""
  nxt = jnp.select([tokens == 4, tokens == 7, tokens == 1], [9, 1, 12], tokens + 2)  # [b, l]
  return jax.nn.one_hot(nxt, 32) * 20.0  # [batch, length, vocab]


@pytest.mark.parametrize("settings", [decoding.DecoderParams(),
                                      decoding.DecoderParams(temperature=0.5),
                                      decoding.DecoderParams(beam_size=2, alpha=0.0)],
                         ids=["greedy", "sampling", "beam_search"])
def test_rows_end_at_any_eos_id_and_are_filled_with_the_pad_id(settings):
  # EOS ids 9 and 12 (not seqio's 1, which is an ordinary token here), pad id 3.
  prompt = jnp.array([[0, 0, 0, 0, 0, 0], [0, 5, 0, 0, 0, 0], [0, 13, 0, 0, 0, 0]])
  start = decoding.recompute_step(_chain_logits, prompt, jnp.array([0, 1, 1]), (9, 12), 3)
  tokens, _ = jax.jit(lambda rng: decoding.decode(start, rng, settings))(jax.random.key(0))
  np.testing.assert_array_equal(tokens[:, 0], [[2, 4, 9, 3, 3, 3], [7, 1, 12, 3, 3, 3],
                                               [15, 17, 19, 21, 23, 3]])


def _brute_force(params, batch, config, length, alpha):
  """Every output (tokens after EOS zeroed) with its length-normalised score, best first."""
  apply = jax.jit(_model(config).module.apply)
  sequences = np.array(list(itertools.product(range(config.vocab_size), repeat=length)))
  results = []
  for row in range(batch["encoder_input_tokens"].shape[0]):
    enc = np.repeat(batch["encoder_input_tokens"][row:row + 1], len(sequences), axis=0)
    dec = np.concatenate([np.zeros((len(sequences), 1), np.int32), sequences[:, :-1]], axis=1)
    log_probs = jax.nn.log_softmax(apply({"params": params}, enc, dec))
    token_lp = np.take_along_axis(np.asarray(log_probs), sequences[..., None], -1)[..., 0]
    outputs = {}
    for seq, lp in zip(sequences, token_lp):
      n = next((i + 1 for i, t in enumerate(seq) if t == EOS_ID), length)
      out = tuple(seq[:n]) + (0,) * (length - n)
      outputs[out] = lp[:n].sum() / decoding.length_penalty(n, alpha)
    results.append(sorted(outputs.items(), key=lambda item: -item[1]))
  return results


def test_beam_search_equals_brute_force_on_tiny_vocab():
  # vocab 6, 3 tokens: 75 beams keep every candidate (2k >= 25 live prefixes x 6 tokens).
  config = dataclasses.replace(UMT5_SCAN, vocab_size=6)
  params, batch, alpha = _params_for(config), _enc_batch(3), 0.8
  batch["encoder_input_tokens"] = batch["encoder_input_tokens"] % 6
  settings = (("beam_size", 75), ("num_decodes", 4), ("alpha", alpha))
  tokens, aux = _predict(config, settings, True)(params, batch)
  for row, expected in enumerate(_brute_force(params, batch, config, 3, alpha)):
    np.testing.assert_array_equal(tokens[row], [seq for seq, _ in expected[:4]])
    np.testing.assert_allclose(aux["scores"][row], [s for _, s in expected[:4]], rtol=1e-5)


def test_beam_search_on_a_sharded_mesh_equals_one_device():
  # batch over (data, fsdp), heads and kv_heads over tensor: the cache and its beam reordering
  # are sharded.
  partitioner = partitioning.Partitioner(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
  params, batch = _params(LLAMA), _lm_prompt_batch(slice(0, 2))
  batch = {k: np.concatenate([v, v[::-1]]) for k, v in batch.items()}  # 4 rows
  model = DecoderOnlyModel(LLAMA)
  shardings = partitioner.shardings(partitioning.logical_axes(_abstract_params(LLAMA)))
  predict = functools.partial(model.predict_batch_with_aux,
                              decoder_params={"beam_size": 2, "num_decodes": 2},
                              return_all_decodes=True)
  expected = jax.jit(predict)(params, batch)
  with partitioner.activate():
    sharded = jax.jit(predict, in_shardings=(shardings, partitioner.batch_sharding))(
        jax.device_put(params, shardings), partitioner.shard_batch(batch))
  np.testing.assert_array_equal(sharded[0], expected[0])
  np.testing.assert_allclose(sharded[1]["scores"], expected[1]["scores"], rtol=1e-5)


def test_rank_classification_picks_the_likeliest_choice():
  model, params = _model(T5), _params(T5)
  enc = np.repeat(np.array([[4, 9, 3, 1], [5, 2, 1, 0]], np.int32), 3, axis=0)  # 2 x 3 choices
  targets = np.array([[8, 1, 0], [3, 5, 1], [9, 1, 0]] * 2, np.int32)
  batch = {"encoder_input_tokens": enc, "decoder_target_tokens": targets,
           "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
           "decoder_loss_weights": (targets > 0).astype(np.float32)}
  score = jax.jit(model.score_batch)
  predictions, scores = decoding.rank_classification(score, params, batch, 3)
  np.testing.assert_array_equal(scores, np.asarray(score(params, batch)).reshape(2, 3))
  np.testing.assert_array_equal(predictions, np.argmax(scores, axis=1))


def test_encoder_decoder_decoder_prompt_is_forced_then_continued_greedily():
  """`prompt_with_targets` (T5X): the nonzero decoder inputs after BOS are a forced prefix; the
  outputs continue it exactly like token-by-token greedy decoding of the full sequence."""
  model = _model(T5)
  params = _params(T5)
  enc = np.array([[4, 9, 3, 7, 1, 0], [5, 2, 1, 0, 0, 0], [6, 6, 1, 0, 0, 0]], np.int32)
  length = 7
  dec_in = np.zeros((3, length), np.int32)
  dec_in[0, 1:3] = [8, 3]
  dec_in[1, 1] = 9  # row 2: no prefix, plain decoding from BOS
  batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
           "decoder_target_tokens": np.zeros((3, length), np.int32)}
  want = np.zeros((3, length), np.int32)
  for row in range(3):
    prefix = [int(t) for t in dec_in[row, 1:] if t]
    seq, outs = [0] + prefix, []
    while len(seq) <= length and len(prefix) + len(outs) < length and EOS_ID not in outs:
      buf = np.zeros((1, length), np.int32)
      buf[0, :len(seq)] = seq
      logits = model.module.apply({"params": params}, enc[row:row + 1], buf)
      outs.append(int(np.argmax(logits[0, len(seq) - 1])))
      seq.append(outs[-1])
    want[row, :len(outs)] = outs
  for use_cache in (True, False):
    got = model.predict_batch(params, batch, decoder_params={"use_cache": use_cache},
                              prompt_with_targets=True)
    np.testing.assert_array_equal(got, want, err_msg=f"use_cache={use_cache}")
  np.testing.assert_array_equal(model.predict_batch(params, batch)[2], want[2])
