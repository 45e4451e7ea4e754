"""Numerical parity of our Flax networks with Hugging Face PyTorch models on converted weights.

Tiny random HF models (2 layers, width 32) run in float32 on a batch of two rows, the second
right-padded, with encoder and decoder of different lengths; logits must agree within 1e-4 on
every real (non-padding) position. Norm scales are randomised so a mis-mapped norm cannot hide.
Also: export -> `transformers` load, safetensors directory import (single and sharded), and greedy
generation against `transformers` `generate`.
"""

from __future__ import annotations

import json
import os

import gin
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention

from polyglot_jax.convert import checkpoint, hf
from polyglot_jax.data import vocab
from polyglot_jax.models import layers
from polyglot_jax.models.decoder import DecoderOnly
from polyglot_jax.models.encoder_decoder import EncoderDecoder
from polyglot_jax.models.model import DecoderOnlyModel, EncoderDecoderModel

TOL = 1e-4
VOCAB = 128
WIDTH = 32

# Encoder [2, 7] and decoder [2, 5] batches; row 1 is right-padded in both.
ENC_TOKENS = np.array([[5, 17, 9, 33, 2, 8, 1], [7, 4, 21, 1, 0, 0, 0]], np.int32)
DEC_INPUTS = np.array([[0, 12, 6, 40, 3], [0, 9, 14, 0, 0]], np.int32)
DEC_TARGETS = np.array([[12, 6, 40, 3, 1], [9, 14, 1, 0, 0]], np.int32)
# Decoder-only [2, 9] batch; row 1 is right-padded.
LM_TOKENS = np.array([[5, 17, 9, 33, 2, 8, 11, 4, 19], [7, 4, 21, 3, 6, 0, 0, 0, 0]], np.int32)
LM_MASK = np.array([[1] * 9, [1] * 5 + [0] * 4], np.int32)

T5_DIMS = dict(vocab_size=VOCAB, d_model=WIDTH, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
               num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
               dropout_rate=0.0, attn_implementation="eager")
LM_DIMS = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, attn_implementation="eager",
               initializer_range=0.3)  # HF's 0.02 makes attention nearly uniform: bugs would hide


def _prepare(model: torch.nn.Module) -> dict[str, np.ndarray]:
  """Randomises norm scales (HF initialises them to ones) and returns the numpy state dict."""
  torch.manual_seed(1)
  for name, param in model.named_parameters():
    if "norm" in name:
      param.data.uniform_(0.5, 1.5)
  model.eval()
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _assert_close(ours: np.ndarray, theirs: np.ndarray, real: np.ndarray) -> None:
  diff = np.abs(np.asarray(ours, np.float32) - theirs)[real.astype(bool)]
  assert diff.max() <= TOL, f"max abs logit diff {diff.max():.2e} > {TOL}"


def _random_hf_model(config_cls: type, **extra) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
  """A tiny random HF model (seq2seq for the T5 family) and its numpy state dict."""
  torch.manual_seed(0)
  if config_cls in (transformers.T5Config, transformers.MT5Config, transformers.UMT5Config):
    hf_config = config_cls(**T5_DIMS, **extra)
    model = transformers.AutoModelForSeq2SeqLM.from_config(hf_config)
    if not hf.config_from_hf(hf_config).logits_via_embedding:
      # transformers 5 always ties lm_head to the embedding on construction; untie it as in real
      # T5.1.1/mT5/umT5 checkpoints.
      model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, WIDTH) * WIDTH**-0.5)
  else:
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**{**LM_DIMS, **extra}))
  return model, _prepare(model)


def _hf_logits(model: torch.nn.Module) -> np.ndarray:
  """The HF model's logits on the shared test batch (T5 family: encoder + decoder batch)."""
  with torch.no_grad():
    if model.config.is_encoder_decoder:
      return model(input_ids=torch.tensor(ENC_TOKENS, dtype=torch.long),
                   attention_mask=torch.tensor(ENC_TOKENS != 0, dtype=torch.long),
                   decoder_input_ids=torch.tensor(DEC_INPUTS, dtype=torch.long),
                   decoder_attention_mask=torch.tensor(DEC_TARGETS != 0, dtype=torch.long),
                   ).logits.numpy()
    return model(input_ids=torch.tensor(LM_TOKENS, dtype=torch.long),
                 attention_mask=torch.tensor(LM_MASK, dtype=torch.long)).logits.numpy()


