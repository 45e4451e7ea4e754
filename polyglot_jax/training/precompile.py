"""Ahead-of-time compilation of the train step: per-device memory and FLOPs before a run.

`polyglot-jax precompile` reads the same gin files as `train`, builds the state spec and the
jitted train step exactly as `train` does, then lowers and compiles the step for the mesh from
ShapeDtypeStructs that carry their shardings. Nothing is allocated and no data is read, so a
config that would not fit in device memory fails here, in a minute, instead of on a paid pod.
The estimate is for the devices this process sees (run it on the slice, or on one of its size).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import gin
import jax
import numpy as np

from polyglot_jax.data import pipeline
from polyglot_jax.parallel.partitioning import MeshConfig, Partitioner
from polyglot_jax.training import flops, loop, step as step_lib, train_state

# The `train` arguments that shape the compiled step; the others (model_dir, steps...) do not.
_STEP_ARGUMENTS = ("model", "train_dataset_cfg", "optimizer", "mesh", "seed", "num_microbatches",
                   "sparsity", "trainable_params")


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """Per-device sizes XLA reports for the compiled train step, and its FLOPs.

  Attributes:
    mesh: mesh axis sizes.
    num_params: parameters of the model.
    argument_bytes, output_bytes, alias_bytes, temp_bytes, generated_code_bytes: XLA's
      per-device buffer sizes (`Compiled.memory_analysis()`); outputs aliased to donated
      arguments (the state) are counted in both arguments and outputs.
    peak_bytes: XLA's peak per-device memory (0 where the backend does not report it).
    xla_flops: per-device FLOPs from `Compiled.cost_analysis()`, None where unavailable.
    analytic_flops: training FLOPs of one global step (`flops.training_flops`).
    bytes_limit: per-device memory of the accelerator, None where unknown (CPU).
  """

  mesh: dict[str, int]
  num_params: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  generated_code_bytes: int
  peak_bytes: int
  xla_flops: float | None
  analytic_flops: float
  bytes_limit: int | None

  @property
  def total_bytes(self) -> int:
    """Live bytes per device: arguments, non-aliased outputs, temporaries and code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.generated_code_bytes)

  def format(self) -> str:
    gib = lambda n: f"{n / 2**30:.3f} GiB"
    lines = [
        f"Mesh {self.mesh}; {self.num_params:,} parameters.",
        "Per-device memory of the train step (XLA memory_analysis):",
        f"  arguments       {gib(self.argument_bytes)}  (state + batch)",
        f"  outputs         {gib(self.output_bytes)}  ({gib(self.alias_bytes)} aliased to "
        "donated arguments)",
        f"  temporaries     {gib(self.temp_bytes)}",
        f"  generated code  {gib(self.generated_code_bytes)}",
        f"  total           {gib(self.total_bytes)}"
        + (f"  (XLA peak {gib(self.peak_bytes)})" if self.peak_bytes else ""),
        f"  device memory   {gib(self.bytes_limit) if self.bytes_limit else 'unknown (CPU)'}",
        f"FLOPs per step: {self.analytic_flops:.3e} analytic (global)"
        + (f", {self.xla_flops:.3e} XLA cost analysis (per device)"
           if self.xla_flops is not None else ""),
    ]
    return "\n".join(lines)


def _train_arguments() -> dict[str, Any]:
  """The arguments gin passes to `loop.train` that shape the step: bindings over defaults."""
  parameters = inspect.signature(inspect.unwrap(loop.train)).parameters
  bindings = gin.get_bindings("train")
  args = {}
  for name in _STEP_ARGUMENTS:
    value = bindings.get(name, parameters[name].default)
    if value is gin.REQUIRED:
      raise ValueError(f"train.{name} is not bound; pass the gin files you would give "
                       "`polyglot-jax train` (e.g. --gin_file=experiments/quickstart.gin).")
    args[name] = value
  return args


def _abstract_batch(model: Any, cfg: Any, partitioner: Partitioner) -> dict[str, jax.Array]:
  """The global batch as ShapeDtypeStructs, from the feature converter (no data is read)."""
  return {name: jax.ShapeDtypeStruct(shape, np.int32, sharding=partitioner.batch_sharding)
          for name, shape in pipeline.batch_shapes(cfg, model.FEATURE_CONVERTER_CLS).items()}


def _cost_flops(compiled: Any) -> float | None:
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):  # Some backends return one dict per program.
    costs = costs[0] if costs else None
  flops_value = (costs or {}).get("flops")
  return float(flops_value) if flops_value is not None and flops_value >= 0 else None


def compile_train_step(model: Any, train_dataset_cfg: Any, optimizer: Any,
                       mesh: MeshConfig = MeshConfig(), seed: int = 0, num_microbatches: int = 1,
                       sparsity: Any = None, trainable_params: str | None = None) -> CompileReport:
  """Lowers and compiles `train`'s step for `mesh` from abstract state and batch."""
  partitioner = Partitioner(mesh)
  batch = _abstract_batch(model, train_dataset_cfg, partitioner)
  shapes = {name: x.shape for name, x in batch.items()}
  types = {name: x.dtype for name, x in batch.items()}
  spec = train_state.state_spec(model, optimizer, partitioner, shapes, types, sparsity=sparsity,
                                trainable_params=trainable_params)
  step = step_lib.make_train_step(model, spec, partitioner,
                                  learning_rate_fn=optimizer.learning_rate_fn,
                                  num_microbatches=num_microbatches, dropout_seed=seed)
  with partitioner.activate():
    compiled = step.lower(spec.abstract, batch).compile()
  memory = compiled.memory_analysis()
  stats = jax.devices()[0].memory_stats() or {}
  return CompileReport(
      mesh=dict(partitioner.mesh.shape),
      num_params=train_state.param_count(spec.abstract.params),
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      generated_code_bytes=int(memory.generated_code_size_in_bytes),
      peak_bytes=int(getattr(memory, "peak_memory_in_bytes", 0) or 0),
      xla_flops=_cost_flops(compiled),
      analytic_flops=flops.batch_training_flops(model.config, shapes),
      bytes_limit=stats.get("bytes_limit"))


def precompile() -> CompileReport:
  """The `polyglot-jax precompile` entry: compiles `train`'s step from its gin bindings.

  Prints the report, and raises a one-line ValueError when the estimate exceeds the memory of
  a device, so a pod launch can be gated on it.
  """
  report = compile_train_step(**_train_arguments())
  print(report.format(), flush=True)
  if report.bytes_limit and report.total_bytes > report.bytes_limit:
    raise ValueError(
        f"the train step needs {report.total_bytes / 2**30:.2f} GiB per device but a device has "
        f"{report.bytes_limit / 2**30:.2f} GiB; use a mesh that splits more (gin/mesh/), a "
        "smaller BATCH_SIZE, or train.num_microbatches.")
  return report
