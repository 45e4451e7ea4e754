"""Hugging Face checkpoints <-> polyglot_jax configs and parameter trees.

Supported: T5 (classic and v1.1), mT5, umT5, Llama and Cohere(-Command). The mapping is one table
of `TensorMap` rows (our path, HF name, our shape, layout); each row's layout change is a
transpose + reshape with a known inverse (`to_hf`), so exporting back to HF reads the same table.
Import reads a local directory of safetensors (one file, or shards listed by
`model.safetensors.index.json`) tensor by tensor: onto the host (`load_hf_checkpoint`), or
straight into a device mesh (`load_hf_params_sharded`: each device's block of each tensor is read
on its own, so no host ever holds the model). Export writes `model.safetensors` and a
`config.json` made by transformers' own config classes, so `AutoModel*.from_pretrained` loads it;
given the imported config.json, every field the model does not determine keeps its value.
Token ids (EOS, one or several; pad; BOS / decoder start) map both ways, import preferring
`generation_config.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import seqio
import transformers

from polyglot_jax.data import vocab
from polyglot_jax.models.config import TransformerConfig

# HF activation names -> ours (`layers.ACTIVATIONS`); "gelu_new" is the tanh approximation.
_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu", "silu": "silu",
                "swish": "silu"}
_T5_FAMILY = ("t5", "mt5", "umt5")
_DECODER_FAMILY = ("llama", "cohere")
GENERATION_CONFIG = "generation_config.json"  # `generate`'s defaults: its EOS ids win on import


def _activation(hf_name: str) -> str:
  if hf_name not in _ACTIVATIONS:
    raise ValueError(f"HF activation {hf_name!r} is not supported; known: {sorted(_ACTIVATIONS)}.")
  return _ACTIVATIONS[hf_name]


def _special_ids(hf_config: Any, generation: Mapping[str, Any]) -> dict[str, Any]:
  """Our token id fields from an HF config and its generation config (which `generate` uses).

  EOS may be one id or a list. Without a pad id, outputs are padded with the first EOS, as
  `generate` does; the first decoder input is T5's `decoder_start_token_id` or a decoder's BOS.
  """

  def pick(name: str) -> Any:
    value = generation.get(name)
    return getattr(hf_config, name, None) if value is None else value

  eos = pick("eos_token_id")
  eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
  if not eos_ids:
    raise ValueError(f"HF {hf_config.model_type} config has no eos_token_id; add it to "
                     "config.json (or generation_config.json).")
  pad = pick("pad_token_id")
  pad = eos_ids[0] if pad is None else pad
  bos = pick("decoder_start_token_id" if hf_config.model_type in _T5_FAMILY else "bos_token_id")
  return dict(eos_token_ids=tuple(map(int, eos_ids)), pad_token_id=int(pad),
              bos_token_id=int(pad if bos is None else bos))


def config_from_hf(hf_config: Any, generation: Mapping[str, Any] | None = None,
                   **overrides: Any) -> TransformerConfig:
  """TransformerConfig equivalent to a T5/MT5/UMT5/Llama/Cohere HF config.

  Args:
    hf_config: a `transformers` config object.
    generation: the checkpoint's `generation_config.json` fields, if any: its EOS, pad and BOS
      ids take precedence (they are what `transformers.generate` stops at).
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
  fields.update(_special_ids(hf_config, generation or {}))
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


def _check(tensor: TensorMap, found: tuple[int, ...] | None) -> None:
  """One-line ValueError if the HF tensor is missing (`found` None) or not of the HF shape."""
  if found is None:
    raise ValueError(f"{tensor.hf_name}: missing from the state dict "
                     f"(expected shape {tensor.hf_shape} for {'/'.join(tensor.path)}).")
  if tuple(found) != tensor.hf_shape:
    raise ValueError(f"{tensor.hf_name}: expected shape {tensor.hf_shape}, found {tuple(found)}.")


def _fetch(state_dict: Mapping[str, Any], tensor: TensorMap) -> np.ndarray:
  """The HF tensor of `tensor` in our layout; ValueError if it is missing or mis-shaped."""
  if tensor.hf_name not in state_dict:
    _check(tensor, None)
  array = np.asarray(state_dict[tensor.hf_name])
  _check(tensor, array.shape)
  return tensor.to_ours(array)


