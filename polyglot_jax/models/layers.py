"""Transformer building blocks shared by the encoder-decoder and decoder-only stacks.

Every parameter is created through `nn.with_logical_partitioning` with the logical axis names of
docs/design.md, and key activations carry `nn.with_logical_constraint`; both are no-ops unless the
partitioner activates a mesh and logical-axis rules. Parameters are stored in
`config.param_dtype` and cast to `config.dtype` at use; softmax and norm statistics run in f32.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from polyglot_jax.models import adapters, attention
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.models.routing import STATS_COLLECTION

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]

default_embed_init = nn.initializers.normal(stddev=1.0)
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
default_relpos_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")

# "gelu" is the tanh approximation: T5.1.1/mT5 were trained with it (HF calls it "gelu_new").
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "linear": lambda x: x,
}

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def dtype_kwargs(config: TransformerConfig) -> dict[str, jnp.dtype]:
  """The compute and storage dtypes of `config`, as module keyword arguments."""
  return {"dtype": jnp.dtype(config.dtype), "param_dtype": jnp.dtype(config.param_dtype)}


def _scaled(init: Initializer, factor: float) -> Initializer:
  """`init` multiplied by a constant (T5X folds 1/sqrt(head_dim) into the query init)."""

  def scaled_init(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
    return init(key, shape, dtype) * jnp.asarray(factor, dtype)

  return scaled_init


class DenseGeneral(nn.Module):
  """Bias-free projection of the trailing `num_in` input axes onto `features` (T5X DenseGeneral).

  The kernel keeps the multi-dimensional layout, e.g. [embed, heads, kv] for a query projection
  and [heads, kv, embed] for the output projection, so each axis gets its own logical name. It is
  initialised as the flattened [prod(in), prod(out)] matrix so fan-in counts every input axis.
  """

  features: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  num_in: int = 1
  kernel_init: Initializer = default_kernel_init
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    in_shape = inputs.shape[inputs.ndim - self.num_in:]
    flat_shape = (int(np.prod(in_shape)), int(np.prod(self.features)))

    def init(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
      return self.kernel_init(key, flat_shape, dtype).reshape(shape)

    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        tuple(in_shape) + tuple(self.features), self.param_dtype)
    kernel = jnp.asarray(kernel, self.dtype)  # [*in, *features]
    inputs = jnp.asarray(inputs, self.dtype)  # [..., *in]
    contract = (tuple(range(inputs.ndim - self.num_in, inputs.ndim)), tuple(range(self.num_in)))
    return jax.lax.dot_general(inputs, kernel, (contract, ((), ())))  # [..., *features]


class Embed(nn.Module):
  """Token embedding table; `attend` reuses it as the tied output projection."""

  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self) -> None:
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(default_embed_init, ("vocab", "embed")),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, tokens: Array) -> Array:
    """Looks up [batch, length] token ids."""
    table = jnp.asarray(self.embedding, self.dtype)  # [vocab, embed]
    return jnp.take(table, tokens, axis=0)  # [batch, length, embed]

  def attend(self, query: Array) -> Array:
    """Scores [batch, length, embed] against every embedding row."""
    table = jnp.asarray(self.embedding, self.dtype)  # [vocab, embed]
    query = jnp.asarray(query, self.dtype)  # [batch, length, embed]
    return jnp.einsum("ble,ve->blv", query, table)  # [batch, length, vocab]


class Norm(nn.Module):
  """RMSNorm (T5, Llama) or, with `kind="layer"`, Cohere's mean-subtracted LayerNorm without bias.

  Statistics and the scale multiply run in float32 whatever the compute dtype.
  """

  kind: str = "rms"
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)  # [batch, length, embed]
    if self.kind == "layer":
      x = x - jnp.mean(x, axis=-1, keepdims=True)  # [batch, length, embed]
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)  # [batch, length, 1]
    y = x * jax.lax.rsqrt(variance + self.epsilon)  # [batch, length, embed]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    return (y * jnp.asarray(scale, jnp.float32)).astype(self.dtype)  # [batch, length, embed]


def make_norm(config: TransformerConfig, name: str) -> Norm:
  """The configured norm layer (call inside a compact method)."""
  return Norm(kind=config.norm_type, epsilon=config.norm_epsilon, name=name, **dtype_kwargs(config))


def make_embed(config: TransformerConfig, name: str) -> Embed:
  """The token embedder named as in T5X."""
  return Embed(config.vocab_size, config.emb_dim, name=name, **dtype_kwargs(config))


def make_dropout(config: TransformerConfig) -> nn.Dropout:
  """Dropout with one mask shared along the length axis, as in T5X."""
  return nn.Dropout(rate=config.dropout_rate, broadcast_dims=(-2,))


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
  """Mesh-TF/T5 bucket of `relative_position` (= key position - query position).

  Half of the buckets hold exact small distances, the rest grow logarithmically up to
  `max_distance`; a bidirectional bias spends half of the buckets on each direction. The float
  arithmetic follows HF's order of operations so bucket boundaries agree exactly.
  """
  buckets = jnp.zeros_like(relative_position)  # [batch, q_length, kv_length]
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(relative_position.dtype) * num_buckets
    distance = jnp.abs(relative_position)  # [batch, q_length, kv_length]
  else:
    distance = jnp.maximum(-relative_position, 0)  # [batch, q_length, kv_length]
  max_exact = num_buckets // 2
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
      max_distance / max_exact)  # [batch, q_length, kv_length]
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative_position.dtype)
  large = jnp.minimum(large, num_buckets - 1)  # [batch, q_length, kv_length]
  return buckets + jnp.where(distance < max_exact, distance, large)  # [batch, q_length, kv_length]


class RelativePositionBias(nn.Module):
  """T5's learned bias per (head, bucketed relative position), computed from token positions."""

  config: TransformerConfig
  bidirectional: bool

  @nn.compact
  def __call__(self, q_positions: Array, kv_positions: Array) -> Array:
    """Returns a float32 [batch, heads, q_length, kv_length] bias from [batch, length] positions."""
    cfg = self.config
    relative = kv_positions[:, None, :] - q_positions[:, :, None]  # [batch, q_length, kv_length]
    buckets = relative_position_bucket(relative.astype(jnp.int32), self.bidirectional,
                                       cfg.relative_attention_num_buckets,
                                       cfg.relative_attention_max_distance)
    table = self.param("rel_embedding",
                       nn.with_logical_partitioning(default_relpos_init,
                                                    ("heads", "relpos_buckets")),
                       (cfg.num_heads, cfg.relative_attention_num_buckets),
                       jnp.dtype(cfg.param_dtype))
    bias = jnp.take(jnp.asarray(table, jnp.float32), buckets, axis=1)  # [heads, b, q, kv]
    return jnp.transpose(bias, (1, 0, 2, 3))  # [batch, heads, q_length, kv_length]


