"""Sparse mixture-of-experts FFN (GShard / Switch / ST-MoE) and the FFN factory of the layers.

Experts are gated FFNs like `layers.Mlp`, stacked on a leading "expert" axis
(`wi_0/kernel` [expert, embed, expert_mlp], ..., `wo/kernel` [expert, expert_mlp, embed]), so a
dense checkpoint's `mlp/wi_0/kernel` upcycles into every expert (see `InitCheckpoint.upcycle`).
Three ways to send tokens to experts:

- tokens_choose with capacity: each sequence is a group; every expert takes at most
  C = ceil(capacity_factor * length * k / E) of its tokens, filling slots in order of choice
  rank (all first choices before second choices) then position. Dispatch and combine are one-hot
  einsums into a [batch, expert, capacity, embed] buffer whose expert axis is sharded on the
  `expert` mesh axis (the compiler inserts the all-to-alls).
- tokens_choose dropless (`capacity_factor=None`): every (token, choice) pair is sorted by
  expert and the experts run as grouped matmuls (`jax.lax.ragged_dot`); nothing is dropped.
- experts_choose: each expert takes its top-C tokens of a sequence by router probability
  (Zhou et al. 2022); tokens no expert picked pass through.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from polyglot_jax.models import layers, routing
from polyglot_jax.models.config import MoeConfig, TransformerConfig

Array = jax.Array
Matmul = Callable[[Array, Array], Array]

# Each expert's kernel is initialised like a dense one: fan-in excludes the expert axis.
_expert_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                       batch_axis=(0,))


def capacity(moe: MoeConfig, length: int) -> int:
  """Tokens of one sequence an expert can take: ceil(capacity_factor * length * k / E)."""
  per_expert = math.ceil(moe.capacity_factor * length * moe.num_selected / moe.num_experts)
  return max(1, min(per_expert, length))


class ExpertKernel(nn.Module):
  """Holds one stacked expert kernel as `kernel`, so its path matches the dense FFN's."""

  shape: tuple[int, ...]
  axes: tuple[str, ...]
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self) -> Array:
    return self.param("kernel", nn.with_logical_partitioning(_expert_kernel_init, self.axes),
                      self.shape, self.param_dtype)