def _scanned(path: tuple[str, ...]) -> tuple[str, ...]:
  """The path of a per-layer parameter in a scanned stack (`layers_3` -> `layers`)."""
  return tuple("layers" if p.startswith("layers_") else p for p in path)


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
        _put(params, _scanned(tensor.path), jnp.asarray(stacked, dtype))
    else:
      for layer in per_layer:
        for tensor in layer:
          _put(params, tensor.path, jnp.asarray(_fetch(state_dict, tensor), dtype))
  return params


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def params_to_hf(params: Mapping[str, Any], config: TransformerConfig) -> dict[str, np.ndarray]:
  """HF state dict (contiguous numpy arrays) of our unboxed params: the inverse of
  `params_from_hf`. Tied tensors are written once (HF re-ties them on load)."""
  maps, stacks = tensor_maps(config)
  state_dict = {t.hf_name: t.to_hf(np.asarray(_get(params, t.path))) for t in maps}
  for per_layer in stacks.values():
    for i, layer in enumerate(per_layer):
      for tensor in layer:
        if config.scan_layers:
          array = np.asarray(_get(params, _scanned(tensor.path)))[i]
        else:
          array = np.asarray(_get(params, tensor.path))
        state_dict[tensor.hf_name] = tensor.to_hf(array)
  return {name: np.ascontiguousarray(array) for name, array in state_dict.items()}


_HF_ACTIVATIONS = {"gelu": "gelu_new", "relu": "relu", "silu": "silu"}
_HF_CLASSES = {
    "t5": (transformers.T5Config, "T5ForConditionalGeneration"),
    "mt5": (transformers.MT5Config, "MT5ForConditionalGeneration"),
    "umt5": (transformers.UMT5Config, "UMT5ForConditionalGeneration"),
    "llama": (transformers.LlamaConfig, "LlamaForCausalLM"),
    "cohere": (transformers.CohereConfig, "CohereForCausalLM"),
}


def _require(ok: bool, model_type: str, what: str) -> None:
  if not ok:
    raise ValueError(f"Cannot export to HF {model_type!r}: {what}.")


def _default_model_type(cfg: TransformerConfig) -> str:
  if cfg.num_encoder_layers:
    return "umt5" if cfg.per_layer_relative_bias else "t5"
  return "cohere" if cfg.parallel_block else "llama"


