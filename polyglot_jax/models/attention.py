"""Attention kernels behind one dispatch: the einsum reference and three fused alternatives.

Every kernel takes queries [batch, q_length, heads, head_dim] (already scaled: T5 folds
1/sqrt(head_dim) into the query init, Llama/Cohere scale q before this call), keys and values
[batch, kv_length, kv_heads, head_dim] (grouped-query attention when kv_heads < heads), an optional
float32 additive `bias` (T5's relative-position bias) and an `AttentionMask` saying which keys each
query sees. They agree on every real query row; rows of padding queries (segment 0) are
unspecified (nothing reads them: padding keys are masked and padding targets carry no loss).

- `einsum`: materialises [batch, heads, q_length, kv_length] f32 scores; supports everything,
  including dropout on the attention weights. The reference, and the default.
- `dot_product`: `jax.nn.dot_product_attention` (cuDNN flash attention on GPU in bf16/f16, XLA
  elsewhere) with the dense mask and the bias.
- `flash`: the Pallas TPU flash attention with the bias as `ab` and segment ids for padding and
  packing; causal or bidirectional masks. For the T5 family (it takes the relative bias).
- `splash`: the Pallas TPU splash attention: causal, PrefixLM, sliding-window and bidirectional
  masks with segment ids and native GQA, no bias. For the decoder families.
- `auto`: flash/splash on TPU where they fit, dot_product on GPU, einsum on CPU.

The Pallas kernels run under `jax.shard_map` over the active mesh (batch split like the logical
`batch` axis, heads like `heads`), so they compose with the data/fsdp/tensor partitioning. With
`interpret=True` they run in Pallas interpret mode, numerically, on any backend (tests, CPU
users); `auto` never chooses interpret mode.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as flash_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_masks
from jax.sharding import PartitionSpec as P

from polyglot_jax.models.config import ATTENTION_KERNELS, AttentionKernel

Array = jax.Array

# T5X's additive mask value: finite, so rows with every key masked (padding queries) stay NaN-free.
MASK_BIAS = -1e10
# Pallas tiles (flash and splash): lengths must be multiples of the smallest.
_BLOCK_SIZES = (512, 256, 128)


@flax.struct.dataclass
class AttentionMask:
  """Which keys each query sees, in a form every kernel takes.

  A query sees a key iff both carry the same segment id > 0 and, when `causal`, the key is not
  after the query (key index <= `q_offset` + query index) or both lie in the PrefixLM `prefix`;
  with `window`, a causal query sees only keys less than `window` positions back (its own
  included); the prefix is exempt from the window.

  Attributes:
    q_segments: [batch, q_length] int segment ids of the queries, 0 on padding.
    kv_segments: [batch, kv_length] int segment ids of the keys, 0 on padding.
    prefix: [batch, length] 1 on PrefixLM's bidirectional prefix (seqio's
      `decoder_causal_attention`); None for a plain causal or a bidirectional mask.
    q_offset: [batch] index of the first query among the keys (a cached decoding step); None = 0.
    causal: keys after the query are hidden.
    window: sliding-window size of a causal mask; None = unlimited.
  """

  q_segments: Array
  kv_segments: Array
  prefix: Array | None = None
  q_offset: Array | None = None
  causal: bool = flax.struct.field(pytree_node=False, default=False)
  window: int | None = flax.struct.field(pytree_node=False, default=None)

  def dense(self) -> Array:
    """bool [batch, 1, q_length, kv_length]: True where the query sees the key."""
    q_seg, kv_seg = self.q_segments, self.kv_segments
    same = q_seg[:, :, None] == kv_seg[:, None, :]  # [batch, q_length, kv_length]
    real = (q_seg[:, :, None] > 0) & (kv_seg[:, None, :] > 0)  # [batch, q_length, kv_length]
    allowed = same & real  # [batch, q_length, kv_length]
    if self.causal:
      q_index = jnp.arange(q_seg.shape[1])[None, :]  # [1, q_length]
      if self.q_offset is not None:
        q_index = q_index + self.q_offset[:, None]  # [batch, q_length]
      kv_index = jnp.arange(kv_seg.shape[1])[None, None, :]  # [1, 1, kv_length]
      visible = kv_index <= q_index[:, :, None]  # [batch|1, q_length, kv_length]
      if self.window is not None:
        visible = visible & (kv_index > q_index[:, :, None] - self.window)
      if self.prefix is not None:
        prefix = self.prefix > 0  # [batch, length]
        visible = visible | (prefix[:, :, None] & prefix[:, None, :])  # [b, q_length, kv_length]
      allowed = allowed & visible  # [batch, q_length, kv_length]
    return allowed[:, None]  # [batch, 1, q_length, kv_length]


def mask_to_bias(mask: Array) -> Array:
  """Boolean mask -> float32 additive attention bias (0 kept, MASK_BIAS dropped)."""
  return jnp.where(mask, 0.0, MASK_BIAS).astype(jnp.float32)


def platform() -> str:
  """The platform attention compiles for: the active mesh's (a TPU topology compiled from a CPU
  host says "tpu"), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.default_backend() if mesh.empty else mesh.abstract_device.platform


