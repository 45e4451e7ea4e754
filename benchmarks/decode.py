"""Greedy decoding throughput with and without the KV cache (tokens/s), batch 1 and 32.

What is measured: the wall time of the jitted `model.predict_batch` (greedy) on random token
prompts with randomly initialised params: encoder-decoders encode `--inputs_length` tokens and
decode `--decode_length` tokens from BOS; decoder-only models read a `--prompt_length` prompt
(one prefill pass with the cache) and continue for `--decode_length` tokens. The first call
(compilation) is not timed; then `--repeats` calls are timed, each ended by
`jax.block_until_ready`, and the table reports their median.
tokens/s = batch x decode steps / median seconds, where decode steps is the longest row's output
(each row stops at EOS, id 1; random params rarely emit it, and the table prints the steps).
"cached" runs one prefill pass and then one token per step against the KV cache; "uncached"
(`decoder_params={'use_cache': False}`) re-runs the decoder over the whole buffer every step.

Configs (`benchmarks/train_step.py`): `tiny`/`small` are mT5 dims, `llama_tiny` the Llama tiny
gin; vocab 8192. The machine's load average (`os.getloadavg`, as `uptime`) is printed before and
after: other processes on a shared CPU slow every number down.

Run: .venv/bin/python benchmarks/decode.py --configs=tiny,small,llama_tiny --batch_sizes=1,32
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import flax.linen as nn
import jax
import numpy as np
from train_step import CONFIGS, load_config, synthetic_batch, timed

from polyglot_jax.models.model import EncoderDecoderModel


def decode_batch(encoder_decoder: bool, batch_size: int, args: argparse.Namespace,
                 vocab_size: int) -> dict[str, np.ndarray]:
  """Random prompts with the features `predict_batch` reads."""
  if encoder_decoder:
    batch = synthetic_batch(True, batch_size, args.inputs_length, args.decode_length, vocab_size)
    return {k: batch[k] for k in ("encoder_input_tokens", "decoder_target_tokens")}
  length = args.prompt_length + args.decode_length - 1  # the prompt, then decode_length outputs
  batch = synthetic_batch(False, batch_size, 0, length, vocab_size)
  prompt = (np.arange(length) < args.prompt_length)[None].astype(np.int32)  # [1, length]
  return {"decoder_input_tokens": batch["decoder_input_tokens"],
          "decoder_causal_attention": np.repeat(prompt, batch_size, axis=0)}


def run(name: str, args: argparse.Namespace) -> list[dict[str, object]]:
  """One row per (batch size, cached/uncached) of config `name`."""
  config = load_config(name, argparse.Namespace(dtype=args.dtype, scan_layers=False,
                                                remat_policy="none"))
  model = CONFIGS[name][1](config)
  encoder_decoder = isinstance(model, EncoderDecoderModel)
  rows = []
  for batch_size in args.batch_sizes:
    batch = decode_batch(encoder_decoder, batch_size, args, config.vocab_size)
    shapes = {k: v.shape for k, v in batch.items()}
    if encoder_decoder:  # init also reads the decoder inputs' shape
      shapes["decoder_input_tokens"] = batch["decoder_target_tokens"].shape
    init = jax.jit(functools.partial(model.get_initial_variables, input_shapes=shapes))
    params = nn.unbox(init(jax.random.key(0))["params"])
    for use_cache in (True, False):
      predict = jax.jit(functools.partial(model.predict_batch,
                                          decoder_params={"use_cache": use_cache}))
      start = time.perf_counter()
      tokens = np.asarray(jax.block_until_ready(predict(params, batch)))  # compiles
      compile_s = time.perf_counter() - start
      seconds = statistics.median(timed(predict, params, batch, warmup=0, steps=args.repeats))
      before_eos = (np.cumsum(tokens == 1, axis=1) == 0).sum(1)  # [batch]
      steps = min(int((before_eos + (tokens == 1).any(1)).max()), args.decode_length)
      rows.append({"config": name, "batch": batch_size, "cache": use_cache, "steps": steps,
                   "seconds": seconds, "tokens_per_s": batch_size * steps / seconds,
                   "compile_s": compile_s})
      print(f"{name:>10} batch {batch_size:>3} {'cached' if use_cache else 'uncached':>8}: "
            f"{rows[-1]['tokens_per_s']:9.1f} tokens/s ({steps} steps, {seconds * 1e3:8.1f} ms,"
            f" compile {compile_s:5.1f} s)", flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="tiny,small,llama_tiny")
  parser.add_argument("--batch_sizes", default="1,32",
                      type=lambda s: [int(x) for x in s.split(",")])
  parser.add_argument("--inputs_length", type=int, default=64)
  parser.add_argument("--prompt_length", type=int, default=16)
  parser.add_argument("--decode_length", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--json", default=None, help="also write the rows here")
  args = parser.parse_args()
  print(f"devices: {jax.devices()}; load average before: {os.getloadavg()}", flush=True)
  rows = [row for name in args.configs.split(",") for row in run(name, args)]
  print(f"load average after: {os.getloadavg()}")
  print("| config | batch | cached tokens/s | uncached tokens/s | speed-up |")
  print("|---|---|---|---|---|")
  for cached, uncached in zip(rows[::2], rows[1::2]):
    print(f"| {cached['config']} | {cached['batch']} | {cached['tokens_per_s']:.1f} | "
          f"{uncached['tokens_per_s']:.1f} | "
          f"{cached['tokens_per_s'] / uncached['tokens_per_s']:.1f}x |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
