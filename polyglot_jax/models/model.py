"""T5X BaseModel API over the Flax networks: init, loss, eval, scoring and decoding.

Batches use seqio feature names (`encoder_input_tokens`, `decoder_input_tokens`,
`decoder_target_tokens`, `decoder_loss_weights`, `*_segment_ids`, `*_positions`,
`decoder_causal_attention`). `params` are unboxed arrays everywhere except in the result of
`get_initial_variables`, whose leaves are `nn.LogicallyPartitioned` boxes for the partitioner.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import seqio

from polyglot_jax.models import decoding
from polyglot_jax.models import losses, routing
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.models.decoder import DecoderOnly
from polyglot_jax.models.encoder_decoder import EncoderDecoder

Array = jax.Array
Batch = Mapping[str, Array]
Params = Any
# Input shapes that build the parameters (`init_params`): they do not depend on the batch.
_PARAM_INIT_SHAPES = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8),
                      "decoder_target_tokens": (1, 8)}

# Applies the decoder with a batch's context (encoder output, PrefixLM mask) bound:
# (variables, [batch, length] tokens, decode=, prefill_lengths=) -> logits, plus the mutated
# 'cache' collection when decoding.
DecoderFn = Callable[..., Any]


def _target_log_probs(logits: Array, targets: Array) -> Array:
  """[batch, length] log-softmax probability (float32) of each target token."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [batch, length, vocab]
  return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [batch, length]


def adapter_free(params: Params) -> Params:
  """`params` without the adapter subtrees (modules named `<site>_adapter`, see `adapters`)."""
  if not isinstance(params, Mapping):
    return params
  return {name: adapter_free(value) for name, value in params.items()
          if not name.endswith("_adapter")}