def resolve_kernel(kernel: AttentionKernel, *, has_bias: bool, mask: AttentionMask | None,
                   q_length: int, kv_length: int, dropout: bool) -> str:
  """The kernel `auto` stands for on this platform (other names are returned unchanged).

  TPU: flash with a bias (T5), splash without, when they can express the mask, both lengths are
  multiples of 128 and no dropout applies to the attention weights; GPU: dot_product; otherwise
  (and for what the Pallas kernels cannot express) einsum.
  """
  if kernel != "auto":
    return kernel
  target = platform()
  if target == "gpu":
    return "dot_product"
  fits = q_length % _BLOCK_SIZES[-1] == 0 and kv_length % _BLOCK_SIZES[-1] == 0
  if target == "tpu" and fits and not dropout:
    prefix = mask is not None and mask.prefix is not None
    window = mask is not None and mask.window is not None
    if has_bias and not (prefix or window):
      return "flash"
    if not has_bias and not (prefix and window):
      return "splash"
  return "einsum"


def attend(q: Array, k: Array, v: Array, bias: Array | None, mask: AttentionMask | None, *,
           kernel: AttentionKernel, interpret: bool = False,
           dropout: Callable[[Array], Array] | None = None,
           dtype: jnp.dtype = jnp.float32) -> Array:
  """Attends [batch, q_length, heads, head_dim] queries to keys/values; returns the same shape.

  Args:
    q: queries, scaled as the model wants (no further 1/sqrt(head_dim) is applied).
    k: [batch, kv_length, kv_heads, head_dim] keys; heads must be a multiple of kv_heads.
    v: [batch, kv_length, kv_heads, head_dim] values.
    bias: float32 additive bias broadcastable to [batch, heads, q_length, kv_length], or None.
    mask: who sees whom; None = every query sees every key.
    kernel: see the module docstring; "auto" resolves per platform.
    interpret: run the Pallas kernels (flash, splash) in interpret mode.
    dropout: applied to the attention weights (einsum only); None = no dropout.
    dtype: the compute dtype the attention weights are cast to (einsum).
  """
  kernel = resolve_kernel(kernel, has_bias=bias is not None, mask=mask, q_length=q.shape[1],
                          kv_length=k.shape[1], dropout=dropout is not None)
  if kernel not in ATTENTION_KERNELS:
    raise ValueError(f"attention_kernel={kernel!r} is unknown; use one of "
                     f"{', '.join(ATTENTION_KERNELS)}.")
  if kernel == "einsum":
    return einsum_attention(q, k, v, bias, mask, dropout, dtype)
  if dropout is not None:
    raise ValueError(f"attention_kernel={kernel!r} cannot apply dropout to attention weights; "
                     "use attention_kernel='einsum' (or 'auto') or dropout_rate=0.")
  if kernel == "dot_product":
    return dot_product_attention(q, k, v, bias, mask)
  if kernel == "flash":
    return flash_attention(q, k, v, bias, mask, interpret)
  return splash_attention(q, k, v, bias, mask, interpret)


