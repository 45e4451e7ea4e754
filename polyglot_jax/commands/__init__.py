"""Every command users run, one module each; `GIN_COMMANDS` lists those configured by gin.

  train        commands/train.py       training loop with its hooks (gin: `train.*`)
  precompile   commands/precompile.py  the train step compiled ahead of time: memory, FLOPs
  eval         commands/evaluate.py    metrics of a checkpoint, per language (gin: `evaluate.*`)
  infer        commands/infer.py       predictions as JSONL (gin: `infer.*`)
  data score   commands/score.py       per-example perplexities for data pruning (gin: `score.*`)
  prune        commands/prune.py       one-shot pruning (gin: `prune_checkpoint.*`), and
                                       `sparsity_report`
  audit        commands/audit.py       per-language PIE audit (gin: `audit.*`)
`runner.py` runs any of them and returns the outcome as data (the CLI and the sweep use it);
`gin_setup.py` parses gin files and turns configuration errors into one line.
Modules are imported when their command runs, so `polyglot-jax --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class GinCommand:
  """A command configured by gin files: `module.function()` called after parsing them."""

  name: str
  module: str
  function: str
  help: str

  def entry(self) -> Callable[[], Any]:
    return getattr(importlib.import_module(self.module), self.function)


GIN_COMMANDS = {c.name: c for c in (
    GinCommand("train", "polyglot_jax.commands.train", "train",
               "Train (or resume) a model; MODEL_DIR gets checkpoints, metrics and config.gin."),
    GinCommand("eval", "polyglot_jax.commands.evaluate", "evaluate",
               "Evaluate a checkpoint on a task or mixture."),
    GinCommand("infer", "polyglot_jax.commands.infer", "infer",
               "Decode a task's inputs with a checkpoint and write JSONL predictions."),
    GinCommand("prune", "polyglot_jax.commands.prune", "prune_checkpoint",
               "One-shot magnitude pruning of a checkpoint (gin: prune_checkpoint, "
               "sparsity/*.gin)."),
    GinCommand("audit", "polyglot_jax.commands.audit", "audit",
               "Per-language PIE audit of dense vs compressed checkpoints (gin: audit)."),
    GinCommand("precompile", "polyglot_jax.commands.precompile", "precompile",
               "Compile the train step ahead of time (same gin files as train) and print its "
               "per-device memory and FLOPs."),
    GinCommand("score", "polyglot_jax.commands.score", "score",
               "Per-example perplexity of a task under a checkpoint, for data pruning "
               "(gin: runs/score.gin)."),
)}
