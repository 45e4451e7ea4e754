"""Analytic FLOPs against hand arithmetic, the PaLM identity, peaks and MFU."""

import dataclasses
import math
from types import SimpleNamespace

import jax
import pytest

from polyglot_jax.models.config import MoeConfig, TransformerConfig
from polyglot_jax.training.flops import (datasheet_peak_flops, matmul_param_count,
                                         measure_peak_flops, mfu, training_flops)

TINY = TransformerConfig(vocab_size=10, emb_dim=4, num_heads=2, num_kv_heads=1, head_dim=3,
                         mlp_dim=5, num_encoder_layers=2, num_decoder_layers=1,
                         mlp_activations=("gelu", "linear"))
# One attention block: q 4*2*3=24 + o 24 + k 4*1*3=12 + v 12 = 72.
# One gated MLP: two input projections 2*4*5=40 + output 5*4=20 = 60.
# Logits: 4*10 = 40. Cross-attention k/v of one decoder layer: 12 + 12 = 24. d_attn = 2*3 = 6.


def test_matmul_param_count_by_hand() -> None:
  assert matmul_param_count(TINY, encoder_decoder=True) == {
      "encoder": 2 * (72 + 60),  # 264
      "decoder": 1 * (72 + 72 + 60),  # self-attention + cross-attention + MLP = 204
      "logits": 40,
  }
  assert matmul_param_count(TINY, encoder_decoder=False) == {"decoder": 72 + 60, "logits": 40}


def test_encoder_decoder_training_flops_by_hand() -> None:
  # batch 2, inputs 6, targets 3: 12 encoder tokens, 6 decoder tokens.
  encoder_matmul = 12 * (264 + 24)  # encoder stack + cross-attention k/v = 3456
  decoder_matmul = 6 * (204 - 24 + 40)  # decoder without cross k/v + logits = 1320
  encoder_pairs = 12 * 2 * 6  # tokens * layers * inputs_length = 144
  decoder_pairs = 6 * 1 * (3 + 6)  # tokens * layers * (self targets + cross inputs) = 54
  expected = 6 * (encoder_matmul + decoder_matmul) + 12 * 6 * (encoder_pairs + decoder_pairs)
  assert expected == 28656 + 14256
  assert training_flops(TINY, encoder_decoder=True, batch_size=2, inputs_length=6,
                        targets_length=3) == expected


def test_decoder_only_training_flops_by_hand() -> None:
  # N = 72 + 60 + 40 = 172; 6 tokens; 12 * L * d_attn * T = 12 * 1 * 6 * 3 = 216 per token.
  assert training_flops(TINY, encoder_decoder=False, batch_size=2, inputs_length=99,
                        targets_length=3) == 6 * (6 * 172 + 216) == 7488


def test_decoder_only_is_6n_plus_12ldt_per_token() -> None:
  config = TransformerConfig(vocab_size=32000, emb_dim=512, num_heads=8, num_kv_heads=2,
                             head_dim=64, mlp_dim=1376, num_decoder_layers=6,
                             mlp_activations=("silu", "linear"))
  n = sum(matmul_param_count(config, encoder_decoder=False).values())
  batch, length = 4, 256
  per_token = 6 * n + 12 * 6 * (8 * 64) * length
  assert training_flops(config, encoder_decoder=False, batch_size=batch,
                        targets_length=length) == batch * length * per_token


def test_measure_peak_flops_is_positive_and_finite() -> None:
  peak = measure_peak_flops(size=64, iters=2)
  assert peak > 0 and math.isfinite(peak)


@pytest.mark.parametrize("platform, kind, peak", [
    ("tpu", "TPU v4", 275e12),
    ("tpu", "TPU v5 lite", 197e12),
    ("tpu", "TPU v5p", 459e12),
    ("tpu", "TPU v6 lite", 918e12),
    ("gpu", "NVIDIA H100 80GB HBM3", 989e12),
    ("gpu", "NVIDIA H100 PCIe", 756e12),
    ("gpu", "NVIDIA H200", 989e12),
    ("gpu", "NVIDIA A100-SXM4-40GB", 312e12),
    ("gpu", "NVIDIA GeForce RTX 4090", None),
])
def test_datasheet_peak_flops(platform: str, kind: str, peak: float | None) -> None:
  assert datasheet_peak_flops(SimpleNamespace(platform=platform, device_kind=kind)) == peak


def test_datasheet_peak_flops_is_none_on_cpu() -> None:
  assert datasheet_peak_flops(jax.devices()[0]) is None


def test_mfu() -> None:
  assert mfu(4e12, step_seconds=2.0, peak_flops=4e12) == 0.5
  with pytest.raises(ValueError):
    mfu(1.0, step_seconds=0.0, peak_flops=1.0)


def test_moe_counts_the_router_and_the_k_active_experts():
  dense = TransformerConfig(emb_dim=64, mlp_dim=256, num_heads=4, head_dim=16,
                            num_encoder_layers=2, num_decoder_layers=2, vocab_size=100)
  ffn = 3 * 64 * 256  # gated: two input projections and the output projection
  for k in (1, 2):
    sparse = dataclasses.replace(dense, moe=MoeConfig(num_experts=8, num_selected=k))
    got = matmul_param_count(sparse, encoder_decoder=False)["decoder"]
    want = matmul_param_count(dense, encoder_decoder=False)["decoder"]
    assert got - want == 2 * ((k - 1) * ffn + 64 * 8)
