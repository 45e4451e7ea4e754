"""`polyglot-jax convert`: a Hugging Face checkpoint directory <-> a polyglot_jax MODEL_DIR.

    polyglot-jax convert --from_hf=/ckpt/aya-101 --model_dir=/runs/aya_101
    polyglot-jax convert --to_hf=/tmp/export --model_dir=/runs/finetuned [--step=N]

Import writes into MODEL_DIR
  checkpoints/0/   the parameters (an orbax checkpoint of a params-only state at step 0), read
                   tensor block by tensor block straight into an FSDP mesh over all devices
  model.gin        the architecture: MODEL and every TransformerConfig field (the checkpoint's
                   EOS, pad and BOS ids included), used in place of a gin/models/ file
                   (ACTIVATION_DTYPE and DROPOUT_RATE stay macros)
  the tokenizer    spiece.model / tokenizer.model (SentencePiece) or tokenizer.json (HF
                   tokenizers) with tokenizer_config.json, special_tokens_map.json and the chat
                   template, copied: `vocab.get_vocabulary(MODEL_DIR)` reads them (a
                   tokenizer.json that does not fit the model is refused: `vocab.check_vocabulary`)
  generation_config.json, when the checkpoint has one (its EOS ids are the ones decoding uses)
  hf_config.json   HF's config.json, so that export restores every field it does not change
`eval` and `infer` read such a MODEL_DIR as it is; `train` starts from it through
runs/finetune.gin (INITIAL_CHECKPOINT_PATH=MODEL_DIR/checkpoints, a new MODEL_DIR).
Export restores MODEL_DIR's latest (or `step`) parameters for the model its gin files describe
(default MODEL_DIR/model.gin, else the run's operative MODEL_DIR/config.gin) and writes
`model.safetensors` + `config.json` that transformers loads, with the tokenizer files copied back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Sequence

import gin
import jax.numpy as jnp
import optax

from polyglot_jax.commands import gin_setup
from polyglot_jax.convert import hf
from polyglot_jax.data import hf_vocab, vocab
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.models.model import BaseTransformerModel, DecoderOnlyModel, EncoderDecoderModel
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import checkpoints, train_state
from polyglot_jax.training.rundir import RunDir

MODEL_GIN = "model.gin"
HF_CONFIG = "hf_config.json"
# Copied both ways next to the weights: the tokenizer, its chat template, generation defaults.
TOKENIZER_FILES = ("spiece.model", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", hf.GENERATION_CONFIG)
# Parameters split along `embed` over every device: no device holds a whole tensor.
IMPORT_MESH = MeshConfig(data=1, fsdp=-1, rules="fsdp")
_MACROS = {"dtype": "ACTIVATION_DTYPE", "dropout_rate": "DROPOUT_RATE"}
_MACRO_DEFAULTS = {"ACTIVATION_DTYPE": "bfloat16", "DROPOUT_RATE": 0.0}  # as gin/models/ files


def model_for(config: TransformerConfig) -> BaseTransformerModel:
  """The model family of `config`: encoder-decoder when it has encoder layers."""
  return EncoderDecoderModel(config) if config.num_encoder_layers else DecoderOnlyModel(config)


def gin_model(gin_files: Sequence[str], gin_bindings: Sequence[str] = ()) -> BaseTransformerModel:
  """The model that the gin files' MODEL macro builds, in the macro's scope as run files use it
  (a run's operative config.gin binds `MODEL/TransformerConfig.*`)."""
  gin_setup.parse(gin_files, gin_bindings)
  with gin.config_scope("MODEL"):
    return gin.query_parameter("%MODEL").scoped_configurable_fn()


def model_gin(config: TransformerConfig, source: str) -> str:
  """A gin file binding MODEL and every field of `config` (what `--gin_file` reads)."""
  model_cls = type(model_for(config)).__name__
  lines = [f"# {model_cls} converted from {source} by `polyglot-jax convert`.",
           "# Use it as the models/ file, e.g. --gin_file=<this file> --gin_file=runs/eval.gin",
           f"MODEL = @{model_cls}()", f"{model_cls}.config = @TransformerConfig()", ""]
  lines += [f"{macro} = {value!r}" for macro, value in _MACRO_DEFAULTS.items()] + [""]
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      raise ValueError(f"TransformerConfig.{field.name}={value} cannot be written to gin; "
                       "convert the model without it.")
    shown = f"%{_MACROS[field.name]}" if field.name in _MACROS else repr(value)
    lines.append(f"TransformerConfig.{field.name} = {shown}")
  return "\n".join(lines) + "\n"


def _copy_tokenizer(source: str, destination: str) -> list[str]:
  """Copies the tokenizer files `source` has into `destination`; returns their names."""
  names = [n for n in TOKENIZER_FILES if os.path.exists(os.path.join(source, n))]
  for name in names:
    shutil.copyfile(os.path.join(source, name), os.path.join(destination, name))
  return names


def import_hf(hf_dir: str, model_dir: str, **overrides: Any) -> str:
  """Converts the HF checkpoint in `hf_dir` into `model_dir` (see the module docstring).

  `overrides` are TransformerConfig fields (scan_layers, param_dtype, ...). Returns a summary.
  """
  config = hf.read_hf_config(hf_dir, **overrides)
  directory = RunDir(model_dir).checkpoints
  if os.path.isdir(directory) and os.listdir(directory):
    raise FileExistsError(f"{directory} already holds checkpoints; convert into a new "
                          "--model_dir.")
  names = os.listdir(hf_dir)
  if any(n in vocab.SENTENCEPIECE_FILES for n in names):
    hf.load_hf_vocabulary(hf_dir)  # An unreadable SentencePiece model fails here, not later.
  elif hf_vocab.TOKENIZER_FILE in names:  # and a tokenizer.json that does not fit the model
    vocab.check_vocabulary(hf.load_hf_vocabulary(hf_dir), config.vocab_size,
                           config.eos_token_ids, config.bos_token_id)
  partitioner = Partitioner(IMPORT_MESH)
  spec = train_state.params_spec(model_for(config), partitioner)
  params = hf.load_hf_params_sharded(hf_dir, config, spec.shardings.params)
  os.makedirs(model_dir, exist_ok=True)
  state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=optax.EmptyState())
  checkpointer = checkpoints.Checkpointer(directory, period=1, keep=None, async_save=False)
  checkpointer.save(0, state, {"batches": 0}, force=True)
  checkpointer.close()
  with open(os.path.join(model_dir, MODEL_GIN), "w", encoding="utf-8") as f:
    f.write(model_gin(config, os.path.abspath(hf_dir)))
  shutil.copyfile(os.path.join(hf_dir, "config.json"), os.path.join(model_dir, HF_CONFIG))
  copied = _copy_tokenizer(hf_dir, model_dir)
  count = train_state.param_count(spec.abstract.params)
  return (f"Converted {hf_dir} ({count:,} parameters) into {model_dir}: checkpoints/0, "
          f"{MODEL_GIN}, {HF_CONFIG}" + "".join(f", {n}" for n in copied) + ".")


