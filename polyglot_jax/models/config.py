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
AttentionKernel = Literal["auto", "einsum", "dot_product", "flash", "splash"]
ATTENTION_KERNELS = ("auto", "einsum", "dot_product", "flash", "splash")

# Sites an adapter can modify: projections (LoRA, MoLoRA add a low-rank update to their output)
# and activations (IA3, MoV scale them): the attention keys/values and the FFN intermediate.
PROJECTION_SITES = ("query", "key", "value", "out", "wi", "wo")
ACTIVATION_SITES = ("key", "value", "mlp")
ADAPTER_KINDS = ("ia3", "lora", "mov", "molora")
_DEFAULT_TARGETS = {"ia3": ACTIVATION_SITES, "mov": ACTIVATION_SITES,
                    "lora": PROJECTION_SITES, "molora": PROJECTION_SITES}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """A sparse mixture-of-experts FFN in every layer (GShard / Switch / ST-MoE).

  Attributes:
    num_experts: experts per layer.
    num_selected: k of the router (tokens_choose: experts per token).
    router: "tokens_choose" (each token picks its top-k experts) or "experts_choose" (each
      expert picks its top-capacity tokens of a sequence; needs `capacity_factor`).
    capacity_factor: each expert takes at most ceil(capacity_factor * length * k / num_experts)
      tokens of a sequence, the rest are dropped (their residual passes through unchanged).
      None = dropless: tokens are sorted by expert and run through a grouped matmul.
    renormalize: rescale the k selected router probabilities to sum to 1 (only when k > 1;
      top-1 keeps the raw probability so the router still gets a gradient).
    load_balance_weight: coefficient of the load-balancing loss added to the training loss.
    router_z_loss_weight: coefficient of the router z-loss added to the training loss.
    router_init_stddev: router kernel init N(0, stddev).
  """

  num_experts: int = 8
  num_selected: int = 2
  router: Literal["tokens_choose", "experts_choose"] = "tokens_choose"
  capacity_factor: float | None = 1.25
  renormalize: bool = True
  load_balance_weight: float = 1e-2
  router_z_loss_weight: float = 1e-3
  router_init_stddev: float = 0.02

  def __post_init__(self) -> None:
    if self.router not in ("tokens_choose", "experts_choose"):
      raise ValueError(f"MoeConfig.router={self.router!r}: use 'tokens_choose' or "
                       "'experts_choose'.")
    if not 1 <= self.num_selected <= self.num_experts:
      raise ValueError(f"MoeConfig.num_selected={self.num_selected} must be in "
                       f"[1, num_experts={self.num_experts}].")
    if self.router == "experts_choose" and self.capacity_factor is None:
      raise ValueError("MoeConfig: the experts_choose router needs a capacity_factor.")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Parameter-efficient adapters (IA3, LoRA) and their soft mixtures (MoV, MoLoRA).

  The base model is meant to stay frozen (`train.trainable_params`, see gin/routing/). Sizes
  come from the model config; every hyperparameter here is a gin binding.

  Attributes:
    kind: "ia3" (learned scale, init 1), "lora" (low-rank update), "mov" (router-weighted
      mixture of IA3 vectors), "molora" (router-weighted mixture of LoRA adapters).
    num_experts: experts per site of "mov"/"molora" (ia3 and lora have one, without router).
    num_selected: None = soft merge over all experts (the method of Zadouri et al.); k = keep
      the top-k router weights per token, renormalised to sum to 1.
    rank: LoRA rank r.
    alpha: LoRA scale numerator; updates are multiplied by alpha / rank.
    targets: the sites adapted; None = the kind's default (IA3/MoV: key, value, mlp;
      LoRA/MoLoRA: query, key, value, out, wi, wo). See PROJECTION_SITES, ACTIVATION_SITES.
    router_init_stddev: router kernel init N(0, stddev).
    lora_init_stddev: LoRA A init N(0, stddev); B starts at zero, so training starts from the
      base model.
    load_balance_weight: coefficient of the load-balancing loss (0: soft merging needs none).
    router_z_loss_weight: coefficient of the router z-loss.
  """

  kind: Literal["ia3", "lora", "mov", "molora"] = "ia3"
  num_experts: int = 10
  num_selected: int | None = None
  rank: int = 4
  alpha: float = 16.0
  targets: tuple[str, ...] | None = None
  router_init_stddev: float = 0.02
  lora_init_stddev: float = 0.02
  load_balance_weight: float = 0.0
  router_z_loss_weight: float = 0.0

  def __post_init__(self) -> None:
    if self.targets is not None:  # gin may give a list; the config must stay hashable.
      object.__setattr__(self, "targets", tuple(self.targets))
    if self.kind not in ADAPTER_KINDS:
      raise ValueError(f"AdapterConfig.kind={self.kind!r}: use one of {', '.join(ADAPTER_KINDS)}.")
    sites = PROJECTION_SITES if self.kind in ("lora", "molora") else ACTIVATION_SITES
    unknown = sorted(set(self.sites) - set(sites))
    if unknown:
      raise ValueError(f"AdapterConfig.targets: {unknown} cannot take {self.kind}; "
                       f"choose from {', '.join(sites)}.")
    if self.num_selected is not None and not 1 <= self.num_selected <= self.num_experts:
      raise ValueError(f"AdapterConfig.num_selected={self.num_selected} must be None or in "
                       f"[1, num_experts={self.num_experts}].")

  @property
  def mixture(self) -> bool:
    """Whether each site holds several experts mixed by a router (MoV, MoLoRA)."""
    return self.kind in ("mov", "molora")

  @property
  def low_rank(self) -> bool:
    """Whether the adapters add low-rank updates to projections (LoRA, MoLoRA)."""
    return self.kind in ("lora", "molora")

  @property
  def sites(self) -> tuple[str, ...]:
    return tuple(self.targets) if self.targets is not None else _DEFAULT_TARGETS[self.kind]

  def adapts(self, site: str, low_rank: bool) -> bool:
    """Whether `site` gets an adapter of this kind (`low_rank`: projection, else activation)."""
    return self.low_rank == low_rank and site in self.sites


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Dimensions and switches of one transformer.

  Attributes:
    vocab_size: rows of the token embedding (mT5: 250112, umT5: 256384).
    eos_token_ids: the ids that end a sequence: decoding stops at the first of them (HF configs
      may list several, e.g. Llama 3 instruct's end of text and end of turn).
    pad_token_id: fills decoded outputs after the end, as `transformers.generate` does.
    bos_token_id: the first decoder input token (seqio feature converters' `bos_id`): T5's 0,
      or the checkpoint's BOS, so decoder inputs are the ids `transformers` feeds.
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
    moe: replace every FFN by a sparse mixture of experts; None = dense FFN.
    adapters: parameter-efficient adapters (IA3, LoRA, MoV, MoLoRA); None = none.
    attention_kernel: how attention scores are computed (docs/attention.md): "einsum" (the
      reference), "dot_product" (jax.nn.dot_product_attention, cuDNN on GPU), "flash" (Pallas
      TPU, T5 relative bias), "splash" (Pallas TPU, causal/PrefixLM/sliding-window masks) or
      "auto" (per backend).
    attention_interpret: run the Pallas kernels in interpret mode (any backend; slow, for
      tests and CPU checks).
    sliding_window: decoder self-attention sees at most this many keys, its own included
      (Mistral-style local attention); None = unlimited.
    loss_chunk_size: compute the output logits and cross-entropy in chunks of this many
      positions per row, never materialising [batch, length, vocab] logits; 0 = all at once.
  """

  vocab_size: int = 32128
  # Special token ids: seqio/T5's by default, the checkpoint's after `convert --from_hf`.
  eos_token_ids: tuple[int, ...] = (1,)
  pad_token_id: int = 0
  bos_token_id: int = 0
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
  moe: MoeConfig | None = None
  adapters: AdapterConfig | None = None
  attention_kernel: AttentionKernel = "einsum"
  attention_interpret: bool = False
  sliding_window: int | None = None
  loss_chunk_size: int = 0

  def __post_init__(self) -> None:
    object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))  # gin/JSON give lists
    special = (*self.eos_token_ids, self.pad_token_id, self.bos_token_id)
    if not self.eos_token_ids or not all(0 <= i < self.vocab_size for i in special):
      raise ValueError(f"eos_token_ids={self.eos_token_ids}, pad_token_id={self.pad_token_id} and "
                       f"bos_token_id={self.bos_token_id} must be ids in [0, vocab_size="
                       f"{self.vocab_size}), with at least one EOS.")
    kv = self.kv_heads
    if self.num_heads % kv:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={kv}; "
          "grouped-query attention needs whole groups.")
    if self.position_embedding not in ("relative", "rope"):
      raise ValueError(f"position_embedding={self.position_embedding!r}: use 'relative' or 'rope'.")
    if self.norm_type not in ("rms", "layer"):
      raise ValueError(f"norm_type={self.norm_type!r}: use 'rms' or 'layer'.")
    if self.moe is not None and self.adapters is not None and {"wi", "wo", "mlp"} & set(
        self.adapters.sites):
      raise ValueError("adapters on the FFN (targets wi, wo, mlp) cannot be combined with a "
                       "sparse MoE FFN; drop those targets or the MoE.")
    if self.attention_kernel not in ATTENTION_KERNELS:
      raise ValueError(f"attention_kernel={self.attention_kernel!r}: use one of "
                       f"{', '.join(ATTENTION_KERNELS)}.")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"sliding_window={self.sliding_window} must be None or at least 1.")
    if self.loss_chunk_size < 0:
      raise ValueError(f"loss_chunk_size={self.loss_chunk_size} must be 0 (no chunking) or "
                       "positive.")

  @property
  def kv_heads(self) -> int:
    """Number of key/value heads (GQA); equals num_heads for multi-head attention."""
    return self.num_kv_heads or self.num_heads
