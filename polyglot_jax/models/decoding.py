"""Autoregressive decoding: greedy, temperature / top-k / top-p sampling and beam search.

Samplers see a decoder only through a `DecodingStart`: the next-token logits after each row's
prompt, a decoding state, and a `step_fn` that feeds one token per row and returns the next
logits and state. `models/model.py` builds the state from the Flax 'cache' collection (KV cache,
one token per step); `recompute_step` builds it from the token buffer instead (every step re-runs
the whole prefix: the reference for tests and the baseline of `benchmarks/decode.py`). Outputs
follow T5X: each row's tokens left-aligned in a [batch, length] buffer. A row ends at the first of
the model's EOS ids (`TransformerConfig.eos_token_ids`: one or several, as HF configs allow) or
at its length limit, and is filled with the model's pad id after that, as `transformers.generate`
does. Everything is jit-compilable; loops are `lax.while_loop`s bounded by the buffer length.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array
State = Any
StepFn = Callable[[Array, State], tuple[Array, State]]

NEG_INF = -1.0e7  # T5X's finite "minus infinity" for beam scores: arithmetic on it stays NaN-free.


@dataclasses.dataclass(frozen=True)
class DecodingStart:
  """A batch whose prompts have been read, ready for a sampler.

  Attributes:
    step_fn: ([batch] tokens, state) -> ([batch, vocab] next-token logits, state).
    logits: [batch, vocab] logits of each row's first output token.
    state: the decoding state (KV cache or token buffer), a pytree.
    state_axes: a pytree like `state` whose int leaves give each leaf's batch axis (beam search
      and `num_decodes` repeat and reorder rows of the state).
    limits: [batch] the most tokens each row may emit (buffer length minus prompt length + 1).
    length: width of the output buffer.
    eos_ids: the token ids that end a row (the model's `eos_token_ids`).
    pad_id: the id that fills a row after its end (the model's `pad_token_id`).
  """

  step_fn: StepFn
  logits: Array
  state: State
  state_axes: Any
  limits: Array
  length: int
  eos_ids: tuple[int, ...]
  pad_id: int

  def is_eos(self, tokens: Array) -> Array:
    """Whether each token is one of the EOS ids (same shape as `tokens`)."""
    return jnp.isin(tokens, jnp.asarray(self.eos_ids, tokens.dtype))


@dataclasses.dataclass(frozen=True)
class DecoderParams:
  """The `decoder_params` of `predict_batch`.

  Attributes:
    temperature: 0 decodes greedily; > 0 samples (with an rng) from softmax(logits / t).
    top_k: sample among the k most likely tokens only (0: all).
    top_p: sample from the nucleus, the smallest set of tokens with probability >= top_p.
    num_decodes: decodes per input: independent samples, or the best beams.
    beam_size: > 0 selects beam search with this many beams (>= num_decodes).
    alpha: beam-search length penalty exponent: scores are log p / ((5 + length) / 6)**alpha.
    use_cache: False recomputes the whole prefix every step (no KV cache).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  num_decodes: int = 1
  beam_size: int = 0
  alpha: float = 0.6
  use_cache: bool = True

  @classmethod
  def parse(cls, decoder_params: Mapping[str, Any] | None) -> DecoderParams:
    """Validated settings from a `decoder_params` dict (None: greedy)."""
    decoder_params = dict(decoder_params or {})
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(decoder_params) - set(known))
    if unknown:
      raise ValueError(f"Unknown decoder_params {unknown}; known: {known}.")
    settings = cls(**decoder_params)
    if settings.beam_size and settings.num_decodes > settings.beam_size:
      raise ValueError(f"num_decodes={settings.num_decodes} > beam_size={settings.beam_size}.")
    if not 0.0 < settings.top_p <= 1.0 or settings.top_k < 0 or settings.temperature < 0:
      raise ValueError(f"Need temperature >= 0, top_k >= 0 and 0 < top_p <= 1: {settings}.")
    return settings


def recompute_step(logits_fn: Callable[[Array], Array], tokens: Array, start: Array,
                   eos_ids: tuple[int, ...], pad_id: int) -> DecodingStart:
  """A cache-free `DecodingStart`: each step writes the token into the buffer and re-runs it all.

  Args:
    logits_fn: [batch, length] decoder input tokens -> [batch, length, vocab] logits.
    tokens: [batch, length] decoder inputs holding each row's prompt (at least the BOS).
    start: [batch] position of each row's last prompt token (prompt length - 1).
    eos_ids: the ids that end a row.
    pad_id: the id that fills a row after its end.
  """
  length = tokens.shape[1]

  def step(token: Array, state: tuple[Array, Array]) -> tuple[Array, tuple[Array, Array]]:
    buffer, slot = state  # [rows, length], [rows]: beam search and num_decodes repeat rows
    rows = jnp.arange(buffer.shape[0])  # [rows]
    buffer = buffer.at[rows, slot].set(token, mode="drop")  # [rows, length]
    logits = logits_fn(buffer)[rows, jnp.minimum(slot, length - 1)]  # [rows, vocab]
    return logits, (buffer, slot + 1)

  first = logits_fn(tokens)[jnp.arange(tokens.shape[0]), start]  # [batch, vocab]
  return DecodingStart(step, first, (tokens, start + 1), (0, 0), length - start, length,
                       tuple(eos_ids), pad_id)


def filter_logits(logits: Array, top_k: int, top_p: float) -> Array:
  """[batch, vocab] logits with -inf outside the top-k tokens and outside the top-p nucleus."""
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [batch, 1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)  # [batch, vocab]
  if top_p < 1.0:
    descending = -jnp.sort(-logits, axis=-1)  # [batch, vocab]
    probs = jax.nn.softmax(descending, axis=-1)  # [batch, vocab]
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [batch, vocab]
    kept = jnp.where(mass_before < top_p, descending, jnp.inf)  # [batch, vocab]
    threshold = jnp.min(kept, axis=-1, keepdims=True)  # [batch, 1]
    logits = jnp.where(logits < threshold, -jnp.inf, logits)  # [batch, vocab]
  return logits


def _take_rows(state: State, state_axes: Any, rows: Array) -> State:
  """The state's rows `rows` (along each leaf's batch axis)."""
  return jax.tree.map(lambda x, axis: jnp.take(x, rows, axis=axis), state, state_axes)


def _repeat_rows(start: DecodingStart, n: int) -> DecodingStart:
  """Each row (of logits, state and limits) repeated n times in place: row b -> b*n ... b*n+n-1."""
  rows = jnp.repeat(jnp.arange(start.logits.shape[0]), n)  # [batch*n]
  return dataclasses.replace(start, logits=start.logits[rows],
                             state=_take_rows(start.state, start.state_axes, rows),
                             limits=start.limits[rows])


def sample(start: DecodingStart, rng: Array | None, settings: DecoderParams
           ) -> tuple[Array, Array]:
  """Greedy (temperature 0 or no rng) or temperature/top-k/top-p sampling, one decode per row.

  Returns:
    (tokens [batch, length], scores [batch]): scores sum the log-probs of the emitted tokens
    under the untempered, unfiltered model distribution.
  """
  batch, length = start.logits.shape[0], start.length
  sampling = rng is not None and settings.temperature > 0

  def emit(t: Array, logits: Array, outputs: Array, done: Array, scores: Array
           ) -> tuple[Array, Array, Array, Array]:
    logits = logits.astype(jnp.float32)  # [batch, vocab]
    if sampling:
      filtered = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p)
      chosen = jax.random.categorical(jax.random.fold_in(rng, t), filtered)  # [batch]
    else:
      chosen = jnp.argmax(logits, axis=-1)  # [batch]
    chosen = jnp.where(done, start.pad_id, chosen).astype(jnp.int32)  # [batch]
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), chosen[:, None], axis=-1)[:, 0]
    scores = scores + jnp.where(done, 0.0, log_prob)  # [batch]
    outputs = jax.lax.dynamic_update_index_in_dim(outputs, chosen, t, axis=1)  # [batch, length]
    done = done | start.is_eos(chosen) | (t + 1 >= start.limits)  # [batch]
    return chosen, outputs, done, scores

  def cond(carry: tuple[Any, ...]) -> Array:
    t, done = carry[0], carry[4]
    return (t < length) & ~jnp.all(done)

  padded = jnp.full((batch, length), start.pad_id, jnp.int32)  # [batch, length]
  token, outputs, done, scores = emit(jnp.int32(0), start.logits, padded, start.limits <= 0,
                                      jnp.zeros((batch,), jnp.float32))

  def step(carry: tuple[Any, ...]) -> tuple[Any, ...]:
    t, token, state, outputs, done, scores = carry
    logits, state = start.step_fn(token, state)  # [batch, vocab]
    token, outputs, done, scores = emit(t, logits, outputs, done, scores)
    return t + 1, token, state, outputs, done, scores

  carry = (jnp.int32(1), token, start.state, outputs, done, scores)
  _, _, _, outputs, _, scores = jax.lax.while_loop(cond, step, carry)
  return outputs, scores


