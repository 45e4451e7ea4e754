"""Routers shared by sparse MoE FFNs and parameter-efficient expert mixtures, and their losses.

A router maps each token's activation to a distribution over experts: `softmax(x · W_r)`, with
no bias, computed in float32. Padded tokens are masked *before* the softmax: they route to no
expert (all-zero weights, so they take no expert capacity and their activation passes through
unchanged) and are left out of every statistic. Each router sows, into the `router_stats`
collection, the quantities that `aux_losses` turns into training losses and metrics:

- load-balancing loss `E · Σ_e f_e · P_e` (Switch/GShard), where `P_e` is the mean router
  probability of expert e and `f_e` the fraction of routing slots it was given (top-k: the
  one-hot choices / k; soft merging: the weights themselves, so the loss is `E · Σ_e P_e²`);
- router z-loss `mean(logsumexp(logits)²)` (ST-MoE);
- per-expert load `f_e`, and for capacity-limited MoE the fraction of routing slots dropped.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

STATS_COLLECTION = "router_stats"


def token_mask(mask: Array | None, x: Array) -> Array:
  """The [batch, length] mask of real tokens of `x`; all ones when the caller has none
  (decoding steps, whose single tokens are always real)."""
  return jnp.ones(x.shape[:2], jnp.float32) if mask is None else mask


class Router(nn.Module):
  """Bias-free linear router in float32: [batch, length, d] -> [batch, length, experts] logits."""

  num_experts: int
  init_stddev: float = 0.02
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.normal(self.init_stddev), ("embed", "unmodeled")),
                        (x.shape[-1], self.num_experts), self.param_dtype)
    return jnp.einsum("bld,de->ble", jnp.asarray(x, jnp.float32),
                      jnp.asarray(kernel, jnp.float32))  # [batch, length, experts]


class Gate(NamedTuple):
  """The routing decision for [batch, length] tokens over E experts.

  Attributes:
    weights: [batch, length, E] combine weights; zero outside the selected experts and on padding.
    probs: [batch, length, E] router softmax (padding rows are uniform, never used).
    slots: [batch, length, E] share of each token's routing slots given to each expert (the
      `f` of the load-balancing loss); zero on padding.
    top_indices: [batch, length, k] selected experts, best first; None for soft merging.
  """
  weights: Array
  probs: Array
  slots: Array
  top_indices: Array | None


def gate(logits: Array, mask: Array, num_selected: int | None, renormalize: bool = True) -> Gate:
  """Token-choice gating: soft merge over all experts, or the top-k per token.

  Args:
    logits: [batch, length, E] float32 router logits.
    mask: [batch, length] 1 on real tokens, 0 on padding.
    num_selected: k, or None for soft merging (every expert, weighted by its probability).
    renormalize: rescale the k selected probabilities to sum to 1 when k > 1.
  """
  real = mask[..., None] > 0  # [batch, length, 1]
  num_experts = logits.shape[-1]
  probs = jax.nn.softmax(jnp.where(real, logits, 0.0), axis=-1)  # [batch, length, E]
  if num_selected is None:
    weights = jnp.where(real, probs, 0.0)  # [batch, length, E]
    return Gate(weights, probs, weights, None)
  top_probs, top_indices = jax.lax.top_k(probs, num_selected)  # [batch, length, k] each
  if renormalize and num_selected > 1:
    top_probs = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)  # [batch, length, k]
  chosen = jax.nn.one_hot(top_indices, num_experts, dtype=probs.dtype)  # [b, l, k, E]
  weights = jnp.where(real, jnp.einsum("blk,blke->ble", top_probs, chosen), 0.0)  # [b, l, E]
  slots = jnp.where(real, jnp.sum(chosen, axis=2) / num_selected, 0.0)  # [batch, length, E]
  return Gate(weights, probs, slots, top_indices)


def sow_statistics(module: nn.Module, logits: Array, routing: Gate, mask: Array,
                   dropped_fraction: Array | None = None) -> None:
  """Sows this router's load-balancing loss, z-loss, per-expert load (and drops) on real tokens.

  A no-op unless the caller made `router_stats` mutable (training and evaluation losses do;
  decoding does not).
  """
  real = mask.astype(jnp.float32)  # [batch, length]
  count = jnp.maximum(jnp.sum(real), 1.0)
  load = jnp.einsum("ble,bl->e", routing.slots, real) / count  # [E]
  mean_prob = jnp.einsum("ble,bl->e", routing.probs, real) / count  # [E]
  num_experts = logits.shape[-1]
  module.sow(STATS_COLLECTION, "load_balance_loss", num_experts * jnp.sum(load * mean_prob))
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, length]
  module.sow(STATS_COLLECTION, "router_z_loss", jnp.sum(jnp.square(log_z) * real) / count)
  module.sow(STATS_COLLECTION, "load", load)
  if dropped_fraction is not None:
    module.sow(STATS_COLLECTION, "dropped_fraction", dropped_fraction)


def collect_statistics(stats: Mapping[str, Any]) -> dict[str, Array]:
  """Averages every router's sown statistics: {'load_balance_loss', 'router_z_loss',
  'dropped_fraction', 'load_<e>'} -> scalar, over layers and sites (empty without routers).

  Scanned layers sow with a leading layers axis; per-expert loads of routers with different
  expert counts are averaged per expert index.
  """
  grouped: dict[str, list[Array]] = {}
  for path, value in jax.tree_util.tree_leaves_with_path(stats):
    name = next(getattr(k, "key") for k in reversed(path) if hasattr(k, "key"))
    grouped.setdefault(name, []).append(value)
  out = {}
  for name, values in grouped.items():
    if name == "load":
      width = max(v.shape[-1] for v in values)
      for e in range(width):
        out[f"load_{e}"] = jnp.mean(jnp.stack(
            [jnp.mean(v[..., e]) for v in values if v.shape[-1] > e]))
    else:
      out[name] = jnp.mean(jnp.stack([jnp.mean(v) for v in values]))
  return out
