"""Small-scale reproduction of "Pushing Mixture of Experts to the Limit" (Zadouri et al. 2023).

From one pretrained tiny mT5 (the quickstart run: span corruption on the bundled UDHR text),
finetune on the bundled instruction mixture (`aya_instruct_mix`: UDHR translation prompts and
chatterbot dialogs) with full finetuning, IA3, LoRA, MoV-10 and MoLoRA-10 for the same number of
steps, then report held-out loss (UDHR articles 26-30, translation into each language) per
language group, the trainable share of parameters and the optimizer-state memory.

    .venv/bin/python scripts/routing_reproduction.py --pretrained=runs/quickstart \
        --out=/tmp/routing_repro --steps=150

Without `--pretrained`, the quickstart model is trained first (a few CPU minutes). Each finetune
runs the real CLI (`polyglot-jax train` with gin/routing/<method>.gin on top of
gin/runs/finetune.gin); evaluation restores each run's final parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import gin


from polyglot_jax.commands import gin_setup
from polyglot_jax.data.pipeline import DatasetConfig
from polyglot_jax.inference import evaluation
from polyglot_jax.models.model import EncoderDecoderModel
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import checkpoints, train_state
from polyglot_jax.training.optimizers import Adafactor

# method -> (routing gin file, constant learning rate, Adafactor's multiply_by_parameter_scale).
# Adafactor scales updates by max(RMS(param), 1e-3): a LoRA B that starts at zero would then
# move 1000x slower than its learning rate, so adapters train with absolute step sizes.
METHODS = {
    "full": ("routing/dense.gin", 1e-2, True),
    "ia3": ("routing/ia3.gin", 1e-2, False),
    "lora_r4": ("routing/lora_r4.gin", 1e-2, False),
    "mov_10": ("routing/mov_10.gin", 1e-2, False),
    "molora_10": ("routing/molora_10.gin", 1e-2, False),
}
LENGTHS = {"inputs": 64, "targets": 64}  # finetuning (longer examples are dropped and counted)
EVAL_LENGTHS = {"inputs": 128, "targets": 128}
BATCH = 16
EVAL_EXAMPLES = 256


def _cli(*args: str) -> None:
  cmd = [sys.executable, "-m", "polyglot_jax.cli", *args]
  print("$", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True)


def finetune(method: str, pretrained: str, out: str, steps: int) -> str:
  gin_file, learning_rate, param_scale = METHODS[method]
  model_dir = os.path.join(out, method)
  if os.path.isdir(os.path.join(model_dir, "checkpoints", str(steps))):
    return model_dir  # Finished earlier: evaluate only.
  _cli("train", "--gin_file=models/mt5/tiny.gin", "--gin_file=runs/finetune.gin",
       "--gin_file=mesh/data_parallel.gin", f"--gin_file={gin_file}",
       "--gin.MIXTURE_OR_TASK_NAME='aya_instruct_mix'", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
       f"--gin.TRAIN_STEPS={steps}", f"--gin.MODEL_DIR='{model_dir}'",
       f"--gin.INITIAL_CHECKPOINT_PATH='{os.path.join(pretrained, 'checkpoints')}'",
       f"--gin.BATCH_SIZE={BATCH}", f"--gin.LEARNING_RATE={learning_rate}",
       "--gin.DROPOUT_RATE=0.0", "--gin.ACTIVATION_DTYPE='float32'",
       "--gin.TransformerConfig.vocab_size=8192", "--gin.InitCheckpoint.fallback_to_scratch=True",
       "--gin.train.eval_dataset_cfg=None", "--gin.train.infer_eval_dataset_cfg=None",
       f"--gin.train.checkpoint_period={steps}",
       f"--gin.Adafactor.multiply_by_parameter_scale={param_scale}", "--gin.train.log_period=25")
  return model_dir


def _model(method: str) -> EncoderDecoderModel:
  """The tiny mT5 of the quickstart with `method`'s routing file, from the gin files."""
  with gin.unlock_config():
    gin.clear_config()
    gin_setup.parse(["models/mt5/tiny.gin", METHODS[method][0]],
                    ["TransformerConfig.vocab_size=8192", "ACTIVATION_DTYPE='float32'"])
    return gin.query_parameter("%MODEL").scoped_configurable_fn()


def evaluate(method: str, model_dir: str) -> dict[str, float]:
  """Held-out metrics per resource group, trainable share and optimizer-state MiB of one run.

  The held-out set is the first EVAL_EXAMPLES of the shuffled validation split of
  `aya_instruct_mix` (UDHR articles 26-30 translations, held-out dialogs), the same for every
  method; groups follow `evaluation.resource_split` (languages with >= 2x the median training
  examples are "high").
  """
  model = _model(method)
  partitioner = Partitioner(MeshConfig(data=-1))
  cfg = DatasetConfig("aya_instruct_mix", EVAL_LENGTHS, "validation", BATCH, shuffle=True,
                      seed=0, pack=False)
  trainable = None if method == "full" else r".*_adapter/.*"
  spec = train_state.state_spec(model, Adafactor(learning_rate=1e-3), partitioner,
                                trainable_params=trainable)
  params, _ = checkpoints.load_params(model, model_dir, partitioner)
  evaluator = evaluation.Evaluator(model, partitioner, spec.shardings.params, cfg,
                                   max_examples=EVAL_EXAMPLES)
  results = evaluator.evaluate(params)
  print(results.table(), flush=True)
  trainable_count = spec.trainable_count()
  row = {"trainable_%": 100 * trainable_count / train_state.param_count(spec.abstract.params),
         "optimizer_MiB": train_state.tree_bytes(spec.abstract.opt_state) / 2**20,
         "adamw_MiB": 8 * trainable_count / 2**20}
  for group in ("high", "low", "all"):
    for name in ("perplexity", "chrf"):
      row[f"{group}/{name}"] = results.groups[group][name]
  return row


def table(rows: dict[str, dict[str, float]]) -> str:
  lines = ["| method | trainable % | Adafactor state (MiB) | AdamW state would be (MiB) | "
           "perplexity high / low / all | chrF high / low / all |", "|---|---|---|---|---|---|"]
  for method, row in rows.items():
    ppl = " / ".join(f"{row[g + '/perplexity']:.1f}" for g in ("high", "low", "all"))
    chrf = " / ".join(f"{row[g + '/chrf']:.1f}" for g in ("high", "low", "all"))
    lines.append(f"| {method} | {row['trainable_%']:.3f} | {row['optimizer_MiB']:.3f} | "
                 f"{row['adamw_MiB']:.3f} | {ppl} | {chrf} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pretrained", default=None, help="a quickstart MODEL_DIR; default: train")
  parser.add_argument("--out", default="/tmp/routing_repro")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--methods", default=",".join(METHODS))
  args = parser.parse_args()
  pretrained = args.pretrained
  if pretrained is None:
    pretrained = os.path.join(args.out, "pretrained")
    _cli("train", "--gin_file=experiments/quickstart.gin", f"--gin.MODEL_DIR='{pretrained}'")
  rows = {}
  for method in args.methods.split(","):
    model_dir = finetune(method, pretrained, args.out, args.steps)
    rows[method] = evaluate(method, model_dir)
    print(json.dumps({method: rows[method]}), flush=True)
  rows = {"pretrained (no finetuning)": evaluate("full", pretrained), **rows}
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(table(rows))


if __name__ == "__main__":
  main()