def einsum_attention(q: Array, k: Array, v: Array, bias: Array | None,
                     mask: AttentionMask | None, dropout: Callable[[Array], Array] | None = None,
                     dtype: jnp.dtype = jnp.float32) -> Array:
  """Reference attention: f32 scores plus the bias and MASK_BIAS, softmax, weighted values."""
  batch, q_length, heads, head_dim = q.shape
  kv_length, kv_heads = k.shape[1], k.shape[2]
  if mask is not None:
    masked = mask_to_bias(mask.dense())  # [batch, 1, q_length, kv_length]
    bias = masked if bias is None else masked + bias  # [batch, heads|1, q_length, kv_length]
  q = q.reshape(batch, q_length, kv_heads, heads // kv_heads, head_dim)  # [b, q, kvh, group, d]
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k)  # [batch, kv_heads, group, q_length, kv_length]
  logits = logits.reshape(batch, heads, q_length, kv_length).astype(jnp.float32)  # [b, h, q, kv]
  if bias is not None:
    logits = logits + bias  # [batch, heads, q_length, kv_length]
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)  # [batch, heads, q_length, kv_length]
  if dropout is not None:
    weights = dropout(weights)
  weights = weights.reshape(batch, kv_heads, heads // kv_heads, q_length, kv_length)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, v)  # [batch, q_length, kv_heads, group, d]
  return out.reshape(batch, q_length, heads, head_dim)  # [batch, q_length, heads, head_dim]


def dot_product_attention(q: Array, k: Array, v: Array, bias: Array | None,
                          mask: AttentionMask | None) -> Array:
  """`jax.nn.dot_product_attention` with the dense mask: cuDNN on GPU for bf16/f16, else XLA."""
  dense = None if mask is None else mask.dense()  # [batch, 1, q_length, kv_length]
  cudnn = platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=dense, scale=1.0,
                                      implementation="cudnn" if cudnn else None)


def flash_attention(q: Array, k: Array, v: Array, bias: Array | None,
                    mask: AttentionMask | None, interpret: bool = False) -> Array:
  """Pallas TPU flash attention; the bias goes in as `ab` (its `sm_scale` stays 1: q is scaled).

  Grouped-query keys/values are repeated to the query heads (the kernel has no GQA).
  """
  if mask is not None and (mask.prefix is not None or mask.window is not None):
    what = "a PrefixLM mask" if mask.prefix is not None else "a sliding window"
    raise ValueError(f"attention_kernel='flash' cannot express {what}; use 'splash' "
                     "(or 'einsum').")
  _check_mask_for_pallas("flash", mask)
  q_length, kv_length = q.shape[1], k.shape[1]
  block_q, block_kv = _block("flash", q_length), _block("flash", kv_length)
  group = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, group, axis=2)  # [batch, kv_length, heads, head_dim]
  v = jnp.repeat(v, group, axis=2)  # [batch, kv_length, heads, head_dim]
  if bias is not None:
    bias = jnp.broadcast_to(bias, (q.shape[0], q.shape[2], q_length, kv_length))
  blocks = flash_lib.BlockSizes(
      block_q=block_q, block_k_major=block_kv, block_k=block_kv, block_b=1,
      block_q_major_dkv=block_q, block_k_major_dkv=block_kv, block_k_dkv=block_kv,
      block_q_dkv=block_q, block_k_major_dq=block_kv, block_k_dq=block_kv, block_q_dq=block_q)
  causal = mask is not None and mask.causal

  def kernel(q: Array, k: Array, v: Array, bias: Array | None, q_seg: Array | None,
             kv_seg: Array | None) -> Array:
    segments = None if q_seg is None else flash_lib.SegmentIds(q_seg, kv_seg)
    out = flash_lib.flash_attention(
        _heads_major(q), _heads_major(k), _heads_major(v), bias, segments, causal=causal,
        sm_scale=1.0, block_sizes=blocks)  # [batch, heads, q_length, head_dim]
    return _heads_major(out)  # [batch, q_length, heads, head_dim]

  if interpret:
    if jax.sharding.get_abstract_mesh().size > 1:
      raise ValueError("attention_kernel='flash' in interpret mode runs on one device only (Pallas "
                       "TPU interpret mode blocks on a multi-device CPU mesh); use 'splash' or a "
                       "one-device mesh.")
    kernel = _interpreted(kernel)
  q_seg, kv_seg = _segment_ids(mask)
  return _sharded(kernel, (q, k, v, bias, q_seg, kv_seg),
                  (_QKV, _QKV, _QKV, _BIAS, _SEGMENTS, _SEGMENTS), _QKV)


