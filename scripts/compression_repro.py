"""Compression at tiny scale: per-language held-out loss and PIE share against sparsity, and int8.

The reproduction of docs/compression.md ("Reproduction at small scale"), in one process:
1. Pretrain tiny mT5 with experiments/quickstart.gin (span corruption on the UDHR, fewer steps).
2. Finetune it on a 16-language instruction mixture, `compression_repro_mix`: UDHR translation
   into each language, plus the chatterbot dialogs of the 8 "high-resource" ones (hundreds to
   thousands of extra examples each; the 8 "low-resource" ones have UDHR translation only:
   `evaluation.resource_split` puts them below 2x the median language's examples), mT5
   temperature sampling (alpha 0.3). Every sparsity in --sparsities (gin/sparsity/gmp.gin,
   layerwise GMP of every kernel, ramp ending at 3/4 of the steps) with every seed in --seeds.
3. Audit (compression/audit.py) each sparse population against the dense one, and the dense
   checkpoints under int8 weight-only and W8A8 (compression/quantization.py): rank
   classification of held-out UDHR translation (articles 26-30) into each language, 4 candidates
   (--distractors). Per language: the NLL of the true translations (mean per token, per example)
   of each population, accuracy, PIE share; how often two dense seeds disagree (the noise floor);
   the outlier statistic of the pretrained and dense models.
4. Write results.json, results.md (tables) and compression_repro.png (needs the `plots` extra)
   to --output_dir.

    .venv/bin/python scripts/compression_repro.py --work_dir=runs/compression_repro \
        --output_dir=runs/compression_repro/results

Finished runs are kept in --work_dir and skipped when the script runs again.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=wrong-import-position
import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from polyglot_jax.commands import gin_setup, train  # noqa: E402
from polyglot_jax.compression import audit, quantization  # noqa: E402
from polyglot_jax.data import mixing, tasks  # noqa: E402
from polyglot_jax.inference import evaluation  # noqa: E402
from polyglot_jax.training.loop import TrainResult  # noqa: E402
# pylint: enable=wrong-import-position

# Resource level = finetuning data (the pretraining UDHR is parallel: equal text per language).
# HIGH have chatterbot dialogs besides UDHR translation; all 16 have >= 4 distinct held-out
# translations that fit LENGTHS (rank classification needs 4 candidates).
HIGH = ("eng", "ita", "jpn", "spa", "cmn_hans", "cmn_hant", "kor", "ind")
LOW = ("nbl", "sus", "cic", "nan", "cjs", "evn", "run", "wuu")
MIXTURE = "compression_repro_mix"
LENGTHS = {"inputs": 128, "targets": 64}
VOCAB_SIZE = 8192
TINY = [f"TransformerConfig.vocab_size={VOCAB_SIZE}", "ACTIVATION_DTYPE='float32'"]
SCHEMES = ("int8_weight_only", "w8a8")


def _register_mixture() -> None:
  task_languages = {f"{tasks.UDHR_TRANSLATION}.{code}": tasks.iso639_3(code)
                    for code in HIGH + LOW}
  task_languages |= {f"{tasks.CHATTERBOT_DIALOG}.{code}": tasks.iso639_3(code) for code in HIGH}
  mixing.register_language_mixture(MIXTURE, task_languages)


def _train(files: list[str], bindings: list[str]) -> TrainResult:
  gin.clear_config()
  gin_setup.parse(files, bindings)
  try:
    return train.train()
  finally:
    gin.clear_config()


def _pretrain(model_dir: str, steps: int) -> None:
  if os.path.isdir(os.path.join(model_dir, "checkpoints")):
    return
  _train(["experiments/quickstart.gin"],
         [f"MODEL_DIR={model_dir!r}", f"TRAIN_STEPS={steps}", "train.eval_dataset_cfg=None",
          f"train.checkpoint_period={steps}", "train.tensorboard=False"])


def _finetune(model_dir: str, pretrained: str, sparsity: float, seed: int, steps: int,
              batch_size: int) -> None:
  if os.path.isdir(os.path.join(model_dir, "checkpoints")):
    return
  switch = "sparsity/dense.gin" if sparsity == 0 else "sparsity/gmp.gin"
  _train(["models/mt5/tiny.gin", "runs/finetune.gin", "mesh/data_parallel.gin", switch],
         [*TINY, f"MIXTURE_OR_TASK_NAME={MIXTURE!r}", f"TASK_FEATURE_LENGTHS={LENGTHS!r}",
          f"TRAIN_STEPS={steps}", f"BATCH_SIZE={batch_size}", f"MODEL_DIR={model_dir!r}",
          f"INITIAL_CHECKPOINT_PATH={os.path.join(pretrained, 'checkpoints')!r}",
          f"RANDOM_SEED={seed}", f"PRUNING_RATIO={sparsity}",
          f"PRUNING_END_STEP={3 * steps // 4}", f"PRUNING_FREQUENCY={max(steps // 20, 1)}",
          "train.eval_dataset_cfg=None", "train.infer_eval_dataset_cfg=None",
          f"train.checkpoint_period={steps}", "train.keep_checkpoints=1",
          f"train.log_period={max(steps // 4, 1)}", "train.tensorboard=False"])


def _model():
  """tiny mT5 (vocabulary 8192) from its gin file."""
  gin.clear_config()
  gin_setup.parse(["models/mt5/tiny.gin"], [*TINY, "audit.model=%MODEL"])
  return gin.query_parameter("audit.model").scoped_configurable_fn()


def _outliers(model, params: list, features: dict[str, np.ndarray], labels: np.ndarray,
              num_candidates: int) -> list[dict[str, float]]:
  """Outlier statistic of each parameter set on the true-translation rows (teacher forced)."""
  true_rows = np.arange(labels.shape[0]) * num_candidates + labels
  rows = {k: v[true_rows] for k, v in features.items()}
  batches = [{k: v[i:i + 64] for k, v in rows.items()} for i in range(0, len(true_rows), 64)]
  return [quantization.outlier_statistics(model, p, batches) for p in params]


def _table(results: dict) -> str:
  """Per language: NLL of each population (sparsity / int8), then PIE share of each."""
  names = list(results["audits"])
  langs = [*HIGH, *LOW]
  head = "| language | group | dense NLL | " + " | ".join(f"{n} NLL" for n in names) + " | " + \
      " | ".join(f"{n} PIE" for n in names) + " |"
  lines = [head, "|" + "---|" * (3 + 2 * len(names))]
  rows = [(f"**{g}**", g, "groups", g) for g in ("high", "low")] + [
      (lang, "high" if lang in HIGH else "low", "languages", lang) for lang in langs]
  for label, group, key, name in rows:
    reports = [results["audits"][n][key][name] for n in names]
    dense = reports[0]["dense_nll"]
    lines.append(f"| {label} | {group} | {dense:.3f} | "
                 + " | ".join(f"{r['compressed_nll']:.3f}" for r in reports) + " | "
                 + " | ".join(f"{r['pie_share']:.2f}" for r in reports) + " |")
  return "\n".join(lines)


def _plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  sparse = [n for n in results["audits"] if n.startswith("gmp_")]
  xs = [0.0] + [results["audits"][n]["sparsity"] for n in sparse]
  positions = np.arange(len(xs))
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = {"high": "tab:blue", "low": "tab:orange"}
  for lang in (*HIGH, *LOW):
    group = "high" if lang in HIGH else "low"
    reports = [results["audits"][n]["languages"][lang] for n in sparse]
    ys = [reports[0]["dense_nll"]] + [r["compressed_nll"] for r in reports]
    left.plot(positions, ys, color=colors[group], alpha=0.35, linewidth=1)
  for group, color in colors.items():
    reports = [results["audits"][n]["groups"][group] for n in sparse]
    ys = [reports[0]["dense_nll"]] + [r["compressed_nll"] for r in reports]
    left.plot(positions, ys, color=color, linewidth=3, marker="o", label=f"{group}-resource mean")
    pie_shares = [0.0] + [r["pie_share"] for r in reports]
    right.plot(positions, pie_shares, color=color, linewidth=3, marker="o",
               label=f"{group}-resource")
  left.axhline(np.log(VOCAB_SIZE), color="gray", linestyle="--", label="uniform over the vocabulary")
  if "dense_seed_disagreement" in results:
    right.axhline(results["dense_seed_disagreement"]["overall"]["pie_share"], color="gray",
                  linestyle="--", label="two dense seeds disagree")
  for ax in (left, right):
    ax.set_xticks(positions, [f"{x:g}" for x in xs])
    ax.set_xlabel("final sparsity (layerwise GMP during finetuning)")
    ax.legend()
  left.set_ylabel("held-out NLL of the true translation (nats/token)")
  left.set_title("Per-language held-out loss (thin: languages, 2 seeds averaged)")
  right.set_ylabel("PIE share (modal prediction changed)")
  right.set_title("Pruning Identified Exemplars, rank classification")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--work_dir", default="runs/compression_repro")
  parser.add_argument("--output_dir", default="runs/compression_repro/results")
  parser.add_argument("--pretrain_steps", type=int, default=150)
  parser.add_argument("--finetune_steps", type=int, default=50)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--sparsities", default="0,0.5,0.8,0.9,0.98")
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--num_candidates", type=int, default=4)
  parser.add_argument("--max_examples", type=int, default=12, help="per language, spread out")
  parser.add_argument("--distractors", default="other_languages", choices=audit.DISTRACTORS)
  args = parser.parse_args()
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.work_dir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  sparsities = [float(s) for s in args.sparsities.split(",")]
  seeds = [int(s) for s in args.seeds.split(",")]
  if sparsities[0] != 0.0:
    raise ValueError("--sparsities must start with 0 (the dense population).")
  began = time.time()
  _register_mixture()
  pretrained = os.path.join(args.work_dir, "pretrain")
  _pretrain(pretrained, args.pretrain_steps)
  timings = {"pretrain_s": time.time() - began}
  dirs = {}
  for sparsity in sparsities:
    dirs[sparsity] = [os.path.join(args.work_dir, f"sparsity_{sparsity:g}_seed_{seed}")
                      for seed in seeds]
    for seed, model_dir in zip(seeds, dirs[sparsity]):
      _finetune(model_dir, pretrained, sparsity, seed, args.finetune_steps, args.batch_size)
  timings["finetune_s"] = time.time() - began - timings["pretrain_s"]

  model = _model()
  high, rule = evaluation.resource_split(MIXTURE)
  groups = {lang: "high" if tasks.iso639_3(lang) in high else "low" for lang in HIGH + LOW}
  if [lang for lang in HIGH + LOW if groups[lang] == "high"] != list(HIGH):
    raise ValueError(f"the mixture's resource split ({rule}) is not HIGH/LOW: {groups}")
  rows, labels, languages = audit.rank_classification_examples(
      tasks.UDHR_TRANSLATION, [*HIGH, *LOW], "validation", LENGTHS, args.num_candidates,
      args.max_examples, args.distractors)
  features = audit.candidate_features(rows, model.FEATURE_CONVERTER_CLS(pack=False), LENGTHS)
  scorer = audit.CandidateScorer(model, features, args.num_candidates)
  dense_params = [scorer.restore(d) for d in dirs[0.0]]
  dense = np.stack([scorer.scores(p) for p in dense_params])  # [seeds, examples, candidates]
  results = {"settings": vars(args), "high": HIGH, "low": LOW, "resource_rule": rule,
             "audits": {}}
  populations = {f"gmp_{s:g}": np.stack([scorer.scores(scorer.restore(d)) for d in dirs[s]])
                 for s in sparsities[1:]}
  for scheme in SCHEMES:
    quantized = quantization.quantized_model(model, scheme)
    populations[scheme] = np.stack([scorer.scores(p, quantized) for p in dense_params])
  for name, population in populations.items():
    report = audit.report(dense, population, labels, languages, groups)
    print(audit.write_report(report, os.path.join(args.output_dir, name)), flush=True)
    results["audits"][name] = report
    if name.startswith("gmp_"):
      report["sparsity"] = float(name[len("gmp_"):])
  if len(seeds) > 1:  # the noise floor: dense seed 0 against the other dense seeds
    results["dense_seed_disagreement"] = audit.report(dense[:1], dense[1:], labels, languages,
                                                      groups)
  results["outliers"] = {
      "pretrained": _outliers(model, [scorer.restore(pretrained)], features, labels,
                              args.num_candidates)[0],
      "dense": _outliers(model, dense_params, features, labels, args.num_candidates)}
  timings["total_s"] = time.time() - began
  results["timings"] = timings
  os.makedirs(args.output_dir, exist_ok=True)
  with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  table = _table(results)
  with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  print(table)
  noise = results.get("dense_seed_disagreement", {})
  print(json.dumps({"outliers": results["outliers"], "timings": timings,
                    "dense_seed_disagreement": {k: noise[k] for k in ("overall", "groups")
                                                if k in noise}}, indent=1))
  _plot(results, os.path.join(args.output_dir, "compression_repro.png"))


if __name__ == "__main__":
  main()
