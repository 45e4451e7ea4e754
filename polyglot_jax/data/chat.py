"""Chat-format data: conversations rendered with the checkpoint's chat template, loss on replies.

A conversation is a list of {"role", "content"} messages (`aya.ROLES`), any number of turns.
`render` runs the Jinja `chat_template` of a Hugging Face tokenizer folder the way
`transformers`' `apply_chat_template` does: a sandboxed `ImmutableSandboxedEnvironment` with
`trim_blocks`, `lstrip_blocks` and the loop-controls extension, the template globals
`raise_exception`, `strftime_now`, `dict`, `namespace` and its `tojson` filter, and the
variables `messages`, `tools`/`documents` (None), `add_generation_prompt` and the named special
tokens (`bos_token`, `eos_token`, ...). `encode_chat` tokenizes the text without adding special
tokens, so its ids equal `tokenizer.apply_chat_template(messages, tokenize=True)`.

Loss weights: a token weighs 1 when it overlaps the text an assistant turn adds, i.e. the
characters between the rendering of the turns before it with the generation prompt and the
rendering up to and including it (its content and end-of-turn tokens, not the header the
template writes before it). That needs templates which render a conversation turn by turn (each
such prefix rendering is a prefix of the whole); one that does not (e.g. it rewrites earlier
turns) is an error.

In a seqio task (`tasks.register_chat_task`), `tokenize_chat` turns the source's "messages"
into "targets" ids and `LOSS_WEIGHTS`; the leading BOS is left to the feature converter, whose
`bos_id` is the model's `bos_token_id`, so that decoder inputs are exactly the ids
`transformers` feeds. `ChatFeatureConverter` (bind it as the decoder-only model's
`feature_converter_cls`, as runs/sft.gin does) makes those weights the `decoder_loss_weights`,
packed with the targets and segment ids. Prompt tasks (`register_chat_task(..., prompts=True)`)
get "inputs" (the generation prompt, `encode_prompt`) and "targets" (the last reply) instead, for
decoding. `chat_task` is the gin form of the registration.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import seqio
import tensorflow as tf

from polyglot_jax.data import quality
from polyglot_jax.data.hf_vocab import HFVocabulary

LOSS_WEIGHTS = "targets_loss_weights"  # per-token loss weights of chat tasks, aligned with targets
# A conversation every chat template must render, turn by turn (checked at registration).
PROBE = ({"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."},
         {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "Welcome."})

Messages = Sequence[Mapping[str, str]]


class ChatTemplateError(ValueError):
  """A chat template that cannot render a conversation (one line: why)."""


class _Generation(jinja2.ext.Extension):
  """transformers' `{% generation %}` block (its assistant-mask marker): rendered as is."""

  tags = {"generation"}

  def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.Scope(body).set_lineno(lineno)


class _Namespace(jinja2.utils.Namespace):
  """`namespace()` refusing underscore attributes, as transformers' template namespace."""

  def __init__(*args: Any, **kwargs: Any) -> None:  # pylint: disable=no-method-argument
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name: str, value: Any) -> None:
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"templates cannot set attribute {name!r}")


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # pylint: disable=redefined-builtin  (the template's name)
  return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
  """The compiled template in transformers' sandboxed environment (see the module docstring)."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=dict,
                     namespace=_Namespace)
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as error:
    raise ChatTemplateError(f"the chat template does not compile: {error} (line "
                            f"{error.lineno})") from None


def render(template: str, messages: Messages, special_tokens: Mapping[str, str],
           add_generation_prompt: bool = False) -> str:
  """The text of `messages` under `template`, as `apply_chat_template(..., tokenize=False)`."""
  try:
    return compile_template(template).render(
        messages=[dict(m) for m in messages], tools=None, documents=None,
        add_generation_prompt=add_generation_prompt, **special_tokens)
  except jinja2.exceptions.TemplateError as error:
    raise ChatTemplateError(f"the chat template fails to render: {error}") from None


def _template(vocabulary: seqio.Vocabulary) -> str:
  """The vocabulary's chat template; a one-line error when it has none."""
  if not isinstance(vocabulary, HFVocabulary):
    raise ValueError(f"chat data needs a Hugging Face tokenizer with a chat template "
                     f"(vocab.get_vocabulary(folder)), not a {type(vocabulary).__name__}")
  if not vocabulary.chat_template:
    raise ValueError(f"{vocabulary!r} has no chat template: chat data needs a Hugging Face "
                     "tokenizer folder with one (tokenizer_config.json's chat_template or "
                     "chat_template.jinja), or HFVocabulary(path, chat_template=...)")
  return vocabulary.chat_template


