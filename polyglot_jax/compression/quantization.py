"""int8 post-training quantization for evaluation and decoding, through qwix (Ahmadian et al. 2023).

Schemes (gin: `quantized_model.scheme`, gin/quantization/*.gin):
  "none"              the float model, unchanged.
  "int8_weight_only"  every projection kernel (DenseGeneral: attention query/key/value/out, MLP
                      wi/wo, the untied `logits_dense`) becomes int8 with one float scale per
                      output channel; activations stay float (the matmul sees q * s).
  "w8a8"              the same int8 kernels, and the input of each of those projections
                      quantized on the fly to int8 with one scale per token (Ahmadian et al.'s
                      "vector-wise" W8A8): an int8 x int8 matmul rescaled by s_token * s_channel.
Both are symmetric absmax quantizations: s = max|x| / 127.5 over the contracted dims (qwix widens
the int8 range by half a bucket; the max itself rounds to 128 and saturates to 127) and
q = round(x / s), so |x - q * s| <= s / 2 for every element (up to the float32 rounding of
x / s). Left in float: the token embedding
(a gather, and the tied output projection that shares it), attention's q.k and weights.v
einsums (activations on both sides), norms and the relative-position bias.

How the model is wrapped, from outside (models/ is untouched): `QuantizedModel` has the model
API that eval and infer call (`eval_fn`, `score_batch`, `predict_batch_with_aux`, ...) and takes
the FLOAT parameters of a checkpoint; each call quantizes them in-graph (one absmax pass over
the weights, once per call: per eval batch, once per decode) and runs a copy of the model whose
network is intercepted by a qwix `PtqProvider`. So `polyglot-jax eval` and `infer` need no code
change: gin binds `evaluate.model = @quantized_model()` (gin/quantization/ptq.gin), restores the
float checkpoint as before and reports the quantized loss.

`outlier_statistics` measures the activation outliers that make W8A8 hard (Dettmers et al.
2022's criterion, the statistic of Ahmadian et al.).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from polyglot_jax.models import layers
from polyglot_jax.training import train_state

SCHEMES = ("none", "int8_weight_only", "w8a8")
# Methods of the networks that model.py applies (EncoderDecoder: encode/decode while decoding).
_NETWORK_METHODS = ("__call__", "encode", "decode")
# nn.scan (layers.stack_layers) stacks every layer's parameters on axis 0 under this key.
_SCANNED = "layers"


def rules(scheme: str, module_path: str = ".*") -> list[qwix.QuantizationRule]:
  """The qwix rules of `scheme`: every `jax.lax.dot_general` (our DenseGeneral projections) in a
  module whose path ('decoder/layers_0/mlp/wi_0') fully matches `module_path`."""
  if scheme not in SCHEMES:
    raise ValueError(f"quantization scheme {scheme!r} is unknown; use one of {SCHEMES}.")
  if scheme == "none":
    return []
  return [qwix.QuantizationRule(
      module_path=module_path, op_names=("dot_general",), weight_qtype=jnp.int8,
      act_qtype=jnp.int8 if scheme == "w8a8" else None)]


def _quantize_tree(params: Mapping[str, Any], abstract: Mapping[str, Any]) -> dict[str, Any]:
  """`qwix.quantize_params`, one layer at a time under nn.scan's stacked `layers` subtrees.

  qwix records how to quantize a kernel from the op that uses it, i.e. for one layer's slice;
  applied to the stacked [layers, ...] kernel it would pool the scales over layers.
  """
  out = {}
  for key, value in params.items():
    target = abstract[key]
    if key == _SCANNED:
      per_layer = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), target)
      out[key] = jax.vmap(lambda p, t=per_layer: qwix.quantize_params(p, t))(value)
    elif isinstance(value, Mapping):
      out[key] = _quantize_tree(value, target)
    else:
      out[key] = qwix.quantize_params({key: value}, {key: target})[key]
  return out


class QuantizedModel:
  """A model (models/model.py API) evaluated and decoded with quantized projections.

  Methods take the float parameters (as restored from a checkpoint) and quantize them in-graph;
  `quantize_params` exposes that step. `get_initial_variables`, `init_params` and `param_shapes`
  are the float model's, so state specs, shardings and checkpoint restores see the float layout.
  """

  def __init__(self, model: Any, scheme: str, module_path: str = ".*") -> None:
    if scheme == "none":
      raise ValueError("QuantizedModel needs a scheme other than 'none'; use the model itself.")
    self.model = model
    self.scheme = scheme
    self.module_path = module_path
    self._provider = qwix.PtqProvider(rules(scheme, module_path))
    network = model.module
    methods = [m for m in _NETWORK_METHODS if hasattr(type(network), m)]
    self._quantized = copy.copy(model)
    self._quantized.module = qwix.quantize_model(network, self._provider, methods=methods)
    self.FEATURE_CONVERTER_CLS = model.FEATURE_CONVERTER_CLS  # pylint: disable=invalid-name

  @property
  def config(self) -> Any:
    return self.model.config

  @property
  def loss_normalizing_factor(self) -> Any:
    return self.model.loss_normalizing_factor

  @functools.cached_property
  def _abstract_params(self) -> Any:
    """Quantized parameter layout (qwix's WithAux(QArray) leaves, how each is quantized)."""
    boxed = self._quantized.param_shapes()
    if self._provider.get_unused_rules():
      raise ValueError(f"quantization module_path={self.module_path!r} matches no projection; "
                       "module paths look like 'decoder/layers_0/mlp/wi_0'.")
    return train_state.unbox(boxed)

  def quantize_params(self, params: Any) -> Any:
    """Float params -> the quantized tree the quantized network applies (jit-able)."""
    return _quantize_tree(params, self._abstract_params)

  def get_initial_variables(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The float model's variables: what checkpoints hold and eval restores."""
    return self.model.get_initial_variables(*args, **kwargs)

  def init_params(self, rng: jax.Array) -> Any:
    """The float model's parameters: what checkpoints hold and eval restores."""
    return self.model.init_params(rng)

  def param_shapes(self) -> Any:
    """The float model's parameter layout."""
    return self.model.param_shapes()

  def loss_fn(self, params: Any, batch: Any, dropout_rng: Any,
              loss_normalizer: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    return self._quantized.loss_fn(self.quantize_params(params), batch, dropout_rng,
                                   loss_normalizer)

  def eval_fn(self, params: Any, batch: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    return self._quantized.eval_fn(self.quantize_params(params), batch)

  def score_batch(self, params: Any, batch: Any, return_intermediates: bool = False) -> Any:
    return self._quantized.score_batch(self.quantize_params(params), batch, return_intermediates)

  def predict_batch_with_aux(self, params: Any, batch: Any, rng: Any = None,
                             decoder_params: Any = None,
                             return_all_decodes: bool = False) -> tuple[jax.Array, dict]:
    """Decodes with the quantized network; the weights are quantized once, before the loop."""
    return self._quantized.predict_batch_with_aux(self.quantize_params(params), batch, rng,
                                                  decoder_params, return_all_decodes)

  def predict_batch(self, params: Any, batch: Any, rng: Any = None, decoder_params: Any = None,
                    return_all_decodes: bool = False) -> jax.Array:
    return self.predict_batch_with_aux(params, batch, rng, decoder_params, return_all_decodes)[0]


@gin.configurable
def quantized_model(model: Any = gin.REQUIRED, scheme: str = "none",
                    module_path: str = ".*") -> Any:
  """`model` under a post-training quantization `scheme` (module docstring); "none" returns it.

  gin: `evaluate.model = @quantized_model()`, `quantized_model.model = %MODEL` (quantization/).
  """
  if scheme not in SCHEMES:
    raise ValueError(f"quantized_model.scheme={scheme!r} is unknown; use one of {SCHEMES}.")
  return model if scheme == "none" else QuantizedModel(model, scheme, module_path)


def _site_counts(model: Any, params: Any, batch: Mapping[str, jax.Array],
                 threshold: float) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
  """Per Norm output ('encoder/layers_0/pre_mlp_layer_norm'), from one forward pass: ([embed]
  count of real tokens with |x| > threshold in each dim, [] real tokens, [] max |x| on them)."""
  outputs = {}

  def capture(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, layers.Norm) and context.method_name == "__call__":
      outputs["/".join(context.module.path)] = out
    return out

  with nn.intercept_methods(capture):
    model.eval_fn(params, batch)
  counts = {}
  for site, x in outputs.items():  # x: [batch, length, embed]
    tokens = batch["encoder_input_tokens" if site.startswith("encoder/")
                   else "decoder_target_tokens"] > 0  # [batch, length]
    magnitude = jnp.where(tokens[..., None], jnp.abs(x.astype(jnp.float32)), 0.0)  # [b, l, e]
    counts[site] = (jnp.sum(magnitude > threshold, axis=(0, 1), dtype=jnp.int32),
                    jnp.sum(tokens, dtype=jnp.int32), jnp.max(magnitude))
  return counts


def outlier_statistics(model: Any, params: Any, batches: Iterable[Mapping[str, np.ndarray]],
                       threshold: float = 6.0, layer_fraction: float = 0.25,
                       token_fraction: float = 0.06) -> dict[str, float]:
  """Outlier dimensions of the activations that W8A8 quantizes (Dettmers et al. 2022).

  Reads every Norm output (the input of the query/key/value, MLP-in and logits projections,
  [batch, length, embed]) on the real tokens of `batches`. A hidden dim is an outlier when
  |x| > `threshold` on at least `token_fraction` of the tokens in at least `layer_fraction` of
  those sites (Dettmers' 6 / 6% / 25%). Returns `outliers/dim_fraction` (outlier dims / embed),
  `outliers/dims`, `outliers/sites`, `outliers/activation_fraction` (share of all real-token
  activations above the threshold) and `outliers/max_abs`. Needs unscanned layers
  (`scan_layers=False`): it reads each layer's activations.
  """
  if model.config.scan_layers:
    raise ValueError("outlier_statistics reads each layer's activations; build the model with "
                     "TransformerConfig.scan_layers=False.")
  site_counts = jax.jit(lambda p, b: _site_counts(model, p, b, threshold))
  over, tokens, largest = None, None, 0.0
  for batch in batches:
    counts = jax.device_get(site_counts(params, batch))
    if over is None:
      over = {site: np.zeros_like(c) for site, (c, _, _) in counts.items()}
      tokens = {site: 0 for site in counts}
    for site, (c, n, m) in counts.items():
      over[site] += c
      tokens[site] += int(n)
      largest = max(largest, float(m))
  if over is None:
    raise ValueError("outlier_statistics got no batch; check the dataset and split.")
  sites = sorted(over)
  frac = np.stack([over[s] / max(tokens[s], 1) for s in sites])  # [sites, embed]
  outlier = np.mean(frac >= token_fraction, axis=0) >= layer_fraction  # [embed]
  elements = sum(tokens[s] for s in sites) * frac.shape[1]
  return {"outliers/dim_fraction": float(np.mean(outlier)),
          "outliers/dims": float(np.sum(outlier)),
          "outliers/sites": float(len(sites)),
          "outliers/activation_fraction": float(sum(over[s].sum() for s in sites) / elements),
          "outliers/max_abs": largest}