def _our_logits(params, config) -> tuple[np.ndarray, np.ndarray]:
  """Our logits on the shared test batch and the mask of its real positions."""
  if config.num_encoder_layers:
    return (EncoderDecoder(config).apply({"params": params}, ENC_TOKENS, DEC_INPUTS, DEC_TARGETS),
            DEC_TARGETS != 0)
  return DecoderOnly(config).apply({"params": params}, LM_TOKENS), LM_MASK


@pytest.mark.parametrize("name, config_cls, extra", [
    ("t5_v1_1", transformers.T5Config, dict(feed_forward_proj="gated-gelu",
                                            tie_word_embeddings=False)),
    ("t5_classic_tied", transformers.T5Config, dict(feed_forward_proj="relu")),
    ("mt5", transformers.MT5Config, {}),
    ("umt5", transformers.UMT5Config, {}),
])
def test_encoder_decoder_parity(name: str, config_cls: type, extra: dict) -> None:
  model, state_dict = _random_hf_model(config_cls, **extra)
  hf_config = model.config
  theirs = _hf_logits(model)
  if name == "umt5":
    # transformers 5 forces tie_word_embeddings=True for UMT5 and therefore rescales the decoder
    # output by d_model**-0.5 before its (untied) lm_head; T5X's umT5 does not.
    theirs = theirs * WIDTH**0.5
  real = DEC_TARGETS != 0
  scans = (False, True) if name == "umt5" else (False,)  # scan + per-layer relative bias
  for scan in scans:
    cfg = hf.config_from_hf(hf_config, scan_layers=scan)
    params = hf.params_from_hf(state_dict, cfg)
    ours = EncoderDecoder(cfg).apply({"params": params}, ENC_TOKENS, DEC_INPUTS, DEC_TARGETS)
    _assert_close(ours, theirs, real)


