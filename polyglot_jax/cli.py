"""The `polyglot-jax` command: train / eval / infer driven by gin, plus data and vocab tools.

    polyglot-jax train --gin_file=experiments/quickstart.gin --gin.MODEL_DIR=/tmp/run
    polyglot-jax eval  --gin_file=runs/eval.gin --gin_file=models/mt5/tiny.gin ...

Configuration errors end with one line on stderr saying what is wrong and how to fix it
(set POLYGLOT_JAX_TRACEBACK=1 to see the full traceback instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before TensorFlow (seqio) loads.

# pylint: disable=wrong-import-position
from polyglot_jax import gin_setup  # noqa: E402
from polyglot_jax.compression import sparsity  # noqa: E402
from polyglot_jax.data import vocab  # noqa: E402
from polyglot_jax.inference import run  # noqa: E402
from polyglot_jax.training import loop  # noqa: E402
# pylint: enable=wrong-import-position

_GIN_COMMANDS = {
    "train": "Train (or resume) a model; MODEL_DIR gets checkpoints, metrics and config.gin.",
    "eval": "Evaluate a checkpoint on a task or mixture.",
    "infer": "Decode a task's inputs with a checkpoint and write JSONL predictions.",
    "prune": "One-shot magnitude pruning of a checkpoint (gin: prune_checkpoint, sparsity/*.gin).",
}


def _gin_entry(command: str) -> Callable[[], object]:
  return {"train": loop.train, "eval": run.evaluate, "infer": run.infer,
          "prune": sparsity.prune_checkpoint}[command]


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="polyglot-jax", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, help_text in _GIN_COMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text + " Extra flags of the form "
                       "--gin.NAME=value bind gin parameters or macros.")
    p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable).")
    p.add_argument("--gin_search_paths", default="",
                   help="comma-separated folders searched for gin files and includes.")
  report = sub.add_parser("sparsity_report", help="Fractions of exactly-zero weights, per tensor.")
  report.add_argument("--model_dir", required=True, help="a run's MODEL_DIR.")
  report.add_argument("--step", type=int, default=None, help="checkpoint step; default latest.")
  vocab = sub.add_parser("vocab", help="Vocabulary tools.")
  vocab_sub = vocab.add_subparsers(dest="vocab_command", required=True)
  vt = vocab_sub.add_parser("train", help="Train a SentencePiece vocabulary on the bundled text.")
  vt.add_argument("--output_prefix", required=True)
  vt.add_argument("--vocab_size", type=int, default=8000)
  vt.add_argument("--temperature_alpha", type=float, default=0.3)
  vt.add_argument("--seed", type=int, default=0)
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
    if args.command == "sparsity_report":
      print(json.dumps(sparsity.sparsity_report(args.model_dir, step=args.step), indent=1))
      return 0
    search_paths = [p for p in args.gin_search_paths.split(",") if p]
    gin_setup.parse(args.gin_file, bindings, search_paths)
    result = _gin_entry(args.command)()
  except (ValueError, OSError, SyntaxError, KeyError, loop.NonFiniteLossError) as exc:
    if os.environ.get("POLYGLOT_JAX_TRACEBACK"):
      raise
    print(f"polyglot-jax {args.command}: error: {gin_setup.one_line_error(exc)}", file=sys.stderr)
    return 2
  interrupted = getattr(result, "interrupted", None)
  return {"SIGTERM": 143, "SIGINT": 130}.get(interrupted, 0)


if __name__ == "__main__":
  sys.exit(main())
