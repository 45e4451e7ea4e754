"""Every gin file in the repo parses, and every model it describes builds abstractly.

Model files are built with `jax.eval_shape` (no allocation, even for xxl) and their parameter
counts checked against the published sizes; run and experiment files are parsed with their
required macros filled in and the arguments of their entry point instantiated, so a broken
include, a misspelled binding or an unknown task name can never ship.
"""

import glob
import inspect
import os

import gin
import jax
import pytest
import seqio

from polyglot_jax.commands import gin_setup
from polyglot_jax.data.pipeline import DatasetConfig
from polyglot_jax.commands import evaluate, infer
from polyglot_jax.data import tasks
from polyglot_jax.training.setup import TrainConfig

tasks.register_bundled()  # this module looks bundled tasks up in seqio directly

GIN_DIR = gin_setup.GIN_DIR
ALL_FILES = sorted(os.path.relpath(p, GIN_DIR)
                   for p in glob.glob(os.path.join(GIN_DIR, "**", "*.gin"), recursive=True))
MODEL_FILES = [f for f in ALL_FILES if f.startswith("models/")]
OTHER_FILES = [f for f in ALL_FILES if not f.startswith("models/")]

# Published parameter counts (embeddings included), within 3%.
PUBLISHED = {
    "models/t5_1_1/small.gin": 77e6, "models/t5_1_1/base.gin": 248e6,
    "models/t5_1_1/large.gin": 783e6, "models/t5_1_1/xl.gin": 2.85e9,
    "models/t5_1_1/xxl.gin": 11.1e9,
    "models/mt5/small.gin": 300e6, "models/mt5/base.gin": 582e6, "models/mt5/large.gin": 1.23e9,
    "models/mt5/xl.gin": 3.74e9, "models/mt5/xxl.gin": 12.9e9,
    "models/llama/xl.gin": 8.03e9, "models/llama/xxl.gin": 70.6e9,
    "models/cohere/aya_23_8b.gin": 8.03e9, "models/cohere/aya_23_35b.gin": 35.0e9,
}

# What a user must supply to the run contracts (a tiny model makes instantiation cheap).
REQUIRED_MACROS = [
    "MIXTURE_OR_TASK_NAME='udhr_span_corruption'",
    "TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}",
    "TRAIN_STEPS=1", "MODEL_DIR='/tmp/unused'", "INITIAL_CHECKPOINT_PATH='/tmp/unused'",
    "PRUNING_RATIO=0.5", "CHAT_DATA={'train': '/tmp/unused'}", "VOCABULARY='/tmp/unused'",
]
ENTRY_POINTS = {"train": TrainConfig, "evaluate": evaluate.evaluate, "infer": infer.infer}


@gin.configurable("gin_file_test_probe")
def _probe(model=gin.REQUIRED):
  return model


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _abstract_param_count(model) -> int:
  shapes = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}
  params = jax.eval_shape(lambda: model.get_initial_variables(jax.random.key(0), shapes))["params"]
  return sum(x.size for x in jax.tree.leaves(params))


def test_the_repo_has_every_tier():
  for required in ("experiments/quickstart.gin", "runs/pretrain.gin", "runs/finetune.gin",
                   "runs/eval.gin", "runs/infer.gin", "mesh/data_parallel.gin",
                   "mesh/fsdp.gin", "mesh/fsdp_tensor.gin"):
    assert required in ALL_FILES
  for family in ("t5_1_1", "mt5", "umt5", "llama"):
    for size in ("tiny", "small", "base", "large", "xl", "xxl"):
      assert f"models/{family}/{size}.gin" in MODEL_FILES


@pytest.mark.parametrize("path", MODEL_FILES)
def test_model_file_builds_abstractly(path):
  gin_setup.parse([path], ["gin_file_test_probe.model=%MODEL"])
  count = _abstract_param_count(_probe())
  if path in PUBLISHED:
    assert count == pytest.approx(PUBLISHED[path], rel=0.03), count


def _instantiate(value):
  if isinstance(value, gin.config.ConfigurableReference):
    return value.scoped_configurable_fn() if value.evaluate else value.scoped_configurable_fn
  return value


@pytest.mark.parametrize("path", OTHER_FILES)
def test_run_and_experiment_files_instantiate(path):
  files = [path] if path.startswith("experiments/") else ["models/mt5/tiny.gin", path]
  if path.startswith(("sparsity/", "routing/")):  # Switches: parse them on top of a run file.
    files.insert(1, "runs/pretrain.gin")
  gin_setup.parse(files, [] if path.startswith("experiments/") else REQUIRED_MACROS)
  if path.startswith("mesh/"):
    from polyglot_jax.parallel.partitioning import MeshConfig, resolve_rules
    resolve_rules(MeshConfig().rules)
    return
  entries = [name for name in ENTRY_POINTS
             if any(key[1].endswith(f".{name}") or key[1] == name
                    for key in gin.config._CONFIG)]  # pylint: disable=protected-access
  assert entries, f"{path} binds no entry point"
  for name in entries:
    signature = inspect.signature(inspect.unwrap(ENTRY_POINTS[name]))
    kwargs = {}
    for param in signature.parameters:
      try:
        kwargs[param] = _instantiate(gin.query_parameter(f"{name}.{param}"))
      except ValueError:
        continue  # Not bound: the function default applies.
    assert "model" in kwargs, f"{path}: {name}.model is not bound"
    assert _abstract_param_count(kwargs["model"]) > 0
    for value in kwargs.values():
      if isinstance(value, DatasetConfig):
        seqio.get_mixture_or_task(value.mixture_or_task_name)  # Raises for unknown names.
