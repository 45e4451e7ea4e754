"""Architecture hyperparameters shared by every model family.

One frozen dataclass describes T5.1.1 / mT5 / umT5 encoder-decoders and Llama / Cohere decoders;
gin files under `gin/models/<family>/<size>.gin` bind its fields. Field names follow T5X
(`emb_dim`, `mlp_dim`, `head_dim`, ...) so T5X gin bindings translate line for line.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import gin

RematPolicy = Literal["none", "full", "dots", "dots_with_no_batch_dims", "save_attention_out"]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Dimensions and switches of one transformer.

  Attributes:
    vocab_size: rows of the token embedding (mT5: 250112, umT5: 256384).
    emb_dim: model width, `d_model`.
    num_heads: query heads.
    num_kv_heads: key/value heads for grouped-query attention; None means `num_heads`.
    head_dim: per-head width, `d_kv`.
    mlp_dim: hidden width of the feed-forward block, `d_ff`.
    num_encoder_layers: encoder depth (ignored by decoder-only models).
    num_decoder_layers: decoder depth.
    mlp_activations: one entry per input projection of the MLP; two entries make a gated MLP,
      e.g. ("gelu", "linear") for T5.1.1's gated-GELU and ("silu", "linear") for SwiGLU.
    dropout_rate: dropout on residual branches and attention weights while training.
    logits_via_embedding: tie the output projection to the token embedding.
    scale_tied_logits: T5 rescales tied logits by emb_dim**-0.5; Llama/Cohere do not.
    logit_scale: constant multiplier on the output logits (Cohere's `logit_scale`).
    position_embedding: "relative" (T5 bucketed bias) or "rope" (rotary, Llama/Cohere).
    relative_attention_num_buckets: T5 relative-position buckets.
    relative_attention_max_distance: T5 relative-position max distance.
    per_layer_relative_bias: umT5 learns a bias table per layer instead of one per stack.
    rope_theta: RoPE base frequency.
    rope_interleaved: Cohere rotates adjacent pairs (x0,x1),(x2,x3)...; Llama rotates halves.
    scale_attention: divide q·k by sqrt(head_dim) (Llama/Cohere); T5 folds it into the init.
    norm_type: "rms" (T5, Llama) or "layer" (Cohere: LayerNorm without bias).
    norm_epsilon: epsilon of the normalisation layers.
    parallel_block: Cohere's x + attn(norm(x)) + mlp(norm(x)) with one shared norm.
    dtype: compute dtype of activations ("bfloat16" on accelerators).
    param_dtype: storage dtype of parameters.
    scan_layers: run the layer stack with `nn.scan` (one compiled layer; params get a leading
      "layers" axis).
    remat_policy: activation rematerialisation per layer.
  """

  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 8
  num_kv_heads: int | None = None
  head_dim: int = 64
  mlp_dim: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  mlp_activations: tuple[str, ...] = ("gelu", "linear")
  dropout_rate: float = 0.0
  logits_via_embedding: bool = False
  scale_tied_logits: bool = True
  logit_scale: float = 1.0
  position_embedding: Literal["relative", "rope"] = "relative"
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  per_layer_relative_bias: bool = False
  rope_theta: float = 10000.0
  rope_interleaved: bool = False
  scale_attention: bool = False
  norm_type: Literal["rms", "layer"] = "rms"
  norm_epsilon: float = 1e-6
  parallel_block: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = False
  remat_policy: RematPolicy = "none"

  def __post_init__(self) -> None:
    kv = self.kv_heads
    if self.num_heads % kv:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={kv}; "
          "grouped-query attention needs whole groups.")
    if self.position_embedding not in ("relative", "rope"):
      raise ValueError(f"position_embedding={self.position_embedding!r}: use 'relative' or 'rope'.")
    if self.norm_type not in ("rms", "layer"):
      raise ValueError(f"norm_type={self.norm_type!r}: use 'rms' or 'layer'.")

  @property
  def kv_heads(self) -> int:
    """Number of key/value heads (GQA); equals num_heads for multi-head attention."""
    return self.num_kv_heads or self.num_heads
