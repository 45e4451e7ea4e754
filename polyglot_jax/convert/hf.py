"""Hugging Face checkpoints -> polyglot_jax configs and parameter trees.

Supported: T5 (classic and v1.1), mT5, umT5, Llama and Cohere(-Command). The mapping is one table
of `TensorMap` rows (our path, HF name, our shape, layout); each row's layout change is a
transpose + reshape with a known inverse (`to_hf`), so exporting back to HF reads the same table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from polyglot_jax.models.config import TransformerConfig

# HF activation names -> ours (`layers.ACTIVATIONS`); "gelu_new" is the tanh approximation.
_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu", "silu": "silu",
                "swish": "silu"}
_T5_FAMILY = ("t5", "mt5", "umt5")
_DECODER_FAMILY = ("llama", "cohere")


def _activation(hf_name: str) -> str:
  if hf_name not in _ACTIVATIONS:
    raise ValueError(f"HF activation {hf_name!r} is not supported; known: {sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[hf_name]


def config_from_hf(hf_config: Any, **overrides: Any) -> TransformerConfig:
  """TransformerConfig equivalent to a T5/MT5/UMT5/Llama/Cohere HF config.

  Args:
    hf_config: a `transformers` config object.
    **overrides: TransformerConfig fields to set on top (dtype, scan_layers, remat_policy, ...).
  """
  model_type = hf_config.model_type
  if model_type in _T5_FAMILY:
    activation = _activation(hf_config.dense_act_fn)
    # transformers 5 forces tie_word_embeddings=True for the T5 family; the real switch of T5 is
    # `scale_decoder_outputs` (classic T5: tied and rescaled; v1.1: untied). mT5 and umT5
    # checkpoints are untied.
    tied = model_type == "t5" and getattr(hf_config, "scale_decoder_outputs",
                                          hf_config.tie_word_embeddings)
    fields = dict(
        vocab_size=hf_config.vocab_size,
        emb_dim=hf_config.d_model,
        num_heads=hf_config.num_heads,
        head_dim=hf_config.d_kv,
        mlp_dim=hf_config.d_ff,
        num_encoder_layers=hf_config.num_layers,
        num_decoder_layers=hf_config.num_decoder_layers,
        mlp_activations=(activation, "linear") if hf_config.is_gated_act else (activation,),
        dropout_rate=hf_config.dropout_rate,
        logits_via_embedding=bool(tied),
        scale_tied_logits=True,
        position_embedding="relative",
        relative_attention_num_buckets=hf_config.relative_attention_num_buckets,
        relative_attention_max_distance=hf_config.relative_attention_max_distance,
        per_layer_relative_bias=model_type == "umt5",
        scale_attention=False,
        norm_type="rms",
        norm_epsilon=hf_config.layer_norm_epsilon,
    )
  elif model_type in _DECODER_FAMILY:
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
      raise ValueError(f"rope_type={rope['rope_type']!r} is not supported; only 'default' RoPE.")
    for flag in ("attention_bias", "mlp_bias", "use_qk_norm"):
      if getattr(hf_config, flag, False):
        raise ValueError(f"{model_type} with {flag}=True is not supported.")
    cohere = model_type == "cohere"
    fields = dict(
        vocab_size=hf_config.vocab_size,
        emb_dim=hf_config.hidden_size,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None)
        or hf_config.hidden_size // hf_config.num_attention_heads,
        mlp_dim=hf_config.intermediate_size,
        num_encoder_layers=0,
        num_decoder_layers=hf_config.num_hidden_layers,
        mlp_activations=(_activation(hf_config.hidden_act), "linear"),
        dropout_rate=0.0,
        logits_via_embedding=bool(hf_config.tie_word_embeddings),
        scale_tied_logits=False,
        logit_scale=float(hf_config.logit_scale) if cohere else 1.0,
        position_embedding="rope",
        rope_theta=float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        rope_interleaved=cohere,
        scale_attention=True,
        norm_type="layer" if cohere else "rms",
        norm_epsilon=hf_config.layer_norm_eps if cohere else hf_config.rms_norm_eps,
        parallel_block=cohere,
    )
  else:
    raise ValueError(f"HF model_type {model_type!r} is not supported; use one of "
                     f"{_T5_FAMILY + _DECODER_FAMILY}.")
  fields.update(overrides)
  return TransformerConfig(**fields)


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One parameter: its path in our (unscanned) tree, its HF name, and how the layouts relate.

  With `in_dims=None` the arrays are identical. Otherwise the HF tensor is a 2-D
  [prod(shape[in_dims:]), prod(shape[:in_dims])] matrix (nn.Linear's [out, in]) and ours is its
  transpose reshaped to `shape`, e.g. q.weight [heads*kv, embed] -> query kernel [embed, heads, kv].
  """

  path: tuple[str, ...]
  hf_name: str
  shape: tuple[int, ...]
  in_dims: int | None = 1

  @property
  def hf_shape(self) -> tuple[int, ...]:
    if self.in_dims is None:
      return self.shape
    return (math.prod(self.shape[self.in_dims:]), math.prod(self.shape[:self.in_dims]))

  def to_ours(self, hf_array: np.ndarray) -> np.ndarray:
    if self.in_dims is None:
      return hf_array
    return hf_array.T.reshape(self.shape)

  def to_hf(self, array: np.ndarray) -> np.ndarray:
    if self.in_dims is None:
      return array
    return array.reshape(math.prod(self.shape[:self.in_dims]), -1).T


