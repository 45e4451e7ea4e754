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
from typing import Sequence

import gin

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before TensorFlow (seqio) loads.

# pylint: disable=wrong-import-position
from polyglot_jax.commands import GIN_COMMANDS, prune, runner  # noqa: E402
from polyglot_jax.data import gettext_corpus, vocab  # noqa: E402
from polyglot_jax.parallel import distributed  # noqa: E402
from polyglot_jax.sweep import command as sweep_command  # noqa: E402
# pylint: enable=wrong-import-position


def _add_gin_flags(parser: argparse.ArgumentParser, multihost: bool) -> None:
  parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable).")
  parser.add_argument("--gin_search_paths", default="",
                      help="comma-separated folders searched for gin files and includes.")
  if not multihost:
    return
  parser.add_argument("--coordinator_address", default=None, help="multi-host: host:port of "
                      "process 0 (automatic on Cloud TPU; see parallel/distributed.py).")
  parser.add_argument("--num_processes", type=int, default=None, help="multi-host: process count.")
  parser.add_argument("--process_id", type=int, default=None, help="multi-host: this process.")
  parser.add_argument("--startup_timeout", type=int, default=distributed.DEFAULT_STARTUP_TIMEOUT,
                      help="multi-host: seconds every process waits for the others to start.")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="polyglot-jax", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for command in GIN_COMMANDS.values():
    if command.name == "score":
      continue  # `data score`, below
    p = sub.add_parser(command.name, help=command.help, description=command.help + " Extra "
                       "flags of the form --gin.NAME=value bind gin parameters or macros.")
    _add_gin_flags(p, multihost=True)
  report = sub.add_parser("sparsity_report", help="Fractions of exactly-zero weights, per tensor.")
  report.add_argument("--model_dir", required=True, help="a run's MODEL_DIR.")
  report.add_argument("--step", type=int, default=None, help="checkpoint step; default latest.")
  data = sub.add_parser("data", help="Data tools: perplexity scores for pruning, gettext corpus.")
  data_sub = data.add_subparsers(dest="data_command", required=True)
  score = GIN_COMMANDS["score"]
  ds = data_sub.add_parser("score", help=score.help, description=score.help + " Extra flags of "
                           "the form --gin.NAME=value bind gin parameters or macros.")
  _add_gin_flags(ds, multihost=False)
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
  vocab_parser = sub.add_parser("vocab", help="Vocabulary tools.")
  vocab_sub = vocab_parser.add_subparsers(dest="vocab_command", required=True)
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


def _run_gin_command(name: str, args: argparse.Namespace, bindings: list[str]) -> int:
  """Runs a gin command through the runner; prints a failure's one line; returns the exit code."""
  command = GIN_COMMANDS[name]
  search_paths = [p for p in args.gin_search_paths.split(",") if p]
  after_parse = None
  if hasattr(args, "coordinator_address"):
    try:
      distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                             args.startup_timeout)
    except Exception as exc:  # pylint: disable=broad-except
      if os.environ.get("POLYGLOT_JAX_TRACEBACK") or not runner.is_user_error(exc):
        raise
      return _fail(args.command, runner.failure(exc))
    after_parse = lambda: distributed.check_same_setup(gin.config_str(), args.startup_timeout)
  outcome = runner.run_gin_command(lambda: command.entry()(), args.gin_file, bindings,
                                   search_paths, after_parse)
  return _fail(args.command, outcome) if outcome.status == runner.FAILED else outcome.exit_code


def _fail(command: str, outcome: runner.Outcome) -> int:
  print(f"polyglot-jax {command}: error: {outcome.error}", file=sys.stderr)
  return outcome.exit_code


def _run_tool(args: argparse.Namespace, bindings: list[str]) -> int:
  """The commands that take ordinary flags: vocab, data build, sweep, sparsity_report, convert."""
  if args.command == "vocab":
    print(vocab.train_vocabulary(args.output_prefix, vocab_size=args.vocab_size,
                                 temperature_alpha=args.temperature_alpha, seed=args.seed))
    return 0
  if args.command == "data":
    gettext_corpus.build_corpus(args.output_dir, [p for p in args.packages.split(",") if p],
                                [d for d in args.domains.split(",") if d], seed=args.seed)
    return 0
  if args.command == "sweep":
    return sweep_command.main(args, bindings)
  if args.command == "sparsity_report":
    print(json.dumps(prune.sparsity_report(args.model_dir, step=args.step), indent=1))
    return 0
  from polyglot_jax.convert import checkpoint  # pylint: disable=import-outside-toplevel  (hf extra)
  print(checkpoint.import_hf(args.from_hf, args.model_dir, scan_layers=args.scan_layers,
                             param_dtype=args.param_dtype) if args.from_hf else
        checkpoint.export_hf(args.model_dir, args.to_hf, args.gin_file, bindings, args.step,
                             args.model_type))
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, bindings = _split_gin_bindings(argv)
  args = _parser().parse_args(rest)
  if args.command in GIN_COMMANDS:
    return _run_gin_command(args.command, args, bindings)
  if args.command == "data" and args.data_command == "score":
    return _run_gin_command("score", args, bindings)
  outcome = runner.run(lambda: _run_tool(args, bindings))
  return _fail(args.command, outcome) if outcome.status == runner.FAILED else outcome.result


if __name__ == "__main__":
  sys.exit(main())