def splash_attention(q: Array, k: Array, v: Array, bias: Array | None,
                     mask: AttentionMask | None, interpret: bool = False) -> Array:
  """Pallas TPU splash attention: static causal/local/full block masks plus segment ids.

  PrefixLM runs as one splash call over the keys seen twice: [prefix keys | causal keys] with a
  static causal mask offset by the length, so the first half is fully visible and the second
  causal; segment ids hide non-prefix keys in the first half and prefix keys in the second.
  """
  if bias is not None:
    raise ValueError("attention_kernel='splash' takes no additive bias (T5's relative "
                     "positions); use 'flash' (or 'einsum').")
  if mask is not None and mask.prefix is not None and mask.window is not None:
    raise ValueError("attention_kernel='splash' cannot combine a PrefixLM mask with a sliding "
                     "window; use 'einsum'.")
  _check_mask_for_pallas("splash", mask)
  causal = mask is not None and mask.causal
  prefix_lm = causal and mask.prefix is not None
  window = mask.window if causal else None
  q_seg, kv_seg = _segment_ids(mask)
  if prefix_lm:
    prefix = mask.prefix > 0  # [batch, length]
    kv_seg = jnp.concatenate([jnp.where(prefix, kv_seg, -1), jnp.where(prefix, -1, kv_seg)],
                             axis=1)  # [batch, 2 * length]
    k = jnp.concatenate([k, k], axis=1)  # [batch, 2 * length, kv_heads, head_dim]
    v = jnp.concatenate([v, v], axis=1)  # [batch, 2 * length, kv_heads, head_dim]
  q_length, kv_length = q.shape[1], k.shape[1]
  block_q, block_kv = _block("splash", q_length), _block("splash", kv_length)
  blocks = splash_lib.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
      block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
      block_kv_dq=block_kv)
  shape = (q_length, kv_length)
  if prefix_lm:
    base = splash_masks.CausalMask(shape, offset=q_length)
  elif window is not None:
    base = splash_masks.LocalMask(shape, window_size=(window - 1, 0), offset=0)
  elif causal:
    base = splash_masks.CausalMask(shape)
  else:
    base = splash_masks.FullMask(shape)

  def kernel(q: Array, k: Array, v: Array, q_seg: Array | None, kv_seg: Array | None) -> Array:
    heads = q.shape[2]  # this shard's query heads
    splash = splash_lib.make_splash_mha(
        splash_masks.MultiHeadMask([base] * heads), block_sizes=blocks, head_shards=1,
        q_seq_shards=1, interpret=interpret)
    if q_seg is None:
      out = jax.vmap(splash)(_heads_major(q), _heads_major(k), _heads_major(v))
    else:
      out = jax.vmap(splash)(_heads_major(q), _heads_major(k), _heads_major(v),
                             splash_lib.SegmentIds(q_seg, kv_seg))  # [b, heads, q_length, d]
    return _heads_major(out)  # [batch, q_length, heads, head_dim]

  return _sharded(kernel, (q, k, v, q_seg, kv_seg), (_QKV, _KV, _KV, _SEGMENTS, _SEGMENTS), _QKV)


# Logical axes of the kernels' operands, mapped to mesh axes by the active rules.
_QKV = ("batch", "length", "heads", "kv")
_KV = ("batch", "length", "kv_heads", "kv")
_BIAS = ("batch", "heads", "length", None)
_SEGMENTS = ("batch", "length")