class BaseTransformerModel(abc.ABC):
  """Loss, evaluation, scoring and decoding shared by both model families.

  Subclasses build `self.module`, list the batch features the module takes (`_features`) and say
  how decoding starts (`_decoding_inputs`). `FEATURE_CONVERTER_CLS(pack=...)` builds the seqio
  feature converter of the model's batches: the given class with the model's `bos_token_id` as
  the first decoder input (T5X's `FEATURE_CONVERTER_CLS`, bound to the checkpoint's BOS).
  """

  FEATURE_CONVERTER_CLS: Callable[..., seqio.FeatureConverter]

  def __init__(self, config: TransformerConfig, module: nn.Module, z_loss: float,
               label_smoothing: float, loss_normalizing_factor: losses.LossNormalizer,
               feature_converter_cls: type[seqio.FeatureConverter]) -> None:
    losses.check_normalizer(loss_normalizing_factor)
    self.config = config
    self.module = module
    self.FEATURE_CONVERTER_CLS = functools.partial(  # pylint: disable=invalid-name
        feature_converter_cls, bos_id=config.bos_token_id)
    self._z_loss = z_loss
    self._label_smoothing = label_smoothing
    self._loss_normalizing_factor = loss_normalizing_factor

  @property
  def loss_normalizing_factor(self) -> losses.LossNormalizer:
    """How losses are normalised; the trainer computes the global batch's divisor from it."""
    return self._loss_normalizing_factor

  @property
  @abc.abstractmethod
  def _features(self) -> tuple[str, ...]:
    """Batch features passed to `self.module` (when present in the batch)."""

  @abc.abstractmethod
  def _decoding_inputs(self, params: Params, batch: Batch, prompt_with_targets: bool = False
                       ) -> tuple[DecoderFn, Array, Array]:
    """(decoder_fn, initial decoder tokens [batch, length], start [batch]).

    Row b's prompt fills `tokens[b, :start[b] + 1]`; its first output is predicted at `start[b]`.
    """

  def decoding_start(self, params: Params, batch: Batch, use_cache: bool = True,
                     prompt_with_targets: bool = False) -> decoding.DecodingStart:
    """Reads the prompts: with `use_cache`, one prefill pass fills the KV cache and each step
    then runs one token per row; otherwise every step re-runs the whole prefix."""
    decoder_fn, tokens, start = self._decoding_inputs(params, batch, prompt_with_targets)
    eos_ids, pad_id = self.config.eos_token_ids, self.config.pad_token_id
    if not use_cache:
      return decoding.recompute_step(lambda t: decoder_fn({"params": params}, t), tokens, start,
                                     eos_ids, pad_id)
    logits, cache = decoder_fn({"params": params}, tokens, decode=True,
                               prefill_lengths=start + 1)  # [batch, 1, vocab]

    def step(token: Array, cache: Any) -> tuple[Array, Any]:
      logits, cache = decoder_fn({"params": params, **cache}, token[:, None],
                                 decode=True)  # [batch, 1, vocab]
      return logits[:, 0], cache

    # Scanned layers stack their cache on a leading "layers" axis: the batch axis is then 1.
    axes = jax.tree_util.tree_map_with_path(
        lambda path, _: int(any(getattr(key, "key", None) == "layers" for key in path)), cache)
    return decoding.DecodingStart(step, logits[:, 0], cache, axes, tokens.shape[1] - start,
                                  tokens.shape[1], eos_ids, pad_id)

  def _logits(self, params: Params, batch: Batch, dropout_rng: Array | None = None,
              mutable: list[str] | bool = False) -> Any:
    """Teacher-forced [batch, length, vocab] logits; dropout iff `dropout_rng` is given."""
    inputs = {name: batch[name] for name in self._features if name in batch}
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    return self.module.apply({"params": params}, **inputs, enable_dropout=dropout_rng is not None,
                             rngs=rngs, mutable=mutable)

  def get_initial_variables(self, rng: Array, input_shapes: Mapping[str, tuple[int, ...]],
                            input_types: Mapping[str, jnp.dtype] | None = None) -> dict[str, Any]:
    """Initialises the variables ({'params': boxed tree}); works under `jax.eval_shape`.

    Args:
      rng: the params init key.
      input_shapes: feature name -> shape (at least the token features of `_features`).
      input_types: feature name -> dtype; int32 by default.
    """
    input_types = input_types or {}
    inputs = {name: jnp.ones(input_shapes[name], input_types.get(name, jnp.int32))
              for name in self._features if name in input_shapes}
    return self.module.init({"params": rng}, **inputs, enable_dropout=False)

  def init_params(self, rng: Array) -> Any:
    """Fresh parameters in their logical-axis boxes (`nn.LogicallyPartitioned`).

    Parameter shapes and values depend on the config and `rng` alone, so a small dummy batch
    builds them.
    """
    return self.get_initial_variables(rng, _PARAM_INIT_SHAPES)["params"]

  def param_shapes(self) -> Any:
    """`init_params` as ShapeDtypeStructs (no allocation)."""
    return jax.eval_shape(self.init_params, jax.random.key(0))

  def loss_fn(self, params: Params, batch: Batch, dropout_rng: Array | None,
              loss_normalizer: Array | None = None, global_num_tokens: Array | None = None
              ) -> tuple[Array, dict[str, Array]]:
    """(loss, metric sums): `losses.cross_entropy_loss` plus the routers' auxiliary losses.

    With `config.loss_chunk_size`, the loss is `losses.chunked_cross_entropy_loss` over the
    decoder's final activations: the [batch, length, vocab] logits never exist whole.

    Routed models (MoE, MoV, MoLoRA) add `load_balance_weight * load_balance_loss +
    router_z_loss_weight * router_z_loss`, averaged over routers, to the loss, and report the
    router statistics as token-weighted sums `experts/<name>` (see `losses.summarize`).

    Args:
      params: unboxed parameters.
      batch: features incl. `decoder_target_tokens` and `decoder_loss_weights`.
      dropout_rng: dropout key, or None for a deterministic pass.
      loss_normalizer: the global batch's divisor under gradient accumulation; None computes it.
      global_num_tokens: the global batch's real target tokens under gradient accumulation, so
        each microbatch's auxiliary loss counts in proportion to its tokens; None = this batch.
    """
    loss_kwargs = dict(z_loss=self._z_loss, label_smoothing=self._label_smoothing,
                       loss_normalizing_factor=self._loss_normalizing_factor,
                       loss_normalizer=loss_normalizer)
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    if not self.config.loss_chunk_size:
      logits, state = self._logits(params, batch, dropout_rng,
                                   mutable=[routing.STATS_COLLECTION])  # [batch, length, vocab]
      loss, sums = losses.cross_entropy_loss(logits, targets, weights, **loss_kwargs)
    else:
      # The chunked loss projects the sown final activations itself; the logits returned here
      # are unused, so jit drops their computation.
      _, state = self._logits(params, batch, dropout_rng,
                              mutable=[routing.STATS_COLLECTION, "intermediates"])
      pre_logits = state["intermediates"]["decoder"]["pre_logits"][0]  # [batch, length, embed]
      project = functools.partial(self.module.apply, {"params": params}, method="logits")
      loss, sums = losses.chunked_cross_entropy_loss(
          pre_logits, project, targets, weights, chunk_size=self.config.loss_chunk_size,
          **loss_kwargs)
    stats = self._router_statistics(state)
    if not stats:
      return loss, sums
    share = 1.0 if global_num_tokens is None else sums["num_tokens"] / jnp.maximum(
        global_num_tokens, 1.0)
    sums.update({f"experts/{name}": value * sums["num_tokens"] for name, value in stats.items()})
    return loss + share * stats["aux_loss"], sums

  def _router_statistics(self, state: Mapping[str, Any]) -> dict[str, Array]:
    """The routers' statistics plus `aux_loss` = `load_balance_weight * load_balance_loss +
    router_z_loss_weight * router_z_loss`; empty for models without routers."""
    stats = routing.collect_statistics(state.get(routing.STATS_COLLECTION, {}))
    if stats:
      routed = self.config.moe or self.config.adapters
      stats["aux_loss"] = (routed.load_balance_weight * stats["load_balance_loss"]
                           + routed.router_z_loss_weight * stats["router_z_loss"])
    return stats

  def token_log_probs(self, params: Params, batch: Batch, dropout_rng: Array | None = None
                      ) -> tuple[Array, Array]:
    """Per-token target log-likelihoods, for sequence-level objectives (preference training).

    Returns:
      ([batch, length] log p(target token) times `decoder_loss_weights`, the routers' scalar
      `aux_loss` (see `loss_fn`; 0 for models without routers)). Dropout iff `dropout_rng`.
    """
    logits, state = self._logits(params, batch, dropout_rng,
                                 mutable=[routing.STATS_COLLECTION])  # [batch, length, vocab]
    scores = _target_log_probs(logits, batch["decoder_target_tokens"])  # [batch, length]
    aux = self._router_statistics(state).get("aux_loss", jnp.zeros((), jnp.float32))
    return scores * batch["decoder_loss_weights"], aux

  def without_adapters(self) -> BaseTransformerModel:
    """This model with `config.adapters = None`.

    Applied to `adapter_free(params)` of an adapter run it computes the base model from the same
    arrays (no copy of the weights): the frozen reference of adapter training.
    """
    base = copy.copy(self)
    base.config = dataclasses.replace(self.config, adapters=None)
    base.module = type(self.module)(base.config)
    return base

  def eval_fn(self, params: Params, batch: Batch) -> tuple[Array, dict[str, Array]]:
    """`loss_fn` without dropout."""
    return self.loss_fn(params, batch, dropout_rng=None)

  def score_batch(self, params: Params, batch: Batch, return_intermediates: bool = False
                  ) -> Array | tuple[Array, Mapping[str, Any]]:
    """[batch] sums of target log-likelihoods weighted by `decoder_loss_weights`.

    With `return_intermediates`, also returns the sown `intermediates` collection.
    """
    mutable = ["intermediates"] if return_intermediates else False
    output = self._logits(params, batch, mutable=mutable)
    logits, state = output if return_intermediates else (output, None)  # [batch, length, vocab]
    token_scores = _target_log_probs(logits, batch["decoder_target_tokens"])  # [batch, length]
    scores = jnp.sum(token_scores * batch["decoder_loss_weights"], axis=-1)  # [batch]
    return (scores, state["intermediates"]) if return_intermediates else scores

  def predict_batch_with_aux(self, params: Params, batch: Batch, rng: Array | None = None,
                             decoder_params: Mapping[str, Any] | None = None,
                             return_all_decodes: bool = False, prompt_with_targets: bool = False
                             ) -> tuple[Array, dict[str, Array]]:
    """Decodes a batch with the KV cache: (tokens [batch, max_decode_len], {'scores': [batch]}).

    Greedy by default. `decoder_params` (see `decoding.DecoderParams`): `temperature`, `top_k`,
    `top_p` sample with `rng`; `beam_size` and `alpha` select beam search; `num_decodes` decodes
    per input; `use_cache=False` recomputes the prefix every step. Each row stops at the first of
    `config.eos_token_ids` and is filled with `config.pad_token_id` after it. With
    `return_all_decodes` the outputs are [batch, num_decodes, max_decode_len] and
    [batch, num_decodes], best first; otherwise the best one. Jit-able.
    """
    settings = decoding.DecoderParams.parse(decoder_params)
    start = self.decoding_start(params, batch, settings.use_cache, prompt_with_targets)
    tokens, scores = decoding.decode(start, rng, settings)  # [b, n, length], [b, n]
    if not return_all_decodes:
      tokens, scores = tokens[:, 0], scores[:, 0]  # [batch, length], [batch]
    return tokens, {"scores": scores}

  def predict_batch(self, params: Params, batch: Batch, rng: Array | None = None,
                    decoder_params: Mapping[str, Any] | None = None,
                    return_all_decodes: bool = False, prompt_with_targets: bool = False) -> Array:
    """The decoded tokens of `predict_batch_with_aux`."""
    return self.predict_batch_with_aux(params, batch, rng, decoder_params, return_all_decodes,
                                       prompt_with_targets)[0]


