"""Input-pipeline throughput: tokenise + preprocess + pack + batch, as the trainer consumes it.

What is measured: `polyglot_jax.data.pipeline.get_dataset` (the trainer's own call: seqio task or
mixture, objective, feature converter with packing, batching, prefetch) iterated as NumPy batches
with `iterate_batches`, exactly what the train command (`commands/train.py`) reads. Nothing else runs in the process.
Defaults are the quickstart's (gin/experiments/quickstart.gin): task udhr_span_corruption,
inputs 128 / targets 32, batch 16, encoder-decoder packing. The first `--warmup` batches (graph
construction, tracing, shuffle-buffer fill) are timed separately as start-up; then `--batches`
batches are timed together. With `--hosts H`, the process plays host 0 of H: it reads only its
data shard and produces batches of batch / H rows (steps/s is then per host).

Reported per task or mixture:
  startup_s             get_dataset + the warm-up batches
  steps_per_second      batches per second (one batch = one train step)
  examples_per_second   packed segments per second (preprocessed examples, e.g. span-corruption
                        pieces), counted from the segment ids
  tokens_per_second     non-padding tokens per second, encoder + decoder
  slot_tokens_per_second  batch x (inputs + targets) x steps/s, the tokens a train step consumes
  headroom              steps_per_second / --train_steps_per_second (the quickstart train step
                        runs about 1 step/s on 2 CPU cores); the issue asks for at least 5x

`--vocabulary=PATH` re-registers the bundled tasks with another vocabulary first (a SentencePiece
model, or a Hugging Face tokenizer folder: `vocab.get_vocabulary`), e.g. to time a checkpoint's
`tokenizer.json`.

Run (CPU; TF uses all cores it may):
  .venv/bin/python benchmarks/input_pipeline.py --json=/tmp/input_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import seqio  # noqa: E402

from polyglot_jax.data import tasks, vocab  # noqa: E402
from polyglot_jax.data.pipeline import DatasetConfig, get_dataset, iterate_batches  # noqa: E402


def measure(name: str, lengths: dict[str, int], batch_size: int, warmup: int, batches: int,
            train_steps_per_second: float, hosts: int = 1) -> dict[str, float | str]:
  """Times one task or mixture through the trainer's pipeline (as host 0 of `hosts`)."""
  began = time.perf_counter()
  cfg = DatasetConfig(name, lengths, "train", batch_size)
  it = iterate_batches(get_dataset(cfg, seqio.EncDecFeatureConverter, 0, hosts))
  for _ in range(warmup):
    next(it)
  startup = time.perf_counter() - began
  segments = tokens = 0
  began = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
    segments += int(batch["encoder_segment_ids"].max(axis=1).sum())  # segments per row, summed
    tokens += sum(int((batch[k] > 0).sum()) for k in ("encoder_segment_ids", "decoder_segment_ids"))
  seconds = time.perf_counter() - began
  steps = batches / seconds
  return {
      "name": name,
      "startup_s": startup,
      "steps_per_second": steps,
      "examples_per_second": segments / seconds,
      "tokens_per_second": tokens / seconds,
      "slot_tokens_per_second": steps * batch_size // hosts * sum(lengths.values()),
      "headroom": steps / train_steps_per_second,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--names", default="udhr_span_corruption,udhr_span_corruption_mix",
                      help="comma-separated tasks or mixtures (encoder-decoder features)")
  parser.add_argument("--inputs_length", type=int, default=128)
  parser.add_argument("--targets_length", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=16, help="global batch")
  parser.add_argument("--hosts", type=int, default=1, help="measure host 0 of this many")
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--batches", type=int, default=300)
  parser.add_argument("--train_steps_per_second", type=float, default=1.0,
                      help="what the train step consumes, for the headroom column")
  parser.add_argument("--vocabulary", help="tokenize with this vocabulary (default: bundled)")
  parser.add_argument("--json", help="also write the rows to this file")
  args = parser.parse_args()
  if args.vocabulary:
    tasks.register_udhr_tasks(vocab.get_vocabulary(args.vocabulary, extra_ids=0))
  lengths = {"inputs": args.inputs_length, "targets": args.targets_length}
  rows = [measure(name, lengths, args.batch_size, args.warmup, args.batches,
                  args.train_steps_per_second, args.hosts) for name in args.names.split(",")]
  print(f"{os.cpu_count()} CPUs visible; lengths {lengths}, batch {args.batch_size}, "
        f"host 0 of {args.hosts}, {args.batches} timed batches, vocabulary "
        f"{args.vocabulary or 'bundled'}")
  header = ("name", "startup_s", "steps_per_second", "examples_per_second", "tokens_per_second",
            "slot_tokens_per_second", "headroom")
  print("  ".join(f"{h:>22}" for h in header))
  for row in rows:
    print("  ".join(f"{row[h]:>22}" if isinstance(row[h], str) else f"{row[h]:>22.1f}"
                    for h in header))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "rows": rows, "cpus": os.cpu_count()}, f, indent=1,
                default=float)


if __name__ == "__main__":
  main()
