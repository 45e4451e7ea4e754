"""Perplexity-based data pruning at tiny scale (Marion et al. 2023): the table in docs/data.md.

1. Train the reference model (gin/experiments/prune_reference.gin, RANDOM_SEED=1) and score
   every UDHR train example with it (`polyglot-jax data score`).
2. Train the same model from scratch (RANDOM_SEED=0, equal steps) on the examples of each
   perplexity band (bottom / middle / top, within each language) at each kept fraction, and on
   all of them (keep 100%), with gin/experiments/prune_udhr_lm.gin.
3. Print a Markdown table of held-out loss (UDHR articles 26-30) and write results_seed<S>.json.

`--seed` repeats step 2 with another seed (initialisation and data order) to measure how much
held-out loss moves from run to run, e.g. `--seed=2 --keep=0.3 --bands=top`.

Runs in one process so that TensorFlow, the tasks and (through JAX's persistent compilation
cache) the compiled steps are shared by all runs:
    python scripts/prune_reproduction.py --work_dir=runs/prune_reproduction
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=wrong-import-position
import gin  # noqa: E402
import jax  # noqa: E402

from polyglot_jax.commands import gin_setup, score, train  # noqa: E402
from polyglot_jax.data import pruning  # noqa: E402
# pylint: enable=wrong-import-position

REFERENCE = "experiments/prune_reference.gin"
PRUNED = "experiments/prune_udhr_lm.gin"


def _run(gin_file: str, bindings: list[str], entry):
  gin.clear_config()
  gin_setup.parse([gin_file], bindings)
  return entry()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--work_dir", default="runs/prune_reproduction")
  parser.add_argument("--keep", default="0.3,0.5,0.7")
  parser.add_argument("--bands", default=",".join(pruning.BANDS))
  parser.add_argument("--train_steps", type=int, default=None, help="default: the gin file's")
  parser.add_argument("--score_batch_size", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0, help="RANDOM_SEED of the pruned runs")
  args = parser.parse_args()
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.work_dir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  steps = [f"TRAIN_STEPS={args.train_steps}"] if args.train_steps else []
  scores_path = os.path.join(args.work_dir, "reference", "scores", "udhr_lm.train.jsonl.gz")
  common = [f"SCORES_PATH={scores_path!r}", *steps]
  began = time.time()

  reference = [f"MODEL_DIR={os.path.join(args.work_dir, 'reference')!r}", "RANDOM_SEED=1", *common]
  if not os.path.exists(scores_path):
    _run(REFERENCE, reference, train.train)
    _run(REFERENCE, reference + [f"BATCH_SIZE={args.score_batch_size}"], score.score)
  records = pruning.load_scores(scores_path)
  print(f"reference + scores: {time.time() - began:.0f}s", flush=True)

  runs = [(1.0, "middle")] + [(float(k), b) for k in args.keep.split(",")
                              for b in args.bands.split(",")]
  results = []
  for keep, band in runs:
    name = f"keep{round(100 * keep)}_{band}" if keep < 1 else "keep100"
    model_dir = os.path.join(args.work_dir, name + (f"_seed{args.seed}" if args.seed else ""))
    bindings = [f"MODEL_DIR={model_dir!r}", f"KEEP_FRACTION={keep}", f"PRUNE_BAND={band!r}",
                f"RANDOM_SEED={args.seed}", *common]
    start = time.time()
    result = _run(PRUNED, bindings, train.train)
    kept = len(pruning.select_ids(records, keep, band))
    results.append({"keep": keep, "band": band if keep < 1 else "-", "seed": args.seed,
                    "examples": kept,
                    "train_loss_last": result.losses[-1], **result.eval_metrics,
                    "seconds": time.time() - start})
    print(json.dumps(results[-1]), flush=True)
  with open(os.path.join(args.work_dir, f"results_seed{args.seed}.json"), "w") as f:
    json.dump(results, f, indent=1)

  print("\n| keep | band | train examples | held-out loss | held-out ppl | held-out accuracy |")
  print("| - | - | - | - | - | - |")
  for r in results:
    print(f"| {100 * r['keep']:.0f}% | {r['band']} | {r['examples']:,} | "
          f"{r['cross_ent_loss']:.4f} | {math.exp(r['cross_ent_loss']):.1f} | "
          f"{r['accuracy']:.4f} |")
  print(f"\ntotal {time.time() - began:.0f}s", flush=True)


if __name__ == "__main__":
  main()
