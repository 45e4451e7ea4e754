"""Train-step throughput and MFU of the tiny/small models on synthetic batches.

What is measured: the wall time of the real jitted train step (`training.step.make_train_step`:
forward, backward, Adafactor update, non-finite guard, metrics) on one fixed batch of random token
ids, with the train state donated and sharded by a `Partitioner` exactly as in training. The first
`--warmup` steps (compilation included) are not timed; then `--steps` steps are timed one by one,
each ended by `jax.block_until_ready`, and the table reports their median. Input pipelines,
checkpointing and host-side metric handling are not part of the number.

FLOP convention (`training.flops`, PaLM appendix B, docs/design.md): training FLOPs per token =
6 x matmul parameters the token passes through (logits projection included, embedding gather
excluded) + 12 x layers x (num_heads x head_dim) x attended length, where a causal decoder counts
the full T x T score matrix (as PaLM and MaxText do, so causal attention is over-counted by up to
2x in the attention term) and encoder-decoder cross-attention covers inputs_length keys.
Rematerialised recomputation is not counted (these are model FLOPs, not hardware FLOPs).

MFU = (training FLOPs per step / median step seconds) / peak, reported against
  (a) the peak measured in this same process: the best FLOP/s of a jitted square f32 matmul
      (`flops.measure_peak_flops`, sizes `--peak_sizes`, measured before and after the runs, best
      kept; on CPU the single-device value, since virtual CPU devices share the cores), and
  (b) the datasheet bf16 dense peak when `flops.datasheet_peak_flops` knows the device (TPU/GPU;
      "-" on CPU).
Host CPU: the process's CPU seconds per step (all threads) and their ratio to wall time ("cores
busy") are recorded in the JSON; on a shared machine they reveal steps slowed by other processes.
Memory: peak resident set size of the process (`ru_maxrss`, so it includes JAX, XLA and the
compiler, and is the high-water mark of everything the process ran so far: give one config per run
for a per-config number) and, where the backend reports it (GPU/TPU), the device's
`peak_bytes_in_use`.

Configs: `tiny` and `small` are mT5 (T5.1.1 architecture) dims from gin/models/mt5/{tiny,small}.gin,
`llama_tiny` is gin/models/llama/tiny.gin; all use vocab_size 8192 (the bundled SentencePiece
vocabulary rounded up). Decoder-only models train on one sequence of `--targets_length` tokens
(`--inputs_length` is ignored for them, as in `training_flops`).

Run (CPU; set XLA_FLAGS before the process starts if you want to change XLA's CPU threading):
  .venv/bin/python benchmarks/train_step.py --configs=tiny,small --dtype=float32 \
      --json=/tmp/train_step.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import statistics
import sys
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from polyglot_jax.commands.gin_setup import GIN_DIR
from polyglot_jax.models.config import TransformerConfig
from polyglot_jax.models.model import DecoderOnlyModel, EncoderDecoderModel
from polyglot_jax.parallel import partitioning
from polyglot_jax.training import flops, optimizers, step, train_state

VOCAB_SIZE = 8192  # The bundled UDHR SentencePiece vocabulary (8100 ids) rounded up.

# name -> (gin file holding the dims, model class).
CONFIGS: dict[str, tuple[str, type]] = {
    "tiny": ("models/mt5/tiny.gin", EncoderDecoderModel),
    "small": ("models/mt5/small.gin", EncoderDecoderModel),
    "llama_tiny": ("models/llama/tiny.gin", DecoderOnlyModel),
}


def load_config(name: str, args: argparse.Namespace) -> TransformerConfig:
  """The TransformerConfig bound by the config's gin file, with the benchmark's overrides."""
  gin_file, _ = CONFIGS[name]
  gin.clear_config()
  gin.add_config_file_search_path(GIN_DIR)
  # gin tries each include relative to the working directory first and logs a harmless error for
  # it; a file missing from the search path still raises.
  level = logging.getLogger().level
  logging.getLogger().setLevel(logging.CRITICAL)
  try:
    gin.parse_config_file(gin_file)
  finally:
    logging.getLogger().setLevel(level)
  with gin.unlock_config():
    config = TransformerConfig()  # gin supplies every field the file binds.
  gin.clear_config()
  return dataclasses.replace(config, vocab_size=VOCAB_SIZE, dtype=args.dtype,
                             param_dtype="float32", dropout_rate=0.0,
                             scan_layers=args.scan_layers, remat_policy=args.remat_policy)


def synthetic_batch(encoder_decoder: bool, batch_size: int, inputs_length: int,
                    targets_length: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random token ids (never 0 = padding, so every position is real) with seqio feature names."""
  rng = np.random.default_rng(seed)
  targets = rng.integers(2, vocab_size, (batch_size, targets_length), dtype=np.int32)  # [b, t]
  decoder_inputs = np.concatenate(  # [batch, targets_length]: shifted right behind BOS 0
      [np.zeros((batch_size, 1), np.int32), targets[:, :-1]], axis=1)
  batch = {"decoder_input_tokens": decoder_inputs, "decoder_target_tokens": targets,
           "decoder_loss_weights": np.ones((batch_size, targets_length), np.float32)}
  if encoder_decoder:
    batch["encoder_input_tokens"] = rng.integers(  # [batch, inputs_length]
        2, vocab_size, (batch_size, inputs_length), dtype=np.int32)
  return batch


