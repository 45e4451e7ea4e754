"""Preference training: DPO, IPO and SimPO losses over pairs of responses to the same prompt.

Batches come from the preference feature converters (`data.preference`): row 2i holds chosen
responses and row 2i+1 the rejected ones, segment k of row 2i paired with segment k of row 2i+1
(a packed row pair holds several pairs; an unpacked one holds one, as segment 1). A response's
log-probability log π(y|x) is the sum of its tokens' log-likelihoods (`decoder_loss_weights`
mark the response; the prompt is context), and |y| its number of tokens.

With h = log π(y|x) − log π_ref(y|x) for the chosen (w) and the rejected (l) response, per pair:
  dpo    −log σ(β (h_w − h_l))                                 Rafailov et al. 2023 (sigmoid)
  ipo    (h_w − h_l − 1/(2β))²                                  Azar et al. 2023
  simpo  −log σ(β (log π(y_w|x)/|y_w| − log π(y_l|x)/|y_l|) − γ)  Meng et al. 2024, no reference
The implicit rewards are β h (dpo, ipo) and β log π(y|x)/|y| (simpo); the metrics are
`dpo/loss`, `dpo/reward_margin` (mean chosen − rejected reward), `dpo/preference_accuracy`
(fraction of pairs whose chosen reward is higher), `dpo/chosen_logps`, `dpo/rejected_logps`
(mean log π(y|x)), whatever the kind. `loss` adds the routers' auxiliary loss of routed models.

The frozen reference π_ref, in order of precedence:
  1. `decoder_reference_log_probs` in the batch: each response's log π_ref(y|x) at its first
     token, 0 elsewhere (precomputed with the data, see `data.preference`, or by
     `make_reference_step` from a reference checkpoint just before the train step);
  2. for adapter models (LoRA, IA3, MoV, MoLoRA), the same parameters with the adapters switched
     off (`model.without_adapters()` on `adapter_free(params)`): no second copy of the weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np

from polyglot_jax.data.preference import REFERENCE_FEATURE
from polyglot_jax.models.model import adapter_free
from polyglot_jax.parallel import partitioning

Array = jax.Array
Batch = Mapping[str, Array]

KINDS = ("dpo", "ipo", "simpo")
METRICS = ("dpo/loss", "dpo/reward_margin", "dpo/preference_accuracy", "dpo/chosen_logps",
           "dpo/rejected_logps")


def segment_sums(values: Array, segment_ids: Array) -> Array:
  """[batch, length] values summed per segment -> [batch, length + 1]; column s is segment s
  (column 0 collects padding)."""
  num_segments = values.shape[1] + 1
  return jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=num_segments))(
      values, segment_ids)  # [batch, length + 1]


def _segment_ids(batch: Batch) -> Array:
  """[batch, length] segment ids: the packed ones, else 1 everywhere (one sequence per row)."""
  if "decoder_segment_ids" in batch:
    return batch["decoder_segment_ids"].astype(jnp.int32)
  return jnp.ones(batch["decoder_target_tokens"].shape, jnp.int32)


def _pairs(x: Array) -> tuple[Array, Array]:
  """[rows, S] per-sequence values -> ([rows / 2, S] chosen, [rows / 2, S] rejected)."""
  rows = x.shape[0]
  if rows % 2:
    raise ValueError(f"preference batches hold (chosen, rejected) row pairs, got {rows} rows; "
                     "use an even batch size per microbatch and data shard")
  paired = x.reshape((rows // 2, 2) + x.shape[1:])  # [rows / 2, 2, S]
  return paired[:, 0], paired[:, 1]


def sequence_log_probs(model: Any, params: Any, batch: Batch, dropout_rng: Array | None = None
                       ) -> tuple[Array, Array, Array]:
  """(log π(y|x) [rows, length + 1], |y| [rows, length + 1], routers' aux loss []) per segment."""
  token_scores, aux = model.token_log_probs(params, batch, dropout_rng)  # [rows, length], []
  segments = _segment_ids(batch)
  weights = batch["decoder_loss_weights"].astype(jnp.float32)  # [rows, length]
  return segment_sums(token_scores, segments), segment_sums(weights, segments), aux


def reference_log_probs(model: Any, params: Any, batch: Batch) -> Array:
  """log π_ref(y|x) per segment [rows, length + 1] (module docstring: where it comes from)."""
  if REFERENCE_FEATURE in batch:
    return segment_sums(batch[REFERENCE_FEATURE].astype(jnp.float32), _segment_ids(batch))
  if model.config.adapters is None:
    raise ValueError(
        f"DPO/IPO need reference log-probs: add {REFERENCE_FEATURE} to the batches (precomputed "
        "data, or preference.make_reference_step with a reference checkpoint), train adapters "
        "(the reference is then the base model), or use PreferenceLoss.kind = 'simpo'")
  logps, _, _ = sequence_log_probs(model.without_adapters(), adapter_free(params), batch)
  return jax.lax.stop_gradient(logps)


def pair_losses(kind: str, beta: float, gamma: float, chosen: Array, rejected: Array,
                chosen_ref: Array | None, rejected_ref: Array | None, chosen_len: Array,
                rejected_len: Array) -> tuple[Array, Array, Array]:
  """(loss, chosen reward, rejected reward) per pair, elementwise over any shape.

  Args:
    kind: one of KINDS.
    beta, gamma: β of every kind, γ of SimPO.
    chosen, rejected: log π(y|x) of the policy.
    chosen_ref, rejected_ref: log π_ref(y|x) (ignored, may be None, for simpo).
    chosen_len, rejected_len: |y| (used by simpo; must be > 0 there).
  """
  if kind == "simpo":
    chosen_reward = beta * chosen / chosen_len
    rejected_reward = beta * rejected / rejected_len
    return (jax.nn.softplus(-(chosen_reward - rejected_reward - gamma)), chosen_reward,
            rejected_reward)
  chosen_reward = beta * (chosen - chosen_ref)
  rejected_reward = beta * (rejected - rejected_ref)
  h = (chosen - chosen_ref) - (rejected - rejected_ref)
  if kind == "dpo":
    return jax.nn.softplus(-beta * h), chosen_reward, rejected_reward
  return jnp.square(h - 1.0 / (2.0 * beta)), chosen_reward, rejected_reward


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
  """A preference objective for the train step (`step.Objective`), e.g.
  `train.objective = @PreferenceLoss()` with `PreferenceLoss.kind = 'dpo'`, `.beta = 0.1`.

  Attributes:
    kind: "dpo" (sigmoid), "ipo" or "simpo" (see the module docstring).
    beta: β, the strength of the implicit KL regulariser (dpo, ipo) or the reward scale (simpo).
    gamma: SimPO's target reward margin γ.
  """

  kind: str = "dpo"
  beta: float = 0.1
  gamma: float = 0.5

  def __post_init__(self) -> None:
    if self.kind not in KINDS:
      raise ValueError(f"PreferenceLoss.kind={self.kind!r}: use one of {', '.join(KINDS)}")
    if not self.beta > 0:
      raise ValueError(f"PreferenceLoss.beta={self.beta} must be > 0")

  def pair_values(self, model: Any, params: Any, batch: Batch,
                  dropout_rng: Array | None = None) -> dict[str, Array]:
    """Per-pair values, each [rows / 2, length + 1] (pair = row pair x segment), and `aux`.

    Keys: `valid` (1 where both responses exist), `loss`, `chosen_logps`, `rejected_logps`,
    `chosen_rewards`, `rejected_rewards`, `chosen_tokens`, `rejected_tokens`; `aux` is the
    routers' scalar auxiliary loss. Invalid entries hold finite filler values.
    """
    chosen_ref = rejected_ref = None
    if self.kind != "simpo":
      chosen_ref, rejected_ref = _pairs(reference_log_probs(model, params, batch))
    logps, counts, aux = sequence_log_probs(model, params, batch, dropout_rng)
    chosen, rejected = _pairs(logps)
    chosen_len, rejected_len = _pairs(counts)
    valid = (chosen_len > 0) & (rejected_len > 0)  # [rows / 2, S]
    loss, chosen_reward, rejected_reward = pair_losses(
        self.kind, self.beta, self.gamma, chosen, rejected, chosen_ref, rejected_ref,
        jnp.maximum(chosen_len, 1.0), jnp.maximum(rejected_len, 1.0))
    valid_f = valid.astype(jnp.float32)
    return {"valid": valid_f, "loss": loss * valid_f, "chosen_logps": chosen * valid_f,
            "rejected_logps": rejected * valid_f, "chosen_rewards": chosen_reward * valid_f,
            "rejected_rewards": rejected_reward * valid_f, "chosen_tokens": chosen_len,
            "rejected_tokens": rejected_len, "aux": aux}

  def normalizer(self, model: Any, batch: Batch) -> Array:
    """The number of pairs in the (global) batch."""
    del model
    counts = segment_sums(batch["decoder_loss_weights"].astype(jnp.float32), _segment_ids(batch))
    chosen_len, rejected_len = _pairs(counts)
    return jnp.sum((chosen_len > 0) & (rejected_len > 0)).astype(jnp.float32)

  def loss_fn(self, model: Any, params: Any, batch: Batch, dropout_rng: Array | None,
              normalizer: Array | None = None, global_num_tokens: Array | None = None
              ) -> tuple[Array, dict[str, Array]]:
    """(Σ pair losses / normalizer + the routers' aux loss share, metric sums); see
    `step.Objective`. `normalizer` None: this batch's number of pairs."""
    values = self.pair_values(model, params, batch, dropout_rng)
    num_pairs = jnp.sum(values["valid"])
    norm = num_pairs if normalizer is None else normalizer
    num_tokens = jnp.sum(batch["decoder_loss_weights"].astype(jnp.float32))
    share = 1.0 if global_num_tokens is None else num_tokens / jnp.maximum(global_num_tokens, 1.0)
    pair_loss = jnp.sum(values["loss"])
    correct = (values["chosen_rewards"] > values["rejected_rewards"]) * values["valid"]
    sums = {
        "pair_loss": pair_loss,
        "aux_loss": share * values["aux"],
        "reward_margin": jnp.sum(values["chosen_rewards"] - values["rejected_rewards"]),
        "correct": jnp.sum(correct),
        "chosen_logps": jnp.sum(values["chosen_logps"]),
        "rejected_logps": jnp.sum(values["rejected_logps"]),
        "num_pairs": num_pairs,
        "normalizer": jnp.asarray(norm, jnp.float32),
        "num_tokens": num_tokens,
        "num_sequences": 2.0 * num_pairs,
    }
    return pair_loss / jnp.maximum(norm, 1.0) + sums["aux_loss"], sums

  def summarize(self, sums: Mapping[str, Array]) -> dict[str, Array]:
    """The `dpo/*` metrics and `loss` (pair loss plus the routers' aux loss) from added sums."""
    pairs = jnp.maximum(sums["num_pairs"], 1.0)
    dpo_loss = sums["pair_loss"] / jnp.maximum(sums["normalizer"], 1.0)
    return {
        "loss": dpo_loss + sums["aux_loss"],
        "dpo/loss": dpo_loss,
        "dpo/reward_margin": sums["reward_margin"] / pairs,
        "dpo/preference_accuracy": sums["correct"] / pairs,
        "dpo/chosen_logps": sums["chosen_logps"] / pairs,
        "dpo/rejected_logps": sums["rejected_logps"] / pairs,
    }


def per_example(values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Host arrays of `pair_values` -> one entry per pair, in data order (row pair, then segment).

  For unpacked batches (evaluation) that is one entry per example, in the batch's order; group
  them by language with the examples' languages (e.g. `inference.compare`). Keys: `loss`,
  `reward_margin`, `preference_accuracy`, `chosen_logps`, `rejected_logps`.
  """
  valid = np.asarray(values["valid"]) > 0  # [rows / 2, S]
  pick = lambda name: np.asarray(values[name])[valid]  # [pairs]
  margin = pick("chosen_rewards") - pick("rejected_rewards")
  return {"loss": pick("loss"), "reward_margin": margin,
          "preference_accuracy": (margin > 0).astype(np.float32),
          "chosen_logps": pick("chosen_logps"), "rejected_logps": pick("rejected_logps")}


def language_metrics(values: Mapping[str, np.ndarray], languages: Sequence[str]
                     ) -> dict[str, dict[str, float]]:
  """`per_example` values averaged per language: {language: {"dpo/<name>": mean, ...,
  "num_examples": n}}."""
  if len(languages) != len(next(iter(values.values()))):
    raise ValueError(f"{len(languages)} languages for {len(next(iter(values.values())))} pairs")
  languages = np.asarray(languages)
  out = {}
  for lang in sorted(set(languages.tolist())):
    rows = languages == lang
    out[lang] = {f"dpo/{k}": float(np.mean(v[rows])) for k, v in values.items()}
    out[lang]["num_examples"] = float(np.sum(rows))
  return out


def first_token_values(values: Array, segment_ids: Array) -> Array:
  """[batch, length + 1] per-segment values -> [batch, length]: each segment's value at its first
  token, 0 elsewhere (the layout of `decoder_reference_log_probs`)."""
  previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))  # [batch, length]
  first = (segment_ids != previous) & (segment_ids > 0)  # [batch, length]
  return jnp.where(first, jnp.take_along_axis(values, segment_ids, axis=1), 0.0)


def reference_feature(model: Any, params: Any, batch: Batch) -> Array:
  """`decoder_reference_log_probs` [rows, length] of `model` with `params` (the reference)."""
  logps, _, _ = sequence_log_probs(model, params, batch)  # [rows, length + 1]
  return first_token_values(logps, _segment_ids(batch))


def make_reference_step(model: Any, params_shardings: Any,
                        partitioner: partitioning.Partitioner
                        ) -> Callable[[Any, Batch], dict[str, Array]]:
  """Returns jitted `add_reference(reference_params, batch) -> batch` with
  `decoder_reference_log_probs` from a reference model (e.g. the SFT checkpoint), for a train
  step whose model has no adapters; run it on each batch before the train step."""
  def add_reference(params: Any, batch: Batch) -> dict[str, Array]:
    return {**batch, REFERENCE_FEATURE: reference_feature(model, params, batch)}

  return jax.jit(add_reference, in_shardings=(params_shardings, partitioner.batch_sharding),
                 out_shardings=partitioner.batch_sharding)
