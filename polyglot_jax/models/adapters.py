"""Parameter-efficient adapters and their expert mixtures (Zadouri et al. 2023), hooked into
the attention and FFN blocks by `adapt_projection` / `adapt_activation`.

- IA3: `h' = l ⊙ h`, l initialised to ones, on keys, values (per head) and the FFN intermediate.
- MoV: `h' = (Σ_i p_i l_i) ⊙ h`, E IA3 vectors (all ones at init) mixed per token by a router.
- LoRA: `y = W x + (α/r) (x A) B`, A ~ N(0, 0.02), B = 0.
- MoLoRA: `y = W x + (α/r) Σ_i p_i (x A_i) B_i` on q, k, v, o and the FFN projections.

Every router reads the input of the projection its experts modify (d_model wide, as in the
paper's parameter counts), is computed in float32 and masks padding before its softmax (see
`routing`); a padded token's activation passes through unchanged. Adapter modules are named
`<site>_adapter` so one regex (`.*_adapter/.*`) selects every trainable parameter.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from polyglot_jax.models import routing
from polyglot_jax.models.config import AdapterConfig, TransformerConfig

Array = jax.Array

TRAINABLE_REGEX = r".*_adapter/.*"


def _route(module: nn.Module, config: AdapterConfig, router_inputs: Array, mask: Array
           ) -> routing.Gate:
  """Routes [batch, length, d] tokens over the module's experts and sows the statistics."""
  logits = routing.Router(config.num_experts, config.router_init_stddev, name="router")(
      router_inputs)  # [batch, length, E]
  gate = routing.gate(logits, mask, config.num_selected)
  routing.sow_statistics(module, logits, gate, mask)
  return gate


class ScaleAdapter(nn.Module):
  """IA3 (one scale vector) or MoV (a router-weighted mixture of scale vectors).

  Attributes:
    config: the adapter settings.
    axes: logical axes of the scaled trailing dims, e.g. ("kv_heads", "kv") or ("mlp",).
    param_dtype: storage dtype of the vectors.
  """

  config: AdapterConfig
  axes: tuple[str, ...]
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, router_inputs: Array, mask: Array) -> Array:
    """Scales h [batch, length, *dims]; the router reads [batch, length, d] `router_inputs`."""
    cfg = self.config
    dims = h.shape[2:]
    if not cfg.mixture:
      scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, self.axes),
                         dims, self.param_dtype)
      return h * jnp.asarray(scale, h.dtype)  # [batch, length, *dims]
    experts = self.param("experts", nn.with_logical_partitioning(
        nn.initializers.ones, ("expert",) + self.axes), (cfg.num_experts,) + dims,
                         self.param_dtype)
    gate = _route(self, cfg, router_inputs, mask)
    merged = jnp.einsum("ble,e...->bl...", gate.weights,
                        jnp.asarray(experts, jnp.float32))  # [batch, length, *dims]
    real = (mask > 0).reshape(mask.shape + (1,) * len(dims))  # [batch, length, 1...]
    merged = jnp.where(real, merged, 1.0)  # [batch, length, *dims]
    return h * merged.astype(h.dtype)  # [batch, length, *dims]


class LoraAdapter(nn.Module):
  """LoRA (one low-rank pair) or MoLoRA (a router-weighted mixture of pairs): returns the update
  (α/r) · Σ_i p_i (x A_i) B_i that is added to a projection's output.

  Attributes:
    config: the adapter settings.
    features: the projection's output dims, e.g. (heads, head_dim).
    in_axis: logical axis of the (flattened) projection input, e.g. "embed" or "joined_kv".
    out_axes: logical axes of `features`.
    dtype: compute dtype.
    param_dtype: storage dtype of A and B.
  """

  config: AdapterConfig
  features: tuple[int, ...]
  in_axis: str
  out_axes: tuple[str, ...]
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    """x [batch, length, *in] -> [batch, length, *features]."""
    cfg = self.config
    x = x.reshape(x.shape[:2] + (-1,))  # [batch, length, d_in]
    lead, lead_axes = ((cfg.num_experts,), ("expert",)) if cfg.mixture else ((), ())
    a = self.param("lora_a", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.lora_init_stddev), lead_axes + (self.in_axis, "rank")),
                   lead + (x.shape[-1], cfg.rank), self.param_dtype)
    b = self.param("lora_b", nn.with_logical_partitioning(
        nn.initializers.zeros, lead_axes + ("rank",) + self.out_axes),
                   lead + (cfg.rank,) + tuple(self.features), self.param_dtype)
    a, b = jnp.asarray(a, self.dtype), jnp.asarray(b, self.dtype)
    xc = jnp.asarray(x, self.dtype)  # [batch, length, d_in]
    if cfg.mixture:
      gate = _route(self, cfg, x, mask)
      xa = jnp.einsum("bld,edr->bler", xc, a)  # [batch, length, E, rank]
      xa = xa * gate.weights[..., None].astype(self.dtype)  # [batch, length, E, rank]
      update = jnp.einsum("bler,er...->bl...", xa, b)  # [batch, length, *features]
    else:
      xa = jnp.einsum("bld,dr->blr", xc, a)  # [batch, length, rank]
      update = jnp.einsum("blr,r...->bl...", xa, b)  # [batch, length, *features]
    return update * jnp.asarray(cfg.alpha / cfg.rank, self.dtype)


def adapt_projection(config: TransformerConfig, site: str, y: Array, x: Array,
                     mask: Array | None, in_axis: str, out_axes: tuple[str, ...],
                     name: str | None = None) -> Array:
  """`y` = W x plus the LoRA/MoLoRA update at `site`, if the config adapts it (call inside a
  compact method; `name` defaults to `<site>_adapter`)."""
  adapters = config.adapters
  if adapters is None or not adapters.adapts(site, low_rank=True):
    return y
  update = LoraAdapter(adapters, y.shape[2:], in_axis, out_axes, dtype=jnp.dtype(config.dtype),
                       param_dtype=jnp.dtype(config.param_dtype),
                       name=name or f"{site}_adapter")(x, routing.token_mask(mask, x))
  return y + update.astype(y.dtype)  # [batch, length, *features]


def adapt_activation(config: TransformerConfig, site: str, h: Array, router_inputs: Array,
                     mask: Array | None, axes: tuple[str, ...]) -> Array:
  """`h` scaled by the IA3/MoV adapter at `site`, if the config adapts it (call inside a compact
  method)."""
  adapters = config.adapters
  if adapters is None or not adapters.adapts(site, low_rank=False):
    return h
  return ScaleAdapter(adapters, axes, jnp.dtype(config.param_dtype), name=f"{site}_adapter")(
      h, router_inputs, routing.token_mask(mask, h))