def _sharded(kernel: Callable[..., Array], args: tuple[Array | None, ...],
             axes: tuple[tuple[str | None, ...], ...], out_axes: tuple[str | None, ...]) -> Array:
  """Runs `kernel(*args)` per shard of the active mesh (`shard_map`), or directly without one.

  Dimensions split by the logical-axis rules stay split; one that its mesh axes do not divide
  is replicated instead. `None` arguments pass through.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(*args)
  present = [i for i, arg in enumerate(args) if arg is not None]
  specs = tuple(_spec(axes[i], args[i].shape, mesh) for i in present)
  out_spec = _spec(out_axes, args[0].shape, mesh)

  def per_shard(*present_args: Array) -> Array:
    full = list(args)
    for i, arg in zip(present, present_args):
      full[i] = arg
    return kernel(*full)

  return jax.shard_map(per_shard, in_specs=specs, out_specs=out_spec, check_vma=False)(
      *(args[i] for i in present))


def _spec(axes: tuple[str | None, ...], shape: tuple[int, ...],
          mesh: jax.sharding.AbstractMesh) -> P:
  """The mesh PartitionSpec of logical `axes`, replicating dimensions the mesh cannot divide."""
  spec = nn.logical_to_mesh_axes(axes)
  if spec is None:
    return P()
  kept = []
  for size, names in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    parts = 1
    for name in (names,) if isinstance(names, str) else tuple(names or ()):
      parts *= mesh.shape[name]
    kept.append(names if size % parts == 0 else None)
  return P(*kept)


def _interpreted(kernel: Callable[..., Array]) -> Callable[..., Array]:
  """`kernel` with its Pallas calls, forward and backward, traced in TPU interpret mode.

  `force_tpu_interpret_mode` acts on the calls traced under it, and JAX traces a custom-VJP's
  backward kernel only when differentiating, outside any context of the caller: the VJP here
  enters the mode again around it.
  """

  @jax.custom_vjp
  def run(*args: Array | None) -> Array:
    with pltpu.force_tpu_interpret_mode():
      return kernel(*args)

  def forward(*args: Array | None) -> tuple[Array, Callable[..., tuple[Array, ...]]]:
    with pltpu.force_tpu_interpret_mode():
      return jax.vjp(kernel, *args)

  def backward(vjp: Callable[..., tuple[Array, ...]], grad: Array) -> tuple[Array, ...]:
    with pltpu.force_tpu_interpret_mode():
      return vjp(grad)

  run.defvjp(forward, backward)
  return run


def _heads_major(x: Array) -> Array:
  """[batch, length, heads, d] <-> [batch, heads, length, d] (the Pallas kernels' layout)."""
  return jnp.swapaxes(x, 1, 2)


def _block(kernel: str, length: int) -> int:
  """The largest Pallas tile that divides `length`."""
  for block in _BLOCK_SIZES:
    if length % block == 0:
      return block
  raise ValueError(f"attention_kernel={kernel!r} needs sequence lengths that are multiples of "
                   f"{_BLOCK_SIZES[-1]}, got {length}; pad the feature lengths or use 'einsum'.")


def _check_mask_for_pallas(kernel: str, mask: AttentionMask | None) -> None:
  """Pallas kernels see whole sequences: a cached decoding step (q_offset) stays on einsum."""
  if mask is not None and mask.q_offset is not None:
    raise ValueError(f"attention_kernel={kernel!r} does not run single-token decoding steps; "
                     "they use 'einsum'.")


def _segment_ids(mask: AttentionMask | None) -> tuple[Array | None, Array | None]:
  """Kernel segment ids: query ids as given, padding keys set to -1 so that no query (padding
  queries included, whose rows are unspecified) ever sees them."""
  if mask is None:
    return None, None
  q_seg = mask.q_segments.astype(jnp.int32)  # [batch, q_length]
  kv_seg = mask.kv_segments.astype(jnp.int32)  # [batch, kv_length]
  return q_seg, jnp.where(kv_seg > 0, kv_seg, -1)  # [batch, kv_length]
