"""`polyglot-jax convert` on tiny random HF models saved to tmp_path, and sharded loading.

Import -> our checkpoint + model.gin gives the HF logits; export -> `transformers` load gives them
again (within test_hf_parity's 1e-4); a block-by-block load into an 8-device mesh equals the host
load and reads every tensor's bytes once; a mis-shaped tensor is one line on stderr.
"""

from __future__ import annotations

import json
import os
import shutil

import gin
import jax
import numpy as np
import pytest
import safetensors.numpy
import transformers
from test_hf_parity import _assert_close, _hf_logits, _our_logits, _random_hf_model

from polyglot_jax import cli
from polyglot_jax.commands import gin_setup
from polyglot_jax.convert import checkpoint, hf
from polyglot_jax.data import vocab
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import checkpoints, train_state

LLAMA_EXTRA = dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0})


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("name, config_cls, extra, flags", [
    ("mt5", transformers.MT5Config, {}, []),
    ("llama_gqa_scan", transformers.LlamaConfig, LLAMA_EXTRA, ["--scan_layers"]),
])
def test_convert_round_trip_through_the_cli(name, config_cls, extra, flags, tmp_path, capsys):
  model, _ = _random_hf_model(config_cls, **extra)
  hf_dir, ours, back = tmp_path / "hf", tmp_path / "ours", tmp_path / "back"
  model.save_pretrained(str(hf_dir))
  shutil.copyfile(vocab.DEFAULT_VOCAB_PATH, hf_dir / "spiece.model")
  assert cli.main(["convert", f"--from_hf={hf_dir}", f"--model_dir={ours}", *flags]) == 0, \
      capsys.readouterr().err
  assert (ours / "spiece.model").read_bytes() == (hf_dir / "spiece.model").read_bytes()
  assert os.listdir(ours / "checkpoints") == ["0"]

  # What `eval` / `infer` do: the model from model.gin, its params restored (onto another mesh).
  gin_setup.parse([str(ours / "model.gin")], ["ACTIVATION_DTYPE='float32'"])
  config = TransformerConfig()
  gin.clear_config()
  assert config == hf.config_from_hf(model.config, scan_layers=bool(flags))
  spec = train_state.state_spec(checkpoint.model_for(config), train_state.ParamsOnly(),
                                Partitioner(MeshConfig(data=2, fsdp=2, tensor=2)))
  params = checkpoints.restore_params(str(ours / "checkpoints"), spec.abstract.params)
  theirs = _hf_logits(model)
  logits, real = _our_logits(params, config)
  _assert_close(logits, theirs, real)

  assert cli.main(["convert", f"--to_hf={back}", f"--model_dir={ours}"]) == 0, \
      capsys.readouterr().err
  auto = (transformers.AutoModelForSeq2SeqLM if config.num_encoder_layers
          else transformers.AutoModelForCausalLM)
  reloaded = auto.from_pretrained(str(back))
  assert type(reloaded) is type(model)
  assert (reloaded.config.eos_token_id, reloaded.config.pad_token_id) == (
      model.config.eos_token_id, model.config.pad_token_id)
  _assert_close(_hf_logits(reloaded), theirs, real)
  assert (back / "spiece.model").read_bytes() == (hf_dir / "spiece.model").read_bytes()


def _save_sharded(config_cls: type, extra: dict, directory) -> None:
  """A tiny random HF model saved in several safetensors shards."""
  model, _ = _random_hf_model(config_cls, **extra)
  model.save_pretrained(str(directory), max_shard_size="20KB")


@pytest.mark.parametrize("config_cls, extra, scan", [
    (transformers.LlamaConfig, LLAMA_EXTRA, False), (transformers.LlamaConfig, LLAMA_EXTRA, True),
    (transformers.MT5Config, {}, False), (transformers.UMT5Config, {}, True),
], ids=["llama", "llama_scan", "mt5", "umt5_scan"])
def test_sharded_load_equals_host_load_and_reads_each_byte_once(config_cls, extra, scan, tmp_path,
                                                               monkeypatch):
  _save_sharded(config_cls, extra, tmp_path)
  directory = tmp_path
  config, host = hf.load_hf_checkpoint(str(directory), scan_layers=scan)
  partitioner = Partitioner(MeshConfig(data=1, fsdp=4, tensor=2))
  spec = train_state.state_spec(checkpoint.model_for(config), train_state.ParamsOnly(),
                                partitioner)
  reads: dict[str, list[int]] = {}
  read = hf.SafetensorsDirectory.read

  def counting_read(self, name, index=None):
    block = read(self, name, index)
    reads.setdefault(name, []).append(block.size)
    return block

  monkeypatch.setattr(hf.SafetensorsDirectory, "read", counting_read)
  sharded = hf.load_hf_params_sharded(str(directory), config, spec.shardings.params)
  for got, want, sharding in zip(jax.tree.leaves(sharded), jax.tree.leaves(host),
                                 jax.tree.leaves(spec.shardings.params)):
    assert got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  maps, stacks = hf.tensor_maps(config)
  for tensor in maps + [t for stack in stacks.values() for layer in stack for t in layer]:
    size = int(np.prod(tensor.hf_shape))
    assert sum(reads[tensor.hf_name]) == size, tensor.hf_name
  # Query kernels are split over 4 (embed) x 2 (heads) devices: each read is one device's block.
  query = stacks["decoder"][0][1]
  assert query.path[-2:] == ("query", "kernel")
  assert max(reads[query.hf_name]) == 32 * 32 // 8


def test_convert_reports_a_mis_shaped_tensor_in_one_line(tmp_path, capsys):
  directory = tmp_path / "hf"
  _save_sharded(transformers.LlamaConfig, LLAMA_EXTRA, directory)
  with open(directory / "model.safetensors.index.json") as f:
    shard = directory / json.load(f)["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
  tensors = safetensors.numpy.load_file(str(shard))
  tensors["model.layers.1.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)
  safetensors.numpy.save_file(tensors, str(shard), metadata={"format": "pt"})
  ours = tmp_path / "ours"
  capsys.readouterr()  # transformers' progress bars
  assert cli.main(["convert", f"--from_hf={directory}", f"--model_dir={ours}"]) == 2
  assert capsys.readouterr().err.strip() == (
      "polyglot-jax convert: error: model.layers.1.self_attn.k_proj.weight: expected shape "
      "(16, 32), found (32, 32).")
  assert not (ours / "checkpoints").exists()


def test_export_reads_the_model_of_a_runs_operative_config(tmp_path):
  """Without model.gin, export reads config.gin, which binds the model in MODEL's scope."""
  (tmp_path / "config.gin").write_text(
      "MODEL = @DecoderOnlyModel()\nMODEL/DecoderOnlyModel.config = @TransformerConfig()\n"
      "MODEL/TransformerConfig.emb_dim = 48\nMODEL/TransformerConfig.num_encoder_layers = 0\n")
  model = checkpoint.gin_model(checkpoint.model_gin_files(str(tmp_path), []))
  assert type(model).__name__ == "DecoderOnlyModel" and model.config.emb_dim == 48
  with pytest.raises(FileNotFoundError, match="neither model.gin nor config.gin"):
    checkpoint.model_gin_files(str(tmp_path / "empty"), [])
