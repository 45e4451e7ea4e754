"""Decoder stack (shared by both model families) and the decoder-only network (Llama, Cohere).

The same `Decoder` serves as the T5 decoder (shared embedding, cross-attention to the encoder,
causal relative-position bias) and as a decoder-only LM (own `token_embedder`, RoPE, SwiGLU,
GQA, Cohere's parallel block, PrefixLM via `decoder_causal_attention`). Parameter names follow
T5X: `decoder/{token_embedder, layers_{i}, relpos_bias, decoder_norm, logits_dense}`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from polyglot_jax.models import layers, moe
from polyglot_jax.models.attention import AttentionMask
from polyglot_jax.models.config import TransformerConfig

Array = jax.Array


class DecoderLayer(nn.Module):
  """One pre-norm decoder block: self-attention, optional cross-attention, MLP.

  With `config.parallel_block` (Cohere) the MLP reads the same normalised input as the
  self-attention and both are added to the residual: x + attn(norm(x)) + mlp(norm(x)).
  """

  config: TransformerConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x: Array, encoded: Array | None, self_mask: AttentionMask,
               self_bias: Array | None, cross_mask: AttentionMask | None, positions: Array,
               key_positions: Array, token_mask: Array,
               encoder_mask: Array | None) -> tuple[Array, None]:
    """Updates the [batch, length, embed] residual stream `x`.

    Args:
      x: decoder activations.
      encoded: [batch, enc_length, embed] encoder output; None for decoder-only models and for
        decoding steps, which read the cached cross-attention keys/values.
      self_mask: the causal (PrefixLM, sliding-window) self-attention mask.
      self_bias: float32 [batch, heads, length, kv_length] shared relative-position bias; None
        with RoPE or a per-layer bias.
      cross_mask: the cross-attention mask; None without cross-attention.
      positions: [batch, length] token positions (RoPE, per-layer relative bias, cache slots).
      key_positions: [batch, kv_length] positions of the self-attention keys (= `positions`,
        except in decoding steps where the keys are the whole cache).
      token_mask: [batch, length] 1 on real decoder tokens, 0 on padding (routers).
      encoder_mask: [batch, enc_length] 1 on real encoder tokens; None when `encoded` is None.
    Returns:
      (x, None), the nn.scan carry convention.
    """
    cfg = self.config
    drop = layers.make_dropout(cfg)
    if cfg.position_embedding == "relative" and cfg.per_layer_relative_bias:
      self_bias = layers.RelativePositionBias(  # the stack passes no shared bias then
          cfg, bidirectional=False, name="relpos_bias")(positions, key_positions)  # [b,h,l,kv]
    h = layers.make_norm(cfg, "pre_self_attention_layer_norm")(x)  # [batch, length, embed]
    y = layers.Attention(cfg, name="self_attention")(
        h, h, self_bias, positions, self.deterministic, self.decode, q_mask=token_mask,
        kv_mask=token_mask, mask=self_mask)  # [batch, length, embed]
    x = x + drop(y, deterministic=self.deterministic)  # [batch, length, embed]
    if cross_mask is not None:
      g = layers.make_norm(cfg, "pre_cross_attention_layer_norm")(x)  # [batch, length, embed]
      y = layers.Attention(cfg, name="encoder_decoder_attention")(
          g, encoded, None, None, self.deterministic, self.decode, q_mask=token_mask,
          kv_mask=encoder_mask, mask=cross_mask)  # [batch, length, embed]
      x = x + drop(y, deterministic=self.deterministic)  # [batch, length, embed]
    if not cfg.parallel_block:
      h = layers.make_norm(cfg, "pre_mlp_layer_norm")(x)  # [batch, length, embed]
    y = moe.make_mlp(cfg)(h, token_mask, self.deterministic)  # [batch, length, embed]
    x = x + drop(y, deterministic=self.deterministic)  # [batch, length, embed]
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class Decoder(nn.Module):
  """Embedding, decoder layers, final norm and output logits.

  Attributes:
    config: the architecture.
    shared_embedding: the encoder-decoder's shared `token_embedder`; None creates this decoder's
      own `token_embedder` (decoder-only models).
  """

  config: TransformerConfig
  shared_embedding: nn.Module | None = None

  def setup(self) -> None:
    # The embedder and output projection live here so that `logits` can run on its own.
    cfg = self.config
    if self.shared_embedding is None:
      self.token_embedder = layers.make_embed(cfg, "token_embedder")
    if not cfg.logits_via_embedding:
      self.logits_dense = layers.DenseGeneral((cfg.vocab_size,), ("embed", "vocab"),
                                              **layers.dtype_kwargs(cfg))

  def _embedder(self) -> nn.Module:
    return self.token_embedder if self.shared_embedding is None else self.shared_embedding

  def logits(self, y: Array) -> Array:
    """Output projection of final [batch, length, embed] activations -> [b, length, vocab]."""
    cfg = self.config
    if cfg.logits_via_embedding:
      logits = self._embedder().attend(y)  # [batch, length, vocab]
      if cfg.scale_tied_logits:
        logits = logits * cfg.emb_dim**-0.5  # [batch, length, vocab]
    else:
      logits = self.logits_dense(y)  # [batch, length, vocab]
    if cfg.logit_scale != 1.0:
      logits = logits * cfg.logit_scale  # [batch, length, vocab]
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

  @nn.compact
  def __call__(self,
               decoder_input_tokens: Array,
               encoded: Array | None = None,
               encoder_segments: Array | None = None,
               decoder_target_tokens: Array | None = None,
               decoder_segment_ids: Array | None = None,
               decoder_positions: Array | None = None,
               decoder_causal_attention: Array | None = None,
               *,
               enable_dropout: bool = False,
               decode: bool = False,
               prefill_lengths: Array | None = None) -> Array:
    """Returns [batch, length, vocab] logits for [batch, length] decoder input tokens.

    Decoding (T5X-style, `decode=True`, 'cache' mutable) runs in two phases. Prefill
    (`prefill_lengths` given): `decoder_input_tokens` is the whole [batch, cache_length] buffer,
    each row's prompt left-aligned; this pass creates the cache (keys/values of every slot, the
    projected encoder output) and returns [batch, 1, vocab] logits after each row's prompt (only
    there: a full [batch, length, vocab] would be large). Steps (`prefill_lengths`
    None): one [batch, 1] token per row goes into slot `cache_index` (= the row's prompt length,
    then +1 per step) and attends to the slots up to it; `encoded` and `encoder_segments` are then
    None, read from the cache. Every cache leaf is per row, so beam search can reorder rows.

    Args:
      decoder_input_tokens: shifted-right targets (or the prompt while decoding).
      encoded: [batch, enc_length, embed] encoder output; None for decoder-only models.
      encoder_segments: [batch, enc_length] encoder segment ids or 1/0 padding indicator; given
        iff the decoder cross-attends (encoder-decoder models; cached while decoding).
      decoder_target_tokens: marks padding (0) when segment ids are absent, as in T5X.
      decoder_segment_ids: packed segment ids, 0 on padding.
      decoder_positions: positions restarting in each packed segment; default arange.
      decoder_causal_attention: PrefixLM's 1-on-prefix indicator; None for a causal decoder.
      enable_dropout: apply dropout (training).
      decode: use and update the 'cache' collection (see above).
      prefill_lengths: [batch] prompt lengths; marks the prefill call while decoding.
    """
    cfg = self.config
    deterministic = not enable_dropout
    drop = layers.make_dropout(cfg)
    if decode and prefill_lengths is None:
      segments, positions, key_positions, self_mask = self._step_positions()
      encoder_segments = self.get_variable("cache", "encoder_segments")  # [b, enc_len] | None
    else:
      segments = layers.segments_or_padding(decoder_segment_ids, decoder_target_tokens,
                                            decoder_input_tokens)  # [batch, length]
      positions = layers.positions_or_arange(decoder_positions, decoder_input_tokens)  # [b, l]
      key_positions = positions  # [batch, length]
      self_mask = AttentionMask(segments, segments, decoder_causal_attention, causal=True,
                                window=cfg.sliding_window)
      if decode:
        self.put_variable("cache", "cache_index", prefill_lengths.astype(jnp.int32))  # [batch]
        self.put_variable("cache", "key_positions", key_positions)  # [batch, cache_length]
        if encoder_segments is not None:
          self.put_variable("cache", "encoder_segments", encoder_segments)  # [batch, enc_len]
    self_bias = None
    if cfg.position_embedding == "relative" and not cfg.per_layer_relative_bias:
      self_bias = layers.RelativePositionBias(
          cfg, bidirectional=False, name="relpos_bias")(positions, key_positions)  # [b,h,l,kv]
    cross_mask = None
    if encoder_segments is not None:
      cross_mask = AttentionMask(segments, encoder_segments)

    x = self._embedder()(decoder_input_tokens)  # [batch, length, embed]
    x = drop(x, deterministic=deterministic)  # [batch, length, embed]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    token_mask = (segments > 0).astype(jnp.float32)  # [batch, length]
    encoder_mask = None
    if encoded is not None:
      encoder_mask = (encoder_segments > 0).astype(jnp.float32)  # [batch, enc_length]
    x = layers.stack_layers(DecoderLayer, cfg, cfg.num_decoder_layers, x, encoded, self_mask,
                            self_bias, cross_mask, positions, key_positions, token_mask,
                            encoder_mask, deterministic=deterministic, decode=decode)
    y = layers.make_norm(cfg, "decoder_norm")(x)  # [batch, length, embed]
    y = drop(y, deterministic=deterministic)  # [batch, length, embed]
    self.sow("intermediates", "pre_logits", y)
    if decode and prefill_lengths is not None:
      last = (prefill_lengths - 1).astype(jnp.int32)[:, None, None]  # [batch, 1, 1]
      y = jnp.take_along_axis(y, last, axis=1)  # [batch, 1, embed]
    return self.logits(y)  # [batch, length, vocab]

  def _step_positions(self) -> tuple[Array, Array, Array, AttentionMask]:
    """(segments, positions, key_positions, self_mask) of one decoding step; advances the index.

    The step's token sits at slot `cache_index` and sees every slot up to it (within the sliding
    window): prompt slots hold the prefill's keys, later ones the earlier steps'.
    """
    index = self.get_variable("cache", "cache_index")  # [batch]
    if index is None:
      raise ValueError("Decoding step without a cache: call with decode=True and prefill_lengths "
                       "first (the prefill pass creates the cache).")
    key_positions = self.get_variable("cache", "key_positions")  # [batch, cache_length]
    positions = index[:, None]  # [batch, 1]
    self.put_variable("cache", "cache_index", index + 1)
    segments = jnp.ones_like(positions)  # [batch, 1]
    self_mask = AttentionMask(segments, jnp.ones_like(key_positions), q_offset=index, causal=True,
                              window=self.config.sliding_window)
    return segments, positions, key_positions, self_mask


class DecoderOnly(nn.Module):
  """Decoder-only LM (Llama, Cohere-Command, PrefixLM); all parameters live under `decoder/`."""

  config: TransformerConfig

  def setup(self) -> None:
    self.decoder = Decoder(self.config)

  def logits(self, y: Array) -> Array:
    """[batch, length, embed] final decoder activations -> [batch, length, vocab] logits."""
    return self.decoder.logits(y)

  def __call__(self,
               decoder_input_tokens: Array,
               decoder_target_tokens: Array | None = None,
               decoder_segment_ids: Array | None = None,
               decoder_positions: Array | None = None,
               decoder_causal_attention: Array | None = None,
               *,
               enable_dropout: bool = False,
               decode: bool = False,
               prefill_lengths: Array | None = None) -> Array:
    """Returns [batch, length, vocab] logits; see `Decoder.__call__` for the features and the
    decoding cache."""
    return self.decoder(
        decoder_input_tokens,
        decoder_target_tokens=decoder_target_tokens,
        decoder_segment_ids=decoder_segment_ids,
        decoder_positions=decoder_positions,
        decoder_causal_attention=decoder_causal_attention,
        enable_dropout=enable_dropout,
        decode=decode,
        prefill_lengths=prefill_lengths)