def _hf_fields(cfg: TransformerConfig, model_type: str) -> dict[str, Any]:
  """The HF config fields that `cfg` determines for `model_type` (the rest keep their value)."""
  if model_type not in _HF_CLASSES:
    raise ValueError(f"model_type={model_type!r}: use one of {sorted(_HF_CLASSES)}.")
  encoder_decoder = cfg.num_encoder_layers > 0
  activation, *gate = cfg.mlp_activations
  _require(activation in _HF_ACTIVATIONS and gate in ([], ["linear"]), model_type,
           f"mlp_activations={cfg.mlp_activations}")
  _require((model_type in _T5_FAMILY) == encoder_decoder, model_type,
           f"num_encoder_layers={cfg.num_encoder_layers}")
  eos = cfg.eos_token_ids
  fields: dict[str, Any] = dict(vocab_size=cfg.vocab_size, pad_token_id=cfg.pad_token_id,
                                eos_token_id=eos[0] if len(eos) == 1 else list(eos),
                                tie_word_embeddings=cfg.logits_via_embedding,
                                architectures=[_HF_CLASSES[model_type][1]])
  if encoder_decoder:
    _require(cfg.position_embedding == "relative" and cfg.norm_type == "rms"
             and not cfg.scale_attention and cfg.kv_heads == cfg.num_heads
             and cfg.logit_scale == 1.0, model_type, "not a T5 architecture")
    _require(cfg.per_layer_relative_bias == (model_type == "umt5"), model_type,
             f"per_layer_relative_bias={cfg.per_layer_relative_bias}")
    _require(model_type == "t5" or not cfg.logits_via_embedding, model_type,
             "only classic T5 ties the output projection to the embedding")
    _require(cfg.scale_tied_logits or not cfg.logits_via_embedding, model_type,
             "tied logits must be rescaled by emb_dim**-0.5")
    hf_activation = _HF_ACTIVATIONS[activation]
    fields.update(
        d_model=cfg.emb_dim, d_kv=cfg.head_dim, d_ff=cfg.mlp_dim,
        num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        dropout_rate=cfg.dropout_rate, layer_norm_epsilon=cfg.norm_epsilon,
        feed_forward_proj=f"gated-{hf_activation}" if gate else hf_activation,
        decoder_start_token_id=cfg.bos_token_id)
  else:
    cohere = model_type == "cohere"
    _require(cfg.position_embedding == "rope" and cfg.scale_attention and gate
             and cfg.rope_interleaved == cohere and cfg.parallel_block == cohere
             and cfg.norm_type == ("layer" if cohere else "rms") and not cfg.scale_tied_logits,
             model_type, f"not a {model_type} architecture")
    _require(cohere or cfg.logit_scale == 1.0, model_type, f"logit_scale={cfg.logit_scale}")
    _require(not cohere or cfg.head_dim * cfg.num_heads == cfg.emb_dim, model_type,
             "Cohere needs head_dim * num_heads == emb_dim")
    fields.update(
        hidden_size=cfg.emb_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_decoder_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads, hidden_act=_HF_ACTIVATIONS[activation],
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=cfg.bos_token_id)
    if cohere:
      fields.update(layer_norm_eps=cfg.norm_epsilon, logit_scale=cfg.logit_scale)
    else:
      fields.update(head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_epsilon)
  return fields


# Keys of an imported config.json that export never copies: transformers writes or derives them
# (`torch_dtype` is the old name of `dtype`).
_NOT_COPIED = ("model_type", "transformers_version", "architectures", "_name_or_path",
               "torch_dtype")


def config_to_hf(config: TransformerConfig, model_type: str | None = None,
                 base: Mapping[str, Any] | None = None,
                 generation: Mapping[str, Any] | None = None,
                 **hf_overrides: Any) -> transformers.PretrainedConfig:
  """The transformers config of `config`: the inverse of `config_from_hf`.

  Args:
    config: our architecture.
    model_type: "t5", "mt5", "umt5", "llama" or "cohere"; default "t5"/"umt5" for
      encoder-decoders (mT5 is T5.1.1 with another vocabulary: say "mt5"), "cohere" for parallel
      blocks, else "llama".
    base: the imported checkpoint's config.json: every field `config` does not change keeps its
      value (e.g. `max_position_embeddings`, a pad id of None), the others are `config`'s.
    generation: the imported generation_config.json, which `base`'s token ids were read with.
    **hf_overrides: extra config fields, set last.
  """
  model_type = model_type or _default_model_type(config)
  fields = _hf_fields(config, model_type)
  config_cls = _HF_CLASSES[model_type][0]
  if base:
    kept = {k: v for k, v in base.items() if k not in _NOT_COPIED}
    # What the imported config itself maps to: a field we derive the same way is unchanged.
    imported = _hf_fields(config_from_hf(config_cls(**kept), generation), model_type)
    fields = {**kept, **{k: kept[k] if k in kept and imported.get(k) == v else v
                         for k, v in fields.items()}}
  fields["dtype"] = config.param_dtype  # the dtype of the weights written
  fields.update(hf_overrides)
  return config_cls(**fields)


def save_hf_checkpoint(directory: str, params: Mapping[str, Any], config: TransformerConfig,
                       model_type: str | None = None, base: Mapping[str, Any] | None = None,
                       generation: Mapping[str, Any] | None = None,
                       **hf_overrides: Any) -> None:
  """Writes `model.safetensors` and `config.json` (see `config_to_hf`) into `directory`.

  config.json holds every field of `base` too, also those equal to transformers' defaults
  (which `save_pretrained` leaves out), for readers of the raw file.
  """
  hf_config = config_to_hf(config, model_type, base, generation, **hf_overrides)
  os.makedirs(directory, exist_ok=True)
  hf_config.save_pretrained(directory)
  path = os.path.join(directory, "config.json")
  with open(path, encoding="utf-8") as f:
    written = json.load(f)
  every = hf_config.to_dict()
  written.update({k: every[k] for k in base or {} if k not in written and k in every})
  with open(path, "w", encoding="utf-8") as f:
    json.dump(written, f, indent=2, sort_keys=True)
    f.write("\n")
  safetensors.numpy.save_file(params_to_hf(params, config),
                              os.path.join(directory, "model.safetensors"),
                              metadata={"format": "pt"})