def peak_rss_bytes() -> int:
  """Peak resident set size of this process (Linux reports ru_maxrss in KiB, macOS in bytes)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if sys.platform == "darwin" else rss * 1024


def cpu_seconds() -> float:
  """User + system CPU seconds of this process (all threads)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def device_peak_bytes() -> int | None:
  """Largest `peak_bytes_in_use` over local devices, where the backend reports it (not CPU)."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  (backends without memory stats)
      stats = {}
    if "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def measure_peaks(sizes: list[int]) -> dict[int, float]:
  """Measured f32 matmul FLOP/s of one device at each square size."""
  return {size: flops.measure_peak_flops(jnp.float32, size=size) for size in sizes}


def timed(fn, *args, warmup: int, steps: int) -> list[float]:
  """Seconds of each of `steps` calls of fn(*args) after `warmup` untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return times


def breakdown(model: Any, state: train_state.TrainState, batch: dict[str, jax.Array],
              spec: train_state.StateSpec, args: argparse.Namespace) -> dict[str, float]:
  """Median seconds of jitted forward (loss), forward+backward (grads), and optimizer update."""
  params = state.params

  def loss(p, b):
    return model.loss_fn(p, b, None)[0]

  grad = jax.jit(jax.grad(loss))
  grads = grad(params, batch)
  update = jax.jit(lambda g, o, p: spec.tx.update(g, o, p))
  parts = {
      "forward_s": (jax.jit(loss), (params, batch)),
      "forward_backward_s": (grad, (params, batch)),
      "optimizer_s": (update, (grads, state.opt_state, params)),
  }
  return {name: statistics.median(timed(fn, *fn_args, warmup=1, steps=args.steps))
          for name, (fn, fn_args) in parts.items()}


