"""`polyglot-jax precompile`: the train step compiled ahead of time, with its memory and FLOPs."""

import gin
import pytest

from polyglot_jax import cli
from polyglot_jax.commands import gin_setup
from polyglot_jax.commands import precompile

TINY = ["TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}"]


@pytest.fixture(autouse=True)
def _clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _report(batch_size: int) -> precompile.CompileReport:
  gin.clear_config()
  gin_setup.parse(["experiments/quickstart.gin"], [*TINY, f"BATCH_SIZE={batch_size}"])
  return precompile.precompile()


def test_reports_positive_sizes_and_a_bigger_batch_needs_more_temporaries(capsys):
  small, big = _report(8), _report(64)
  printed = capsys.readouterr().out
  assert "Per-device memory of the train step" in printed and "FLOPs per step" in printed
  assert small.mesh == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
  assert small.num_params == big.num_params > 0
  for report in (small, big):
    assert report.argument_bytes > 0 and report.output_bytes > 0 and report.temp_bytes > 0
    # The donated state comes back in place: every output but the metrics is aliased.
    assert 0 < report.alias_bytes <= report.output_bytes
  # Data parallel: the state is replicated, so only the batch and activations grow.
  assert big.temp_bytes > small.temp_bytes
  assert big.argument_bytes > small.argument_bytes
  assert big.analytic_flops == pytest.approx(8 * small.analytic_flops)
  assert big.xla_flops > small.xla_flops > 0


def test_a_mesh_that_does_not_fit_the_devices_is_one_line(capsys):
  code = cli.main(["precompile", "--gin_file=experiments/quickstart.gin",
                   "--gin.MeshConfig.data=3"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1
  assert "polyglot-jax precompile: error:" in err and "needs 3 devices but 8 are visible" in err