@gin.configurable
class EncoderDecoderModel(BaseTransformerModel):
  """T5.1.1 / mT5 / umT5 model with the T5X EncoderDecoderModel API."""

  def __init__(self, config: TransformerConfig, z_loss: float = 1e-4,
               label_smoothing: float = 0.0,
               loss_normalizing_factor: losses.LossNormalizer = losses.NUM_REAL_TARGET_TOKENS
               ) -> None:
    super().__init__(config, EncoderDecoder(config), z_loss, label_smoothing,
                     loss_normalizing_factor, seqio.EncDecFeatureConverter)

  @property
  def _features(self) -> tuple[str, ...]:
    return ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
            "encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")

  def _decoding_inputs(self, params: Params, batch: Batch, prompt_with_targets: bool = False
                       ) -> tuple[DecoderFn, Array, Array]:
    """Encodes once; decodes up to `decoder_target_tokens.shape[1]` tokens from the BOS, or with
    `prompt_with_targets` (T5X) after a forced decoder prefix: the nonzero tokens that follow
    BOS in `decoder_input_tokens` (EOS dropped); outputs exclude the prefix."""
    encoder_tokens = batch["encoder_input_tokens"]  # [batch, enc_length]
    encoded = self.module.apply({"params": params}, encoder_tokens,
                                batch.get("encoder_segment_ids"), batch.get("encoder_positions"),
                                method="encode")  # [batch, enc_length, embed]

    def decoder_fn(variables: Mapping[str, Any], tokens: Array, decode: bool = False,
                   prefill_lengths: Array | None = None) -> Any:
      step = decode and prefill_lengths is None  # steps read the encoder side from the cache
      return self.module.apply(variables, None if step else encoded,
                               None if step else encoder_tokens, tokens,
                               encoder_segment_ids=batch.get("encoder_segment_ids"),
                               decode=decode, prefill_lengths=prefill_lengths,
                               mutable=["cache"] if decode else False,
                               method="decode")  # [batch, length, vocab]

    batch_size, length = batch["decoder_target_tokens"].shape
    if not prompt_with_targets:
      tokens = jnp.zeros((batch_size, length), jnp.int32)  # [batch, length]
      tokens = tokens.at[:, 0].set(self.config.bos_token_id)  # [batch, length]
      return decoder_fn, tokens, jnp.zeros((batch_size,), jnp.int32)
    prompt = batch["decoder_input_tokens"].astype(jnp.int32)  # [batch, length]: BOS, prefix, 0...
    is_eos = jnp.isin(prompt, jnp.asarray(self.config.eos_token_ids, jnp.int32))  # [b, length]
    prompt = jnp.where(is_eos, 0, prompt)  # [batch, length]
    return decoder_fn, prompt, jnp.sum(prompt[:, 1:] != 0, axis=1).astype(jnp.int32)


