"""Ahead-of-time compilation of the train step: per-device memory and FLOPs before a run.

`polyglot-jax precompile` reads the same gin files as `train`, builds the same `TrainSetup`
(state spec and jitted train step), then lowers and compiles the step for the mesh from
ShapeDtypeStructs that carry their shardings. Nothing is allocated and no data is read, so a
config that would not fit in device memory fails here, in a minute, instead of on a paid pod.
The estimate is for the devices this process sees (run it on the slice, or on one of its size).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from polyglot_jax.training import train_state
from polyglot_jax.training.setup import TrainConfig, TrainSetup


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


def _cost_flops(compiled: Any) -> float | None:
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):  # Some backends return one dict per program.
    costs = costs[0] if costs else None
  flops_value = (costs or {}).get("flops")
  return float(flops_value) if flops_value is not None and flops_value >= 0 else None


def compile_train_step(config: TrainConfig) -> CompileReport:
  """Lowers and compiles `config`'s train step for its mesh from abstract state and batch."""
  setup = TrainSetup.build(config)
  spec = setup.spec
  with setup.partitioner.activate():
    compiled = setup.train_step.lower(spec.abstract, setup.abstract_batch()).compile()
  memory = compiled.memory_analysis()
  stats = jax.devices()[0].memory_stats() or {}
  return CompileReport(
      mesh=dict(setup.partitioner.mesh.shape),
      num_params=train_state.param_count(spec.abstract.params),
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes),
      generated_code_bytes=int(memory.generated_code_size_in_bytes),
      peak_bytes=int(getattr(memory, "peak_memory_in_bytes", 0) or 0),
      xla_flops=_cost_flops(compiled),
      analytic_flops=setup.step_flops,
      bytes_limit=stats.get("bytes_limit"))


def precompile() -> CompileReport:
  """The `polyglot-jax precompile` entry: compiles `train`'s step from its gin bindings.

  Prints the report, and raises a one-line ValueError when the estimate exceeds the memory of
  a device, so a pod launch can be gated on it.
  """
  report = compile_train_step(TrainConfig())
  print(report.format(), flush=True)
  if report.bytes_limit and report.total_bytes > report.bytes_limit:
    raise ValueError(
        f"the train step needs {report.total_bytes / 2**30:.2f} GiB per device but a device has "
        f"{report.bytes_limit / 2**30:.2f} GiB; use a mesh that splits more (gin/mesh/), a "
        "smaller BATCH_SIZE, or train.num_microbatches.")
  return report