def length_penalty(length: Array, alpha: float) -> Array:
  """T5X/GNMT beam-search length normalisation ((5 + length) / 6)**alpha."""
  return ((5.0 + length) / 6.0)**alpha


def beam_search(start: DecodingStart, settings: DecoderParams) -> tuple[Array, Array]:
  """T5X-style beam search with `settings.beam_size` beams and length penalty `settings.alpha`.

  Each step extends every live beam by every token and keeps the 2k best candidates by log-prob:
  those ending in EOS, or reaching the row's limit, become finished with score
  log p / length_penalty(length incl. EOS); the best k others stay live, and the decoding state
  follows them. A row stops early once no live beam can beat its k-th finished one.

  Returns:
    (tokens [batch, num_decodes, length], scores [batch, num_decodes]), best first.
  """
  k, length, alpha = settings.beam_size, start.length, settings.alpha
  batch, vocab = start.logits.shape
  limits = start.limits[:, None]  # [batch, 1]
  rows = jnp.arange(batch)[:, None] * k  # [batch, 1]

  def extend(t: Array, logits: Array, beams: tuple[Array, ...]
             ) -> tuple[tuple[Array, ...], Array, Array]:
    """One step: (new beams, [batch*k] live tokens, [batch*k] their source rows in the state)."""
    live_seqs, live_lp, fin_seqs, fin_scores = beams
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, k, vocab)
    candidates = (live_lp[:, :, None] + log_probs).reshape(batch, k * vocab)  # [batch, k*V]
    top_lp, top_index = jax.lax.top_k(candidates, 2 * k)  # [batch, 2k]
    origin, token = top_index // vocab, top_index % vocab  # [batch, 2k]
    seqs = jnp.take_along_axis(live_seqs, origin[:, :, None], axis=1)  # [batch, 2k, length]
    seqs = jax.lax.dynamic_update_index_in_dim(seqs, token, t, axis=2)  # [batch, 2k, length]
    ends = start.is_eos(token) | (t + 1 >= limits)  # [batch, 2k]
    new_scores = jnp.where(ends & (top_lp > NEG_INF / 2),
                           top_lp / length_penalty(t + 1.0, alpha), NEG_INF)  # [batch, 2k]
    fin_scores, pick = jax.lax.top_k(jnp.concatenate([fin_scores, new_scores], axis=1), k)
    fin_seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, seqs], axis=1), pick[:, :, None],
                                   axis=1)  # [batch, k, length]
    live_lp, pick = jax.lax.top_k(jnp.where(ends, NEG_INF, top_lp), k)  # [batch, k]
    live_seqs = jnp.take_along_axis(seqs, pick[:, :, None], axis=1)  # [batch, k, length]
    tokens = jnp.take_along_axis(token, pick, axis=1).reshape(-1)  # [batch*k]
    source = (rows + jnp.take_along_axis(origin, pick, axis=1)).reshape(-1)  # [batch*k]
    return (live_seqs, live_lp, fin_seqs, fin_scores), tokens, source

  def cond(carry: tuple[Any, ...]) -> Array:
    t, _, _, (_, live_lp, _, fin_scores) = carry
    best_live = live_lp[:, 0] / length_penalty(start.limits.astype(jnp.float32), alpha)  # [b]
    done = (t >= start.limits) | (fin_scores[:, -1] > best_live)  # [batch]
    return (t < length) & ~jnp.all(done)

  def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
    t, tokens, state, beams = carry
    logits, state = start.step_fn(tokens, state)  # [batch*k, vocab]
    beams, tokens, source = extend(t, logits, beams)
    return t + 1, tokens, _take_rows(state, start.state_axes, source), beams

  seqs = jnp.full((batch, k, length), start.pad_id, jnp.int32)  # [batch, k, length]
  first_lp = jnp.full((batch, k), NEG_INF).at[:, 0].set(0.0)  # [batch, k]: one live beam
  beams = (seqs, first_lp, seqs, jnp.full((batch, k), NEG_INF))
  repeated = _repeat_rows(start, k)
  beams, tokens, source = extend(jnp.int32(0), repeated.logits, beams)
  state = _take_rows(repeated.state, start.state_axes, source)
  _, _, _, beams = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, state, beams))
  _, _, fin_seqs, fin_scores = beams
  n = settings.num_decodes
  return fin_seqs[:, :n], fin_scores[:, :n]