def apply_rope(x: Array, positions: Array, theta: float, interleaved: bool) -> Array:
  """Rotary position embedding of [batch, length, heads, head_dim] at [batch, length] positions.

  Rotates pairs of features by position * theta**(-2i/head_dim): adjacent pairs (x0,x1),(x2,x3)...
  when `interleaved` (Cohere), else the two halves (x_i, x_{i+d/2}) (Llama).
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [d/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, length, d/2]
  cos = jnp.cos(angles)[:, :, None, :]  # [batch, length, 1, d/2]
  sin = jnp.sin(angles)[:, :, None, :]  # [batch, length, 1, d/2]
  x = jnp.asarray(x, jnp.float32)  # [batch, length, heads, d]
  if interleaved:
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [batch, length, heads, d/2]
  else:
    x1, x2 = jnp.split(x, 2, axis=-1)  # [batch, length, heads, d/2]
  r1 = x1 * cos - x2 * sin  # [batch, length, heads, d/2]
  r2 = x2 * cos + x1 * sin  # [batch, length, heads, d/2]
  if interleaved:
    return jnp.stack([r1, r2], axis=-1).reshape(x.shape)  # [batch, length, heads, d]
  return jnp.concatenate([r1, r2], axis=-1)  # [batch, length, heads, d]


class Attention(nn.Module):
  """Dot-product attention for self- and cross-attention, MHA or grouped-query (GQA).

  Position information enters either as an additive bias (T5's relative bias, given by the
  caller) or as RoPE on q and k when `config.position_embedding == "rope"` and `positions` is
  given (self-attention). T5 does not scale q·k by 1/sqrt(head_dim) but folds it into the query
  init instead (`config.scale_attention=False`). The scores run on `config.attention_kernel`
  (see `attention.py`); single-token cached decoding steps always use the einsum kernel, which
  reads the cache as it is, so cached and uncached decoding agree with every kernel.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array | None, bias: Array | None,
               positions: Array | None = None, deterministic: bool = True,
               decode: bool = False, q_mask: Array | None = None,
               kv_mask: Array | None = None,
               mask: attention.AttentionMask | None = None) -> Array:
    """Attends [batch, q_length, embed] queries to [batch, kv_length, embed] memory.

    Args:
      inputs_q: query-side activations.
      inputs_kv: key/value-side activations (the same array for self-attention); None while
        decoding reads the cross-attention keys/values cached by an earlier call.
      bias: float32 additive bias broadcastable to [batch, heads, q_length, kv_length] (T5's
        relative-position bias), or None; while decoding, kv_length is the cache length.
      positions: [batch, q_length] positions of self-attention queries (RoPE, and the cache slots
        written while decoding); None for cross-attention.
      deterministic: disables dropout on the attention weights.
      decode: use the 'cache' collection (see `_cached_kv`).
      q_mask: [batch, q_length] 1 on real query tokens (adapter routers); None = all real.
      kv_mask: [batch, kv_length] 1 on real key/value tokens; None = all real.
      mask: which keys each query sees; None = all of them.
    """
    cfg = self.config
    dtypes = dtype_kwargs(cfg)
    query_init = default_kernel_init
    if not cfg.scale_attention:
      query_init = _scaled(default_kernel_init, cfg.head_dim**-0.5)
    q = DenseGeneral((cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv"),
                     kernel_init=query_init, name="query", **dtypes)(inputs_q)  # [b, q, heads, kv]
    q = adapters.adapt_projection(cfg, "query", q, inputs_q, q_mask, "embed", ("heads", "kv"))
    rope = cfg.position_embedding == "rope" and positions is not None
    if rope:
      q = apply_rope(q, positions, cfg.rope_theta, cfg.rope_interleaved).astype(q.dtype)
    if inputs_kv is None:
      k, v = self._cached_kv(None, None, None)  # [b, kv_length, kv_heads, kv] each
    else:
      k = self._key_or_value("key", inputs_kv, kv_mask)  # [b, kv_length, kv_heads, kv]
      v = self._key_or_value("value", inputs_kv, kv_mask)  # [b, kv_length, kv_heads, kv]
      if rope:
        k = apply_rope(k, positions, cfg.rope_theta, cfg.rope_interleaved).astype(k.dtype)
      if decode:
        k, v = self._cached_kv(k, v, positions)  # [b, cache_length, kv_heads, kv] each
    if cfg.scale_attention:
      q = q * jnp.asarray(cfg.head_dim**-0.5, q.dtype)  # [batch, q_length, heads, kv]
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "kv"))

    kernel = cfg.attention_kernel
    if decode and q.shape[1] == 1:
      kernel = "einsum"  # a cached decoding step: one query against the whole cache
    dropout = None
    if not deterministic and cfg.dropout_rate > 0.0:
      dropout = functools.partial(nn.Dropout(rate=cfg.dropout_rate), deterministic=False)
    out = attention.attend(q, k, v, bias, mask, kernel=kernel, interpret=cfg.attention_interpret,
                           dropout=dropout, dtype=dtypes["dtype"])  # [b, q_length, heads, kv]
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    projected = DenseGeneral((cfg.emb_dim,), ("heads", "kv", "embed"), num_in=2, name="out",
                             **dtypes)(out)  # [batch, q_length, embed]
    out = adapters.adapt_projection(cfg, "out", projected, out, q_mask, "joined_kv",
                                    ("embed",))  # [batch, q_length, embed]
    out = checkpoint_name(out, "attention_out")  # [batch, q_length, embed]
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))

  def _key_or_value(self, name: str, inputs_kv: Array, kv_mask: Array | None) -> Array:
    """The adapted key or value projection of [batch, kv_length, embed] `inputs_kv`."""
    cfg = self.config
    axes = ("kv_heads", "kv")
    y = DenseGeneral((cfg.kv_heads, cfg.head_dim), ("embed",) + axes, name=name,
                     **dtype_kwargs(cfg))(inputs_kv)  # [batch, kv_length, kv_heads, kv]
    y = adapters.adapt_projection(cfg, name, y, inputs_kv, kv_mask, "embed", axes)
    return adapters.adapt_activation(cfg, name, y, inputs_kv, kv_mask, axes)

  def _cached_kv(self, k: Array | None, v: Array | None,
                 positions: Array | None) -> tuple[Array, Array]:
    """Keys and values of the 'cache' collection (T5X-style decoding), updated by this call.

    Self-attention (`positions` given) writes this call's [batch, q_length, kv_heads, kv] keys and
    values into slots `positions` of a [batch, cache_length, kv_heads, kv] cache, which the first
    (prefill) call creates with its own length; writes past the end are dropped. Cross-attention
    (`positions` None) stores the projected encoder output once; with `k` None it reads it back.
    """
    if k is None:
      k, v = self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
      if k is None:
        raise ValueError(f"{self.name}: no cached keys; prefill the cache (decode=True with "
                         "the encoder output) before decoding steps.")
      return k, v
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    if positions is None:
      cached_k.value, cached_v.value = k, v
    else:
      rows = jnp.arange(k.shape[0])[:, None]  # [batch, 1]
      cached_k.value = cached_k.value.at[rows, positions].set(k, mode="drop")  # [b, cache, h, kv]
      cached_v.value = cached_v.value.at[rows, positions].set(v, mode="drop")  # [b, cache, h, kv]
    return cached_k.value, cached_v.value