def encode_chat(vocabulary: HFVocabulary, messages: Messages,
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
  """(ids, loss weights) of a conversation (see the module docstring).

  `vocabulary` is an `hf_vocab.HFVocabulary` with a chat template; the ids equal
  `apply_chat_template(messages, tokenize=True, add_generation_prompt=...)`. Raises
  ChatTemplateError when the template refuses the conversation.
  """
  template, tokens = _template(vocabulary), vocabulary.special_tokens
  text = render(template, messages, tokens, add_generation_prompt)
  encoding = vocabulary.tokenizer.encode(text, add_special_tokens=False)
  offsets = np.array(encoding.offsets, np.int64).reshape(-1, 2)  # [tokens, 2] characters
  weights = np.zeros(len(encoding.ids), bool)  # [tokens]
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    before = render(template, messages[:i], tokens, add_generation_prompt=True)
    through = render(template, messages[:i + 1], tokens)
    if not (text.startswith(before) and text.startswith(through)):
      raise ChatTemplateError(
          f"the chat template does not render conversations turn by turn (turns 0-{i} are not a "
          "prefix of the whole conversation), so the assistant's tokens cannot be told apart")
    start, end = len(before), len(through)
    ends = np.maximum(offsets[:, 1], offsets[:, 0] + 1)  # [tokens]: zero-width tokens count
    weights |= (offsets[:, 0] < end) & (ends > start)
  return list(encoding.ids), weights.astype(int).tolist()


def check_chat_template(vocabulary: seqio.Vocabulary) -> None:
  """One-line ValueError unless the vocabulary's template renders `PROBE` turn by turn."""
  try:
    encode_chat(vocabulary, PROBE)
  except ChatTemplateError as error:
    raise ValueError(f"{vocabulary!r}: {error} (on a user/assistant conversation)") from None


def encode_prompt(vocabulary: HFVocabulary, messages: Messages) -> tuple[list[int], list[int]]:
  """(prompt ids, reply ids) of a conversation ending with an assistant turn, for decoding.

  The prompt is every turn before the reply with the generation prompt, the ids of
  `apply_chat_template(messages[:-1], add_generation_prompt=True)` (what one feeds `generate`);
  the reply is the tokens of the whole conversation that follow the prompt's text (the last
  turn's content and end-of-turn tokens).
  """
  if not messages or messages[-1]["role"] != "assistant":
    raise ChatTemplateError("the conversation does not end with an assistant turn to predict")
  template, tokens = _template(vocabulary), vocabulary.special_tokens
  prompt = render(template, messages[:-1], tokens, add_generation_prompt=True)
  text = render(template, messages, tokens)
  if not text.startswith(prompt):
    raise ChatTemplateError("the chat template does not render conversations turn by turn (the "
                            "prompt is not a prefix of the conversation)")
  encoding = vocabulary.tokenizer.encode(text, add_special_tokens=False)
  reply = [i for i, (start, _) in zip(encoding.ids, encoding.offsets) if start >= len(prompt)]
  return vocabulary.tokenizer.encode(prompt, add_special_tokens=False).ids, reply


def tokenize_chat(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                  source: str = "chat data", strict: bool = False) -> tf.data.Dataset:
  """seqio preprocessor: "messages" (JSON) -> ids, other features kept.

  With a "targets" feature only (training): "targets" = the conversation's ids and
  `LOSS_WEIGHTS` (`encode_chat`). With "inputs" too (decoding, `infer`, generation metrics):
  "inputs" = the prompt, "targets" = the last (assistant) turn (`encode_prompt`). A leading BOS
  is dropped (the feature converter starts decoder inputs with it). A conversation the template
  refuses is dropped and counted as malformed (or raises if strict).
  """
  vocabulary = output_features["targets"].vocabulary
  check_chat_template(vocabulary)
  prompts = "inputs" in output_features
  names = ("inputs", "targets") if prompts else ("targets", LOSS_WEIGHTS)

  def encode(messages: bytes, language: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
      first, second = (encode_prompt if prompts else encode_chat)(vocabulary,
                                                                   json.loads(messages))
    except ChatTemplateError as error:
      quality.drop("malformed", source, f"language {language.decode()!r} ({error})", strict)
      return np.zeros([0], np.int32), np.zeros([0], np.int32)
    skip = int(bool(first) and first[0] == vocabulary.bos_id)
    if not prompts:  # ids and their weights: both lose the BOS
      second = second[skip:]
    return np.array(first[skip:], np.int32), np.array(second, np.int32)

  def convert(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    first, second = tf.numpy_function(encode, [x["messages"], x["language"]],
                                      (tf.int32, tf.int32), stateful=True)
    first.set_shape([None])
    second.set_shape([None])
    return {**{k: v for k, v in x.items() if k != "messages"}, names[0]: first,
            names[1]: second}

  return dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE).filter(
      lambda x: tf.size(x[names[0]]) > 0)


@functools.cache
class _WeightedLMFeatureConverter(seqio.FeatureConverter):
  """A causal-LM converter with per-token loss weights that never reads token id 0 as padding.

  seqio's packing and LM converter take 0 for padding (an example's length is its number of
  nonzero ids; loss weights are `targets != 0`), which drops or mutes a real token 0 (Llama 3's
  "!") and cannot pack a 0/1 weight. Here every id and weight is shifted by one while packing
  or padding and shifted back after, so only padding is 0; segment ids and positions come in
  unpacked batches too, so that the model never needs `tokens != 0` as its mask.
  """

  TASK_FEATURES = {"targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                   LOSS_WEIGHTS: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
  MODEL_FEATURES = {name: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32) for name in (
      "decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
      "decoder_segment_ids", "decoder_positions")}
  PACKING_FEATURE_DTYPES = {"decoder_segment_ids": tf.int32, "decoder_positions": tf.int32}

  def _convert_example(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    shifted = features[LOSS_WEIGHTS]  # [length]: 1 + weight on tokens, 0 on padding
    real = tf.cast(shifted > 0, tf.int32)  # [length]
    targets = (features["targets"] - 1) * real  # [length]
    if self.pack:
      segments, positions = features["targets_segment_ids"], features["targets_positions"]
    else:
      segments, positions = real, tf.range(tf.size(real)) * real  # [length] each
    return {
        "decoder_target_tokens": targets,
        "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(
            targets, sequence_id=segments if self.pack else None, bos_id=self.bos_id),
        "decoder_loss_weights": tf.maximum(shifted - 1, 0),
        "decoder_segment_ids": segments,
        "decoder_positions": positions,
    }

  def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
                        ) -> tf.data.Dataset:
    ds = ds.map(lambda x: {"targets": x["targets"] + 1, LOSS_WEIGHTS: x[LOSS_WEIGHTS] + 1},
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = self._pack_or_pad(ds, task_feature_lengths)
    return ds.map(self._convert_example, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> dict[str, int]:
    return {name: task_feature_lengths["targets"] for name in self.MODEL_FEATURES}


@gin.configurable
class ChatFeatureConverter(seqio.DecoderFeatureConverter):
  """seqio's DecoderFeatureConverter, with per-token loss weights for "targets"-only tasks.

  Tasks with "inputs" (PrefixLM) convert exactly as with DecoderFeatureConverter. "targets"-only
  tasks go through `_WeightedLMFeatureConverter`: the `LOSS_WEIGHTS` of chat tasks become
  `decoder_loss_weights` (weight 1 on every token for other tasks), packed with the targets,
  token id 0 is a token like any other, and batches always carry segment ids and positions.
  """

  def __init__(self, loss_on_targets_only: bool = True, pack: bool = True,
               use_custom_packing_ops: bool = False, apply_length_check: bool = True,
               bos_id: int = 0) -> None:
    super().__init__(loss_on_targets_only=loss_on_targets_only, pack=pack,
                     use_custom_packing_ops=use_custom_packing_ops,
                     apply_length_check=apply_length_check, bos_id=bos_id)
    self._weighted = _WeightedLMFeatureConverter(
        pack=pack, use_custom_packing_ops=use_custom_packing_ops,
        apply_length_check=apply_length_check, bos_id=bos_id)

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
               ) -> tf.data.Dataset:
    if set(task_feature_lengths) != {"targets"}:
      return super().__call__(ds, task_feature_lengths)
    if LOSS_WEIGHTS not in ds.element_spec:
      ds = ds.map(lambda x: {**x, LOSS_WEIGHTS: tf.ones_like(x["targets"])},
                  num_parallel_calls=tf.data.AUTOTUNE)
    lengths = {**task_feature_lengths, LOSS_WEIGHTS: task_feature_lengths["targets"]}
    return self._weighted(ds, lengths)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> dict[str, int]:
    if set(task_feature_lengths) != {"targets"}:
      return dict(super().get_model_feature_lengths(task_feature_lengths))
    return self._weighted.get_model_feature_lengths(task_feature_lengths)
