"""Analytic training FLOPs and model FLOPs utilisation (MFU), PaLM appendix B convention.

Training FLOPs of one token = 6 x (matmul parameters the token passes through)
                              + 12 x layers x d_attn x (attended length),
with d_attn = num_heads x head_dim.
  * 6 = 2 (multiply-add) x 3 (forward + the two backward matmuls). Every matmul parameter counts:
    q/k/v/o projections, all MLP input projections (two for gated MLPs) and the output projection,
    and the logits projection (also when it is tied to the embedding).
  * Not counted: the embedding lookup (a gather), norms, relative-position biases, softmax, and
    rematerialised recomputation (MFU counts model FLOPs, not hardware FLOPs).
  * Sparse MoE: a token passes the router and its k experts (active parameters), not all of
    them; dropped tokens and capacity padding still count (the hardware computes the buffers).
    The one-hot dispatch/combine einsums of the capacity path are routing overhead, not counted.
  * Adapters (IA3, LoRA, MoV, MoLoRA) add well under 1% and are not counted. A frozen base skips
    its weight-gradient matmuls (about 4N instead of 6N per token), so for PEFT runs `timing/mfu`
    overstates utilisation by up to 1.5x; compare PEFT runs by tokens/s.
  * Attention scores: q.k and weights.v cost 2 x 2 x d_attn per (query, key) pair forward, times 3
    for training. We count the full T x T score matrix, not the causal half, as PaLM does, so
    decoder-only MFU here is comparable with PaLM/MaxText numbers. Grouped-query attention shares
    k/v heads but still computes num_heads score matrices, hence d_attn uses num_heads.
  * Encoder-decoder (T5): encoder tokens pass the encoder stack and, in every decoder layer, the
    cross-attention k/v projections; decoder tokens pass the rest of the decoder (self-attention,
    cross-attention q/o, MLP) and the logits. Cross-attention scores cover inputs_length keys.
  Padding positions count as tokens (the hardware computes them).

Decoder-only per token this is PaLM's 6N + 12 L d_attn T.  MFU = (training FLOPs per step /
step seconds) / peak FLOP/s, with the datasheet bf16 peak on TPU/GPU and a measured matmul peak
on CPU (docs/design.md).
"""

from __future__ import annotations

import time
from typing import Mapping

import jax
import jax.numpy as jnp

from polyglot_jax.models.config import TransformerConfig


def _attention_params(config: TransformerConfig) -> int:
  """q and o (num_heads) plus k and v (kv_heads) projections of one attention block."""
  return config.emb_dim * config.head_dim * 2 * (config.num_heads + config.kv_heads)


def _cross_kv_params(config: TransformerConfig) -> int:
  """The k and v projections of one cross-attention block (applied to encoder tokens)."""
  return config.emb_dim * config.head_dim * 2 * config.kv_heads


def _mlp_params(config: TransformerConfig) -> int:
  """One input projection per activation plus the output projection; for a sparse MoE, the
  router plus the experts a token passes through (k; expert choice: capacity_factor * k)."""
  ffn = (len(config.mlp_activations) + 1) * config.emb_dim * config.mlp_dim
  if config.moe is None:
    return ffn
  moe = config.moe
  active = moe.num_selected * (moe.capacity_factor if moe.router == "experts_choose" else 1)
  return int(active * ffn) + config.emb_dim * moe.num_experts


def matmul_param_count(config: TransformerConfig, encoder_decoder: bool) -> dict[str, int]:
  """Matmul parameters per stack: 'encoder' (encoder-decoder only), 'decoder', 'logits'.

  'decoder' includes cross-attention (all of q/k/v/o) so each entry matches the kernels of one
  subtree of the real parameter tree; 'logits' is emb_dim x vocab_size, which is the embedding
  table itself when logits are tied.
  """
  layer = _attention_params(config) + _mlp_params(config)
  cross = _attention_params(config) if encoder_decoder else 0
  counts = {"decoder": config.num_decoder_layers * (layer + cross),
            "logits": config.emb_dim * config.vocab_size}
  if encoder_decoder:
    counts = {"encoder": config.num_encoder_layers * layer, **counts}
  return counts


def training_flops(config: TransformerConfig, *, encoder_decoder: bool, batch_size: int,
                   inputs_length: int = 0, targets_length: int) -> float:
  """FLOPs of one training step (forward + backward) on a batch, per the module convention.

  Decoder-only models ignore `inputs_length` (prefix and targets are one sequence of
  `targets_length`).
  """
  counts = matmul_param_count(config, encoder_decoder)
  d_attn = config.num_heads * config.head_dim
  decoder_tokens = batch_size * targets_length
  if encoder_decoder:
    encoder_tokens = batch_size * inputs_length
    cross_kv = config.num_decoder_layers * _cross_kv_params(config)
    matmul_flops = 6 * (encoder_tokens * (counts["encoder"] + cross_kv)
                        + decoder_tokens * (counts["decoder"] - cross_kv + counts["logits"]))
    score_pairs = (encoder_tokens * config.num_encoder_layers * inputs_length
                   + decoder_tokens * config.num_decoder_layers * (targets_length + inputs_length))
  else:
    matmul_flops = 6 * decoder_tokens * (counts["decoder"] + counts["logits"])
    score_pairs = decoder_tokens * config.num_decoder_layers * targets_length
  return float(matmul_flops + 12 * d_attn * score_pairs)


def batch_training_flops(config: TransformerConfig,
                         input_shapes: Mapping[str, tuple[int, ...]]) -> float:
  """`training_flops` of one step on a global batch given by its feature shapes
  ({'decoder_target_tokens': (batch, length), 'encoder_input_tokens': ... if encoder-decoder})."""
  batch_size, targets_length = input_shapes["decoder_target_tokens"]
  encoder = "encoder_input_tokens" in input_shapes
  return training_flops(config, encoder_decoder=encoder, batch_size=batch_size,
                        inputs_length=input_shapes["encoder_input_tokens"][1] if encoder else 0,
                        targets_length=targets_length)


def measure_peak_flops(dtype: jnp.dtype = jnp.float32, size: int = 2048, iters: int = 10) -> float:
  """FLOP/s of a jitted size x size matmul on the default device: best of `iters`, after warm-up.

  The CPU stand-in for a datasheet peak: MFU on CPU is only meaningful against what this process
  can actually reach.
  """
  a = jnp.ones((size, size), dtype)  # [size, size]
  b = jnp.ones((size, size), dtype)  # [size, size]
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # compile and warm up
  best = float("inf")
  for _ in range(iters):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


# (substring of the lower-cased device_kind, bf16 dense peak FLOP/s); first match wins, so the
# more specific names come first ("TPU v5 lite" is v5e, "TPU v5" is v5p, "TPU v6 lite" is v6e).
_DATASHEET_PEAKS: tuple[tuple[str, float], ...] = (
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5p", 459e12), ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12), ("tpu v6e", 918e12), ("tpu v4", 275e12),
    ("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12), ("a100", 312e12),
)


def datasheet_peak_flops(device: jax.Device) -> float | None:
  """bf16 dense peak FLOP/s of a known TPU/GPU; None for CPU and unknown accelerators."""
  if device.platform == "cpu":
    return None
  kind = device.device_kind.lower()
  return next((peak for name, peak in _DATASHEET_PEAKS if name in kind), None)


def mfu(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over peak FLOP/s."""
  if step_seconds <= 0 or peak_flops <= 0:
    raise ValueError(f"step_seconds={step_seconds} and peak_flops={peak_flops} must be positive")
  return flops_per_step / step_seconds / peak_flops