class Mlp(nn.Module):
  """Feed-forward block; two activations make it gated (gated-GELU for T5.1.1, SwiGLU for Llama).

  One input projection per entry of `config.mlp_activations` (`wi` if there is one, else
  `wi_0`, `wi_1`, ...); their activated outputs are multiplied, then projected back by `wo`.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, token_mask: Array | None = None,
               deterministic: bool = True) -> Array:
    """[batch, length, embed] -> [batch, length, embed]; `token_mask` [batch, length] marks real
    tokens for adapter routers (None = all real)."""
    cfg = self.config
    dtypes = dtype_kwargs(cfg)
    branches = []
    for name, activation in zip(mlp_input_names(cfg), cfg.mlp_activations):
      h = DenseGeneral((cfg.mlp_dim,), ("embed", "mlp"), name=name, **dtypes)(x)  # [b, l, mlp]
      h = adapters.adapt_projection(cfg, "wi", h, x, token_mask, "embed", ("mlp",),
                                    name=f"{name}_adapter")  # [batch, length, mlp]
      branches.append(ACTIVATIONS[activation](h))
    h = functools.reduce(operator.mul, branches)  # [batch, length, mlp]
    h = adapters.adapt_activation(cfg, "mlp", h, x, token_mask, ("mlp",))  # [b, length, mlp]
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = make_dropout(cfg)(h, deterministic=deterministic)  # [batch, length, mlp]
    out = DenseGeneral((cfg.emb_dim,), ("mlp", "embed"), name="wo", **dtypes)(h)  # [b, l, embed]
    out = adapters.adapt_projection(cfg, "wo", out, h, token_mask, "mlp", ("embed",))
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))


def mlp_input_names(config: TransformerConfig) -> list[str]:
  """Names of the FFN input projections: `wi` for one activation, else `wi_0`, `wi_1`, ..."""
  activations = config.mlp_activations
  return ["wi"] if len(activations) == 1 else [f"wi_{i}" for i in range(len(activations))]


def segments_or_padding(segment_ids: Array | None, tokens: Array | None, like: Array) -> Array:
  """Segment ids for masking: given ones, else 1 on real tokens / 0 on padding (token 0).

  With neither (e.g. the decoder while predicting, where causality already hides the future),
  every position of `like` [batch, length] is one segment.
  """
  if segment_ids is not None:
    return segment_ids
  if tokens is not None:
    return (tokens != 0).astype(jnp.int32)  # [batch, length]
  return jnp.ones(like.shape, jnp.int32)  # [batch, length]


def positions_or_arange(positions: Array | None, like: Array) -> Array:
  """Given positions (they restart in each packed segment), else 0..length-1 for each row."""
  if positions is not None:
    return positions
  return jnp.broadcast_to(jnp.arange(like.shape[-1], dtype=jnp.int32), like.shape)  # [b, l]


def decoder_self_mask(segments: Array, causal_attention: Array | None) -> Array:
  """Causal self-attention mask, bidirectional among prefix positions (PrefixLM).

  Args:
    segments: [batch, length] segment ids (0 = padding).
    causal_attention: seqio's `decoder_causal_attention` [batch, length], 1 on the prefix; None
      for a purely causal decoder.
  Returns:
    bool [batch, 1, length, length].
  """
  return attention.AttentionMask(segments, segments, causal_attention, causal=True).dense()


def stack_layers(layer_cls: type[nn.Module], config: TransformerConfig, num_layers: int,
                 x: Array, *args: Any, **layer_kwargs: Any) -> Array:
  """Applies `num_layers` layers to the residual stream `x` (call inside a compact method).

  Unrolled layers are named `layers_{i}`; with `config.scan_layers` one `nn.scan`ned layer named
  `layers` holds every parameter with a leading axis named "layers". `config.remat_policy` wraps
  each layer in `nn.remat`. Layers are called as `layer(x, *args) -> (x, None)`, the nn.scan carry
  convention; `args` are broadcast to every layer. A scanned decoding cache gets the same leading
  layers axis; decoding (`decode=True` in `layer_kwargs`) skips remat, which only serves gradients.
  """
  if config.remat_policy != "none" and not layer_kwargs.get("decode", False):
    layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[config.remat_policy],
                         prevent_cse=not config.scan_layers)
  if config.scan_layers:
    scanned = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0, STATS_COLLECTION: 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * len(args), length=num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(config, name="layers", **layer_kwargs)(x, *args)
    return x
  for i in range(num_layers):
    x, _ = layer_cls(config, name=f"layers_{i}", **layer_kwargs)(x, *args)
  return x