def run_config(name: str, args: argparse.Namespace,
               partitioner: partitioning.Partitioner) -> dict[str, Any]:
  """Builds, compiles and times one config; returns one result row (MFU is added by `main`)."""
  config = load_config(name, args)
  model_cls = CONFIGS[name][1]
  model = model_cls(config)
  encoder_decoder = model_cls is EncoderDecoderModel
  inputs_length = args.inputs_length if encoder_decoder else 0

  host_batch = synthetic_batch(encoder_decoder, args.batch_size, inputs_length,
                               args.targets_length, config.vocab_size)
  optimizer = optimizers.Adafactor(learning_rate=args.learning_rate)

  # State and step are built outside the mesh context (as commands/train.py does); only the
  # model's activation constraints need `activate()`.
  spec = train_state.state_spec(model, optimizer, partitioner)
  state = train_state.initialize(model, spec, seed=0)
  batch = partitioner.shard_batch(host_batch)
  train_step = step.make_train_step(model, spec, partitioner,
                                    learning_rate_fn=optimizer.learning_rate_fn)
  with partitioner.activate():
    start = time.perf_counter()
    state, metrics = train_step(state, batch)  # Compiles.
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
      state, metrics = jax.block_until_ready(train_step(state, batch))

    if args.profile_dir:
      jax.profiler.start_trace(os.path.join(args.profile_dir, name))
    times, cpu_times = [], []
    for _ in range(args.steps):
      start, cpu_start = time.perf_counter(), cpu_seconds()
      state, metrics = jax.block_until_ready(train_step(state, batch))
      times.append(time.perf_counter() - start)
      cpu_times.append(cpu_seconds() - cpu_start)
    cores_busy = sum(cpu_times) / sum(times)
    if args.profile_dir:
      jax.profiler.stop_trace()
    parts = breakdown(model, state, batch, spec, args) if args.breakdown else {}
    loss = float(metrics["loss"])

  step_s = statistics.median(times)
  num_params = train_state.param_count(spec.abstract.params)
  step_flops = flops.training_flops(config, encoder_decoder=encoder_decoder,
                                    batch_size=args.batch_size, inputs_length=inputs_length,
                                    targets_length=args.targets_length)
  target_tokens = args.batch_size * args.targets_length
  total_tokens = args.batch_size * (inputs_length + args.targets_length)
  datasheet = flops.datasheet_peak_flops(jax.devices()[0])
  datasheet_total = datasheet * jax.device_count() if datasheet else None
  device_bytes = device_peak_bytes()
  return {
      "config": name,
      "model": model_cls.__name__,
      "params": num_params,
      "dtype": args.dtype,
      "scan_layers": args.scan_layers,
      "remat_policy": args.remat_policy,
      "mesh": dict(partitioner.mesh.shape),
      "batch_size": args.batch_size,
      "inputs_length": inputs_length,
      "targets_length": args.targets_length,
      "target_tokens_per_step": target_tokens,
      "total_tokens_per_step": total_tokens,
      "compile_plus_first_step_s": compile_s,
      "step_s_median": step_s,
      "step_s_min": min(times),
      "step_s_max": max(times),
      "step_s_all": times,
      "step_cpu_s_all": cpu_times,  # Host CPU seconds (all threads); robust to other load.
      "host_cores_busy": cores_busy,
      "target_tokens_per_s": target_tokens / step_s,
      "total_tokens_per_s": total_tokens / step_s,
      "flops_per_step": step_flops,
      "achieved_tflops": step_flops / step_s / 1e12,
      "peak_datasheet_tflops": datasheet_total / 1e12 if datasheet_total else None,
      "mfu_datasheet": flops.mfu(step_flops, step_s, datasheet_total) if datasheet_total else None,
      "peak_rss_gib": peak_rss_bytes() / 2**30,
      "device_peak_gib": device_bytes / 2**30 if device_bytes is not None else None,
      "final_loss": loss,
      "loadavg_after": os.getloadavg(),
      "dims": {**dataclasses.asdict(config), "kv_heads": config.kv_heads},
      **parts,
  }


COLUMNS = (  # (header, row -> text)
    ("config", lambda r: r["config"]),
    ("params", lambda r: f"{r['params'] / 1e6:.1f}M"),
    ("batch", lambda r: f"{r['batch_size']}x({r['inputs_length']}+{r['targets_length']})"),
    ("tokens/step tgt / all",
     lambda r: f"{r['target_tokens_per_step']} / {r['total_tokens_per_step']}"),
    ("step s (med)", lambda r: f"{r['step_s_median']:.3f}"),
    ("tgt tok/s", lambda r: f"{r['target_tokens_per_s']:,.0f}"),
    ("all tok/s", lambda r: f"{r['total_tokens_per_s']:,.0f}"),
    ("TFLOP/s", lambda r: f"{r['achieved_tflops']:.4f}"),
    ("MFU meas.", lambda r: f"{100 * r['mfu_measured']:.1f}%"),
    ("MFU datasheet", lambda r: "-" if r["mfu_datasheet"] is None
     else f"{100 * r['mfu_datasheet']:.1f}%"),
    ("peak RSS GiB", lambda r: f"{r['peak_rss_gib']:.2f}"),
    ("dev peak GiB", lambda r: "-" if r["device_peak_gib"] is None
     else f"{r['device_peak_gib']:.2f}"),
)