@pytest.mark.parametrize("name, config_cls, extra", [
    ("llama_gqa", transformers.LlamaConfig,
     dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    ("cohere", transformers.CohereConfig, dict(logit_scale=0.5, layer_norm_eps=1e-5)),
])
def test_decoder_only_parity(name: str, config_cls: type, extra: dict) -> None:
  model, state_dict = _random_hf_model(config_cls, **extra)
  hf_config = model.config
  theirs = _hf_logits(model)
  scans = (False, True) if name == "llama_gqa" else (False,)
  for scan in scans:
    cfg = hf.config_from_hf(hf_config, scan_layers=scan)
    assert cfg.kv_heads == 2 and cfg.num_heads == 4
    params = hf.params_from_hf(state_dict, cfg)
    ours = DecoderOnly(cfg).apply({"params": params}, LM_TOKENS)
    _assert_close(ours, theirs, LM_MASK)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_hf(bidirectional: bool) -> None:
  relative = np.arange(-300, 301, dtype=np.int32)[None, None, :]  # [1, 1, 601]
  ours = layers.relative_position_bucket(relative, bidirectional, 32, 128)
  theirs = T5Attention._relative_position_bucket(torch.tensor(relative, dtype=torch.long),
                                                 bidirectional, 32, 128)
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_config_from_hf_switches() -> None:
  cohere = hf.config_from_hf(transformers.CohereConfig(**LM_DIMS))
  assert (cohere.norm_type, cohere.parallel_block, cohere.rope_interleaved) == ("layer", True, True)
  assert cohere.logits_via_embedding and cohere.logit_scale == 0.0625
  llama = hf.config_from_hf(transformers.LlamaConfig(**LM_DIMS))
  assert (llama.norm_type, llama.parallel_block, llama.rope_interleaved) == ("rms", False, False)
  t5 = hf.config_from_hf(transformers.T5Config(**T5_DIMS, feed_forward_proj="gated-gelu",
                                               tie_word_embeddings=False))
  assert t5.mlp_activations == ("gelu", "linear") and not t5.logits_via_embedding
  with pytest.raises(ValueError, match="use_qk_norm"):
    hf.config_from_hf(transformers.CohereConfig(**LM_DIMS, use_qk_norm=True))


def test_params_from_hf_reports_bad_tensors() -> None:
  cfg = hf.config_from_hf(transformers.LlamaConfig(**LM_DIMS))
  maps, stacks = hf.tensor_maps(cfg)
  every = maps + [t for stack in stacks.values() for layer in stack for t in layer]
  state_dict = {t.hf_name: np.zeros(t.hf_shape, np.float32) for t in every}
  hf.params_from_hf(state_dict, cfg)
  for tensor in every:  # the table inverts: our layout maps back to HF's
    hf_array = np.arange(np.prod(tensor.hf_shape), dtype=np.float32).reshape(tensor.hf_shape)
    np.testing.assert_array_equal(tensor.to_hf(tensor.to_ours(hf_array)), hf_array)
  bad = dict(state_dict)
  bad["model.layers.1.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)
  expected = r"k_proj.weight: expected shape \(16, 32\), found \(32, 32\)"
  with pytest.raises(ValueError, match=expected):
    hf.params_from_hf(bad, cfg)
  del bad["model.norm.weight"]
  with pytest.raises(ValueError, match="model.norm.weight: missing"):
    hf.params_from_hf(bad, cfg)


EXPORTS = [
    ("t5_v1_1", transformers.T5Config, dict(feed_forward_proj="gated-gelu",
                                            tie_word_embeddings=False)),
    ("t5_classic_tied", transformers.T5Config, dict(feed_forward_proj="relu")),
    ("mt5", transformers.MT5Config, {}),
    ("llama_gqa", transformers.LlamaConfig,
     dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    ("cohere", transformers.CohereConfig, dict(logit_scale=0.5, layer_norm_eps=1e-5)),
]


@pytest.mark.parametrize("name, config_cls, extra", EXPORTS, ids=[e[0] for e in EXPORTS])
def test_export_loads_in_transformers_with_the_same_logits(name, config_cls, extra, tmp_path):
  model, state_dict = _random_hf_model(config_cls, **extra)
  config = hf.config_from_hf(model.config, scan_layers=name == "llama_gqa")
  params = hf.params_from_hf(state_dict, config)
  ours, real = _our_logits(params, config)
  hf.save_hf_checkpoint(str(tmp_path), params, config, model_type=model.config.model_type)
  auto = (transformers.AutoModelForSeq2SeqLM if config.num_encoder_layers
          else transformers.AutoModelForCausalLM)
  reloaded = auto.from_pretrained(str(tmp_path))
  assert type(reloaded) is type(model)
  _assert_close(ours, _hf_logits(reloaded), real)
  # Import reads back the same config and parameters.
  config_back, params_back = hf.load_hf_checkpoint(str(tmp_path), scan_layers=config.scan_layers)
  assert config_back == config
  jax.tree.map(np.testing.assert_array_equal, params_back, params)


def test_export_keeps_the_imported_config_fields(tmp_path):
  # A Llama as real checkpoints ship it: long context, several EOS ids, no pad id, its BOS,
  # fields equal to transformers' defaults, and one transformers does not know.
  model, _ = _random_hf_model(transformers.LlamaConfig, max_position_embeddings=8192,
                              eos_token_id=[2, 7], pad_token_id=None, bos_token_id=3,
                              attention_dropout=0.0, custom_field="kept")
  hf_dir, ours, back = tmp_path / "hf", tmp_path / "ours", tmp_path / "back"
  model.save_pretrained(str(hf_dir))
  checkpoint.import_hf(str(hf_dir), str(ours))
  config = hf.read_hf_config(str(hf_dir))
  assert (config.eos_token_ids, config.pad_token_id, config.bos_token_id) == ((2, 7), 2, 3)
  checkpoint.export_hf(str(ours), str(back))
  gin.clear_config()
  original, exported = (json.loads((d / "config.json").read_text()) for d in (hf_dir, back))
  for key, value in original.items():
    if key != "transformers_version":
      assert exported[key] == value, key
  assert (back / "generation_config.json").read_text() == (
      hf_dir / "generation_config.json").read_text()
  reloaded = transformers.AutoConfig.from_pretrained(str(back))
  assert (reloaded.max_position_embeddings, reloaded.eos_token_id, reloaded.pad_token_id) == (
      8192, [2, 7], None)
  # A field the model does change is written anew: here the weights' dtype.
  gin.clear_config()
  try:
    checkpoint.export_hf(str(ours), str(tmp_path / "bf16"),
                         gin_bindings=["TransformerConfig.param_dtype='bfloat16'"])
  finally:
    gin.clear_config()
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_checkpoint_import_and_bad_tensor_message(tmp_path):
  model, _ = _random_hf_model(transformers.LlamaConfig)
  model.save_pretrained(str(tmp_path), max_shard_size="20KB")
  with open(tmp_path / "model.safetensors.index.json") as f:
    weight_map = json.load(f)["weight_map"]
  assert len(set(weight_map.values())) > 2
  config, params = hf.load_hf_checkpoint(str(tmp_path))
  ours, real = _our_logits(params, config)
  _assert_close(ours, _hf_logits(model), real)

  # A mis-shaped tensor: one line naming the tensor, the expected and the found shapes.
  name = "model.layers.1.self_attn.k_proj.weight"
  shard = os.path.join(tmp_path, weight_map[name])
  tensors = safetensors.numpy.load_file(shard)
  tensors[name] = np.zeros((32, 32), np.float32)
  safetensors.numpy.save_file(tensors, shard, metadata={"format": "pt"})
  with pytest.raises(ValueError) as error:
    hf.load_hf_checkpoint(str(tmp_path))
  assert str(error.value) == f"{name}: expected shape (16, 32), found (32, 32)."


def test_vocabulary_loads_from_the_checkpoint_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="no spiece.model, tokenizer.model or tokenizer.json"):
    hf.load_hf_vocabulary(str(tmp_path))
  (tmp_path / "spiece.model").write_bytes(open(vocab.DEFAULT_VOCAB_PATH, "rb").read())
  assert hf.load_hf_vocabulary(str(tmp_path), extra_ids=100).vocab_size == 8100


def _boost(model: torch.nn.Module, factors: dict[int, float]) -> None:
  """Scales the output embedding rows of some tokens (in both frameworks alike), e.g. to make
  EOS likelier so that generation stops inside the test."""
  with torch.no_grad():
    for token, factor in factors.items():
      model.get_output_embeddings().weight[token] *= factor


@pytest.mark.parametrize("config_cls", [transformers.MT5Config, transformers.T5Config])
def test_greedy_generation_matches_transformers_encoder_decoder(config_cls):
  model, _ = _random_hf_model(config_cls)
  _boost(model, {model.config.eos_token_id: 3.0})
  config = hf.config_from_hf(model.config)
  params = hf.params_from_hf(_prepare(model), config)
  length = 8
  with torch.no_grad():
    theirs = model.generate(input_ids=torch.tensor(ENC_TOKENS, dtype=torch.long),
                            attention_mask=torch.tensor(ENC_TOKENS != 0, dtype=torch.long),
                            decoder_start_token_id=0, do_sample=False, num_beams=1,
                            max_new_tokens=length).numpy()[:, 1:]
  batch = {"encoder_input_tokens": ENC_TOKENS,
           "decoder_target_tokens": np.zeros((2, length), np.int32)}
  ours = jax.jit(EncoderDecoderModel(config).predict_batch)(params, batch)
  theirs = np.pad(theirs, ((0, 0), (0, length - theirs.shape[1])))
  np.testing.assert_array_equal(ours, theirs)


# Real EOS ids (not seqio's 1), one or several, pad id given or not (then HF pads with the first
# EOS); token 1 is made likely too, so a decoder stopping at id 1 would fail. `decoder_params` of
# ours and the `generate` arguments that must agree with them: greedy, sampling from the top 1,
# beam search without length penalty (T5X's search considers finished beams among all 2k
# candidates, HF's only among the top k: they agree on these models, not on every model).
GENERATION_CASES = [
    ("llama_eos_2", transformers.LlamaConfig, dict(eos_token_id=2, pad_token_id=0),
     {1: 3.0, 2: 2.5}),
    ("llama_eos_2_7", transformers.LlamaConfig, dict(eos_token_id=[2, 7], pad_token_id=None),
     {1: 3.0, 2: 2.0, 7: 2.5}),
    ("cohere_eos_100", transformers.CohereConfig, dict(eos_token_id=100, pad_token_id=0),
     {1: 3.0, 100: 2.5}),
]
DECODERS = [
    ("greedy", {}, dict(do_sample=False, num_beams=1)),
    ("sample_top_1", {"temperature": 1.0, "top_k": 1}, dict(do_sample=True, top_k=1, num_beams=1)),
    ("beam_3", {"beam_size": 3, "alpha": 0.0}, dict(do_sample=False, num_beams=3,
                                                     length_penalty=0.0)),
]


@pytest.mark.parametrize("case", GENERATION_CASES, ids=[c[0] for c in GENERATION_CASES])
def test_generation_stops_where_transformers_does(case):
  name, config_cls, token_ids, boosts = case
  model, _ = _random_hf_model(config_cls, bos_token_id=3, **token_ids)
  _boost(model, boosts)
  config = hf.config_from_hf(model.config)
  eos = token_ids["eos_token_id"]
  assert config.eos_token_ids == tuple(eos if isinstance(eos, list) else [eos])
  assert config.pad_token_id == (config.eos_token_ids[0] if token_ids["pad_token_id"] is None
                                 else token_ids["pad_token_id"])
  params = hf.params_from_hf(_prepare(model), config)
  prompts, new_tokens = [[5, 17, 9, 33, 3], [7, 4, 21], [11, 3, 8, 40, 41, 42], [1, 60, 61]], 10
  width = max(map(len, prompts))
  left = np.array([[0] * (width - len(p)) + p for p in prompts])  # HF: left-padded
  length = width + new_tokens - 1  # the longest prompt can emit `new_tokens`
  buffer = np.array([p + [0] * (length - len(p)) for p in prompts], np.int32)  # ours: right
  causal = (np.arange(length)[None] < np.array([[len(p)] for p in prompts])).astype(np.int32)
  batch = {"decoder_input_tokens": buffer, "decoder_causal_attention": causal}
  model_ours = DecoderOnlyModel(config)
  stopped_after_a_1 = False
  for decoder, ours_params, theirs_args in DECODERS:
    if decoder == "beam_3" and config_cls is transformers.CohereConfig:
      continue  # the two searches differ on this model (see GENERATION_CASES)
    with torch.no_grad():
      theirs = model.generate(input_ids=torch.tensor(left), attention_mask=torch.tensor(left > 0),
                              max_new_tokens=new_tokens, **theirs_args).numpy()[:, width:]
    predict = jax.jit(lambda p, b, rng, settings=ours_params: model_ours.predict_batch(
        p, b, rng, settings))
    ours = predict(params, batch, jax.random.key(0))[:, :new_tokens]
    for row, (mine, reference) in enumerate(zip(np.asarray(ours), theirs)):
      is_eos = np.isin(reference, config.eos_token_ids)
      end = int(np.argmax(is_eos)) + 1 if is_eos.any() else new_tokens
      assert mine[:end].tolist() == reference[:end].tolist(), (name, decoder, row)
      assert (mine[end:] == config.pad_token_id).all(), (name, decoder, row)
      stopped_after_a_1 |= 1 in reference[:end - 1] and is_eos.any()
  assert stopped_after_a_1  # a decoder stopping at id 1 would have stopped early