@gin.configurable
class DecoderOnlyModel(BaseTransformerModel):
  """Decoder-only LM (Llama, Cohere, PrefixLM) with the T5X DecoderOnlyModel API.

  With `inputs_bidirectional_attention`, positions marked by `decoder_causal_attention` attend to
  each other bidirectionally (PrefixLM) and the feature converter is seqio's PrefixLM one.
  `feature_converter_cls` replaces seqio's DecoderFeatureConverter, e.g. with
  `chat.ChatFeatureConverter` (runs/sft.gin), which keeps chat tasks' per-token loss weights.
  """

  def __init__(self, config: TransformerConfig, z_loss: float = 1e-4,
               label_smoothing: float = 0.0,
               loss_normalizing_factor: losses.LossNormalizer = losses.NUM_REAL_TARGET_TOKENS,
               inputs_bidirectional_attention: bool = False,
               feature_converter_cls: type[seqio.FeatureConverter] | None = None) -> None:
    default = (seqio.PrefixLMFeatureConverter if inputs_bidirectional_attention
               else seqio.DecoderFeatureConverter)
    super().__init__(config, DecoderOnly(config), z_loss, label_smoothing,
                     loss_normalizing_factor, feature_converter_cls or default)
    self.inputs_bidirectional_attention = inputs_bidirectional_attention

  @property
  def _features(self) -> tuple[str, ...]:
    features = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids",
                "decoder_positions")
    if self.inputs_bidirectional_attention:
      features += ("decoder_causal_attention",)
    return features

  def _decoding_inputs(self, params: Params, batch: Batch, prompt_with_targets: bool = False
                       ) -> tuple[DecoderFn, Array, Array]:
    """Continues the prompt: the positions of `decoder_input_tokens` marked by
    `decoder_causal_attention` (T5X: the BOS plus the inputs); outputs exclude the prompt.
    (`prompt_with_targets` is for encoder-decoders: here the prompt is always read.)"""
    del prompt_with_targets
    if "decoder_causal_attention" not in batch:
      raise ValueError("predict_batch needs batch['decoder_causal_attention'] to mark the prompt "
                       "(seqio PrefixLM/Decoder feature converters with 'inputs' provide it).")
    causal_attention = batch["decoder_causal_attention"]  # [batch, length]
    prompt = batch["decoder_input_tokens"] * causal_attention  # [batch, length]
    start = jnp.sum(causal_attention, axis=1).astype(jnp.int32) - 1  # [batch]
    prefix = causal_attention if self.inputs_bidirectional_attention else None

    def decoder_fn(variables: Mapping[str, Any], tokens: Array, decode: bool = False,
                   prefill_lengths: Array | None = None) -> Any:
      return self.module.apply(variables, tokens, decoder_causal_attention=prefix,
                               decode=decode, prefill_lengths=prefill_lengths,
                               mutable=["cache"] if decode else False)  # [batch, length, vocab]

    return decoder_fn, prompt.astype(jnp.int32), start