class MoeMlp(nn.Module):
  """A routed mixture of gated FFN experts with the call signature of `layers.Mlp`."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, token_mask: Array | None = None,
               deterministic: bool = True) -> Array:
    """[batch, length, embed] -> [batch, length, embed]; padded tokens (`token_mask` 0) go to
    no expert and take no capacity."""
    cfg, moe = self.config, self.config.moe
    mask = routing.token_mask(token_mask, x)  # [batch, length]
    logits = routing.Router(moe.num_experts, moe.router_init_stddev,
                            jnp.dtype(cfg.param_dtype), name="router")(x)  # [batch, length, E]
    wi = [self._kernel(name, (cfg.emb_dim, cfg.mlp_dim), ("embed", "expert_mlp"))
          for name in layers.mlp_input_names(cfg)]  # each [E, embed, expert_mlp]
    wo = self._kernel("wo", (cfg.mlp_dim, cfg.emb_dim), ("expert_mlp", "embed"))  # [E, mlp, d]
    x = jnp.asarray(x, cfg.dtype)  # [batch, length, embed]
    if moe.router == "experts_choose":
      gate, dispatch, combine, dropped = _experts_choose(logits, mask, capacity(moe, x.shape[1]))
    else:
      gate = routing.gate(logits, mask, moe.num_selected, moe.renormalize)
      if moe.capacity_factor is None:
        routing.sow_statistics(self, logits, gate, mask, jnp.zeros((), jnp.float32))
        return self._dropless(x, gate, wi, wo, deterministic)
      dispatch, combine, dropped = _tokens_choose_dispatch(gate, mask, capacity(moe, x.shape[1]))
    routing.sow_statistics(self, logits, gate, mask, dropped)
    expert_in = jnp.einsum("blec,bld->becd", dispatch.astype(x.dtype), x)  # [b, E, C, embed]
    expert_in = nn.with_logical_constraint(expert_in,
                                           ("expert_group", "expert", "unmodeled", "embed"))
    per_expert = lambda a, kernel: jnp.einsum("bech,ehf->becf", a, kernel)
    h = self._ffn(expert_in, wi, wo, per_expert, deterministic)  # [batch, E, C, embed]
    h = nn.with_logical_constraint(h, ("expert_group", "expert", "unmodeled", "embed"))
    out = jnp.einsum("blec,becd->bld", combine.astype(x.dtype), h)  # [batch, length, embed]
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))

  def _kernel(self, name: str, shape: tuple[int, int], axes: tuple[str, str]) -> Array:
    """The [expert, *shape] `<name>/kernel` parameter (the dense FFN's path), in compute dtype."""
    cfg = self.config
    kernel = ExpertKernel((cfg.moe.num_experts,) + shape, ("expert",) + axes,
                          jnp.dtype(cfg.param_dtype), name=name)()
    return jnp.asarray(kernel, cfg.dtype)

  def _ffn(self, x: Array, wi: list[Array], wo: Array, matmul: Matmul,
           deterministic: bool) -> Array:
    """The gated FFN of the experts: product of activated input projections, then `wo`.

    `matmul(activations, [E, in, out] kernel)` applies each token's expert: a batched einsum
    over capacity buffers, or a grouped matmul over expert-sorted tokens (dropless).
    """
    branches = [layers.ACTIVATIONS[act](matmul(x, kernel))
                for act, kernel in zip(self.config.mlp_activations, wi)]
    h = functools.reduce(operator.mul, branches)  # [..., expert_mlp]
    h = layers.make_dropout(self.config)(h, deterministic=deterministic)
    return matmul(h, wo)  # [..., embed]

  def _dropless(self, x: Array, gate: routing.Gate, wi: list[Array], wo: Array,
                deterministic: bool) -> Array:
    """Every (token, choice) pair through its expert: sort by expert, grouped matmuls, unsort."""
    batch, length, emb = x.shape
    num_selected = gate.top_indices.shape[-1]
    experts = gate.top_indices.reshape(-1)  # [batch * length * k]
    order = jnp.argsort(experts, stable=True)  # [batch * length * k]
    tokens = order // num_selected  # [batch * length * k] row of each sorted pair
    group_sizes = jnp.bincount(experts, length=self.config.moe.num_experts).astype(jnp.int32)
    sorted_in = x.reshape(batch * length, emb)[tokens]  # [batch * length * k, embed]
    grouped = lambda a, kernel: jax.lax.ragged_dot(a, kernel, group_sizes)
    h = self._ffn(sorted_in, wi, wo, grouped, deterministic)  # [batch * length * k, embed]
    pair_weights = jnp.take_along_axis(gate.weights, gate.top_indices, axis=-1)  # [b, l, k]
    h = h * pair_weights.reshape(-1)[order][:, None].astype(h.dtype)  # [batch * length * k, d]
    out = jnp.zeros((batch * length, emb), h.dtype).at[tokens].add(h)  # [batch * length, embed]
    return nn.with_logical_constraint(out.reshape(batch, length, emb), ("batch", "length", "embed"))


def _tokens_choose_dispatch(gate: routing.Gate, mask: Array, capacity_per_expert: int
                            ) -> tuple[Array, Array, Array]:
  """(dispatch, combine [batch, length, E, C], dropped fraction) of top-k choices under capacity.

  Slots fill by choice rank first (every token's first choice before any second choice), then by
  position; a choice finding its expert full is dropped.
  """
  num_experts = gate.weights.shape[-1]
  batch, length, k = gate.top_indices.shape
  chosen = jax.nn.one_hot(gate.top_indices, num_experts, dtype=jnp.int32)  # [b, l, k, E]
  chosen = chosen * (mask[:, :, None, None] > 0)  # [batch, length, k, E]
  by_rank = jnp.transpose(chosen, (0, 2, 1, 3)).reshape(batch, k * length, num_experts)
  slot = jnp.cumsum(by_rank, axis=1) - 1  # [batch, k * length, E] slot if chosen
  kept = by_rank * (slot < capacity_per_expert)  # [batch, k * length, E]
  dispatch = kept[..., None] * jax.nn.one_hot(slot, capacity_per_expert, dtype=jnp.int32)
  dispatch = dispatch.reshape(batch, k, length, num_experts, capacity_per_expert).sum(axis=1)
  combine = dispatch * gate.weights[..., None]  # [batch, length, E, C]
  dropped = 1.0 - jnp.sum(kept) / jnp.maximum(jnp.sum(by_rank), 1)
  return dispatch, combine, dropped.astype(jnp.float32)


def _experts_choose(logits: Array, mask: Array, capacity_per_expert: int
                    ) -> tuple[routing.Gate, Array, Array, Array]:
  """Expert-choice routing: each expert takes its top-C real tokens of a sequence by probability.

  Returns the gate (for statistics: `slots` = each expert's share of the picks), dispatch and
  combine [batch, length, E, C], and the fraction of real tokens no expert picked.
  """
  real = mask > 0  # [batch, length]
  probs = jax.nn.softmax(jnp.where(real[..., None], logits, 0.0), axis=-1)  # [b, l, E]
  scores = jnp.where(real[..., None], probs, -1.0)  # [batch, length, E] padding ranks last
  top_scores, top_tokens = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity_per_expert)
  picked = jax.nn.one_hot(top_tokens, logits.shape[1], dtype=jnp.int32)  # [b, E, C, length]
  picked = picked * (top_scores[..., None] >= 0)  # [batch, E, C, length] padding never picked
  dispatch = jnp.transpose(picked, (0, 3, 1, 2))  # [batch, length, E, C]
  combine = dispatch * probs[..., None]  # [batch, length, E, C]
  per_token = jnp.sum(dispatch, axis=-1).astype(jnp.float32)  # [batch, length, E]
  weights = per_token * probs  # [batch, length, E]
  # Scaled so that the mean over real tokens (the statistics' `load`) is each expert's share of
  # all picks.
  num_real = jnp.maximum(jnp.sum(real), 1).astype(jnp.float32)
  slots = per_token * (num_real / jnp.maximum(jnp.sum(per_token), 1.0))  # [batch, length, E]
  unpicked = jnp.sum((jnp.sum(per_token, axis=-1) == 0) & real) / jnp.maximum(jnp.sum(real), 1)
  return routing.Gate(weights, probs, slots, None), dispatch, combine, unpicked.astype(jnp.float32)


def make_mlp(config: TransformerConfig, name: str = "mlp") -> nn.Module:
  """The layer's FFN: a sparse MoE when `config.moe` is set, else the dense `layers.Mlp`."""
  return (MoeMlp if config.moe is not None else layers.Mlp)(config, name=name)