def print_table(rows: list[dict[str, Any]]) -> None:
  """A Markdown table, one row per config."""
  print("| " + " | ".join(h for h, _ in COLUMNS) + " |")
  print("|" + "|".join("---" for _ in COLUMNS) + "|")
  for row in rows:
    print("| " + " | ".join(fmt(row) for _, fmt in COLUMNS) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--configs", default="tiny,small",
                      help=f"comma list of {', '.join(CONFIGS)}")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps, compilation included")
  parser.add_argument("--batch_size", type=int, default=8, help="global batch (sequences)")
  parser.add_argument("--inputs_length", type=int, default=128)
  parser.add_argument("--targets_length", type=int, default=128)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="activation/compute dtype; parameters stay float32")
  parser.add_argument("--scan_layers", action="store_true")
  parser.add_argument("--remat_policy", default="none",
                      choices=("none", "full", "dots", "dots_with_no_batch_dims",
                               "save_attention_out"))
  parser.add_argument("--learning_rate", type=float, default=1e-3, help="constant Adafactor LR")
  parser.add_argument("--mesh_data", type=int, default=-1, help="-1: all remaining devices")
  parser.add_argument("--mesh_fsdp", type=int, default=1)
  parser.add_argument("--mesh_tensor", type=int, default=1)
  parser.add_argument("--rules", default="fsdp_tensor",
                      help=f"logical-axis rule preset: {', '.join(partitioning.RULE_PRESETS)}")
  parser.add_argument("--peak_sizes", default="2048,4096",
                      help="square f32 matmul sizes for the measured peak; the best is used")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time forward, forward+backward and the optimizer update alone")
  parser.add_argument("--profile_dir", default="",
                      help="write a jax.profiler trace of the timed steps here")
  parser.add_argument("--json", default="", help="also write the results as JSON to this path")
  args = parser.parse_args(argv)
  unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
  if unknown:
    parser.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
  if args.warmup < 1 or args.steps < 1:
    parser.error("--warmup and --steps must be at least 1 (the first step compiles).")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  mesh_config = partitioning.MeshConfig(data=args.mesh_data, fsdp=args.mesh_fsdp,
                                        tensor=args.mesh_tensor, rules=args.rules)
  partitioner = partitioning.Partitioner(mesh_config)
  device = jax.devices()[0]
  load_at_start = os.getloadavg()
  sizes = [int(s) for s in args.peak_sizes.split(",")]
  peaks = measure_peaks(sizes)
  print(f"# devices: {jax.device_count()} x {device.device_kind} ({device.platform}); "
        f"mesh {dict(partitioner.mesh.shape)}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print("# measured f32 matmul peak before the runs: "
        + ", ".join(f"{s}: {p / 1e9:.1f} GFLOP/s" for s, p in peaks.items())
        + f"; loadavg at start {load_at_start}")
  rows = []
  for name in args.configs.split(","):
    rows.append(run_config(name, args, partitioner))
    row = rows[-1]
    extra = "".join(f", {k} {row[k]:.3f}s" for k in ("forward_s", "forward_backward_s",
                                                   "optimizer_s") if k in row)
    cfg = row["dims"]
    print(f"# {name}: emb {cfg['emb_dim']}, mlp {cfg['mlp_dim']}, heads {cfg['num_heads']}"
          f"/{cfg['kv_heads']}x{cfg['head_dim']}, layers {cfg['num_encoder_layers']}+"
          f"{cfg['num_decoder_layers']}, vocab {cfg['vocab_size']}; loadavg {row['loadavg_after']}")
    print(f"# {name}: compile+first step {row['compile_plus_first_step_s']:.1f}s, steps "
          f"{', '.join(f'{t:.3f}' for t in row['step_s_all'])}s (host CPU busy "
          f"{row['host_cores_busy']:.2f} cores), loss {row['final_loss']:.3f}"
          f"{extra}", flush=True)
  # Measured again after the runs and the best kept: another process briefly stealing a core
  # must not lower the peak (and inflate MFU).
  peaks = {size: max(p, peaks[size]) for size, p in measure_peaks(sizes).items()}
  # Virtual CPU devices (xla_force_host_platform_device_count) share the host's cores, so the
  # CPU peak is the single-device one; accelerators add up.
  peak = max(peaks.values()) * (1 if device.platform == "cpu" else jax.device_count())
  print("# measured f32 matmul peak (best of before/after): "
        + ", ".join(f"{s}: {p / 1e9:.1f} GFLOP/s" for s, p in peaks.items())
        + f"; used {peak / 1e9:.1f} GFLOP/s")
  for row in rows:
    row["peak_measured_tflops"] = peak / 1e12
    row["mfu_measured"] = flops.mfu(row["flops_per_step"], row["step_s_median"], peak)
  print_table(rows)
  if args.json:
    meta = {"argv": sys.argv, "args": vars(args), "device_kind": device.device_kind,
            "platform": device.platform, "device_count": jax.device_count(),
            "peak_measured_per_device_flops": {str(s): p for s, p in peaks.items()},
            "loadavg_at_start": load_at_start, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax_version": jax.__version__}
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
  main()