class SafetensorsDirectory(Mapping[str, np.ndarray]):
  """The tensors of a local HF checkpoint, read one at a time on access, or block by block.

  `model.safetensors.index.json` (sharded) names each tensor's file; otherwise every tensor is in
  `model.safetensors`. Tensors come back as numpy arrays (bfloat16 via ml_dtypes); files are
  memory-mapped, so reading a block reads only its bytes.
  """

  def __init__(self, directory: str) -> None:
    self._directory = directory
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
      with open(index, encoding="utf-8") as f:
        self._weight_map: dict[str, str] = json.load(f)["weight_map"]
    elif os.path.exists(single):
      with safetensors.safe_open(single, framework="numpy") as f:
        self._weight_map = {name: "model.safetensors" for name in f.keys()}
    else:
      raise FileNotFoundError(f"{directory}: neither model.safetensors nor "
                              "model.safetensors.index.json.")
    self._files: dict[str, Any] = {}

  def _slice(self, name: str) -> Any:
    filename = self._weight_map[name]
    if filename not in self._files:
      self._files[filename] = safetensors.safe_open(os.path.join(self._directory, filename),
                                                    framework="numpy")
    return self._files[filename].get_slice(name)  # (numpy's get_tensor rejects bfloat16)

  def shape(self, name: str) -> tuple[int, ...]:
    """The stored shape, read from the file header."""
    return tuple(self._slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor, or only its block `index` (one slice per dimension)."""
    tensor = self._slice(name)
    return np.asarray(tensor[index or tuple(slice(None) for _ in tensor.get_shape())])

  def __getitem__(self, name: str) -> np.ndarray:
    return self.read(name)

  def __contains__(self, name: object) -> bool:
    return name in self._weight_map

  def __iter__(self) -> Iterator[str]:
    return iter(self._weight_map)

  def __len__(self) -> int:
    return len(self._weight_map)


def read_hf_config(directory: str, **overrides: Any) -> TransformerConfig:
  """The TransformerConfig of the HF checkpoint in a local directory: its `config.json`, with
  the token ids of `generation_config.json` when there is one."""
  if not os.path.exists(os.path.join(directory, "config.json")):
    raise FileNotFoundError(f"{directory}: no config.json; point at a Hugging Face checkpoint "
                            "directory (config.json and safetensors).")
  generation: dict[str, Any] = {}
  if os.path.exists(os.path.join(directory, GENERATION_CONFIG)):
    with open(os.path.join(directory, GENERATION_CONFIG), encoding="utf-8") as f:
      generation = json.load(f)
  return config_from_hf(transformers.AutoConfig.from_pretrained(directory), generation,
                        **overrides)


def load_hf_checkpoint(directory: str,
                       **overrides: Any) -> tuple[TransformerConfig, dict[str, Any]]:
  """(config, unboxed params) of the HF checkpoint in a local directory (`config.json` +
  safetensors, single file or sharded). `overrides` are TransformerConfig fields (dtype,
  scan_layers, ...); a missing or mis-shaped tensor raises a one-line ValueError."""
  config = read_hf_config(directory, **overrides)
  return config, params_from_hf(SafetensorsDirectory(directory), config)


def _block(reader: SafetensorsDirectory, tensor: TensorMap, index: tuple[slice, ...]
           ) -> np.ndarray:
  """Block `index` of `tensor` in our layout, reading only the HF rows and columns it spans.

  Our dims before `in_dims` flatten to HF's columns (inputs), the rest to its rows (outputs):
  the block's flat row and column indices give the HF sub-matrix to read, usually exactly the
  block (heads and embedding split into contiguous ranges).
  """
  if tensor.in_dims is None:
    return reader.read(tensor.hf_name, index)
  ranges = [range(*part.indices(size)) for part, size in zip(index, tensor.shape)]
  k = tensor.in_dims
  cols = np.ravel_multi_index(np.ix_(*ranges[:k]), tensor.shape[:k]).ravel()  # [block inputs]
  rows = np.ravel_multi_index(np.ix_(*ranges[k:]), tensor.shape[k:]).ravel()  # [block outputs]
  hf_block = reader.read(tensor.hf_name, (slice(rows.min(), rows.max() + 1),
                                          slice(cols.min(), cols.max() + 1)))  # [rows, cols]
  picked = hf_block[np.ix_(rows - rows.min(), cols - cols.min())]  # [block outputs, inputs]
  return picked.T.reshape([len(r) for r in ranges])


def _stacked_block(reader: SafetensorsDirectory, layers: list[TensorMap],
                   index: tuple[slice, ...]) -> np.ndarray:
  """Block `index` of a scanned parameter: [layers, ...] stacked from per-layer HF tensors."""
  picked = range(*index[0].indices(len(layers)))
  return np.stack([_block(reader, layers[i], index[1:]) for i in picked])


def load_hf_params_sharded(directory: str, config: TransformerConfig, shardings: Any
                           ) -> dict[str, Any]:
  """Our params of the HF checkpoint in `directory`, placed straight into `shardings`.

  `shardings` is a tree like the params with a NamedSharding per leaf (e.g. a ParamsOnly state
  spec's). Every tensor is checked first (one-line errors as `load_hf_checkpoint`); then each
  device's block of each parameter is read from the safetensors files on its own
  (`jax.make_array_from_callback`), so a host holds about one tensor at a time, never the model.
  Equal to `load_hf_checkpoint`'s params, sharded.
  """
  reader = SafetensorsDirectory(directory)
  dtype = jnp.dtype(config.param_dtype)
  maps, stacks = tensor_maps(config)
  for tensor in maps + [t for stack in stacks.values() for layer in stack for t in layer]:
    _check(tensor, reader.shape(tensor.hf_name) if tensor.hf_name in reader else None)
  params: dict[str, Any] = {}

  def place(path: tuple[str, ...], shape: tuple[int, ...],
            read_block: Callable[[tuple[slice, ...]], np.ndarray]) -> None:
    blocks: dict[Any, np.ndarray] = {}  # replicated devices ask for the same block

    def callback(index: tuple[slice, ...]) -> np.ndarray:
      key = tuple((part.start, part.stop, part.step) for part in index)
      if key not in blocks:
        blocks[key] = np.asarray(read_block(index), dtype)
      return blocks[key]

    _put(params, path, jax.make_array_from_callback(shape, _get(shardings, path), callback))

  for tensor in maps:
    place(tensor.path, tensor.shape, functools.partial(_block, reader, tensor))
  for per_layer in stacks.values():
    if config.scan_layers:
      for j, tensor in enumerate(per_layer[0]):
        layers = [layer[j] for layer in per_layer]
        place(_scanned(tensor.path), (len(layers),) + tensor.shape,
              functools.partial(_stacked_block, reader, layers))
    else:
      for tensor in (t for layer in per_layer for t in layer):
        place(tensor.path, tensor.shape, functools.partial(_block, reader, tensor))
  return params


def load_hf_vocabulary(directory: str, extra_ids: int = 0) -> seqio.Vocabulary:
  """The vocabulary next to the weights (`vocab.get_vocabulary` of the directory): SentencePiece
  `spiece.model` (T5/mT5/umT5) or `tokenizer.model` (Llama 2) when there is one, else the
  `tokenizer.json` of HF tokenizers (Cohere, Llama 3) as an `hf_vocab.HFVocabulary`. HF's T5
  tokenizer appends 100 sentinels to `spiece.model`: pass `extra_ids=100` for T5.1.1 (mT5's
  model already holds them)."""
  return vocab.get_vocabulary(directory, extra_ids=extra_ids)