def decode(start: DecodingStart, rng: Array | None, settings: DecoderParams
           ) -> tuple[Array, Array]:
  """Beam search or sampling as `settings` say: (tokens [b, n, length], scores [b, n]), best
  first, with n = `settings.num_decodes`."""
  if settings.beam_size > 0:
    return beam_search(start, settings)
  n = settings.num_decodes
  tokens, scores = sample(_repeat_rows(start, n) if n > 1 else start, rng, settings)
  tokens = tokens.reshape(-1, n, start.length)  # [batch, n, length]
  scores = scores.reshape(-1, n)  # [batch, n]
  order = jnp.argsort(-scores, axis=1)  # [batch, n]
  return jnp.take_along_axis(tokens, order[:, :, None], axis=1), jnp.take_along_axis(
      scores, order, axis=1)


def rank_classification(score_fn: Callable[[Any, Mapping[str, Array]], Array], params: Any,
                        batch: Mapping[str, Array], num_choices: int) -> tuple[Array, Array]:
  """Multiple choice by log-likelihood: the choice whose target scores highest.

  Args:
    score_fn: `model.score_batch`.
    params: model parameters.
    batch: one row per (example, choice), the choices of an example in consecutive rows (as
      T5X's `rank_classification` preprocessor lays them out).
    num_choices: choices per example.
  Returns:
    (predicted choice [examples], scores [examples, num_choices]).
  """
  scores = score_fn(params, batch).reshape(-1, num_choices)  # [examples, num_choices]
  return jnp.argmax(scores, axis=1), scores
