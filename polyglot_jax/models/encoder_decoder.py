"""T5.1.1 / mT5 / umT5 encoder-decoder network.

Parameter names follow T5X: `token_embedder/embedding` (shared by both stacks),
`encoder/{relpos_bias, layers_{i}/{pre_attention_layer_norm, attention, pre_mlp_layer_norm, mlp},
encoder_norm}` and the decoder of `decoder.py`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from polyglot_jax.models import layers, moe
from polyglot_jax.models.attention import AttentionMask
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.models.decoder import Decoder

Array = jax.Array


class EncoderLayer(nn.Module):
  """One pre-norm encoder block: bidirectional self-attention, then MLP."""

  config: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, mask: AttentionMask, bias: Array | None, positions: Array,
               token_mask: Array) -> tuple[Array, None]:
    """Updates the [batch, length, embed] residual stream `x`.

    Args:
      x: encoder activations.
      mask: the bidirectional self-attention mask (segments, padding).
      bias: float32 [batch, heads, length, length] shared relative-position bias; None with
        RoPE or a per-layer bias.
      positions: [batch, length] token positions (RoPE, per-layer relative bias).
      token_mask: [batch, length] 1 on real tokens, 0 on padding (routers).
    Returns:
      (x, None), the nn.scan carry convention.
    """
    cfg = self.config
    drop = layers.make_dropout(cfg)
    if cfg.position_embedding == "relative" and cfg.per_layer_relative_bias:
      bias = layers.RelativePositionBias(  # the stack passes no shared bias then
          cfg, bidirectional=True, name="relpos_bias")(positions, positions)  # [b, h, l, l]
    h = layers.make_norm(cfg, "pre_attention_layer_norm")(x)  # [batch, length, embed]
    y = layers.Attention(cfg, name="attention")(h, h, bias, positions, self.deterministic,
                                                q_mask=token_mask, kv_mask=token_mask, mask=mask)
    x = x + drop(y, deterministic=self.deterministic)  # [batch, length, embed]
    h = layers.make_norm(cfg, "pre_mlp_layer_norm")(x)  # [batch, length, embed]
    y = moe.make_mlp(cfg)(h, token_mask, self.deterministic)  # [batch, length, embed]
    x = x + drop(y, deterministic=self.deterministic)  # [batch, length, embed]
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class Encoder(nn.Module):
  """Embedding (shared with the decoder), encoder layers and final norm."""

  config: TransformerConfig
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None, *, enable_dropout: bool = False) -> Array:
    """Encodes [batch, length] tokens into [batch, length, embed] activations."""
    cfg = self.config
    deterministic = not enable_dropout
    drop = layers.make_dropout(cfg)
    segments = layers.segments_or_padding(encoder_segment_ids, encoder_input_tokens,
                                          encoder_input_tokens)  # [batch, length]
    positions = layers.positions_or_arange(encoder_positions, encoder_input_tokens)  # [b, l]
    mask = AttentionMask(segments, segments)
    bias = None
    if cfg.position_embedding == "relative" and not cfg.per_layer_relative_bias:
      bias = layers.RelativePositionBias(
          cfg, bidirectional=True, name="relpos_bias")(positions, positions)  # [b, h, l, l]
    x = self.shared_embedding(encoder_input_tokens)  # [batch, length, embed]
    x = drop(x, deterministic=deterministic)  # [batch, length, embed]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    token_mask = (segments > 0).astype(jnp.float32)  # [batch, length]
    x = layers.stack_layers(EncoderLayer, cfg, cfg.num_encoder_layers, x, mask, bias, positions,
                            token_mask, deterministic=deterministic)
    x = layers.make_norm(cfg, "encoder_norm")(x)  # [batch, length, embed]
    x = drop(x, deterministic=deterministic)  # [batch, length, embed]
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class EncoderDecoder(nn.Module):
  """The full encoder-decoder; `encode` and `decode` are exposed for incremental decoding."""

  config: TransformerConfig

  def setup(self) -> None:
    self.token_embedder = layers.make_embed(self.config, "token_embedder")
    self.encoder = Encoder(self.config, shared_embedding=self.token_embedder)
    self.decoder = Decoder(self.config, shared_embedding=self.token_embedder)

  def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Array | None = None,
             encoder_positions: Array | None = None, *, enable_dropout: bool = False) -> Array:
    """[batch, enc_length] tokens -> [batch, enc_length, embed] encoder output."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                        enable_dropout=enable_dropout)

  def logits(self, y: Array) -> Array:
    """[batch, length, embed] final decoder activations -> [batch, length, vocab] logits."""
    return self.decoder.logits(y)

  def decode(self,
             encoded: Array | None,
             encoder_input_tokens: Array | None,
             decoder_input_tokens: Array,
             decoder_target_tokens: Array | None = None,
             encoder_segment_ids: Array | None = None,
             decoder_segment_ids: Array | None = None,
             decoder_positions: Array | None = None,
             *,
             enable_dropout: bool = False,
             decode: bool = False,
             prefill_lengths: Array | None = None) -> Array:
    """[batch, length] decoder inputs attending to `encoded` -> [batch, length, vocab] logits.

    `decode`/`prefill_lengths` drive the decoding cache (`Decoder.__call__`); decoding steps pass
    `encoded=None` and `encoder_input_tokens=None`: the prefill cached what they need.
    """
    encoder_segments = None
    if encoded is not None:
      encoder_segments = layers.segments_or_padding(encoder_segment_ids, encoder_input_tokens,
                                                    encoder_input_tokens)  # [batch, enc_length]
    return self.decoder(decoder_input_tokens, encoded, encoder_segments, decoder_target_tokens,
                        decoder_segment_ids, decoder_positions, enable_dropout=enable_dropout,
                        decode=decode, prefill_lengths=prefill_lengths)

  def __call__(self,
               encoder_input_tokens: Array,
               decoder_input_tokens: Array,
               decoder_target_tokens: Array | None = None,
               encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None,
               decoder_positions: Array | None = None,
               *,
               enable_dropout: bool = False) -> Array:
    """Teacher-forced [batch, length, vocab] logits (seqio EncDecFeatureConverter features)."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                          enable_dropout=enable_dropout)  # [batch, enc_length, embed]
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       encoder_segment_ids, decoder_segment_ids, decoder_positions,
                       enable_dropout=enable_dropout)