def _read_json(path: str) -> dict[str, Any]:
  """The JSON object in `path`, or {} when there is no such file."""
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def model_gin_files(model_dir: str, gin_files: Sequence[str]) -> list[str]:
  """The gin files describing MODEL_DIR's model: the given ones, else model.gin, else
  config.gin (what `train` wrote)."""
  if gin_files:
    return list(gin_files)
  for name in (MODEL_GIN, "config.gin"):
    if os.path.exists(os.path.join(model_dir, name)):
      return [os.path.join(model_dir, name)]
  raise FileNotFoundError(f"{model_dir} has neither {MODEL_GIN} nor config.gin; pass the "
                          "model's --gin_file.")


def export_hf(model_dir: str, hf_dir: str, gin_files: Sequence[str] = (),
              gin_bindings: Sequence[str] = (), step: int | None = None,
              model_type: str | None = None) -> str:
  """Writes MODEL_DIR's parameters as a transformers checkpoint in `hf_dir`; returns a summary.

  `model_type` ("t5", "mt5", "umt5", "llama", "cohere") picks the HF class, see
  `hf.config_to_hf`; by default it comes from the imported hf_config.json when MODEL_DIR has
  one, and so does every config field the model does not determine (`hf.config_to_hf`'s
  `base`), e.g. `max_position_embeddings`.
  """
  model = gin_model(model_gin_files(model_dir, gin_files), gin_bindings)
  params, _ = checkpoints.load_params(model, model_dir, Partitioner(IMPORT_MESH), step)
  imported, generation = (_read_json(os.path.join(model_dir, name))
                          for name in (HF_CONFIG, hf.GENERATION_CONFIG))
  model_type = model_type or imported.get("model_type")
  same_type = imported.get("model_type") == model_type
  hf.save_hf_checkpoint(hf_dir, params, model.config, model_type,
                        base=imported if same_type else None, generation=generation)
  copied = _copy_tokenizer(model_dir, hf_dir)
  return (f"Exported {model_dir} to {hf_dir}: model.safetensors, config.json"
          + "".join(f", {n}" for n in copied) + ".")