def _attention(cfg: TransformerConfig, path: tuple[str, ...], hf: str,
               names: tuple[str, str, str, str]) -> list[TensorMap]:
  """q/k/v/out projections; `names` are HF's projection names in that order."""
  e, h, kvh, d = cfg.emb_dim, cfg.num_heads, cfg.kv_heads, cfg.head_dim
  q, k, v, o = names
  return [
      TensorMap(path + ("query", "kernel"), f"{hf}.{q}.weight", (e, h, d)),
      TensorMap(path + ("key", "kernel"), f"{hf}.{k}.weight", (e, kvh, d)),
      TensorMap(path + ("value", "kernel"), f"{hf}.{v}.weight", (e, kvh, d)),
      TensorMap(path + ("out", "kernel"), f"{hf}.{o}.weight", (h, d, e), in_dims=2),
  ]


def _mlp(cfg: TransformerConfig, path: tuple[str, ...], hf_in: tuple[str, ...],
         hf_out: str) -> list[TensorMap]:
  """MLP input projections (`wi` or `wi_{i}`, in order) and the output projection `wo`."""
  e, m = cfg.emb_dim, cfg.mlp_dim
  ours = ("wi",) if len(hf_in) == 1 else tuple(f"wi_{i}" for i in range(len(hf_in)))
  return [TensorMap(path + (name, "kernel"), hf, (e, m)) for name, hf in zip(ours, hf_in)] + [
      TensorMap(path + ("wo", "kernel"), hf_out, (m, e))]


def _norm(cfg: TransformerConfig, path: tuple[str, ...], hf: str) -> TensorMap:
  return TensorMap(path + ("scale",), hf, (cfg.emb_dim,), in_dims=None)


def _relpos(cfg: TransformerConfig, path: tuple[str, ...], hf: str) -> TensorMap:
  # HF nn.Embedding [buckets, heads] -> ours [heads, buckets]: the transpose layout.
  return TensorMap(path + ("rel_embedding",), f"{hf}.relative_attention_bias.weight",
                   (cfg.num_heads, cfg.relative_attention_num_buckets))


def _t5_layer_maps(cfg: TransformerConfig, stack: str, i: int) -> list[TensorMap]:
  """One T5 encoder (`stack="encoder"`) or decoder block."""
  path, hf = (stack, f"layers_{i}"), f"{stack}.block.{i}.layer"
  mlp_in = tuple(f"{hf}.{{}}.DenseReluDense.{n}.weight" for n in (
      ("wi",) if len(cfg.mlp_activations) == 1 else ("wi_0", "wi_1")))
  if stack == "encoder":
    maps = [_norm(cfg, path + ("pre_attention_layer_norm",), f"{hf}.0.layer_norm.weight")]
    maps += _attention(cfg, path + ("attention",), f"{hf}.0.SelfAttention", ("q", "k", "v", "o"))
    mlp_block = 1
  else:
    maps = [_norm(cfg, path + ("pre_self_attention_layer_norm",), f"{hf}.0.layer_norm.weight")]
    maps += _attention(cfg, path + ("self_attention",), f"{hf}.0.SelfAttention",
                       ("q", "k", "v", "o"))
    maps.append(_norm(cfg, path + ("pre_cross_attention_layer_norm",), f"{hf}.1.layer_norm.weight"))
    maps += _attention(cfg, path + ("encoder_decoder_attention",), f"{hf}.1.EncDecAttention",
                       ("q", "k", "v", "o"))
    mlp_block = 2
  maps.append(_norm(cfg, path + ("pre_mlp_layer_norm",), f"{hf}.{mlp_block}.layer_norm.weight"))
  maps += _mlp(cfg, path + ("mlp",), tuple(n.format(mlp_block) for n in mlp_in),
               f"{hf}.{mlp_block}.DenseReluDense.wo.weight")
  if cfg.per_layer_relative_bias:
    maps.append(_relpos(cfg, path + ("relpos_bias",), f"{hf}.0.SelfAttention"))
  return maps


