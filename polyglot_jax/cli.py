"""The `polyglot-jax` command: train / eval / infer driven by gin, plus data and vocab tools.

    polyglot-jax train --gin_file=experiments/quickstart.gin --gin.MODEL_DIR=/tmp/run
    polyglot-jax eval  --gin_file=runs/eval.gin --gin_file=models/mt5/tiny.gin ...
    polyglot-jax convert --from_hf=/ckpt/aya-101 --model_dir=/runs/aya_101

Configuration errors end with one line on stderr saying what is wrong and how to fix it
(set POLYGLOT_JAX_TRACEBACK=1 to see the full traceback instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import gin

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before TensorFlow (seqio) loads.

# pylint: disable=wrong-import-position
from polyglot_jax import gin_setup  # noqa: E402
from polyglot_jax.compression import audit, sparsity  # noqa: E402
from polyglot_jax.data import gettext_corpus, scoring, vocab  # noqa: E402
from polyglot_jax.inference import run  # noqa: E402
from polyglot_jax.parallel import distributed  # noqa: E402
from polyglot_jax.sweep import command as sweep_command  # noqa: E402
from polyglot_jax.training import loop, precompile  # noqa: E402
# pylint: enable=wrong-import-position

_GIN_COMMANDS = {
    "train": "Train (or resume) a model; MODEL_DIR gets checkpoints, metrics and config.gin.",
    "eval": "Evaluate a checkpoint on a task or mixture.",
    "infer": "Decode a task's inputs with a checkpoint and write JSONL predictions.",
    "prune": "One-shot magnitude pruning of a checkpoint (gin: prune_checkpoint, sparsity/*.gin).",
    "audit": "Per-language PIE audit of dense vs compressed checkpoints (gin: audit).",
    "precompile": "Compile the train step ahead of time (same gin files as train) and print "
                  "its per-device memory and FLOPs.",
}


def _gin_entry(command: str) -> Callable[[], object]:
  return {"train": loop.train, "eval": run.evaluate, "infer": run.infer,
          "prune": sparsity.prune_checkpoint, "audit": audit.audit,
          "precompile": precompile.precompile}[command]


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="polyglot-jax", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, help_text in _GIN_COMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text + " Extra flags of the form "
                       "--gin.NAME=value bind gin parameters or macros.")
    p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable).")
    p.add_argument("--gin_search_paths", default="",
                   help="comma-separated folders searched for gin files and includes.")
    p.add_argument("--coordinator_address", default=None, help="multi-host: host:port of "
                   "process 0 (automatic on Cloud TPU; see parallel/distributed.py).")
    p.add_argument("--num_processes", type=int, default=None, help="multi-host: process count.")
    p.add_argument("--process_id", type=int, default=None, help="multi-host: this process.")
    p.add_argument("--startup_timeout", type=int, default=distributed.DEFAULT_STARTUP_TIMEOUT,
                   help="multi-host: seconds every process waits for the others to start.")
  report = sub.add_parser("sparsity_report", help="Fractions of exactly-zero weights, per tensor.")
  report.add_argument("--model_dir", required=True, help="a run's MODEL_DIR.")
  report.add_argument("--step", type=int, default=None, help="checkpoint step; default latest.")
  data = sub.add_parser("data", help="Data tools: perplexity scores for pruning, gettext corpus.")
  data_sub = data.add_subparsers(dest="data_command", required=True)
  score_help = ("Per-example perplexity of a task under a checkpoint, for data pruning "
                "(gin: runs/score.gin).")
  ds = data_sub.add_parser("score", help=score_help, description=score_help + " Extra flags of "
                           "the form --gin.NAME=value bind gin parameters or macros.")
  ds.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable).")
  ds.add_argument("--gin_search_paths", default="",
                  help="comma-separated folders searched for gin files and includes.")
  db = data_sub.add_parser("build", help="Parallel corpus from the gettext catalogs of installed "
                           "packages (pycountry, Django) as Aya-format JSONL.")
  db.add_argument("--output_dir", required=True)
  db.add_argument("--packages", default=",".join(gettext_corpus.PACKAGES),
                  help="comma-separated, from: " + ", ".join(gettext_corpus.PACKAGES))
  db.add_argument("--domains", default="", help="comma-separated catalog names to keep, e.g. "
                  "iso3166-1,django (default: all)")
  db.add_argument("--seed", type=int, default=0)
  sweep_help = ("Train a grid of runs over gin bindings (or print their commands), then gather "
                "results.csv/results.md, a scaling fit and plots (docs/sweeps.md).")
  sweep_command.add_arguments(sub.add_parser(
      "sweep", help=sweep_help, description=sweep_help + " Extra flags of the form "
      "--gin.NAME=value bind gin parameters or macros in every run."))
  vocab = sub.add_parser("vocab", help="Vocabulary tools.")
  vocab_sub = vocab.add_subparsers(dest="vocab_command", required=True)
  vt = vocab_sub.add_parser("train", help="Train a SentencePiece vocabulary on the bundled text.")
  vt.add_argument("--output_prefix", required=True)
  vt.add_argument("--vocab_size", type=int, default=8000)
  vt.add_argument("--temperature_alpha", type=float, default=0.3)
  vt.add_argument("--seed", type=int, default=0)
  convert = sub.add_parser(
      "convert", help="Hugging Face checkpoint directory <-> MODEL_DIR (checkpoint + model.gin).",
      description="--from_hf imports a local HF directory (safetensors, config.json, tokenizer) "
      "into --model_dir; --to_hf exports --model_dir's checkpoint for transformers. Needs the "
      "hf extra: pip install 'polyglot-jax[hf]' (transformers, safetensors).")
  direction = convert.add_mutually_exclusive_group(required=True)
  direction.add_argument("--from_hf", help="HF checkpoint directory to import.")
  direction.add_argument("--to_hf", help="directory to write the HF checkpoint into.")
  convert.add_argument("--model_dir", required=True, help="our MODEL_DIR (written or read).")
  convert.add_argument("--scan_layers", action="store_true", help="import: scanned layers.")
  convert.add_argument("--param_dtype", default="float32", help="import: parameter dtype.")
  convert.add_argument("--gin_file", action="append", default=[], help="export: gin files of the "
                       "model (default MODEL_DIR/model.gin, else MODEL_DIR/config.gin).")
  convert.add_argument("--step", type=int, default=None, help="export: step; default latest.")
  convert.add_argument("--model_type", default=None,
                       help="export: t5, mt5, umt5, llama or cohere (default from the model).")
  return parser


def _split_gin_bindings(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--gin.X=Y` flags (T5X style) from the ordinary arguments."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      bindings.append(arg[len("--gin."):])
    else:
      rest.append(arg)
  return rest, bindings


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, bindings = _split_gin_bindings(argv)
  args = _parser().parse_args(rest)
  try:
    if args.command == "vocab":
      print(vocab.train_vocabulary(args.output_prefix, vocab_size=args.vocab_size,
                                   temperature_alpha=args.temperature_alpha, seed=args.seed))
      return 0
    if args.command == "data" and args.data_command == "build":
      gettext_corpus.build_corpus(args.output_dir, [p for p in args.packages.split(",") if p],
                                  [d for d in args.domains.split(",") if d], seed=args.seed)
      return 0
    if args.command == "sweep":
      return sweep_command.main(args, bindings)
    if args.command == "sparsity_report":
      print(json.dumps(sparsity.sparsity_report(args.model_dir, step=args.step), indent=1))
      return 0
    if args.command == "convert":
      from polyglot_jax.convert import checkpoint  # pylint: disable=import-outside-toplevel
      print(checkpoint.import_hf(args.from_hf, args.model_dir, scan_layers=args.scan_layers,
                                 param_dtype=args.param_dtype) if args.from_hf else
            checkpoint.export_hf(args.model_dir, args.to_hf, args.gin_file, bindings, args.step,
                                 args.model_type))
      return 0
    search_paths = [p for p in args.gin_search_paths.split(",") if p]
    if args.command in _GIN_COMMANDS:
      distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                             args.startup_timeout)
    gin_setup.parse(args.gin_file, bindings, search_paths)
    if args.command in _GIN_COMMANDS:
      distributed.check_same_setup(gin.config_str(), args.startup_timeout)
    result = scoring.score() if args.command == "data" else _gin_entry(args.command)()
  except (ValueError, OSError, SyntaxError, KeyError, ImportError, RuntimeError) as exc:
    user_error = not isinstance(exc, RuntimeError) or isinstance(exc, loop.NonFiniteLossError) \
        or gin_setup.is_missing_binding(exc)
    if os.environ.get("POLYGLOT_JAX_TRACEBACK") or not user_error:
      raise
    print(f"polyglot-jax {args.command}: error: {gin_setup.one_line_error(exc)}", file=sys.stderr)
    return 2
  interrupted = getattr(result, "interrupted", None)
  return {"SIGTERM": 143, "SIGINT": 130}.get(interrupted, 0)


if __name__ == "__main__":
  sys.exit(main())
