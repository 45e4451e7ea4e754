"""Numerical parity of our Flax networks with Hugging Face PyTorch models on converted weights.

Tiny random HF models (2 layers, width 32) run in float32 on a batch of two rows, the second
right-padded, with encoder and decoder of different lengths; logits must agree within 1e-4 on
every real (non-padding) position. Norm scales are randomised so a mis-mapped norm cannot hide.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention

from polyglot_jax.convert import hf
from polyglot_jax.models import layers
from polyglot_jax.models.decoder import DecoderOnly
from polyglot_jax.models.encoder_decoder import EncoderDecoder

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


@pytest.mark.parametrize("name, config_cls, extra", [
    ("t5_v1_1", transformers.T5Config, dict(feed_forward_proj="gated-gelu",
                                            tie_word_embeddings=False)),
    ("t5_classic_tied", transformers.T5Config, dict(feed_forward_proj="relu")),
    ("mt5", transformers.MT5Config, {}),
    ("umt5", transformers.UMT5Config, {}),
])
def test_encoder_decoder_parity(name: str, config_cls: type, extra: dict) -> None:
  torch.manual_seed(0)
  hf_config = config_cls(**T5_DIMS, **extra)
  model = transformers.AutoModelForSeq2SeqLM.from_config(hf_config)
  config = hf.config_from_hf(hf_config)
  if not config.logits_via_embedding:
    # transformers 5 always ties lm_head to the embedding on construction; untie it as in real
    # T5.1.1/mT5/umT5 checkpoints.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, WIDTH) * WIDTH**-0.5)
  state_dict = _prepare(model)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ENC_TOKENS, dtype=torch.long),
                   attention_mask=torch.tensor(ENC_TOKENS != 0, dtype=torch.long),
                   decoder_input_ids=torch.tensor(DEC_INPUTS, dtype=torch.long),
                   decoder_attention_mask=torch.tensor(DEC_TARGETS != 0, dtype=torch.long),
                   ).logits.numpy()
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
  torch.manual_seed(0)
  hf_config = config_cls(**LM_DIMS, **extra)
  model = transformers.AutoModelForCausalLM.from_config(hf_config)
  state_dict = _prepare(model)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(LM_TOKENS, dtype=torch.long),
                   attention_mask=torch.tensor(LM_MASK, dtype=torch.long)).logits.numpy()
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