def _decoder_only_layer_maps(cfg: TransformerConfig, i: int) -> list[TensorMap]:
  """One Llama/Cohere block (Cohere's parallel block has no post-attention norm)."""
  path, hf = ("decoder", f"layers_{i}"), f"model.layers.{i}"
  maps = [_norm(cfg, path + ("pre_self_attention_layer_norm",), f"{hf}.input_layernorm.weight")]
  maps += _attention(cfg, path + ("self_attention",), f"{hf}.self_attn",
                     ("q_proj", "k_proj", "v_proj", "o_proj"))
  if not cfg.parallel_block:
    maps.append(_norm(cfg, path + ("pre_mlp_layer_norm",), f"{hf}.post_attention_layernorm.weight"))
  maps += _mlp(cfg, path + ("mlp",), (f"{hf}.mlp.gate_proj.weight", f"{hf}.mlp.up_proj.weight"),
               f"{hf}.mlp.down_proj.weight")
  return maps


LayerMaps = dict[str, list[list[TensorMap]]]  # stack name -> per layer -> tensors


def tensor_maps(config: TransformerConfig) -> tuple[list[TensorMap], LayerMaps]:
  """The whole mapping for `config`: (non-layer maps, {stack: per-layer maps}).

  Encoder-decoders (`num_encoder_layers > 0`) use HF T5 names, decoder-only models Llama/Cohere
  names.
  """
  cfg = config
  e, vocab = cfg.emb_dim, cfg.vocab_size
  if cfg.num_encoder_layers > 0:
    maps = [
        TensorMap(("token_embedder", "embedding"), "shared.weight", (vocab, e), in_dims=None),
        _norm(cfg, ("encoder", "encoder_norm"), "encoder.final_layer_norm.weight"),
        _norm(cfg, ("decoder", "decoder_norm"), "decoder.final_layer_norm.weight"),
    ]
    if not cfg.per_layer_relative_bias:
      # HF keeps the shared table in block 0 of each stack.
      maps += [_relpos(cfg, (s, "relpos_bias"), f"{s}.block.0.layer.0.SelfAttention")
               for s in ("encoder", "decoder")]
    depths = {"encoder": cfg.num_encoder_layers, "decoder": cfg.num_decoder_layers}
    stacks = {s: [_t5_layer_maps(cfg, s, i) for i in range(n)] for s, n in depths.items()}
  else:
    maps = [
        TensorMap(("decoder", "token_embedder", "embedding"), "model.embed_tokens.weight",
                  (vocab, e), in_dims=None),
        _norm(cfg, ("decoder", "decoder_norm"), "model.norm.weight"),
    ]
    stacks = {"decoder": [_decoder_only_layer_maps(cfg, i) for i in range(cfg.num_decoder_layers)]}
  if not cfg.logits_via_embedding:
    maps.append(TensorMap(("decoder", "logits_dense", "kernel"), "lm_head.weight", (e, vocab)))
  return maps, stacks


def _fetch(state_dict: Mapping[str, Any], tensor: TensorMap) -> np.ndarray:
  """The HF tensor of `tensor` in our layout; ValueError if it is missing or mis-shaped."""
  if tensor.hf_name not in state_dict:
    raise ValueError(f"{tensor.hf_name}: missing from the state dict "
                     f"(expected shape {tensor.hf_shape} for {'/'.join(tensor.path)}).")
  array = np.asarray(state_dict[tensor.hf_name])
  if array.shape != tensor.hf_shape:
    raise ValueError(f"{tensor.hf_name}: expected shape {tensor.hf_shape}, found {array.shape}.")
  return tensor.to_ours(array)


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def params_from_hf(state_dict: Mapping[str, Any], config: TransformerConfig) -> dict[str, Any]:
  """Our unboxed params tree from an HF state dict of numpy arrays (e.g. `safetensors.numpy`).

  Layer weights are stacked along a new leading axis under `layers` when `config.scan_layers`.
  Arrays are cast to `config.param_dtype`. Extra HF tensors (tied copies such as
  `encoder.embed_tokens.weight`) are ignored.
  """
  dtype = jnp.dtype(config.param_dtype)
  params: dict[str, Any] = {}
  maps, stacks = tensor_maps(config)
  for tensor in maps:
    _put(params, tensor.path, jnp.asarray(_fetch(state_dict, tensor), dtype))
  for per_layer in stacks.values():
    if config.scan_layers:
      for j, tensor in enumerate(per_layer[0]):
        stacked = np.stack([_fetch(state_dict, layer[j]) for layer in per_layer])
        path = tuple("layers" if p.startswith("layers_") else p for p in tensor.path)
        _put(params, path, jnp.asarray(stacked, dtype))
    else:
      for layer in per_layer:
        for tensor in layer:
          _put(params, tensor.path, jnp.asarray(_fetch(state_dict, tensor), dtype))
  return params
